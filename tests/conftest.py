"""Shared test material: small configs, padded batches, and transformers' MegatronBert* as the oracle."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from exporter.sources import demo
from runtime.heads import HEADS as SPECS
from runtime.threads import VARIABLE as THREADS

ROOT = Path(__file__).resolve().parent.parent

# pytest-xdist's workers share the cores: the engines of each (and of what it starts) get its share, not
# every core, so that the workers do not wait on one another
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    share = len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault(THREADS, str(max(1, share)))
    torch.set_num_threads(int(os.environ[THREADS]))
DEMO_VOCAB = demo.VOCAB

HEADS = list(SPECS)  # every head the runtime declares

HF_CLASSES = {
    "base": "MegatronBertModel",
    "mlm": "MegatronBertForMaskedLM",
    "causal-lm": "MegatronBertForCausalLM",
    "nsp": "MegatronBertForNextSentencePrediction",
    "pretraining": "MegatronBertForPreTraining",
    "sequence-classification": "MegatronBertForSequenceClassification",
    "multiple-choice": "MegatronBertForMultipleChoice",
    "token-classification": "MegatronBertForTokenClassification",
    "qa": "MegatronBertForQuestionAnswering",
}

# Two HF config dicts: a plain tiny one, and one with odd sizes and another activation.
CONFIGS = {
    "tiny": dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=64),
    "odd": dict(vocab_size=1003, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                intermediate_size=100, max_position_embeddings=80, num_labels=5, hidden_act="gelu_new",
                layer_norm_eps=1e-5),
}


def hf_config(name: str, head: str, **overrides):
    transformers = pytest.importorskip("transformers")
    values = {**CONFIGS[name], **overrides}
    if head == "qa":
        values["num_labels"] = 2  # HF's QA head splits exactly two logits
    if head == "causal-lm":
        values["is_decoder"] = True
    return transformers.MegatronBertConfig(**values)


def hf_model(head: str, config, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    model = getattr(transformers, HF_CLASSES[head])(config).eval()
    with torch.no_grad():  # HF zero-inits biases and LayerNorm shifts; randomize them so they are tested
        for name, param in model.named_parameters():
            if name.endswith("bias") or "ln" in name or "LayerNorm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def save_hf(head: str, directory: Path, config_name: str = "tiny", seed: int = 0, **overrides):
    """A HF checkpoint directory written by transformers itself, with a vocab.txt that fits its
    vocabulary (the demo's first tokens); returns the transformers model."""
    model = hf_model(head, hf_config(config_name, head, **overrides), seed)
    model.save_pretrained(directory)
    vocab = DEMO_VOCAB.read_text().splitlines()[:model.config.vocab_size]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return model


def padded_batch(vocab_size: int, batch: int = 2, length: int = 11, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch whose second row is right-padded, with two segments (token types 0 and 1)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, length // 2:] = 1
    for row in range(1, batch):
        attention_mask[row, length - 3 - row:] = 0
        input_ids[row, length - 3 - row:] = 0
        token_type_ids[row, length - 3 - row:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def head_inputs(head: str, batch: dict[str, torch.Tensor], num_choices: int = 3) -> dict[str, torch.Tensor]:
    """The batch in the form a head takes: choices stacked for multiple-choice, no token types for causal-lm."""
    if head == "multiple-choice":
        return {k: torch.stack([v.roll(i, dims=1) for i in range(num_choices)], dim=1) for k, v in batch.items()}
    if head == "causal-lm":
        return {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


def hf_outputs(head: str, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    if head == "base":
        return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
    if head == "pretraining":
        return {"prediction_logits": out.prediction_logits, "seq_relationship_logits": out.seq_relationship_logits}
    if head == "qa":
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}
    return {"logits": out.logits}


def our_outputs(head: str, model, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if head == "causal-lm":
            logits, _ = model(inputs["input_ids"], inputs["attention_mask"])
            return {"logits": logits}
        return model(**inputs)


# Limits for artifacts of the tiny config (64 positions): room for batch 3 x 37 tokens, 4 choices,
# and a causal-LM cache of 16.
def tiny_limits(head: str) -> dict[str, int]:
    limits = dict(max_batch=4, max_sequence=48)
    if head == "multiple-choice":
        limits["max_choices"] = 4
    if head == "causal-lm":
        limits["max_past"] = 16
    return limits


# The modules with the longest fixtures of their own run first (pytest-xdist hands them to different test
# processes): the build-all over the trained demo and the served artifacts then overlap everything else,
# and no process waits at the end for a long module that started last.
FIRST = ("test_task_accuracy.py", "test_triton_server.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@pytest.fixture(scope="session", autouse=True)
def own_cache(tmp_path_factory):
    """Exported graphs, OpenVINO's compiled models and backend="auto"'s choices in the test run's own
    folder, not ~/.cache; shared by the run's processes (pytest-xdist's workers), so that a graph one of
    them exported is not exported again by another."""
    before = os.environ.get("MEGATRON_DEPLOY_CACHE")
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "cache"
    cache.mkdir(exist_ok=True)
    os.environ["MEGATRON_DEPLOY_CACHE"] = str(cache)
    yield
    if before is None:
        del os.environ["MEGATRON_DEPLOY_CACHE"]
    else:
        os.environ["MEGATRON_DEPLOY_CACHE"] = before


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """A transformers checkpoint directory of every head of the tiny config: head -> (directory, HF model)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {head: (root / head, save_hf(head, root / head)) for head in HEADS}


def shared_folder(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Path:
    """A folder that `make` fills once per test run, for tests to read: under pytest-xdist, the first
    test process to ask makes it while the others wait for it, then all of them use it."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # the run's, above each process's own
    folder, complete = root / name, root / f"{name}.complete"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            make(folder)
            complete.touch()
    return folder


def build_all(checkpoints, out: Path, precision: str) -> None:
    """Every head built at `precision` into `out` (its manifest: out/HEAD.json)."""
    from exporter.pipeline.build import BuildOptions, build

    for head, (directory, _) in checkpoints.items():
        # Random weights: their task metrics mean nothing, so these artifacts are judged by their logits.
        build(BuildOptions(head=head, checkpoint=str(directory), out=out, precision=precision, eval_data="none",
                           **tiny_limits(head)), log=lambda message: None)


def built_at(precision: str, checkpoints, tmp_path_factory) -> dict:
    """Every head of the tiny config built at `precision` from its transformers checkpoint, once per test
    run: head -> (manifest path, HF model)."""
    out = shared_folder(tmp_path_factory, f"built-{precision}", lambda folder: build_all(checkpoints, folder, precision))
    return {head: (out / f"{head}.json", model) for head, (_, model) in checkpoints.items()}


@pytest.fixture(scope="session")
def built(hf_checkpoints, tmp_path_factory):
    """Every head of the tiny config exported from a transformers checkpoint: head -> (manifest, HF model)."""
    return built_at("fp32", hf_checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def built_int8(hf_checkpoints, tmp_path_factory):
    return built_at("int8", hf_checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def built_fp16(hf_checkpoints, tmp_path_factory):
    return built_at("fp16", hf_checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def built_int4(hf_checkpoints, tmp_path_factory):
    return built_at("int4", hf_checkpoints, tmp_path_factory)


@pytest.fixture(scope="session")
def serving_python() -> Path:
    """The Python of an environment of its own with `.[serve]` installed, editable so it runs this checkout
    (numpy<2, as Triton's Python backend needs), made once per project folder and pyproject.toml under ~/.cache."""
    key = hashlib.sha256(f"{ROOT}\n{(ROOT / 'pyproject.toml').read_text()}".encode()).hexdigest()[:12]
    environment = Path.home() / ".cache" / "megatron-deploy" / f"serve-env-{key}"
    python = environment / "bin" / "python"
    environment.parent.mkdir(parents=True, exist_ok=True)
    with open(environment.parent / f"{environment.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one test process makes it; the others wait, then use it
        if not (environment / "complete").exists():
            shutil.rmtree(environment, ignore_errors=True)
            # System site packages: the runtime's own requirements come from this environment; the serve
            # extra's numpy<2 shadows its numpy.
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(environment)], check=True)
            subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "-e", f"{ROOT}[serve]"], check=True)
            (environment / "complete").touch()
    return python


def run_onnx(path, feed: dict) -> dict:
    """Run an ONNX graph on CPU with numpy (or torch) inputs; outputs by name."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feed.items()})
    return dict(zip(names, values))


def torch_backend(checkpoint, head: str):
    """The reference PyTorch head of a checkpoint behind a Session, so a helper's logic can be fed the
    reference outputs instead of ONNX Runtime's."""
    from exporter.validation.task_metric import TorchBackend
    from exporter.sources.checkpoints import load

    return TorchBackend(load(head, checkpoint).model)


def assert_same_result(actual, expected, path="result"):
    """Equal structure, labels, spans and tokens; scores equal to ~1e-4."""
    import numpy as np

    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), path
        for key in expected:
            assert_same_result(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_result(a, e, f"{path}[{i}]")
    elif isinstance(expected, (float, np.ndarray)):
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-5, err_msg=path)
    else:
        assert actual == expected, path
