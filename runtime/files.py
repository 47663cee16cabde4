"""File helpers the exporter and the runtime share: JSON reading with clear errors, atomic writes, hashes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError


def cache_root() -> Path:
    """What the runtime keeps between runs (compiled models, backend choices): $MEGATRON_DEPLOY_CACHE,
    else ~/.cache/megatron-deploy (under $XDG_CACHE_HOME where set)."""
    base = os.environ.get("MEGATRON_DEPLOY_CACHE")
    return Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-deploy"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; `what` names the file in errors ("manifest", "config")."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable {what} ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a {what} (holds a JSON {type(data).__name__}, not an object)")
    return data


def json_lines(path: Path, label: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-empty line of a JSON-lines file; `label` starts each error."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{label}{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(item, dict):
            raise UserError(f"{label}{path}:{number}: expected an object")
        rows.append((number, item))
    return rows


def write_atomically(path: Path, text: str) -> None:
    """Write via a temporary file and a rename, so readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the file is as readable as its neighbours
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def sha256_of(*files: Path) -> str:
    """One digest over the files' bytes, in order (streamed: model files can be gigabytes)."""
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
