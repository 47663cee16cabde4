"""runtime.Session itself: opening artifacts, checking inputs, threads, and no torch anywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime import Session, UserError, openvino_backend
from runtime.manifest import FORMAT_VERSION

ROOT = Path(__file__).resolve().parent.parent


def copy_artifact(manifest_path: Path, directory: Path) -> Path:
    directory.mkdir()
    manifest = json.loads(manifest_path.read_text())
    for name in [*manifest["files"], manifest_path.name]:
        shutil.copy(manifest_path.parent / name, directory / name)
    return directory / manifest_path.name


def qa_inputs(batch=2, length=12):
    ids = np.full((batch, length), 20, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def test_opens_from_manifest_or_model_file(built):
    qa = built["qa"][0]
    for path in (qa, qa.with_suffix(".onnx")):
        session = Session(path, backend="onnxruntime")
        assert session.backend == "onnxruntime/CPUExecutionProvider"
        assert session.run(qa_inputs())["start_logits"].shape == (2, 12)
    lm = built["causal-lm"][0]
    assert Session(lm.with_name("causal-lm.decode.onnx")).head.name == "causal-lm"


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("token_type_ids"), "missing token_type_ids"),
    (lambda f: f.update(extra=f["input_ids"]), "unexpected extra"),
    (lambda f: f.update(input_ids=f["input_ids"].astype(np.int32)), "input_ids has dtype int32, expected int64"),
    (lambda f: f.update(attention_mask=f["attention_mask"].tolist()), "must be a numpy array"),
    (lambda f: f.update(input_ids=f["input_ids"][0]), "has shape [12], expected [batch, sequence]"),
    (lambda f: f.update(attention_mask=f["attention_mask"][:, :5]), "axis sequence is 5 here but 12"),
    (lambda f: f.update({k: np.tile(v, (1, 5)) for k, v in f.items()}), "sequence of 60 is outside"),
    (lambda f: f.update({k: np.tile(v, (3, 1)) for k, v in f.items()}), "batch of 6 is outside"),
])
def test_bad_raw_inputs_are_clear_errors_and_the_session_stays_usable(built, change, message):
    feed = qa_inputs()
    change(feed)
    refused_and_still_usable(Session(built["qa"][0]), feed, message)


def refused_and_still_usable(session: Session, feed: dict, message: str) -> None:
    """`feed` is refused with a UserError saying `message`, and the session answers the next good feed."""
    with pytest.raises(UserError) as err:
        session.run(feed)
    assert message in str(err.value)
    outputs = session.run(qa_inputs())
    assert outputs["start_logits"].shape == outputs["end_logits"].shape == (2, 12)


def test_bad_text_inputs(built):
    qa = Session(built["qa"][0])
    with pytest.raises(UserError, match="non-empty"):
        qa.answer("", "some context")
    assert qa.answer("who", "the cat " * 200)["answer"]  # long contexts are windowed, not refused
    classifier = Session(built["sequence-classification"][0])
    with pytest.raises(UserError, match="empty text"):
        classifier.classify("   ")
    with pytest.raises(UserError, match="longer than this artifact's 48"):
        classifier.classify("the cat sat on the mat " * 100)
    with pytest.raises(UserError, match="2 texts but 1 pairs"):
        classifier.classify(["a", "b"], text_pair=["c"])
    with pytest.raises(UserError, match="no \\[MASK\\] token"):
        Session(built["mlm"][0]).fill_mask("nothing to fill")
    with pytest.raises(UserError, match="exceeds this artifact's cache of 16"):
        Session(built["causal-lm"][0]).generate("the sky", max_new_tokens=40)
    with pytest.raises(UserError, match="5 choices; this artifact takes 2 to 4"):
        Session(built["multiple-choice"][0]).choose("a", ["b", "c", "d", "e", "f"])
    assert classifier.classify("fine")["label"]  # still usable


def test_tampered_files_and_newer_manifests_are_refused(built, tmp_path):
    manifest_path = copy_artifact(built["qa"][0], tmp_path / "qa")
    onnx_file = manifest_path.with_suffix(".onnx")
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    with pytest.raises(UserError, match="sha256 mismatch"):
        Session(manifest_path)

    manifest_path = copy_artifact(built["qa"][0], tmp_path / "qa2")
    data = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**data, "format": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match="newer than this runtime reads"):
        Session(manifest_path)
    with pytest.raises(UserError, match="no manifest nothing.json"):
        Session(tmp_path / "nothing.onnx")
    with pytest.raises(UserError, match="expected an artifact's manifest"):
        Session(tmp_path / "qa2" / "qa.tokenizer.json.bak")
    with pytest.raises(UserError, match="unknown backend"):
        Session(manifest_path.with_name("qa.json"), backend="tvm")


def test_threads_share_a_session(built):
    session = Session(built["qa"][0])
    contexts = [f"the cat sat on the mat number {i} in the sun" for i in range(20)]
    expected = [session.answer("who sat", c) for c in contexts]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: session.answer("who sat", contexts[i % 20]), range(1000)))
    assert results == [expected[i % 20] for i in range(1000)]


def test_engines_take_the_threads_the_environment_gives_and_refuse_a_bad_count(built, monkeypatch):
    monkeypatch.setenv("MEGATRON_DEPLOY_THREADS", "1")
    ort_session = next(iter(Session(built["qa"][0], backend="onnxruntime")._backend.sessions.values()))
    assert ort_session.get_session_options().intra_op_num_threads == 1
    if openvino_backend.usable() is None:
        compiled = next(iter(Session(built["qa"][0], backend="openvino")._backend.compiled.values()))
        assert compiled.get_property("INFERENCE_NUM_THREADS") == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("MEGATRON_DEPLOY_THREADS", bad)
        with pytest.raises(UserError, match=f"MEGATRON_DEPLOY_THREADS='{bad}': give a whole number"):
            Session(built["qa"][0], backend="onnxruntime")


def test_runtime_works_without_torch(built):
    """The runtime in a process where torch (and the exporter) cannot be imported at all."""
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in ("torch", "exporter", "transformers"):
                    raise ImportError(f"blocked: {{name}}")

        sys.meta_path.insert(0, Block())
        import runtime
        session = runtime.Session({str(built["qa"][0])!r})
        print(session.answer("who sat", "the cat sat on the mat")["answer"])
        assert not any(m.split(".")[0] in ("torch", "exporter") for m in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() in "the cat sat on the mat"


def test_no_runtime_module_imports_one_that_imports_it_back():
    """Every import between runtime's modules, type-only ones too, runs one way: no circle."""
    import ast

    folder = ROOT / "runtime"
    modules = {p.stem for p in folder.glob("*.py")}
    imports: dict[str, set[str]] = {}
    for module in modules:
        found = set()
        for node in ast.walk(ast.parse((folder / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("runtime."):
                found.add(node.module.split(".")[1])
        imports[module] = found & modules - {"__init__"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in imports[start])

    circles = sorted(m for m in modules if reaches(m, m, {m}))
    assert not circles, f"import circles through {circles}"


def test_a_staged_artifact_is_measured_without_a_verdict(built, tmp_path):
    """The build measures forms through Session.staged: no validation verdict is needed (none is forged),
    while Session(path) keeps refusing an artifact that has none."""
    from runtime.backends import OnnxRuntimeBackend
    from runtime.manifest import Manifest

    path = copy_artifact(built["qa"][0], tmp_path / "staged")
    manifest = Manifest.load(path)
    manifest.validation = {}
    session = Session.staged(manifest, path.parent, OnnxRuntimeBackend({"model": path.parent / "qa.onnx"}))
    assert session.answer("who sat", "the cat sat on the mat")["answer"] in "the cat sat on the mat"
    manifest.validation = {"passed": False}
    manifest.save(path)
    with pytest.raises(UserError, match="failed validation"):
        Session(path)


def test_truncate_cuts_a_text_too_long_for_the_window_but_never_a_prompt(built):
    long = "the cat sat on the mat " * 100
    cut = Session(built["sequence-classification"][0], truncate=True)
    whole = cut.tokenizer.encode(long).ids
    encoding = cut.encode([long])[0]
    assert len(whole) > cut.max_length == len(encoding.ids)
    assert encoding.ids == [*whole[:cut.max_length - 1], whole[-1]]  # its end cut, [SEP] kept
    assert cut.classify(long)["label"] in cut.id2label.values()  # answered, not refused
    pair = cut.encode(["short"], [long])[0]
    assert len(pair.ids) == cut.max_length and pair.ids[:3] == cut.tokenizer.encode("short", long).ids[:3]
    with pytest.raises(UserError, match="longer than this artifact's"):
        Session(built["causal-lm"][0], truncate=True).generate("the sky " * 40, max_new_tokens=1)
    with pytest.raises(UserError, match="truncate must be true or false"):
        Session(built["sequence-classification"][0], truncate="yes")


def test_a_list_of_texts_runs_in_batches_packed_by_length_each_answered_as_alone(built):
    """Helpers sort a list's texts by length and pad each batch to its own longest: fewer padded tokens,
    the same answers, in the order given."""
    sizes = [12, 1, 9, 2, 11, 1, 7, 3, 14]  # words of 3 tokens; the artifact's batch is 4: three batches
    texts = [" ".join(["ada"] * n) for n in sizes]
    for head, ask in (("base", lambda s, t: s.embed(t, pooling="mean")),
                      ("token-classification", lambda s, t: [[g["score"] for g in found] for found in s.tag(t, aggregation="none")])):
        session = Session(built[head][0])
        inner, lengths = session._backend, []

        class Recording:
            name = inner.name

            def run(self, graph, feed, keep=frozenset()):
                lengths.append(feed["input_ids"].shape)
                return inner.run(graph, feed, keep)

        session._backend = Recording()
        together = ask(session, texts)
        assert [rows for rows, _ in lengths] == [4, 4, 1]
        longest = max(len(e.ids) for e in session.encode(texts))
        assert [length for _, length in lengths] == sorted(length for _, length in lengths)
        assert lengths[0][1] < longest == lengths[-1][1]  # the short ones were not padded to the longest
        for text, answer in zip(texts, together):
            np.testing.assert_allclose(ask(session, [text])[0], answer, rtol=1e-4, atol=1e-5)
