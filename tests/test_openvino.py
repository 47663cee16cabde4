"""The OpenVINO backend: every head equal to ONNX Runtime within its precision's tolerance, int8 from the
Q/DQ graph, bf16 only where the CPU has it (and the build validated it), the build's validation of its
forms, and backend="auto" picking the faster validated backend once per artifact and CPU."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from conftest import tiny_limits
from exporter.sources import checkpoints
from exporter.pipeline.build import BuildOptions, build
from runtime import Session, UserError, backend_choice, feeds, openvino_backend
from runtime.manifest import Manifest

pytest.importorskip("openvino", reason="OpenVINO is not installed (the openvino extra)")

ENCODERS = ["base", "mlm", "nsp", "pretraining", "sequence-classification", "multiple-choice",
            "token-classification", "qa"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Compiled models and auto's choices in a folder of each test's own."""
    monkeypatch.setenv("MEGATRON_DEPLOY_CACHE", str(tmp_path / "cache"))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("head", ENCODERS)
def test_every_encoder_head_equals_onnxruntime(built, head):
    manifest = built[head][0]
    openvino = Session(manifest, backend="openvino", precision="fp32")  # bf16 would be the default on a bf16 CPU
    onnxruntime = Session(manifest, backend="onnxruntime")
    assert (openvino.backend, openvino.precision) == ("openvino/CPU", "fp32")
    feed = feeds.feed(openvino.manifest, "model", backend_choice.timed_sizes(openvino.manifest, "model"))
    expected = onnxruntime.run(feed)
    actual = openvino.run(feed)
    assert set(actual) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-4, err_msg=name)


def test_helpers_and_generation_answer_as_with_onnxruntime(built):
    for backend in ("openvino", "onnxruntime"):
        qa = Session(built["qa"][0], backend=backend)
        assert qa.answer("Who built it?", "It was built by Ada in the year 1850.")
    answers = [Session(built["qa"][0], backend=b).answer("Who built it?", "It was built by Ada.")
               for b in ("openvino", "onnxruntime")]
    assert answers[0]["answer"] == answers[1]["answer"] and abs(answers[0]["score"] - answers[1]["score"]) < 1e-4
    # the causal LM's prefill, then decode steps with the KV cache fed back
    texts = [Session(built["causal-lm"][0], backend=b).generate("the bridge over", max_new_tokens=6)
             for b in ("openvino", "onnxruntime")]
    assert texts[0] == texts[1]


@pytest.mark.parametrize("head", ["qa", "causal-lm"])
def test_int8_runs_the_qdq_graph(built_int8, built, head):
    manifest = Manifest.load(built_int8[head][0])
    assert manifest.validation["forms"]["openvino"] is True
    session = Session(built_int8[head][0], backend="openvino")
    assert session.precision == "int8"
    assert {str(p).rsplit("/", 1)[-1] for p in session._backend.files.values()} == {
        g["tensorrt_file"] for g in manifest.graphs.values()} and all(".qdq." in g["tensorrt_file"]
                                                                      for g in manifest.graphs.values())
    graph = "prefill" if head == "causal-lm" else "model"
    feed = feeds.feed(session.manifest, graph, backend_choice.timed_sizes(session.manifest, graph))
    fp32 = Session(built[head][0], backend="onnxruntime").run(feed, graph)
    for name, value in session.run(feed, graph).items():
        assert cosine(value, fp32[name]) > manifest.validation["tolerance"]["min_cosine"], name
    if head == "causal-lm":  # prefill, then decode steps on OpenVINO's int8 cache
        assert session.generate("the bridge over", max_new_tokens=6).strip()


def test_bf16_only_where_the_cpu_has_it(built):
    if openvino_backend.native_bf16():
        assert Session(built["qa"][0], backend="openvino", precision="bf16").precision == "bf16"
    else:
        with pytest.raises(UserError, match="no native bf16"):
            Session(built["qa"][0], backend="openvino", precision="bf16")
    assert Session(built["qa"][0], backend="openvino", precision="fp32").precision == "fp32"
    with pytest.raises(UserError, match="unknown precision"):
        Session(built["qa"][0], backend="openvino", precision="fp8")
    with pytest.raises(UserError, match="is for the openvino backend"):
        Session(built["qa"][0], backend="onnxruntime", precision="fp32")


def test_a_cpu_with_bf16_gets_a_bf16_form_judged_by_the_bf16_bounds(hf_checkpoints, tmp_path, monkeypatch):
    """Runs on any CPU: where bf16 is not native OpenVINO computes the hinted form in fp32, which still
    shows that the build adds the form, judges it by [tolerance.bf16] and records its verdict."""
    monkeypatch.setattr(openvino_backend, "native_bf16", lambda: True)
    recipe = tmp_path / "unreachable-bf16.toml"
    recipe.write_text("[tolerance.bf16]\nmin_cosine = 1.01\n")
    options = dict(head="qa", checkpoint=str(hf_checkpoints["qa"][0]), eval_data="none", **tiny_limits("qa"))
    manifest = Manifest.load(build(BuildOptions(out=tmp_path / "out", recipe=str(recipe), **options), log=print))
    assert manifest.validation["passed"]
    assert manifest.validation["forms"] == {"onnxruntime": True, "openvino": True, "openvino bf16": False}


def test_threads_share_an_openvino_session(built):
    session = Session(built["qa"][0], backend="openvino")
    inputs = []
    for n in range(8):
        feed = feeds.feed(session.manifest, "model", backend_choice.timed_sizes(session.manifest, "model"))
        feed["input_ids"] = (feed["input_ids"] + n) % session.manifest.config["vocab_size"]
        inputs.append({k: v[:, :10 + n] for k, v in feed.items()})
    expected = [session.run(feed) for feed in inputs]
    got: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(i, session.run(inputs[i % 8]))) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, outputs in got.items():
        for name, value in expected[i % 8].items():
            np.testing.assert_array_equal(outputs[name], value)


def test_compiled_models_are_cached(built, tmp_path):
    Session(built["qa"][0], backend="openvino")
    assert any((tmp_path / "cache" / "openvino").iterdir())


def test_the_build_validates_openvino_and_a_failing_form_is_recorded_not_fatal(hf_checkpoints, tmp_path, monkeypatch,
                                                                                capsys):
    options = dict(head="qa", checkpoint=str(hf_checkpoints["qa"][0]), eval_data="none", **tiny_limits("qa"))
    good = Manifest.load(build(BuildOptions(out=tmp_path / "good", **options), log=print))
    assert good.validation["forms"] == {"onnxruntime": True, "openvino": True,
                                        **({"openvino bf16": True} if openvino_backend.native_bf16() else {})}
    assert "openvino" in good.validation["backends"]
    run = openvino_backend.OpenVinoBackend.run
    monkeypatch.setattr(openvino_backend.OpenVinoBackend, "run",
                        lambda self, graph, feed, keep=frozenset(): {k: v + 1 for k, v in run(self, graph, feed).items()})
    bad = Manifest.load(build(BuildOptions(out=tmp_path / "bad", **options), log=print))
    assert bad.validation["passed"] and bad.validation["forms"]["openvino"] is False
    assert "openvino failed validation" in capsys.readouterr().out


def test_openvino_is_not_validated_where_its_compiled_graphs_would_not_fit(hf_checkpoints, tmp_path, monkeypatch,
                                                                           capsys):
    """At 3.9B, compiling the fp32 graphs for OpenVINO passes 19 GiB: a build skips the form, says so,
    and backend="auto" then never picks it (it was not validated)."""
    monkeypatch.setattr(checkpoints, "available_memory", lambda: 2**10)  # less than the tiny graphs need
    options = dict(head="qa", checkpoint=str(hf_checkpoints["qa"][0]), eval_data="none", **tiny_limits("qa"))
    manifest = Manifest.load(build(BuildOptions(out=tmp_path, memory_check=False, **options), log=print))
    assert manifest.validation["passed"] and manifest.validation["forms"] == {"onnxruntime": True}
    assert "note: OpenVINO not validated: compiling these graphs needs about" in capsys.readouterr().out


def measured_as(monkeypatch, speeds: dict[str, float]) -> list[str]:
    """Make auto's timing say `speeds` (backend name prefix -> ms); returns the backends it timed."""
    timed: list[str] = []

    def milliseconds(backend, graph, feed):
        timed.append(backend.name.split("/")[0])
        backend.run(graph, feed)  # it runs
        return speeds[timed[-1]]

    monkeypatch.setattr(backend_choice, "milliseconds", milliseconds)
    return timed


@pytest.mark.parametrize("faster", ["openvino", "onnxruntime"])
def test_auto_picks_the_faster_once_per_artifact_and_cpu(built, monkeypatch, tmp_path, faster):
    timed = measured_as(monkeypatch, {faster: 1.0, ({"openvino", "onnxruntime"} - {faster}).pop(): 2.0})
    first = Session(built["qa"][0])
    assert first.backend.startswith(faster) and sorted(timed) == ["onnxruntime", "openvino"]
    choices = json.loads((tmp_path / "cache" / "choices.json").read_text())
    (entry,) = choices.values()
    assert entry["backend"] == faster and entry["ms"][faster] == 1.0
    timed.clear()
    assert Session(built["qa"][0]).backend.startswith(faster) and timed == []  # remembered, not measured again
    monkeypatch.setattr(backend_choice, "cpu", lambda: "another CPU")
    Session(built["qa"][0])
    assert len(timed) == 2  # another CPU measures again


def test_auto_never_picks_a_form_that_failed_validation(built, monkeypatch, tmp_path):
    copy = tmp_path / "qa"
    copy.mkdir()
    for file in built["qa"][0].parent.glob("qa.*"):
        shutil.copy(file, copy / file.name)
    manifest = json.loads((copy / "qa.json").read_text())
    manifest["validation"]["forms"]["openvino"] = False
    (copy / "qa.json").write_text(json.dumps(manifest))
    timed = measured_as(monkeypatch, {"openvino": 1.0, "onnxruntime": 2.0})
    assert Session(copy / "qa.json").backend.startswith("onnxruntime") and timed == []
    assert Session(copy / "qa.json", backend="openvino").backend == "openvino/CPU"  # asked for: the user's call
