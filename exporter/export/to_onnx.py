"""Export: a reference head to ONNX graphs with dynamic axes, as `runtime.heads` declares them.

torch's exporter (torch.export + dynamo) traces the head at small example sizes; every declared
dynamic axis becomes a named symbolic dim (batch, sequence, ...). Weights over 256 MiB go to ONNX
external data. Each written graph passes onnx.checker's full check (which includes strict shape
inference), so what we hand on is a well-formed graph.
"""

from __future__ import annotations

import gc
import logging
import warnings
from pathlib import Path

import onnx
import onnx_ir
import torch
from torch import Tensor, nn
from torch.export import Dim

from runtime.heads import DYNAMIC_AXES, HeadSpec, TensorSpec, expand

from exporter.export import cache
from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import ForCausalLM, HeadModel
from exporter.model.samples import synthetic_inputs

OPSET = 20  # LayerNormalization (17) and Gelu (20) stay single ops, which TensorRT maps to fused layers
# Tracing sizes: all different (so torch.export cannot conclude two axes are one) and above 1
# (size-1 axes get specialized to constants).
# Weights over this (256 MiB) go to NAME.onnx.data: protobuf cannot hold over 2 GB at all, and external data
# is written tensor by tensor instead of as one whole serialized model (the 345M export peaks 3.8 GB lower).
# Other modules read it here (to_onnx.EXTERNAL_DATA_OVER), so one patch moves it everywhere.
EXTERNAL_DATA_OVER = 2**28
EXPORT_SIZES = {"batch": 2, "choices": 3, "sequence": 7, "past_sequence": 5, "total_sequence": 12}


def reference_outputs(model: HeadModel, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """The head's outputs for one graph's named inputs, named as the graph's outputs.

    For the causal LM that is one generation step: logits of the last position, and the key/value
    cache (passed in, if any, and returned grown) spelled out per layer.
    """
    if not isinstance(model, ForCausalLM):
        return model(**inputs)
    layers = range(model.bert.config.num_hidden_layers)
    past = None
    if "past_key_values.0.key" in inputs:
        past = [(inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"]) for i in layers]
    logits, present = model(inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], past)
    outputs = {"logits": logits[:, -1]}
    for i, (key, value) in zip(layers, present):
        outputs[f"present.{i}.key"], outputs[f"present.{i}.value"] = key, value
    return outputs


class GraphModule(nn.Module):
    """A head as one graph sees it: tensors in the declared input order, outputs in the declared order."""

    def __init__(self, model: HeadModel, inputs: list[TensorSpec], outputs: list[TensorSpec]):
        super().__init__()
        self.model = model
        self.input_names = [t.name for t in inputs]
        self.output_names = [t.name for t in outputs]

    def forward(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        outputs = reference_outputs(self.model, dict(zip(self.input_names, tensors)))
        return tuple(outputs[name] for name in self.output_names)


def export_graph(model: HeadModel, spec: HeadSpec, graph: str, config: MegatronBertConfig, path: Path) -> list[Path]:
    """Write one graph of `spec` to `path` (plus external data if large); returns the files written. An
    export of the same weights, config, graph and code is taken from the export cache."""
    size = weight_bytes(model)
    if size > cache.bound():  # could not be kept: no key worth computing
        return _export(model, spec, graph, config, path)
    settings = {"opset": OPSET, "sizes": EXPORT_SIZES, "external_over": EXTERNAL_DATA_OVER}
    entry = cache.key(model, spec, graph, config, settings, path.name if size > EXTERNAL_DATA_OVER else None)
    return cache.exported(entry, path, lambda target: _export(model, spec, graph, config, target))


def _export(model: HeadModel, spec: HeadSpec, graph: str, config: MegatronBertConfig, path: Path) -> list[Path]:
    hf_config = config.to_hf_dict()
    inputs = expand(spec.graphs[graph].inputs, hf_config)
    outputs = expand(spec.graphs[graph].outputs, hf_config)
    example = synthetic_inputs(inputs, EXPORT_SIZES, config, spec.padding_side)
    dims = {axis: Dim(axis, min=1) for axis in DYNAMIC_AXES}
    dynamic = tuple({i: dims[a] for i, a in enumerate(t.shape) if a in dims} for t in inputs)
    with warnings.catch_warnings(), _quiet("torch.onnx", "onnxscript"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            GraphModule(model, inputs, outputs), tuple(example[t.name] for t in inputs), dynamo=True,
            opset_version=OPSET, input_names=[t.name for t in inputs], output_names=[t.name for t in outputs],
            dynamic_shapes=(dynamic,), verbose=False)
        assert program is not None  # None only when exporting to a file directly
        for value, declared in zip(program.model.graph.outputs, outputs):
            # Name output axes as declared: the exporter would call a grown cache "sequence + past_sequence"
            value.shape = onnx_ir.Shape(declared.shape)
        program.save(str(path), external_data=weight_bytes(model) > EXTERNAL_DATA_OVER)
    forget_matched_graphs()
    check_graph(path)
    return written(path)


def forget_matched_graphs() -> None:
    """Make onnxscript's rewrite rules let go of the graph they last matched. The exporter's rules are
    module-level objects whose matchers keep their last match's graph (onnxscript 0.7), and through it
    an alias of every weight: the model's memory could not be freed before ONNX Runtime loads its own
    copy (1.2 GiB more at 345M). The state is set afresh at the start of every match, so clearing it is
    safe; tests/test_export.py checks that nothing else keeps the weights."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:
        return
    # issubclass of the type: isinstance would ask every object for __class__, which some answer with a warning
    for matcher in (o for o in gc.get_objects() if issubclass(type(o), SimplePatternMatcher)):
        for state in ("_graph", "_match", "_current_node", "_tracer"):
            if hasattr(matcher, state):
                setattr(matcher, state, None)


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def written(path: Path) -> list[Path]:
    """A graph file and its external data files (named after it), if any."""
    return [path, *sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file())]


def check_graph(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=True)


class _quiet:
    """Silence the exporter's chatty loggers (progress emoji, unrelated torchvision notices)."""

    def __init__(self, *names: str):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self) -> None:
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
