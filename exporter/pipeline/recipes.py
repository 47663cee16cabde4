"""Recipes: each head's build defaults, in `recipes/<head>.toml` over `recipes/defaults.toml`.

A recipe names the checkpoint, the shape limits ([min, opt, max] per dynamic axis), the tolerances
per precision, the calibration data and the task defaults the runtime's helpers use. Command-line
flags override it (`Recipe.with_limits`).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.manifest_schema import PRECISIONS  # noqa: F401 - the build's choices are the manifest's
from runtime.heads import DYNAMIC_AXES, HEADS, HeadSpec

from exporter.model.config import MegatronBertConfig

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# A build's choices, known without importing the libraries that build (so `verify` needs only the runtime).
JUDGED = (*PRECISIONS, "bf16")  # precisions with bounds; bf16: OpenVINO's compute for fp32 artifacts
BUILD_BACKENDS = ("auto", "onnxruntime", "tensorrt")  # build --backend: whether to make TensorRT engines
TOLERANCE_KEYS = ("max_abs", "min_cosine", "min_argmax", "tie_margin")


@dataclass(frozen=True)
class Recipe:
    head: str
    checkpoint: str  # a path, or "demo"
    shape_limits: dict[str, list[int]]
    tolerance: dict[str, dict[str, float]]
    calibration: dict[str, Any] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    evaluation: dict[str, Any] = field(default_factory=dict)  # data (a .jsonl) and the deciding metric
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)  # precision -> {"max_drop": points}
    int4: dict[str, Any] = field(default_factory=dict)  # how int4 weights are made (exporter.precision.int4)

    @property
    def spec(self) -> HeadSpec:
        return HEADS[self.head]

    def with_limits(self, **maxima: int | None) -> Recipe:
        """Override the max of some axes (e.g. sequence=256); opt and min follow down if above it."""
        limits = {axis: list(v) for axis, v in self.shape_limits.items()}
        for axis, value in maxima.items():
            if value is None:
                continue
            if axis not in limits:
                raise UserError(f"the {self.head} head has no {axis} axis to limit")
            if value < 1:
                raise UserError(f"max {axis} must be at least 1, got {value}")
            low, opt, _ = limits[axis]
            limits[axis] = [min(low, value), min(opt, value), value]
        return replace(self, shape_limits=limits)

    def fit_to(self, config: MegatronBertConfig, explicit: set[str]) -> tuple[Recipe, list[str]]:
        """Fit sequence (+ past_sequence) into the model's position table: recipe defaults that exceed
        it are lowered (with a note); limits the user gave explicitly are refused instead."""
        positions = config.max_position_embeddings
        limits = {axis: list(v) for axis, v in self.shape_limits.items()}
        axes = [a for a in ("sequence", "past_sequence") if a in limits]
        if sum(limits[a][2] for a in axes) <= positions:
            return self, []
        given = sum(limits[a][2] for a in axes if a in explicit)
        free = [a for a in axes if a not in explicit]
        if not free or given + len(free) > positions:
            raise UserError(f"max {' + '.join(axes)} of {sum(limits[a][2] for a in axes)} exceeds the model's "
                            f"max_position_embeddings of {positions}")
        share = (positions - given) // len(free)
        for axis in free:
            limits[axis] = [min(v, share) for v in limits[axis]]
        note = (f"shape limits lowered to fit the model's {positions} positions: "
                + ", ".join(f"{a} max {limits[a][2]}" for a in free))
        return replace(self, shape_limits=limits), [note]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid TOML recipe ({err})") from None


def load_recipe(head: str, path: str | Path | None = None) -> Recipe:
    """The recipe for `head`: recipes/<head>.toml (or `path`) over recipes/defaults.toml."""
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; the heads are: {', '.join(HEADS)}")
    path = Path(path) if path is not None else RECIPES_DIR / f"{head}.toml"
    data = _merge(_read_toml(RECIPES_DIR / "defaults.toml"), _read_toml(path))
    data.pop("head", None)
    unknown = set(data) - {"checkpoint", "tokenizer", "shape_limits", "tolerance", "calibration", "task", "demo",
                           "evaluation", "accuracy", "int4"}
    if unknown:
        raise UserError(f"{path}: unknown recipe keys: {', '.join(sorted(unknown))}")
    # Relative paths in a recipe are relative to the recipe that names them.
    for key in ("checkpoint", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and value != "demo":
            prefix = "random:" if value.startswith("random:") else ""
            data[key] = prefix + str((path.parent / value.removeprefix(prefix)).resolve())
    for section in ("calibration", "evaluation"):  # data files named in defaults.toml or a recipe beside it
        if "data" in data.get(section, {}) and data[section]["data"] != "none":
            data[section]["data"] = str((RECIPES_DIR / data[section]["data"]).resolve())
    recipe = Recipe(head=head, **data)
    _check(recipe, path)
    return recipe


def _check(recipe: Recipe, path: Path) -> None:
    axes = {a for t in (t for g in recipe.spec.graphs.values() for t in g.inputs) for a in t.shape
            if a in DYNAMIC_AXES and a != "total_sequence"}
    missing = axes - set(recipe.shape_limits)
    if missing:
        raise UserError(f"{path}: shape_limits lacks {', '.join(sorted(missing))} for the {recipe.head} head")
    for axis, limits in recipe.shape_limits.items():
        ok = (isinstance(limits, list) and len(limits) == 3 and all(isinstance(v, int) for v in limits)
              and 1 <= limits[0] <= limits[1] <= limits[2])
        if not ok:
            raise UserError(f"{path}: shape_limits.{axis} must be [min, opt, max] with 1 <= min <= opt <= max, "
                            f"got {limits!r}")
    for precision, bound in recipe.accuracy.items():
        if precision not in JUDGED or not isinstance(bound, dict) or set(bound) != {"max_drop"} \
                or isinstance(bound["max_drop"], bool) or not isinstance(bound["max_drop"], (int, float)) \
                or bound["max_drop"] < 0:
            raise UserError(f"{path}: accuracy.{precision} must be {{max_drop = POINTS}} (a number >= 0), got {bound!r}")
    for precision in JUDGED:
        bounds = recipe.tolerance.get(precision)
        if not isinstance(bounds, dict) or not set(bounds) <= set(TOLERANCE_KEYS) or not bounds:
            raise UserError(f"{path}: tolerance.{precision} must set some of {', '.join(TOLERANCE_KEYS)}")
