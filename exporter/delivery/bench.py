"""`python -m exporter bench`: latency, throughput and memory of artifacts, side by side with PyTorch.

Each artifact runs through `runtime.Session` on every backend this machine has (ONNX Runtime with each
available provider; TensorRT where the artifact has engines and TensorRT runs), on the same random
inputs; `--vs-pytorch` times the reference PyTorch head (rebuilt from the manifest's source) in the
same process. Causal LMs are timed as generation: time to first token, per-token decode latency,
and end-to-end tokens/s, against PyTorch with and without a KV cache (and transformers' generate()
where installed).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch

from runtime import Session, feeds, openvino_backend, tensorrt_backend
from runtime.backends import OnnxRuntimeBackend
from runtime.machine import describe, timed
from runtime.errors import UserError
from runtime.evaluation import evaluate, fitting, read_examples
from runtime.generation import Generator, SamplingOptions
from runtime.manifest import Manifest
from runtime.manifest_schema import QUANTIZED
from runtime.pinned import find_manifest

from exporter.sources import checkpoints
from exporter.validation.task_metric import TorchBackend
from exporter.pipeline.build import versions
from exporter.model.config import MegatronBertConfig
from exporter.model.megatron_bert import HeadModel
from exporter.export.to_onnx import reference_outputs
from exporter.validation.logits import compare


@dataclass
class Figures:
    artifact: str
    precision: str
    backend: str
    batch: int
    sequence: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    sequences_per_s: float
    tokens_per_s: float
    peak_rss_mib: float
    speedup: float | None = None  # over PyTorch eager on the same inputs
    cosine: float | None = None  # of the outputs with PyTorch fp32's on the same inputs (the lowest output's)
    # causal LM generation: time to first token, per-token decode latency
    first_token_ms: float | None = None
    per_token_ms: float | None = None
    task: str | None = None  # the head's task metric on the artifact's evaluation set, e.g. "exact_match 86.50"


def peak_rss_reset() -> None:
    """Start a new peak-memory window (Linux: clear_refs 5 resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def figures(artifact: str, precision: str, backend: str, batch: int, sequence: int, times: np.ndarray,
            tokens: int) -> Figures:
    p50, p90, p99 = (float(np.percentile(times * 1000, q)) for q in (50, 90, 99))
    mean = float(times.mean())
    return Figures(artifact, precision, backend, batch, sequence, p50, p90, p99, batch / mean, tokens / mean,
                   peak_rss_mib())


def sessions(path: Path) -> list[tuple[str, Callable[[], Session]]]:
    """Every way this machine can run the artifact: (label, opener)."""
    manifest = Manifest.load(find_manifest(path))
    preferred = [p for p in OnnxRuntimeBackend.PREFERENCE if p in ort.get_available_providers()]
    def onnxruntime(provider: str) -> Callable[[], Session]:
        chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        return lambda: Session(path, backend="onnxruntime", providers=chain)

    openers = [(f"onnxruntime/{p.removesuffix('ExecutionProvider')}", onnxruntime(p)) for p in preferred]
    if openvino_backend.usable() is None:  # int8: its Q/DQ graph; floats: fp32, and bf16 where the CPU has it
        float_precisions = ["fp32"] if manifest.precision in QUANTIZED else ["fp32", "bf16"][:1 + openvino_backend.native_bf16()]
        openers += [("openvino/CPU", partial(Session, path, backend="openvino", precision=p)) for p in float_precisions]
    if manifest.engines and tensorrt_backend.usable() is None:
        openers.append(("tensorrt", lambda: Session(path, backend="tensorrt")))
    return openers


def task_metric(manifest: Manifest) -> Callable[[Session], str | None]:
    """Measures the metric the build decided by, on the evaluation set the manifest names (where it is
    still here): the same figure `build` printed, beside the latency."""
    accuracy = manifest.accuracy
    if not accuracy or not Path(accuracy["data"]).is_file():
        return lambda session: None
    examples = read_examples(accuracy["data"], manifest.head)
    # over the examples that fit the artifact, as the build measured it
    return lambda session: f"{accuracy['metric']} {evaluate(session, fitting(session, examples)[0])[0][accuracy['metric']]:.2f}"


def with_task(results: list[Figures], task: str | None) -> list[Figures]:
    for r in results:
        r.task = task
    return results


def reference_model(manifest: Manifest) -> HeadModel:
    """The PyTorch head the artifact was built from: its checkpoint, or its seeded random weights."""
    source = manifest.source
    if source["kind"] == "random":
        seed = int(re.search(r"seed=(\d+)", source["checkpoint"]).group(1)) if "seed=" in source["checkpoint"] else 0  # type: ignore[union-attr]
        config = MegatronBertConfig.from_hf_dict(manifest.config)
        return checkpoints.random_model(manifest.head, config, seed).model.eval()
    if not Path(source["checkpoint"]).exists():
        raise UserError(f"--vs-pytorch needs the artifact's checkpoint, {source['checkpoint']}, which is not here")
    return checkpoints.load(manifest.head, source["checkpoint"], allow_random_head=True).model.eval()


def encoder_inputs(manifest: Manifest, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """A timing feed of the encoder graph (choices at the artifact's opt)."""
    choices = manifest.shape_limits.get("choices", [0, 0, 0])[1]
    return feeds.feed(manifest, "model", {"batch": batch, "sequence": sequence, "choices": choices})


def pytorch_outputs(model: HeadModel, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outputs = reference_outputs(model, {name: torch.from_numpy(value) for name, value in feed.items()})
    return {name: value.numpy() for name, value in outputs.items()}


def bench_encoder(path: Path, manifest: Manifest, batches: list[int], lengths: list[int], warmup: int,
                  iterations: int, model: HeadModel | None) -> list[Figures]:
    results = []
    feeds = {(batch, length): encoder_inputs(manifest, batch, length) for batch in batches for length in lengths}
    # PyTorch's outputs, made before any backend's memory is measured
    expected = {} if model is None else {size: pytorch_outputs(model, feed) for size, feed in feeds.items()}
    measure_task = task_metric(manifest)
    for label, open_session in sessions(path):
        peak_rss_reset()
        session = open_session()
        mine = []
        for batch in batches:
            for length in lengths:
                feed = feeds[batch, length]
                times = timed(partial(session.run, feed), warmup, iterations)
                result = figures(manifest.name, session.precision, label, batch, length, times,
                                 int(feed["attention_mask"].sum()))
                if expected:
                    actual = session.run(feed)
                    result.cosine = min(compare(value, actual[name], is_logits=False)[1]
                                        for name, value in expected[batch, length].items())
                mine.append(result)
        results += with_task(mine, measure_task(session))
        del session  # its memory is not the next backend's
    if model is not None:
        torch_results = []
        peak_rss_reset()
        for batch in batches:
            for length in lengths:
                tensors = {k: torch.from_numpy(v) for k, v in feeds[batch, length].items()}
                with torch.no_grad():
                    times = timed(lambda: model(**tensors), warmup, iterations)
                torch_results.append(figures(manifest.name, "fp32", "pytorch eager", batch, length, times,
                                             int(tensors["attention_mask"].sum())))
        for r in results:
            base = next(t for t in torch_results if (t.batch, t.sequence) == (r.batch, r.sequence))
            r.speedup = base.p50_ms / r.p50_ms
        results += with_task(torch_results, measure_task(Session(path, backend=TorchBackend(model))))
    return results


def bench_generation(path: Path, manifest: Manifest, batches: list[int], lengths: list[int], new_tokens: int,
                     iterations: int, model: HeadModel | None) -> list[Figures]:
    """Prompts of `length` tokens, `new_tokens` greedy tokens each, timed end to end and per step."""
    results: list[Figures] = []
    options = SamplingOptions(max_new_tokens=new_tokens, stop=())
    measure_task = task_metric(manifest)
    for label, open_session in sessions(path):
        peak_rss_reset()
        session = open_session()
        first = len(results)
        for batch in batches:
            for length in lengths:
                prompts = np.random.default_rng(0).integers(5, manifest.config["vocab_size"], (batch, length)).tolist()
                generator = Generator(session, options)
                generator.stop_ids = set()  # always make new_tokens tokens
                runs = [step_times(generator.steps(prompts)) for _ in range(iterations + 1)][1:]  # first: warm-up
                results.append(generation_figures(manifest, session.precision, label, batch, length, new_tokens, runs))
        with_task(results[first:], measure_task(session))
        del session, generator
    if model is not None:
        for batch in batches:
            for length in lengths:
                ids = torch.from_numpy(np.random.default_rng(0).integers(5, manifest.config["vocab_size"], (batch, length)))
                for label, steps in torch_generators(model, manifest, ids, new_tokens).items():
                    runs = [step_times(steps()) for _ in range(iterations + 1)][1:]
                    results.append(generation_figures(manifest, "fp32", label, batch, length, new_tokens, runs))
        with_task([r for r in results if r.backend == "pytorch kv cache"],
                  measure_task(Session(path, backend=TorchBackend(model))))
        onnx_rows = [r for r in results if not r.backend.startswith(("pytorch", "transformers"))]
        for r in onnx_rows:
            base = next(t for t in results if t.backend == "pytorch no cache" and (t.batch, t.sequence) == (r.batch, r.sequence))
            r.speedup = base.p50_ms / r.p50_ms
    return results


def step_times(steps: Any) -> np.ndarray:
    """Wall time at which each step of a generator finished, from the start."""
    start = time.perf_counter()
    marks = [time.perf_counter() - start for _ in steps]
    return np.array(marks)


def generation_figures(manifest: Manifest, precision: str, label: str, batch: int, length: int, new_tokens: int,
                       runs: list[np.ndarray]) -> Figures:
    totals = np.array([r[-1] for r in runs])
    result = figures(manifest.name, precision, label, batch, length, totals, batch * new_tokens)
    if all(len(r) == new_tokens for r in runs):  # a mark per token (transformers' generate() gives one in all)
        result.first_token_ms = float(np.median([r[0] for r in runs]) * 1000)
        result.per_token_ms = float(np.median([np.diff(r).mean() for r in runs]) * 1000) if new_tokens > 1 else None
    return result


def torch_generators(model: HeadModel, manifest: Manifest, ids: torch.Tensor, new_tokens: int
                     ) -> dict[str, Callable[[], Any]]:
    """Greedy generation in PyTorch: the full sequence each step, with our KV cache, and transformers'."""
    def no_cache() -> Any:
        tokens = ids
        with torch.no_grad():
            for _ in range(new_tokens):
                mask = torch.ones_like(tokens)
                logits = reference_outputs(model, {"input_ids": tokens, "attention_mask": mask,
                                                   "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)})["logits"]
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
                yield

    def cached() -> Any:
        with torch.no_grad():
            feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                    "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
            for _ in range(new_tokens):
                outputs = reference_outputs(model, feed)
                yield
                total = feed["attention_mask"].shape[1] + 1
                feed = {"input_ids": outputs["logits"].argmax(-1, keepdim=True),
                        "attention_mask": torch.ones(len(ids), total, dtype=torch.long),
                        "position_ids": torch.full((len(ids), 1), total - 1),
                        **{k.replace("present", "past_key_values"): v for k, v in outputs.items() if k.startswith("present.")}}

    generators: dict[str, Callable[[], Any]] = {"pytorch no cache": no_cache, "pytorch kv cache": cached}
    try:
        import transformers
    except ImportError:
        return generators
    hf = transformers.MegatronBertForCausalLM(transformers.MegatronBertConfig(**manifest.config)).eval()
    hf.load_state_dict(model.state_dict(), strict=False)

    def hf_generate() -> Any:
        with torch.no_grad():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        yield  # one mark: generate() gives no per-step times

    generators["transformers generate()"] = hf_generate
    return generators


def machine() -> dict[str, Any]:
    """The machine (runtime.machine) and the threads PyTorch runs on here."""
    return {**describe(), "torch_threads": torch.get_num_threads()}


def default_lengths(limits: list[int], plotting: bool) -> list[int]:
    """128 (or the artifact's max, if lower); for a plot, doublings from 8 up to the max, and the max."""
    low, _, high = limits
    if not plotting:
        return [max(low, min(128, high))]
    lengths = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if low <= n < high] + [high]
    if len(lengths) < 2:
        raise UserError(f"--plot: the artifact takes sequences of {low} to {high} tokens, too few lengths to plot")
    return lengths


def run(paths: list[Path], batches: list[int], asked: list[int] | None, warmup: int, iterations: int,
        vs_pytorch: bool, new_tokens: int, plotting: bool = False) -> list[Figures]:
    """Figures of each artifact at each batch x sequence length (`asked`, else `default_lengths`)."""
    results = []
    for path in paths:
        manifest = Manifest.load(find_manifest(path))
        lengths = asked or default_lengths(manifest.shape_limits["sequence"], plotting)
        for axis, values in (("batch", batches), ("sequence", lengths)):
            low, _, high = manifest.shape_limits[axis]
            outside = [v for v in values if not low <= v <= high]
            if outside:
                raise UserError(f"{path}: {axis} {outside} is outside the artifact's limits [{low}, {high}]")
        model = reference_model(manifest) if vs_pytorch else None
        if "prefill" in manifest.graphs:
            results += bench_generation(path, manifest, batches, lengths, new_tokens, iterations, model)
        else:
            results += bench_encoder(path, manifest, batches, lengths, warmup, iterations, model)
    return results


def table(results: list[Figures]) -> str:
    generation = any(r.first_token_ms is not None for r in results)
    header = (f"{'artifact':<14} {'precision':<9} {'backend':<26} {'batch':>5} {'seq':>5} {'p50 ms':>9} {'p90 ms':>9} "
              f"{'p99 ms':>9} {'seq/s':>8} {'tok/s':>9} {'peak MiB':>9} {'speedup':>8} {'cos vs pt':>9} {'task metric':>26}")
    if generation:
        header += f" {'1st tok ms':>10} {'ms/token':>9}"
    lines = [header]
    for r in results:
        speedup = "-" if r.speedup is None else f"{r.speedup:.2f}x"
        line = (f"{r.artifact:<14} {r.precision:<9} {r.backend:<26} {r.batch:>5} {r.sequence:>5} {r.p50_ms:>9.2f} "
                f"{r.p90_ms:>9.2f} {r.p99_ms:>9.2f} {r.sequences_per_s:>8.2f} {r.tokens_per_s:>9.1f} "
                f"{r.peak_rss_mib:>9.0f} {speedup:>8} {'-' if r.cosine is None else f'{r.cosine:.5f}':>9} {r.task or '-':>26}")
        if generation:
            line += "".join(f" {'-' if v is None else f'{v:.2f}':>{w}}" for v, w in ((r.first_token_ms, 10),
                                                                                    (r.per_token_ms, 9)))
        lines.append(line)
    return "\n".join(lines)


def write_json(results: list[Figures], settings: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps({"machine": machine(), "versions": versions(), "settings": settings,
                                "results": [asdict(r) for r in results]}, indent=1) + "\n")


def plot(results: list[Figures], path: Path) -> None:
    latency_figure(results).savefig(path)


def latency_figure(results: list[Figures]) -> Any:
    """Latency (p50) against sequence length, one line per artifact, backend and batch; the CPU in the title."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for key in dict.fromkeys((r.artifact, r.precision, r.backend, r.batch) for r in results):
        rows = sorted((r for r in results if (r.artifact, r.precision, r.backend, r.batch) == key),
                      key=lambda r: r.sequence)
        axes.plot([r.sequence for r in rows], [r.p50_ms for r in rows], marker="o",
                  label=f"{key[0]} {key[1]} {key[2]} b{key[3]}")
    lengths = sorted({r.sequence for r in results})
    axes.set_xscale("log", base=2)  # the lengths double: evenly spaced, the short ones not crowded
    axes.set_xticks(lengths, [str(n) for n in lengths])
    axes.minorticks_off()
    axes.set_xlabel("sequence length (tokens)")
    axes.set_ylabel("p50 latency (ms)")
    axes.set_ylim(bottom=0)
    here = machine()
    axes.set_title(f"{here['cpu']}, {here['cores']} cores ({', '.join(here['cpu_flags']) or 'no AVX2'})",
                   fontsize="small")
    axes.legend(fontsize="small")
    figure.tight_layout()
    return figure
