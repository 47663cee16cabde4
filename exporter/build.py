"""`build`: checkpoint -> reference head -> ONNX graph(s) -> precision -> validation -> artifact.

Everything is made in a staging directory inside the output directory. Only an artifact that passed
validation is moved into place (each file by an atomic rename, the manifest last), so an interrupted
or failed build leaves the previous artifact of that name as it was. A failed one is kept in
`OUT/NAME.failed/` for inspection, where no Session looks for it.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterator

import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

from runtime.errors import UserError
from runtime.heads import TensorSpec, expand, graph_file
from runtime.manifest import Manifest
from runtime.tokenizer import load_tokenizer

from . import checkpoints, demo
from .checkpoints import LoadedModel
from .config import MegatronBertConfig
from .onnx_export import export_graph
from .precision import to_fp16
from .recipes import PRECISIONS, Recipe, load_recipe
from .validate import summary, table, validate

SPECIAL_TOKENS = {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]", "mask": "[MASK]", "unk": "[UNK]"}


class ValidationFailed(Exception):
    """The artifact was built but does not agree with PyTorch within the recipe's tolerance."""


@dataclass
class BuildOptions:
    head: str
    precision: str = "fp32"
    checkpoint: str | None = None  # default: the recipe's
    tokenizer: str | None = None  # default: the recipe's, else found beside the checkpoint
    lowercase: bool | None = None  # for a vocab.txt tokenizer
    out: Path = Path("artifacts")
    name: str | None = None  # default: the head
    recipe: str | None = None  # default: recipes/<head>.toml
    max_batch: int | None = None
    max_sequence: int | None = None
    max_choices: int | None = None
    max_past: int | None = None
    allow_random_head: bool = False


Log = Callable[[str], None]


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(log: Log, what: str) -> Iterator[None]:
    log(f"- {what} ...")
    start = time.perf_counter()
    yield
    log(f"  done in {time.perf_counter() - start:.1f} s")


def build(options: BuildOptions, log: Log = _say) -> Path:
    """Build one artifact; returns its manifest's path. Raises UserError or ValidationFailed."""
    recipe = load_recipe(options.head, options.recipe)
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if options.precision == "int8":
        raise UserError("--precision int8 (calibrated Q/DQ) is not implemented yet (issue #5); "
                        "use fp32 or fp16")
    explicit = {axis for axis, value in (("batch", options.max_batch), ("sequence", options.max_sequence),
                                         ("choices", options.max_choices), ("past_sequence", options.max_past))
                if value is not None}
    recipe = recipe.with_limits(batch=options.max_batch, sequence=options.max_sequence,
                                choices=options.max_choices, past_sequence=options.max_past)
    name = options.name or options.head
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise UserError(f"--name {name!r} must be a plain file name (no directories, not hidden)")
    out = Path(options.out)
    check_writable(out)

    checkpoint = options.checkpoint or recipe.checkpoint
    with step(log, f"loading the {options.head} head from {checkpoint}"):
        loaded = load_model(options.head, checkpoint, recipe, options.allow_random_head)
    report_load(loaded, log)
    recipe, notes = recipe.fit_to(loaded.config, explicit)
    for note in notes:
        log(f"  note: {note}")
    tokenizer = pick_tokenizer(checkpoint, options.tokenizer or recipe.tokenizer, options.lowercase, loaded)

    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=out))
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror})") from None
    try:
        manifest = make_artifact(loaded, recipe, options.precision, name, tokenizer, staging, log)
        if not manifest.validation["passed"]:
            failed = out / f"{name}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(staging, failed)
            raise ValidationFailed(f"validation failed: the {options.precision} artifact differs from PyTorch "
                                   f"beyond the recipe's tolerance; kept for inspection in {failed}, not "
                                   f"installed as {out / name}.json")
        publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"wrote {out / name}.json ({', '.join(manifest.files)})")
    return out / f"{name}.json"


def check_writable(out: Path) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write to {existing} (permission denied)")


def load_model(head: str, checkpoint: str, recipe: Recipe, allow_random_head: bool) -> LoadedModel:
    """`checkpoint` is a path, "demo", or "random:CONFIG.json" (seeded random weights of that config)."""
    if checkpoint == "demo":
        return demo.demo_model(head, recipe.demo.get("labels"))
    if checkpoint.startswith("random:"):
        return checkpoints.random_model(head, MegatronBertConfig.from_json_file(checkpoint.removeprefix("random:")))
    return checkpoints.load(head, checkpoint, allow_random_head=allow_random_head)


def report_load(loaded: LoadedModel, log: Log) -> None:
    report = loaded.report
    for note in report.notes:
        log(f"  note: {note}")
    if report.unused:
        log(f"  {len(report.unused)} checkpoint weights are not used by this head: {', '.join(report.unused[:8])}"
            + (" ..." if len(report.unused) > 8 else ""))
    if report.randomly_initialized:
        log(f"  warning: head weights missing from the checkpoint were randomly initialized: "
            f"{', '.join(report.randomly_initialized)}")


def pick_tokenizer(checkpoint: str, tokenizer: str | None, lowercase: bool | None, loaded: LoadedModel) -> Tokenizer:
    if tokenizer is None:
        if checkpoint == "demo":
            tokenizer = str(demo.VOCAB)
        elif Path(checkpoint).is_dir() and any((Path(checkpoint) / n).exists() for n in ("tokenizer.json", "vocab.txt")):
            tokenizer = checkpoint
        else:
            raise UserError(f"no tokenizer.json or vocab.txt with the checkpoint {checkpoint}; pass --tokenizer PATH")
    loaded_tokenizer = load_tokenizer(tokenizer, lowercase)
    size, vocab = loaded_tokenizer.get_vocab_size(), loaded.config.vocab_size
    if size > vocab:
        raise UserError(f"the tokenizer at {tokenizer} has {size} tokens but the model's vocabulary has {vocab}: "
                        "they do not belong together")
    return loaded_tokenizer


def make_artifact(loaded: LoadedModel, recipe: Recipe, precision: str, name: str, tokenizer: Tokenizer,
                  staging: Path, log: Log) -> Manifest:
    """Write the graphs, tokenizer and manifest of one artifact into `staging`."""
    spec, config = recipe.spec, loaded.config
    hf_config = config.to_hf_dict()
    files: list[str] = []
    graph_paths = {}
    for graph in spec.graphs:
        path = staging / graph_file(name, graph)
        fp32_path = path if precision == "fp32" else staging / "fp32" / path.name
        fp32_path.parent.mkdir(exist_ok=True)
        with step(log, f"exporting {path.name} (fp32)"):
            written = export_graph(loaded.model, spec, graph, config, fp32_path)
        if precision == "fp16":
            with step(log, f"converting {path.name} to fp16"):
                written = to_fp16(fp32_path, path)
        files += [f.name for f in written]
        graph_paths[graph] = path

    tolerance = recipe.tolerance[precision]
    with step(log, f"validating against PyTorch on {len(graph_paths) * 4} input shapes (ONNX Runtime, CPU)"):
        results = validate(loaded.model, spec, config, graph_paths, recipe.shape_limits, tolerance)
    log(table(results))

    shutil.rmtree(staging / "fp32", ignore_errors=True)
    tokenizer_file = f"{name}.tokenizer.json"
    tokenizer.save(str(staging / tokenizer_file))
    manifest = Manifest(
        name=name, head=spec.name, precision=precision, config=hf_config,
        graphs={graph: {"file": graph_file(name, graph),
                        "inputs": [_tensor(t) for t in expand(g.inputs, hf_config)],
                        "outputs": [_tensor(t) for t in expand(g.outputs, hf_config)]}
                for graph, g in spec.graphs.items()},
        shape_limits=recipe.shape_limits,
        tokenizer={"file": tokenizer_file, "max_length": recipe.shape_limits["sequence"][2],
                   "padding_side": spec.padding_side,
                   "special_tokens": {role: {"token": token, "id": tokenizer.token_to_id(token)}
                                      for role, token in SPECIAL_TOKENS.items()
                                      if tokenizer.token_to_id(token) is not None}},
        task=recipe.task, validation=summary(results, precision, tolerance), versions=versions(),
        source={"checkpoint": loaded.report.source, "kind": loaded.report.kind, "sha256": loaded.report.sha256,
                "notes": loaded.report.notes, "unused_weights": loaded.report.unused,
                "randomly_initialized": loaded.report.randomly_initialized},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    manifest.record_files(staging, [*files, tokenizer_file])
    manifest.save(staging / f"{name}.json")
    return manifest


def _tensor(t: TensorSpec) -> dict[str, object]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def versions() -> dict[str, str]:
    return {"exporter": metadata.version("megatron-deploy"), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def publish(staging: Path, out: Path, manifest: Manifest) -> None:
    """Move a validated artifact into `out`, manifest last; drop files only the old one listed."""
    manifest_name = f"{manifest.name}.json"
    try:
        old_files = set(Manifest.load(out / manifest_name).files)
    except UserError:  # no previous artifact (or an unreadable one): nothing of it to tidy
        old_files = set()
    for name in [*manifest.files, manifest_name]:
        os.replace(staging / name, out / name)
    for stale in old_files - set(manifest.files):
        if Path(stale).name == stale:  # only plain names: a manifest never reaches outside `out`
            (out / stale).unlink(missing_ok=True)

