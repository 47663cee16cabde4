"""The command line: `python -m exporter build|build-all|bench|heads|triton|serve|sign|verify ...`.

Exit status: 0 success, 1 the artifact failed validation (for serve: the server stopped by itself or
loaded nothing), 2 a mistake in what the user gave us (printed as one line, no traceback), 130
interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from runtime.errors import UserError
from runtime.heads import HEADS

from exporter.errors import ValidationFailed
from exporter.delivery.http_guard import MAX_REQUEST_BYTES
from exporter.interrupts import exit_at_once
from exporter.pipeline.recipes import BUILD_BACKENDS, PRECISIONS, RECIPES_DIR
from exporter.flags import add_arguments
from exporter.pipeline.options import QUANTIZED, BuildOptions, from_arguments
from exporter.tensorrt.engine import EngineOptions
from exporter.delivery.triton import QUEUE_DELAY_US


# Each command's one-line help (in `--help`'s list) and its description (in `COMMAND --help`)
COMMANDS = {
    "build": ("export, validate and write one artifact",
              "Export one head of a checkpoint to ONNX, validate it against the reference PyTorch head, and "
              "write NAME.onnx, NAME.tokenizer.json and the manifest NAME.json into --out. Defaults come from "
              "recipes/HEAD.toml."),
    "bench": ("latency, throughput and memory of artifacts, beside PyTorch",
              "Time artifacts through runtime.Session on every backend this machine has, on random inputs; with "
              "--vs-pytorch, the reference PyTorch head too."),
    "build-all": ("build every head x precision of a recipe set, with an index",
              "Build HEAD-PRECISION artifacts for every recipe in --recipes, continuing past failures; write "
              "OUT/index.json; skip artifacts whose inputs are unchanged. Exit 1 if any failed."),
    "triton": ("write artifacts as a Triton model repository",
              "Write <model>/config.pbtxt and <model>/1/model.plan|model.onnx per graph."),
    "serve": ("start a Triton Inference Server on artifacts (needs .[serve])",
              "Start the Triton server of nvidia-pytriton on a repository of these artifacts (Python-backend "
              "models running runtime.Session, NAME-text included), wait until it is ready and print its "
              "endpoints. Ctrl-C or SIGTERM stops it; in-flight requests finish first."),
    "verify": ("check artifacts on the machine that will serve them",
              "Re-check file hashes, that TensorRT engines match this machine's TensorRT and GPU, and run a "
              "smoke inference. Exit 0: all good; 1: something is wrong."),
    "sign": ("sign artifacts with an elliptic-curve private key (OpenSSF model-signing)",
              "Write NAME.sig beside each artifact's manifest: a signature of the manifest and every file it "
              "lists. Check with verify --public-key or runtime.Session(..., public_key=...)."),
    "predict": ("answer a whole corpus (JSONL/Parquet) with an artifact, resumable",
                "Stream the rows of --input (a .jsonl or .parquet file, or a folder of them) through the artifact's "
                "helper in this process or --workers N, writing Parquet shards with the answers to --output. "
                "Started again with the same command, it skips what is done. Bad rows go to --output's _errors/."),
    "heads": ("list the heads with their inputs and outputs",
              "List the nine heads this tool builds, each with its graphs' inputs and outputs (dynamic axes by "
              "name), as the manifests declare them."),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    top = Parser(prog="python -m exporter", description="Turn MegatronBERT checkpoints into validated "
                 "ONNX artifacts (graphs + tokenizer + manifest) for runtime.Session.")
    top.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                     help="print the package's version and exit")
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND",
                                  help="one of the commands below; COMMAND --help for its options")

    def command(name: str) -> argparse.ArgumentParser:
        short, long = COMMANDS[name]
        return commands.add_parser(name, help=short, description=long)

    b = command("build")
    groups = {QUANTIZED: b.add_argument_group(QUANTIZED), "TensorRT": b.add_argument_group("TensorRT")}
    for declared in (BuildOptions, EngineOptions):
        add_arguments(b, declared, groups)

    m = command("bench")
    m.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT", help="a manifest, .onnx or .plan")
    m.add_argument("--batch", type=sizes, default=[1], metavar="N,N", help="batch sizes (default: 1)")
    m.add_argument("--seq", type=sizes, metavar="N,N", help="sequence lengths; prompt lengths for a causal LM "
                   "(default: 128, or the artifact's max if lower; with --plot, 8, 16, 32, ... up to its max)")
    m.add_argument("--iterations", type=int, default=20, metavar="N", help="timed calls per setting (default: 20)")
    m.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed calls first (default: 3)")
    m.add_argument("--new-tokens", type=int, default=64, metavar="N", help="causal LM: tokens to generate (default: 64)")
    m.add_argument("--vs-pytorch", action="store_true", help="also time the reference PyTorch head (rebuilt from "
                   "the manifest's checkpoint) and show the speedup over it")
    m.add_argument("--json", type=Path, metavar="FILE", help="write the figures with machine, versions and settings")
    m.add_argument("--plot", type=Path, metavar="FILE.png", help="draw p50 latency (ms) against sequence length "
                   "(tokens), titled with the CPU (needs .[bench]: matplotlib)")

    a = command("build-all")
    a.add_argument("--recipes", type=Path, default=RECIPES_DIR, metavar="DIR", help="default: recipes/")
    a.add_argument("--heads", type=names, metavar="H,H", help="only these heads (default: every recipe's)")
    a.add_argument("--precisions", type=names, default=["fp32", "fp16", "int8"], metavar="P,P",
                   help=f"any of {','.join(PRECISIONS)} (default: fp32,fp16,int8; int4 is a decode form, asked for)")
    a.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="where the artifacts and their index.json go")
    a.add_argument("--backend", choices=BUILD_BACKENDS, default="auto", help="as for build (default: auto)")

    r = command("triton")
    r.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT",
                   help="an artifact's manifest (NAME.json) or graph (NAME.onnx)")
    r.add_argument("--out", type=Path, required=True, metavar="DIR", help="the model repository")
    r.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="instance group kind (default auto: GPU for engines, CPU for ONNX)")
    r.add_argument("--with-tokenizer", action="store_true", help="add NAME-text, a Python-backend model that "
                   "takes the helper's arguments as JSON text and answers as runtime.Session does")
    r.add_argument("--python-backend", action="store_true", help="serve each graph with runtime.Session on "
                   "Triton's Python backend, for servers without its ONNX Runtime or TensorRT backends")
    batching_arguments(r)

    s = command("serve")
    s.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT",
                   help="an artifact's manifest (NAME.json) or graph (NAME.onnx) to serve")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, metavar="N", help="HTTP port (default: 8000)")
    s.add_argument("--grpc-port", type=int, default=8001, metavar="N", help="gRPC port (default: 8001)")
    s.add_argument("--public-key", type=Path, metavar="PUB", help="serve only artifacts signed (NAME.sig) by this "
                   "elliptic-curve public key's private key; each model checks the bytes it loads")
    s.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES, metavar="N",
                   help=f"largest HTTP request taken, and largest input any request may declare "
                   f"(default: {MAX_REQUEST_BYTES})")
    batching_arguments(s)

    v = command("verify")
    v.add_argument("target", type=Path, metavar="DIR|ARTIFACT", help="a directory of artifacts, or one artifact")
    v.add_argument("--public-key", type=Path, metavar="PUB", help="also require each artifact's signature "
                   "(NAME.sig) by this elliptic-curve public key (PEM; needs .[sign])")

    g = command("sign")
    g.add_argument("artifacts", nargs="+", type=Path, metavar="ARTIFACT", help="a manifest, .onnx or .plan")
    g.add_argument("--key", type=Path, required=True, metavar="KEY", help="the private key (PEM)")
    g.add_argument("--password-env", metavar="VAR", help="the environment variable holding the key's password, "
                   "if it is encrypted")

    p = command("predict")
    p.add_argument("artifact", type=Path, metavar="ARTIFACT", help="a manifest, .onnx or .plan")
    p.add_argument("--input", type=Path, required=True, metavar="FILE|FOLDER", help="JSONL or Parquet rows with "
                   "the fields the head's helper takes (qa: question, context; classification: text, text_pair)")
    p.add_argument("--output", type=Path, required=True, metavar="FOLDER", help="where the Parquet shards go")
    p.add_argument("--batch", type=int, default=32, metavar="N", help="rows per helper call (default: 32)")
    p.add_argument("--shard-rows", type=int, default=4096, metavar="N", help="rows per output shard, the unit of "
                   "work and of resuming (default: 4096)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="processes (local) or actors (ray), each "
                   "with its own Session (default: 1; local: this process); MEGATRON_DEPLOY_THREADS gives each its "
                   "cores")
    p.add_argument("--engine", default="local", choices=("local", "ray"), help="local: this machine; ray: an actor "
                   "pool of Ray Data (needs .[ray]) (default: local)")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT", help="the Ray cluster to run on (default: a Ray "
                   "instance of its own on this machine); --output must be a folder every node writes")
    p.add_argument("--field", action="append", default=[], metavar="NAME=COLUMN", help="read the helper's field "
                   "NAME from input column COLUMN (repeatable)")
    p.add_argument("--helper-args", type=json_object, default={}, metavar="JSON", help="the helper's other "
                   "arguments, e.g. '{\"max_new_tokens\": 16}' or '{\"top_k\": 3}'")
    p.add_argument("--id", metavar="COLUMN", help="keep only this input column beside the answers")
    p.add_argument("--backend", default="auto", choices=("auto", "onnxruntime", "openvino", "tensorrt"),
                   help="as runtime.Session's (default: auto)")
    p.add_argument("--public-key", type=Path, metavar="PUB", help="answer only with an artifact signed by this "
                   "public key's private key")
    p.add_argument("--truncate", action="store_true", help="cut a text too long for the artifact to fit (its end) "
                   "instead of counting its row as bad; questions and prompts are never cut")
    p.add_argument("--strict", action="store_true", help="exit 1 if any row was bad (default: 0, with a count)")

    command("heads")
    return top


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-deploy")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def check_paths(args: argparse.Namespace) -> None:
    """The files and folders the user named exist: said at once, before torch and ONNX Runtime load
    (seconds on a cold machine)."""
    if args.command == "build":
        checkpoint, config = args.checkpoint, args.config
        if checkpoint in (None, "demo", "demo-random"):
            checkpoint = None
        elif checkpoint.startswith("random:"):
            checkpoint = checkpoint.removeprefix("random:")
        if checkpoint != args.checkpoint and args.checkpoint not in (None, "demo"):
            config = None  # random weights take no --config: build says so
        for flag, value, what in (("--checkpoint", checkpoint, "checkpoint"), ("--config", config, "config"),
                                  ("--tokenizer", args.tokenizer, "file"), ("--recipe", args.recipe, "file"),
                                  ("--calibration-data", args.calibration_data, "file"),
                                  ("--eval-data", None if args.eval_data == "none" else args.eval_data, "file")):
            if value is not None and not Path(value).exists():
                raise UserError(f"{flag} {value}: no such {what}")
    if args.command in ("bench", "triton", "serve", "sign", "predict"):
        from runtime.pinned import manifest_beside

        for artifact in args.artifacts if args.command != "predict" else [args.artifact]:
            if not manifest_beside(artifact).exists():
                raise UserError(f"{artifact}: no such artifact")
    if args.command == "build-all" and not args.recipes.is_dir():
        raise UserError(f"--recipes {args.recipes}: no such folder")


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def sizes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be at least 1, got {text!r}")
    return values


def benchmark(args: argparse.Namespace) -> None:
    with exit_at_once():
        from exporter.delivery import bench

    if args.iterations < 1 or args.warmup < 0 or args.new_tokens < 1:
        raise UserError("--iterations and --new-tokens must be at least 1, --warmup at least 0")
    if args.plot and args.seq is not None and len(set(args.seq)) < 2:
        raise UserError(f"--plot draws latency against sequence length, and --seq {args.seq[0]} is one length: "
                        "give two or more (--seq 32,64,128), or leave --seq out for a range")
    results = bench.run(args.artifacts, args.batch, args.seq, args.warmup, args.iterations, args.vs_pytorch,
                        args.new_tokens, plotting=args.plot is not None)
    machine = bench.machine()
    print(f"{machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no AVX2'}; {machine['cores']} cores); "
          f"OpenVINO: {machine['openvino']}")
    print(bench.table(results))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "command"}
    settings["artifacts"] = [str(p) for p in args.artifacts]
    if args.json:
        bench.write_json(results, settings, args.json)
        print(f"wrote {args.json}")
    if args.plot:
        bench.plot(results, args.plot)
        print(f"wrote {args.plot}")


def sign_artifacts(paths: list[Path], key: Path, password_env: str | None) -> None:
    from runtime.pinned import find_manifest, verify
    from runtime.signatures import sign

    password = None
    if password_env is not None:
        if password_env not in os.environ:
            raise UserError(f"--password-env {password_env}: no such environment variable")
        password = os.environ[password_env]
    manifests = [find_manifest(path) for path in paths]  # every name checked before any is signed
    for manifest in manifests:  # sign only what is whole as built
        verify(manifest)
    for manifest in manifests:
        print(f"signed {manifest} -> {sign(manifest, key, password)}")


def list_heads() -> str:
    lines = []
    for head in HEADS.values():
        lines.append(f"{head.name}: {head.summary}")
        for graph, spec in head.graphs.items():
            label = "" if graph == "model" else f"{graph} graph: "
            lines.append(f"    {label}in  " + ", ".join(f"{t.name}[{','.join(map(str, t.shape))}]" for t in spec.inputs))
            lines.append(f"    {' ' * len(label)}out " + ", ".join(f"{t.name}[{','.join(map(str, t.shape))}]"
                                                           for t in spec.outputs))
    return "\n".join(lines)


def batching_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--max-batch-delay-us", type=int, default=QUEUE_DELAY_US, metavar="N",
                         help=f"how long Triton's dynamic batcher waits for more requests (default: {QUEUE_DELAY_US})")
    command.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                         help="let Triton run queued requests together (default: yes)")


def queue_delay(args: argparse.Namespace) -> int | None:
    if args.max_batch_delay_us < 0:
        raise UserError("--max-batch-delay-us must be 0 or more")
    return args.max_batch_delay_us if args.dynamic_batching else None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_paths(args)
        if args.command == "heads":
            print(list_heads())
            return 0
        if args.command == "bench":
            benchmark(args)
            return 0
        if args.command == "build-all":
            with exit_at_once():
                from exporter.pipeline.build_all import build_all

            return 0 if build_all(args.recipes, args.heads, args.precisions, args.out, args.backend, print) else 1
        if args.command == "triton":
            from exporter.delivery.triton import RepositoryOptions, write_repository

            models = write_repository(args.artifacts, args.out, RepositoryOptions(
                device=args.device, with_tokenizer=args.with_tokenizer, python_backend=args.python_backend,
                queue_delay_us=queue_delay(args)))
            print(f"wrote {args.out}: {', '.join(models)}")
            return 0
        if args.command == "serve":
            from exporter.delivery.serve import ServeOptions, serve

            for port, flag in ((args.port, "--port"), (args.grpc_port, "--grpc-port")):
                if not 0 < port < 65536:
                    raise UserError(f"{flag} must be a port number (1-65535)")
            if args.max_request_bytes < 1:
                raise UserError("--max-request-bytes must be at least 1")
            return serve(args.artifacts, ServeOptions(host=args.host, port=args.port, grpc_port=args.grpc_port,
                                                      queue_delay_us=queue_delay(args), public_key=args.public_key,
                                                      max_request_bytes=args.max_request_bytes))
        if args.command == "sign":
            sign_artifacts(args.artifacts, args.key, args.password_env)
            return 0
        if args.command == "predict":
            from exporter.delivery.predict import Options, predict

            fields = dict(item.split("=", 1) for item in args.field if "=" in item)
            if len(fields) != len(args.field):
                raise UserError("--field takes NAME=COLUMN")
            return predict(Options(artifact=args.artifact, input=args.input, output=args.output, batch=args.batch,
                                   shard_rows=args.shard_rows, workers=args.workers, fields=fields, id_column=args.id,
                                   helper_args=args.helper_args, engine=args.engine, ray_address=args.ray_address,
                                   backend=args.backend, public_key=args.public_key, strict=args.strict,
                                   truncate=args.truncate))
        if args.command == "verify":
            from exporter.delivery.verify import report

            text, good = report(args.target, args.public_key)
            print(text)
            return 0 if good else 1
        with exit_at_once():
            from exporter.pipeline.build import build  # torch and onnx: only the commands that build import them

        build(from_arguments(args))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValidationFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0
