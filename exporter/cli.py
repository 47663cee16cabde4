"""The command line: `python -m exporter build ...` and `python -m exporter heads`.

Exit status: 0 success, 1 the artifact failed validation, 2 a mistake in what the user gave us
(printed as one line, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from runtime.errors import UserError
from runtime.heads import HEADS

from .build import BuildOptions, ValidationFailed, build
from .recipes import PRECISIONS


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    top = Parser(prog="python -m exporter", description="Turn MegatronBERT checkpoints into validated "
                 "ONNX artifacts (graphs + tokenizer + manifest) for runtime.Session.")
    commands = top.add_subparsers(dest="command", required=True, parser_class=Parser)

    b = commands.add_parser("build", help="export, validate and write one artifact",
                            description="Export one head of a checkpoint to ONNX, validate it against the "
                            "reference PyTorch head, and write NAME.onnx, NAME.tokenizer.json and the manifest "
                            "NAME.json into --out. Defaults come from recipes/HEAD.toml.")
    b.add_argument("--head", required=True, choices=list(HEADS), metavar="HEAD",
                   help=f"one of: {', '.join(HEADS)}")
    b.add_argument("--precision", default="fp32", choices=PRECISIONS, help="default: fp32")
    b.add_argument("--checkpoint", metavar="PATH", help="a Hugging Face model directory or a Megatron .zip / .pt "
                   "(default: the recipe's). 'demo' is a small built-in model with random weights; "
                   "'random:CONFIG.json' gives seeded random weights of any config (for benchmarks)")
    b.add_argument("--tokenizer", metavar="PATH", help="tokenizer.json, vocab.txt or a directory with one "
                   "(default: the one beside the checkpoint)")
    b.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=None,
                   help="lower-case text for a vocab.txt tokenizer (default: its tokenizer_config.json, else yes)")
    b.add_argument("--out", type=Path, default=Path("artifacts"), metavar="DIR", help="default: artifacts/")
    b.add_argument("--name", help="artifact name (default: the head)")
    b.add_argument("--recipe", metavar="FILE", help="a recipe TOML instead of recipes/HEAD.toml")
    for axis in ("batch", "sequence", "choices", "past"):
        b.add_argument(f"--max-{axis}", type=int, metavar="N", help=f"largest {axis} size the artifact accepts "
                       "(default: the recipe's)")
    b.add_argument("--allow-random-head", action="store_true", help="randomly initialize head weights the "
                   "checkpoint lacks (e.g. a base checkpoint built as qa) instead of failing")

    commands.add_parser("heads", help="list the heads with their inputs and outputs")
    return top


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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "heads":
            print(list_heads())
            return 0
        build(BuildOptions(head=args.head, precision=args.precision, checkpoint=args.checkpoint,
                           tokenizer=args.tokenizer, lowercase=args.lowercase, out=args.out, name=args.name,
                           recipe=args.recipe, max_batch=args.max_batch, max_sequence=args.max_sequence,
                           max_choices=args.max_choices, max_past=args.max_past,
                           allow_random_head=args.allow_random_head))
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
