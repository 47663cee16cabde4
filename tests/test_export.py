"""Every head exported to ONNX matches transformers' MegatronBertFor* on the same weights, at shapes
other than those it was traced and validated at, and its graphs are well-formed with named axes."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from conftest import CONFIGS, HEADS, head_inputs, hf_outputs, padded_batch, run_onnx
from exporter.sources.checkpoints import random_model
from exporter.model.config import MegatronBertConfig
from exporter.export.to_onnx import export_graph
from runtime.heads import HEADS as SPECS
from runtime.manifest import Manifest


def graph_path(manifest_path, graph="model"):
    manifest = Manifest.load(manifest_path)
    return manifest_path.parent / manifest.graphs[graph]["file"]


@pytest.mark.parametrize("head", [h for h in HEADS if h != "causal-lm"])
def test_onnx_matches_transformers(head, built):
    manifest_path, hf = built[head]
    batch = padded_batch(hf.config.vocab_size, batch=3, length=37)
    for choices in (2, 4) if head == "multiple-choice" else (3,):
        inputs = head_inputs(head, batch, num_choices=choices)
        expected = hf_outputs(head, hf, inputs)
        actual = run_onnx(graph_path(manifest_path), inputs)
        assert set(actual) == set(expected)
        for name, value in expected.items():
            assert actual[name].shape == tuple(value.shape)
            np.testing.assert_allclose(actual[name], value.numpy(), atol=1e-4, rtol=0, err_msg=name)


def test_causal_lm_prefill_matches_transformers(built):
    manifest_path, hf = built["causal-lm"]
    ids = padded_batch(hf.config.vocab_size, batch=3, length=37)["input_ids"]
    positions = torch.arange(37).expand(3, -1)
    actual = run_onnx(graph_path(manifest_path, "prefill"),
                      {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions})
    with torch.no_grad():
        expected = hf(input_ids=ids).logits[:, -1]
    np.testing.assert_allclose(actual["logits"], expected.numpy(), atol=1e-4, rtol=0)
    assert actual["present.1.value"].shape == (3, hf.config.num_attention_heads, 37, 8)


@pytest.mark.parametrize("head", HEADS)
def test_graphs_are_checked_and_axes_named(head, built):
    manifest_path, _ = built[head]
    manifest = Manifest.load(manifest_path)
    assert manifest.validation["passed"] and manifest.validation["cases"]
    for graph, declared in manifest.graphs.items():
        path = manifest_path.parent / declared["file"]
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
        for tensors, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
            got = [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
            assert got == [(t["name"], t["shape"]) for t in declared[tensors]], (graph, tensors)


def test_heads_declare_the_ecosystem_names():
    names = {h: [t.name for g in s.graphs.values() for t in g.inputs + g.outputs] for h, s in SPECS.items()}
    assert names["qa"] == ["input_ids", "attention_mask", "token_type_ids", "start_logits", "end_logits"]
    assert names["base"][-2:] == ["last_hidden_state", "pooler_output"]
    assert names["pretraining"][-2:] == ["prediction_logits", "seq_relationship_logits"]
    assert set(SPECS["causal-lm"].graphs) == {"prefill", "decode"}
    assert "past_key_values.{layer}.key" in names["causal-lm"] and "present.{layer}.value" in names["causal-lm"]
    assert SPECS["multiple-choice"].graphs["model"].inputs[0].shape == ("batch", "choices", "sequence")


def test_export_keeps_no_alias_of_the_weights(tmp_path):
    """Once exported, nothing but the model holds its weights, so the build can free them before ONNX
    Runtime loads its own copy (onnxscript's rewrite rules used to keep the last graph, weights and all)."""
    loaded = random_model("qa", MegatronBertConfig.from_hf_dict(CONFIGS["tiny"]))
    export_graph(loaded.model, SPECS["qa"], "model", loaded.config, tmp_path / "qa.onnx")
    storages = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    loaded.model.to("meta")
    gc.collect()
    aliases = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.device.type == "cpu"
               and not isinstance(o, FakeTensor) and o.untyped_storage().data_ptr() in storages]
    assert aliases == []


def test_an_export_is_reused_only_for_the_same_weights_config_and_graph(tmp_path, monkeypatch):
    """The export cache: the same weights, config and graph are exported once (the second build copies
    the graph, byte for byte); another weight or config exports again; a bound of 0 turns it off."""
    from exporter.export import to_onnx

    monkeypatch.setenv("MEGATRON_DEPLOY_CACHE", str(tmp_path / "cache"))
    exports: list[str] = []
    real = to_onnx._export
    monkeypatch.setattr(to_onnx, "_export", lambda model, spec, graph, config, path: exports.append(path.name)
                        or real(model, spec, graph, config, path))
    config = MegatronBertConfig.from_hf_dict({**CONFIGS["tiny"], "num_labels": 2})
    model = random_model("qa", config).model
    export_graph(model, SPECS["qa"], "model", config, tmp_path / "first.onnx")
    export_graph(model, SPECS["qa"], "model", config, tmp_path / "second.onnx")
    assert exports == ["first.onnx"]
    assert (tmp_path / "first.onnx").read_bytes() == (tmp_path / "second.onnx").read_bytes()
    with torch.no_grad():
        model.qa_outputs.weight[0, 0] += 1e-3  # one weight
    export_graph(model, SPECS["qa"], "model", config, tmp_path / "changed.onnx")
    other = MegatronBertConfig.from_hf_dict({**CONFIGS["tiny"], "num_labels": 2, "layer_norm_eps": 1e-6})
    export_graph(random_model("qa", other).model, SPECS["qa"], "model", other, tmp_path / "config.onnx")
    assert exports == ["first.onnx", "changed.onnx", "config.onnx"]
    monkeypatch.setenv("MEGATRON_DEPLOY_EXPORT_CACHE_BYTES", "0")
    export_graph(model, SPECS["qa"], "model", config, tmp_path / "off.onnx")
    assert exports[-1] == "off.onnx"
