"""`python -m exporter verify DIR|ARTIFACT`: is this artifact good to serve on this machine?

For each artifact: its files match their recorded hashes, its TensorRT engines (if any) match this
machine's TensorRT version and GPU (else: which rebuild is needed), and a small inference on the
smallest shapes it takes gives finite outputs on every backend it can use here. Needs only the runtime.
"""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np

from runtime import Session, feeds, pinned, tensorrt_backend
from runtime.errors import UserError
from runtime.manifest import Manifest
from runtime.pinned import manifest_beside


def manifests(target: Path) -> list[Path]:
    if target.is_dir():
        found = sorted(p for p in target.glob("*.json") if not p.name.endswith(".tokenizer.json")
                       and p.name != "index.json")
        if not found:
            raise UserError(f"{target}: no artifact manifests (NAME.json) in it")
        return found
    if not target.exists():
        raise UserError(f"{target}: no such artifact")
    return [manifest_beside(target)]


def engine_problems(manifest: Manifest) -> list[str]:
    if not manifest.engines:
        return []
    reason = tensorrt_backend.usable()
    if reason:
        version = manifest.tensorrt.get("version", "?")
        return [f"its TensorRT engines cannot run here ({reason}); they were built with "
                f"{tensorrt_backend.built_by(manifest.tensorrt)}: serve the ONNX graphs, or install TensorRT "
                f"{version} on such a GPU"]
    problem = tensorrt_backend.built_elsewhere(manifest.tensorrt)
    return [problem] if problem else []


def private_files(path: Path) -> list[str]:
    """Warnings for the artifact's files that other users cannot read while their siblings can: a server
    running as another user than the builder would fail on them."""
    try:
        names = [path.name, *Manifest.load(path).files]
    except UserError:
        return []
    modes = {name: (path.parent / name).stat().st_mode for name in names if (path.parent / name).is_file()}
    if not any(mode & stat.S_IROTH for mode in modes.values()):
        return []  # a private artifact throughout is a choice, not a slip
    return [f"{name} is readable by its owner only (mode {stat.S_IMODE(mode):04o}) while the artifact's other files "
            f"are readable by all: a server running as another user cannot open it; chmod a+r {path.parent / name}"
            for name, mode in modes.items() if not mode & stat.S_IROTH]


def verify_one(path: Path, public_key: Path | None = None) -> list[str]:
    """What is wrong with the artifact at `path` here (empty: nothing)."""
    try:
        manifest = pinned.verify(path, public_key=public_key)
    except UserError as err:
        return [str(err)]
    problems = engine_problems(manifest)
    backends = ["onnxruntime"] + (["tensorrt"] if manifest.engines and not problems else [])
    for backend in backends:
        try:
            session = Session(path, backend=backend, public_key=public_key)
            for graph in manifest.graphs:
                outputs = session.run(feeds.feed(manifest, graph, feeds.smallest(manifest), seed=None), graph)
                if not all(np.isfinite(v).all() for v in outputs.values()):
                    problems.append(f"{backend}: the {graph} graph gives non-finite outputs on a smoke input")
        except UserError as err:
            problems.append(f"{backend}: {err}")
    return problems


def report(target: Path, public_key: Path | None = None) -> tuple[str, bool]:
    """A line per artifact (and one per problem), and whether all are good."""
    lines, good = [], True
    for path in manifests(target):
        try:
            problems = verify_one(path, public_key)
        except Exception as err:  # one broken artifact must not stop the others being checked
            problems = [f"cannot be checked: {type(err).__name__}: {err}"]
        good &= not problems
        lines.append(f"{'ok  ' if not problems else 'FAIL'} {path}")
        lines += [f"     - {p}" for p in problems]
        lines += [f"     warning: {w}" for w in private_files(path)]
    return "\n".join(lines), good
