"""`python -m exporter build-all`: every head x precision a recipe set asks for, into one directory.

Artifacts are named HEAD-PRECISION. A failure does not stop the others; `OUT/index.json` lists every
artifact with its manifest, precision, backend and validation result, and the exit status says whether
all passed. An artifact whose inputs are unchanged since the last run (checkpoint files, recipe files,
precision, backend and library versions: its fingerprint) and whose files still match is skipped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from runtime.errors import UserError
from runtime.files import read_json, sha256_of, write_atomically
from runtime.heads import HEADS
from runtime.manifest import Manifest
from runtime.pinned import verify

from exporter.sources import demo
from exporter.pipeline.build import BuildOptions, Log, ValidationFailed, build, versions
from exporter.pipeline.recipes import PRECISIONS, RECIPES_DIR, load_recipe


def recipe_files(recipes: Path, heads: list[str] | None) -> dict[str, Path]:
    """Head -> its recipe file in `recipes` (every HEAD.toml there, or the heads asked for)."""
    found = {p.stem: p for p in sorted(recipes.glob("*.toml")) if p.stem in HEADS}
    if not found:
        raise UserError(f"--recipes {recipes}: no HEAD.toml recipes in it (heads: {', '.join(HEADS)})")
    unknown = [h for h in heads or [] if h not in found]
    if unknown:
        raise UserError(f"no recipe for {', '.join(unknown)} in {recipes}")
    return {h: found[h] for h in heads} if heads else found


def checkpoint_digest(checkpoint: str) -> str:
    """What identifies the checkpoint's contents without loading it."""
    if checkpoint == "demo-random":
        return "demo-random:" + sha256_of(demo.VOCAB)
    path = Path(checkpoint.removeprefix("random:"))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"checkpoint {checkpoint}: {missing[0]} does not exist")
    return sha256_of(*files)


def fingerprint(options: BuildOptions, recipe_path: Path) -> str:
    recipe = load_recipe(options.head, recipe_path)
    data = [Path(p) for p in (recipe.calibration.get("data"), recipe.evaluation.get("data")) if p and p != "none"]
    parts = {"checkpoint": checkpoint_digest(demo.resolve(options.checkpoint or recipe.checkpoint, options.head)),
             "recipe": sha256_of(RECIPES_DIR / "defaults.toml", recipe_path, *(p for p in data if p.is_file())),
             "options": repr(replace(options, out=Path("."))), "versions": versions()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def unchanged(entry: dict[str, Any] | None, print_: str, out: Path) -> bool:
    if not entry or entry.get("fingerprint") != print_ or not entry.get("passed"):
        return False
    try:
        verify(out / entry["manifest"])
    except UserError:
        return False
    return True


def build_all(recipes: Path, heads: list[str] | None, precisions: list[str], out: Path, backend: str,
              log: Log) -> bool:
    """Build them all; returns whether every artifact passed."""
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        raise UserError(f"unknown precision {', '.join(bad)}; choose from {', '.join(PRECISIONS)}")
    files = recipe_files(recipes, heads)
    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "index.json"
    previous = {e["name"]: e for e in read_json(index_path, "index")["artifacts"]} if index_path.exists() else {}
    entries = []
    for head, recipe_path in files.items():
        for precision in precisions:
            name = f"{head}-{precision}"
            options = BuildOptions(head=head, precision=precision, out=out, name=name, recipe=str(recipe_path),
                                   backend=backend)
            print_ = fingerprint(options, recipe_path)
            if unchanged(previous.get(name), print_, out):
                log(f"== {name}: unchanged since the last build, skipped")
                entries.append(previous[name])
                continue
            log(f"== {name}")
            entry: dict[str, Any] = {"name": name, "head": head, "precision": precision, "fingerprint": print_,
                                     "manifest": f"{name}.json"}
            try:
                manifest = Manifest.load(build(options, log))
                entry.update(passed=True, backend="tensorrt" if manifest.engines else "onnxruntime",
                             validation=_summary(manifest))
            except (UserError, ValidationFailed) as err:
                log(f"   FAILED: {err}")
                entry.update(passed=False, backend=None, error=str(err))
            entries.append(entry)
    write_atomically(index_path, json.dumps({"artifacts": entries}, indent=1) + "\n")
    failed = [e["name"] for e in entries if not e["passed"]]
    log(f"wrote {index_path}: {len(entries) - len(failed)} built, {len(failed)} failed"
        + (f" ({', '.join(failed)})" if failed else ""))
    return not failed


def _summary(manifest: Manifest) -> dict[str, Any]:
    pooled = [c for c in manifest.validation["cases"] if c["case"] == "all"]
    return {"passed": manifest.validation["passed"], "backends": manifest.validation["backends"],
            "min_cosine": min((c["cosine"] for c in pooled), default=None),
            "min_argmax": min((c["argmax"] for c in pooled if c["argmax"] is not None), default=None)}
