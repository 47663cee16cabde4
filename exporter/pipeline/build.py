"""`build`: checkpoint -> reference head -> ONNX graph(s) -> precision -> validation -> artifact.

Everything is made in a staging directory inside the output directory, and what one build carries
(its options, recipe, tokenizer, evaluation, staging folder, log) travels as one `BuildContext`. Only an
artifact that passed validation is published (`publish`: a new version folder, then one symlink swap),
so an interrupted or failed build leaves the previous artifact of that name as it was. A failed one is
kept in `OUT/NAME.failed/` for inspection, where no Session looks for it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from tokenizers import Tokenizer

from runtime import openvino_backend, tensorrt_backend
from runtime.errors import UserError
from runtime.files import read_json
from runtime.heads import HeadSpec, TensorSpec, expand, graph_file
from runtime.backends import Backend, OnnxRuntimeBackend
from runtime.openvino_backend import OpenVinoBackend
from runtime.manifest import Manifest
from runtime.pinned import FORM_SUFFIXES
from runtime.tensorrt_backend import TensorRTBackend
from runtime.threads import engine_threads
from runtime.tokenizer import load_tokenizer

from exporter.sources import checkpoints, demo
from exporter.pipeline.fp32_reference import ANCHOR_EXAMPLES, Fp32Reference, anchor, measured_beside
from exporter.validation.task_metric import Evaluation, evaluation_for
from exporter.sources.checkpoints import LoadedModel
from exporter.model.config import MegatronBertConfig
from exporter.export.to_onnx import export_graph, written
from exporter.precision.fp16 import to_fp16
from exporter.precision.int4 import Int4Settings
from exporter.errors import ValidationFailed
from exporter.pipeline.progress import Log, say, step
from exporter.pipeline.publish import publish, staging_folder
from exporter.pipeline.quantized import (SPECIAL_TOKENS, CalibrationSet, Int4, Int8, Quantized, calibration_problems,
                                         read_calibration_set, report_sensitive)
from exporter.pipeline.recipes import BUILD_BACKENDS, PRECISIONS, Recipe, load_recipe
from exporter.pipeline.options import BuildOptions
from exporter.tensorrt.engine import build_engine, profile_shapes
from exporter.tensorrt.parser_check import TABLE as TENSORRT_TABLE
from exporter.tensorrt.parser_check import graph_problems, load_structure, profile_problems
from exporter.validation.logits import Case, Comparison, failures, reference_cases, summary, table, validate

def build(options: BuildOptions, log: Log = say) -> Path:
    """Build one artifact; returns its manifest's path. Raises UserError or ValidationFailed."""
    recipe = load_recipe(options.head, options.recipe)
    if options.precision not in PRECISIONS:
        raise UserError(f"unknown precision {options.precision!r}; choose one of {', '.join(PRECISIONS)}")
    engines_wanted = wants_engines(options.backend, options.precision, log)
    if threads := engine_threads():  # PyTorch's share of the machine; the sessions read it themselves
        torch.set_num_threads(threads)
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
    check_name_is_free(out, name)
    # A bad evaluation or calibration set stops us before any work.
    evaluation = evaluation_for(recipe.head, recipe.evaluation, recipe.accuracy, options.eval_data)
    int4 = Int4Settings.from_recipe(recipe.int4, options.recipe or f"recipes/{options.head}.toml")
    calibration_set = read_calibration_set(recipe, options) if options.precision in ("int8", "int4") else None

    checkpoint = demo.resolve(options.checkpoint or recipe.checkpoint, options.head)
    with step(log, f"loading the {options.head} head from {checkpoint}"):
        loaded = load_model(options, checkpoint, recipe)
    report_load(loaded, log)
    recipe, notes = recipe.fit_to(loaded.config, explicit)
    for note in notes:
        log(f"  note: {note}")
    tokenizer = pick_tokenizer(checkpoint, options.tokenizer or recipe.tokenizer, options.lowercase, loaded)

    new_out = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = staging_folder(out, name)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror})") from None
    try:
        context = BuildContext(options, recipe, name, tokenizer, staging, evaluation, calibration_set, engines_wanted,
                               log, describe(loaded, recipe, options.precision, name, tokenizer), int4)
        manifest = make_artifact(context, loaded)
        if not manifest.validation["passed"]:
            failed = out / f"{name}.failed"
            shutil.rmtree(failed, ignore_errors=True)
            os.replace(staging, failed)
            problems = manifest.validation["problems"]
            raise ValidationFailed(f"validation failed: {'; '.join(problems[:3])}"
                                   f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}; the "
                                   f"{options.precision} artifact is kept for inspection in {failed}, not installed "
                                   f"as {out / name}.json")
        publish(staging, out, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if new_out and not any(out.iterdir()):  # a build that wrote nothing leaves no empty --out behind
            out.rmdir()
    log(f"wrote {out / name}.json ({', '.join(manifest.files)})")
    return out / f"{name}.json"


NO_INT4_ENGINES = ("int4 artifacts are MatMulNBits graphs, ONNX Runtime's own operator, which TensorRT's ONNX "
                   "parser does not take; they run on ONNX Runtime and OpenVINO")


def wants_engines(backend: str, precision: str, log: Log) -> bool:
    """Build TensorRT engines? "auto": where TensorRT and a GPU exist; "tensorrt": must (else exit 2)."""
    if backend not in BUILD_BACKENDS:
        raise UserError(f"unknown --backend {backend!r}; choose one of {', '.join(BUILD_BACKENDS)}")
    if backend == "onnxruntime":
        return False
    if precision == "int4":
        if backend == "tensorrt":
            raise UserError(f"--backend tensorrt: no TensorRT engines for int4: {NO_INT4_ENGINES}")
        return False
    reason = tensorrt_backend.usable()
    if reason is None:
        return True
    if backend == "tensorrt":
        raise UserError(f"--backend tensorrt: cannot build TensorRT engines here: {reason}")
    log(f"note: no TensorRT engine will be built ({reason}); building the ONNX Runtime artifact")
    return False


def check_name_is_free(out: Path, name: str) -> None:
    """Refuse a name whose files could be another artifact's in `out` (`qa.tokenizer` beside `qa` would
    overwrite qa.tokenizer.json; `qa.qdq` beside `qa` would be what `qa.qdq.onnx` opens), or that the tools
    reserve (build-all's index.json; verify skips NAME.tokenizer.json; a graph file's form suffixes)."""
    reserved = (".tokenizer", ".sig", *FORM_SUFFIXES)
    if name == "index" or name.endswith(reserved):
        raise UserError(f"--name {name!r} is reserved (index.json is build-all's index; a name may not end in "
                        f"{', '.join(reserved)}, which the tools read as a part of another artifact); choose another")
    for other in sorted(out.glob("*.json")) if out.is_dir() else []:
        if other.name in (f"{name}.json", "index.json") or other.name.endswith(".tokenizer.json"):
            continue
        try:
            theirs = {other.name, *Manifest.load(other).files}
        except UserError:  # not an artifact we can read: it owns nothing we know of
            continue
        clash = sorted(f for f in theirs if f.startswith(f"{name}."))
        if clash or name.startswith(f"{other.stem}."):
            raise UserError(f"--name {name!r}: files named {name}.* would clash with the artifact {other.stem!r} "
                            f"in {out} ({', '.join(clash or [other.name])}); choose another name")


def check_writable(out: Path) -> None:
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot write to {existing} (permission denied)")


def load_model(options: BuildOptions, checkpoint: str, recipe: Recipe) -> LoadedModel:
    """`checkpoint` is a path, "demo-random", or "random:CONFIG.json" (seeded random weights of that config)."""
    head, config = options.head, options.config
    if config is not None and (checkpoint == "demo-random" or checkpoint.startswith("random:")):
        raise UserError(f"--config applies to a checkpoint's weights; {checkpoint} has none (random:CONFIG.json "
                        "takes its config)")
    if checkpoint == "demo-random":
        return demo.random_demo_model(head, recipe.demo.get("labels"))
    if checkpoint.startswith("random:"):
        return checkpoints.random_model(head, MegatronBertConfig.from_json_file(checkpoint.removeprefix("random:")),
                                        memory_check=options.memory_check)
    given = read_json(Path(config), "config (--config)") if config is not None else None
    return checkpoints.load(head, checkpoint, config=given, allow_random_head=options.allow_random_head,
                            memory_check=options.memory_check)


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
        if checkpoint == "demo-random":
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


def give_back_freed_memory() -> None:
    """Return freed heap memory to the system. glibc keeps what PyTorch freed (weights, activations) for
    reuse, so ONNX Runtime's copy of the model would otherwise be counted on top of it (0.8 GiB at 345M)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        pass


@dataclass
class BuildContext:
    """What one build carries through its stages."""
    options: BuildOptions
    recipe: Recipe  # fitted to the checkpoint's config, with the shape limits asked for
    name: str
    tokenizer: Tokenizer
    staging: Path  # where the artifact is made
    evaluation: Evaluation | None  # the task metric's examples and bounds (None: logits decide)
    calibration_set: CalibrationSet | None  # int8 and int4 only
    engines_wanted: bool  # build TensorRT engines
    log: Log
    manifest: Manifest  # filled in as the build goes
    int4: Int4Settings  # how int4 weights are made (the recipe's [int4])
    cases: list[Case] = field(default_factory=list)  # validation inputs with PyTorch's outputs

    @property
    def spec(self) -> HeadSpec:
        return self.recipe.spec

    @property
    def precision(self) -> str:
        return self.options.precision


def describe(loaded: LoadedModel, recipe: Recipe, precision: str, name: str, tokenizer: Tokenizer) -> Manifest:
    """The manifest of what is about to be built: graphs, limits, tokenizer, task, source."""
    spec, hf_config = recipe.spec, loaded.config.to_hf_dict()
    return Manifest(
        name=name, head=spec.name, precision=precision, config=hf_config,
        graphs={graph: {"file": graph_file(name, graph),
                        "inputs": [_tensor(t) for t in expand(g.inputs, hf_config)],
                        "outputs": [_tensor(t) for t in expand(g.outputs, hf_config)]}
                for graph, g in spec.graphs.items()},
        shape_limits=recipe.shape_limits,
        tokenizer={"file": f"{name}.tokenizer.json", "max_length": recipe.shape_limits["sequence"][2],
                   "padding_side": spec.padding_side,
                   "special_tokens": {role: {"token": token, "id": tokenizer.token_to_id(token)}
                                      for role, token in SPECIAL_TOKENS.items()
                                      if tokenizer.token_to_id(token) is not None}},
        task=recipe.task, versions=versions(),
        source={"checkpoint": loaded.report.source, "kind": loaded.report.kind, "sha256": loaded.report.sha256,
                "notes": loaded.report.notes, "unused_weights": loaded.report.unused,
                "randomly_initialized": loaded.report.randomly_initialized})


def make_artifact(context: BuildContext, loaded: LoadedModel) -> Manifest:
    """Write the graphs (and engines), tokenizer and manifest of one artifact into the staging folder."""
    spec, config, precision, staging, log = context.spec, loaded.config, context.precision, context.staging, context.log
    recipe, manifest, evaluation, name = context.recipe, context.manifest, context.evaluation, context.name
    graphs = {graph: staging / graph_file(name, graph) for graph in spec.graphs}  # what ONNX Runtime runs
    for graph, path in graphs.items():
        with step(log, f"exporting {path.name} (fp32)"):
            export_graph(loaded.model, spec, graph, config, path)
    context.tokenizer.save(str(staging / manifest.tokenizer["file"]))
    if evaluation:
        asked = len(evaluation.examples)
        evaluation.prepare(loaded.model, manifest, staging)
        if evaluation.left_out:
            log(f"note: {len(evaluation.left_out)} of the {asked} evaluation examples do not fit this artifact and "
                f"are left out (first: {evaluation.left_out[0]})")
    # fp32's metric: in an fp32 build, its first form's that matches PyTorch; else the fp32 graphs', measured
    # beside converting them once they match PyTorch on the first examples (fp32_reference)
    anchor_cases: list[Case] | None = None
    if evaluation and precision != "fp32":
        if evaluation.cached_reference():
            log("- fp32's task accuracy: taken from an earlier build of the same weights and examples")
        else:
            with step(log, f"running PyTorch on the first {ANCHOR_EXAMPLES} evaluation examples"):
                anchor_cases = anchor(evaluation, loaded.model, manifest, staging)
    with step(log, f"running the PyTorch reference on {len(graphs) * 4} validation inputs"):
        context.cases = reference_cases(loaded.model, spec, config, recipe.shape_limits)
    # Free its weights before anything else loads a copy (converter, quantizer, ONNX Runtime): the
    # outputs are all we need, and two copies of a 3.9B model do not fit in 24 GB.
    loaded.model.to("meta")
    give_back_freed_memory()

    # fp16, int8 and int4 are made from the fp32 graphs, kept aside in fp32/ until the artifact is complete
    fp32 = graphs if precision == "fp32" else {graph: set_aside(path, staging / "fp32") for graph, path in graphs.items()}
    for_tensorrt = dict(graphs)  # what TensorRT builds from
    quantized: Quantized | None = None
    if precision == "int8":
        quantized = Int8(context, fp32, graphs)
    elif precision == "int4":
        quantized = Int4(context, fp32, graphs, context.int4)
    if quantized is not None:
        quantized.calibrate()  # on every core: a pass beside it would slow it by more than it takes
    reference = None if anchor_cases is None or evaluation is None else Fp32Reference(
        evaluation, fp32, manifest, staging, anchor_cases, spec, recipe.tolerance["fp32"])
    # Converting and quantizing keep one core busy: fp32's pass over the evaluation set takes the other
    with measured_beside(reference, log, "quantizing" if quantized else "converting"):
        if precision == "fp16":
            for graph, path in graphs.items():
                with step(log, f"converting {path.name} to fp16"):
                    to_fp16(fp32[graph], path)
        if quantized is not None:
            for_tensorrt = quantized.quantize(quantized.start())
    forms = [Form("onnxruntime", precision, graphs), *([Form("onnxruntime q/dq", precision, for_tensorrt)]
                                                       if precision == "int8" else []),
             *openvino_forms(precision, graphs, for_tensorrt, log)]
    measured = check_forms(context, forms)
    stopped: list[str] = []
    if quantized is not None and evaluation is not None and required_problems(forms, measured, evaluation):
        # Each repair step measures the forms that decide; OpenVINO's are measured once, on what it left
        required, optional = [f for f in forms if f.required], [f for f in forms if not f.required]
        measured, stopped = quantized.repair(evaluation, lambda: check_forms(context, required), measured,
                                             lambda again: required_problems(forms, again, evaluation))
        if optional:
            results, accuracy = check_forms(context, optional)
            measured = (measured[0] + results, {**measured[1], **accuracy})
    problems = required_problems(forms, measured, evaluation) + stopped
    verdicts = {form.name: not form_problems(form, measured, evaluation) for form in forms}
    for form in (f for f in forms if not f.required and not verdicts[f.name]):
        log(f"note: {form.name} failed validation; Session's backend='auto' will not use it "
            f"({'; '.join(form_problems(form, measured, evaluation))})")
    if isinstance(quantized, Int8):
        problems = calibration_problems(quantized.record, recipe) + problems
    if quantized is not None and problems:
        quantized.record["sensitive_layers"] = quantized.ranking()[:5]
        report_sensitive(quantized.record["sensitive_layers"], log, precision)

    tensorrt_record = ({"not_built": NO_INT4_ENGINES} if precision == "int4" else
                       {"parser_check": tensorrt_check(spec, manifest.config, recipe.shape_limits, for_tensorrt, log)})
    if not problems and context.engines_wanted:
        engines = make_engines(context, for_tensorrt, tensorrt_record)
        forms.append(engines)
        engine_results, engine_accuracy = check_forms(context, [engines])
        measured = (measured[0] + engine_results, {**measured[1], **engine_accuracy})
        problems = form_problems(engines, measured, evaluation)
        verdicts[engines.name] = not problems
        manifest.engines = {graph: {"file": path.name} for graph, path in engines.files.items()}

    shutil.rmtree(staging / "fp32", ignore_errors=True)
    for graph, path in for_tensorrt.items():
        if path != graphs[graph]:
            manifest.graphs[graph]["tensorrt_file"] = path.name
    manifest.validation = summary(measured[0], precision, recipe.tolerance[precision], problems, verdicts)
    manifest.accuracy = evaluation.record(precision, [f.name for f in forms if f.required]) if evaluation else {}
    manifest.quantization = quantized.record if quantized else {}
    manifest.tensorrt = tensorrt_record
    manifest.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    files = [p.name for p in staging.iterdir() if p.is_file() and p.name != f"{name}.json"]
    manifest.record_files(staging, sorted(files))
    manifest.save(staging / f"{name}.json")
    return manifest


def set_aside(graph: Path, folder: Path) -> Path:
    """Move a graph with its external data into `folder` (where the data's relative location still holds)."""
    folder.mkdir(exist_ok=True)
    for file in written(graph):
        file.rename(folder / file.name)
    return folder / graph.name


@dataclass(frozen=True)
class Form:
    """One way the artifact runs, validated against PyTorch: a backend over some of its files (graphs,
    or TensorRT engines), judged by the bounds of `precision`. A form not `required` (OpenVINO's) may
    fail without failing the build; the manifest records it, and runtime.Session's backend="auto"
    passes it over."""
    name: str
    precision: str
    files: dict[str, Path]
    backend: str = "onnxruntime"  # onnxruntime, openvino or tensorrt
    float_precision: str | None = None  # OpenVINO's compute for float tensors
    built_with: dict[str, Any] = field(default_factory=dict)  # TensorRT's: what built the engines

    @property
    def required(self) -> bool:
        return self.backend != "openvino"

    def open(self, manifest: Manifest) -> Backend:
        if self.backend == "tensorrt":
            return TensorRTBackend(self.files, self.built_with)
        if self.backend == "openvino":
            outputs = {graph: manifest.output_names(graph) for graph in self.files}
            return OpenVinoBackend(self.files, outputs, self.float_precision, cache=False)
        return OnnxRuntimeBackend(self.files, ["CPUExecutionProvider"])


# What compiling a graph for OpenVINO's CPU plugin holds at its peak, in the graph's weight bytes
# (measured: 345M qa fp32 2.04 GiB for 1.24 GiB; 3.9B passed 19 GiB while still reading its 14.4 GiB)
OPENVINO_MEMORY = 1.7


def openvino_forms(precision: str, graphs: dict[str, Path], qdq: dict[str, Path], log: Log) -> list[Form]:
    """What OpenVINO would run here, where it is installed and its compiled graphs fit in the memory
    left: the Q/DQ graph for int8, the float graphs in fp32, and in bf16 too for fp32 artifacts on a
    CPU with native bf16. Forms not validated are never picked by backend="auto"."""
    if openvino_backend.usable() is not None:
        return []
    files = qdq if precision == "int8" else graphs
    need = OPENVINO_MEMORY * sum(f.stat().st_size for path in files.values() for f in written(path))
    available = checkpoints.available_memory()
    if available is not None and need > available:
        log(f"note: OpenVINO not validated: compiling these graphs needs about {need / 2**30:.1f} GiB and "
            f"{available / 2**30:.1f} GiB is available; Session's backend='auto' will not use it")
        return []
    if precision == "int8":
        return [Form("openvino", precision, qdq, "openvino", "fp32")]
    bf16 = ([Form("openvino bf16", "bf16", graphs, "openvino", "bf16")]
            if precision == "fp32" and openvino_backend.native_bf16() else [])
    return [Form("openvino", precision, graphs, "openvino", "fp32"), *bf16]


Accuracy = dict[str, list[str]]  # form -> how its task metric fell too far (empty: it held)
Measured = tuple[list[Comparison], Accuracy]


def check_forms(context: BuildContext, forms: list[Form]) -> Measured:
    """Each form's outputs against PyTorch's (logits), and its task accuracy where there is an
    evaluation set; one form loaded at a time (at 3.9B, two copies do not fit)."""
    evaluation, manifest, log = context.evaluation, context.manifest, context.log
    results = []
    for form in forms:
        backend = form.open(manifest)
        where = "GPU" if form.backend == "tensorrt" else "CPU"
        with step(log, f"validating ({form.name}, {where}) against PyTorch"):
            compared = validate(context.cases, {graph: partial(backend.run, graph) for graph in form.files},
                                context.spec, context.recipe.tolerance[form.precision], form.name)
            results += compared
        if evaluation and form.precision != "fp32":
            with step(log, f"measuring {form.name}'s task accuracy"):
                evaluation.measure(form.name, form.precision, manifest, context.staging, backend)
        elif evaluation and evaluation.reference is None and not failures(compared):
            with step(log, f"measuring {form.name}'s task accuracy (fp32's: its outputs matched PyTorch's)"):
                evaluation.measure_fp32(form.name, manifest, context.staging, backend)
        if isinstance(backend, TensorRTBackend):
            backend.close()
        del backend
    log(table(results))
    if not evaluation:
        return results, {}
    if manifest.precision != "fp32":
        log(f"  ({manifest.precision}: agreement with PyTorch's outputs is reported above; the task metric decides)")
    log(evaluation.table())
    return results, {form.name: evaluation.problems(form.precision, [form.name]) for form in forms}


def form_problems(form: Form, measured: Measured, evaluation: Evaluation | None) -> list[str]:
    """Why a form fails: the task metric decides fp16, bf16 and int8 where there is one; logit
    tolerances decide the rest."""
    results, accuracy = measured
    by_logits = form.precision == "fp32" or evaluation is None
    return (failures([r for r in results if r.backend == form.name]) if by_logits else []) + accuracy.get(form.name, [])


def required_problems(forms: list[Form], measured: Measured, evaluation: Evaluation | None) -> list[str]:
    return [problem for form in forms if form.required for problem in form_problems(form, measured, evaluation)]


def tensorrt_check(spec: HeadSpec, config: dict[str, Any], limits: dict[str, list[int]], graphs: dict[str, Path],
                   log: Log) -> dict[str, Any]:
    """Would TensorRT's ONNX parser take these graphs, with this profile? (No TensorRT needed.)"""
    problems = []
    for graph, path in graphs.items():
        shapes = profile_shapes(expand(spec.graphs[graph].inputs, config), limits)
        model = load_structure(path)
        problems += [f"{path.name}: {p}" for p in graph_problems(model) + profile_problems(model, shapes)]
    if problems:
        log(f"  warning: TensorRT's ONNX parser would refuse {len(problems)} things: {'; '.join(problems[:3])}")
    return {"graphs": [p.name for p in graphs.values()], "problems": problems,
            "operator_table": TENSORRT_TABLE["source"]}


def make_engines(context: BuildContext, sources: dict[str, Path], record: dict[str, Any]) -> Form:
    """Build NAME.plan (per graph) into the staging folder, noting in `record` what built them; returns
    them as a form to validate like the others."""
    problems = record["parser_check"]["problems"]
    if problems:
        raise UserError(f"TensorRT's ONNX parser would refuse this graph: {'; '.join(problems[:3])}")
    plans = {}
    for graph, source in sources.items():
        plans[graph] = context.staging / graph_file(context.name, graph, ".plan")
        shapes = profile_shapes(expand(context.spec.graphs[graph].inputs, context.manifest.config),
                                context.recipe.shape_limits)
        with step(context.log, f"building the TensorRT engine {plans[graph].name} from {source.name}"):
            record.update(build_engine(source, plans[graph], shapes, context.precision, context.options.engine))
    return Form("tensorrt", context.precision, plans, "tensorrt", built_with=record)


def _tensor(t: TensorSpec) -> dict[str, object]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def versions() -> dict[str, str]:
    return {"exporter": metadata.version("megatron-deploy"), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            **({"openvino": version} if (version := openvino_backend.version()) else {})}
