"""A build's options, each declared once: its field (name, type, default) with the flag's help, choices
and group beside it (exporter.flags makes `python -m exporter build`'s arguments from them). Light to
import: the command line reads it before torch loads.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from runtime.heads import HEADS

from exporter.flags import option
from exporter.precision.calibration import CALIBRATION_METHODS
from exporter.pipeline.recipes import BUILD_BACKENDS, PRECISIONS
from exporter.tensorrt.engine import EngineOptions

QUANTIZED = "int8 and int4"  # the --help section of what quantizing reads


@dataclass
class BuildOptions:
    head: str = option(f"one of: {', '.join(HEADS)}", MISSING, choices=list(HEADS), metavar="HEAD")
    precision: str = option("what the artifact computes in", "fp32", choices=PRECISIONS)
    checkpoint: str | None = option(
        "a Hugging Face model directory, or a Megatron-LM checkpoint folder, .zip or .pt (any tensor/pipeline "
        "parallelism). 'demo': small models trained here for every head; 'demo-random': the same shape with "
        "random weights; 'random:CONFIG.json': seeded random weights of any config", metavar="PATH",
        recipe="checkpoint")
    config: str | None = option(
        "a Hugging Face config.json, whole or just some fields, over what the checkpoint states: the head count, "
        "activation, epsilon and true vocabulary size that a Megatron checkpoint may not store", metavar="FILE")
    tokenizer: str | None = option("tokenizer.json, vocab.txt or a directory with one (default: the recipe's, "
                                   "else the one beside the checkpoint)", metavar="PATH")
    lowercase: bool | None = option("lower-case text for a vocab.txt tokenizer (default: its "
                                    "tokenizer_config.json, else yes)")
    out: Path = option("where the artifact goes", Path("artifacts"), metavar="DIR")
    name: str | None = option("artifact name (default: the head)")
    recipe: str | None = option("a recipe TOML instead of recipes/HEAD.toml", metavar="FILE")
    max_batch: int | None = option("largest batch the artifact accepts", metavar="N", recipe="shape_limits.batch")
    max_sequence: int | None = option("largest sequence the artifact accepts", metavar="N",
                                      recipe="shape_limits.sequence")
    max_choices: int | None = option("largest number of choices the artifact accepts (multiple-choice)",
                                     metavar="N", recipe="shape_limits.choices")
    max_past: int | None = option("largest KV cache the artifact accepts (causal-lm)", metavar="N",
                                  recipe="shape_limits.past_sequence")
    allow_random_head: bool = option("randomly initialize head weights the checkpoint lacks (e.g. a base "
                                     "checkpoint built as qa) instead of failing", False)
    memory_check: bool = option("build even when the model's weights exceed the memory this machine has "
                                "available (it will likely be killed)", True, name="--skip-memory-check",
                                inverted=True)
    eval_data: str | None = option("task-accuracy evaluation set: a .jsonl with the head's fields and gold "
                                   "answers; none: judge by logits alone (default: the recipe's)", metavar="FILE|none")
    calibration_data: str | None = option(
        "representative text (int8 calibrates on it; int4 ranks its products on it to repair): a .txt of lines, "
        "or a .jsonl with the head's fields, e.g. question/context for qa",
        metavar="FILE", group=QUANTIZED, recipe="calibration.data")
    calibration_method: str | None = option("how int8's activation ranges are chosen", choices=CALIBRATION_METHODS,
                                            group=QUANTIZED, recipe="calibration.method")
    calibration_samples: int | None = option("examples to calibrate on", metavar="N", group=QUANTIZED,
                                             recipe="calibration.samples")
    keep_float: list[str] = option("leave layers matching this glob over module names in float, e.g. "
                                   "'bert.encoder.layer.23.*' (repeatable)", [], metavar="PATTERN", group=QUANTIZED)
    backend: str = option("tensorrt: build NAME.plan engines or fail; onnxruntime: no engines; auto: engines "
                          "where TensorRT and a GPU exist", "auto", choices=BUILD_BACKENDS, group="TensorRT")
    engine: EngineOptions = field(default_factory=EngineOptions)  # its own fields declare its flags


def from_arguments(args: argparse.Namespace) -> BuildOptions:
    """The options the parsed flags give."""
    engine = EngineOptions(**{f.name: getattr(args, f.name) for f in fields(EngineOptions) if "flag" in f.metadata})
    return BuildOptions(**{f.name: getattr(args, f.name) for f in fields(BuildOptions) if "flag" in f.metadata},
                        engine=engine)

