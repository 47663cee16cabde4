"""File helpers the exporter and the runtime share: JSON reading with clear errors, atomic writes, hashes.

Every file is opened as a regular file or not at all: a named pipe or a device in place of a manifest
or a graph is refused at once, instead of blocking the reader forever.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

JSON_LIMIT = 64 << 20  # bytes: manifests, configs and indexes are kilobytes; more is not one of them


class Vanished(UserError):
    """A file that was there a moment ago is gone (a publish replaced its version meanwhile)."""


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file (never blocks: a FIFO is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Vanished(f"{path}: missing") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be opened ({err.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = {stat.S_IFIFO: "a named pipe", stat.S_IFDIR: "a directory", stat.S_IFSOCK: "a socket",
                stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}.get(stat.S_IFMT(mode), "not a regular file")
        raise UserError(f"{path}: {kind}, not a regular file")
    return fd


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    fd = open_regular(path)
    try:
        return read_fd(fd, path, limit)
    finally:
        os.close(fd)


def read_fd(fd: int, path: Path, limit: int | None = None) -> bytes:
    """What an open regular file holds, refused if over `limit` bytes (`path` names it in errors)."""
    size = os.fstat(fd).st_size
    if limit is not None and size > limit:
        raise UserError(f"{path}: {size} bytes, more than the {limit} such a file may have")
    return b"".join(_chunks(fd))


def cache_root() -> Path:
    """What the runtime keeps between runs (compiled models, backend choices): $MEGATRON_DEPLOY_CACHE,
    else ~/.cache/megatron-deploy (under $XDG_CACHE_HOME where set)."""
    base = os.environ.get("MEGATRON_DEPLOY_CACHE")
    return Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megatron-deploy"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; `what` names the file in errors ("manifest", "config")."""
    try:
        raw = read_regular(path, JSON_LIMIT)
    except Vanished:
        raise Vanished(f"{path}: no such {what}") from None
    return parse_json(raw, path, what)


def parse_json(raw: bytes, path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file's bytes (`path` and `what` name it in errors)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not a readable {what} ({err})") from None
    except RecursionError:
        raise UserError(f"{path}: not a {what} (JSON nested too deeply)") from None
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
        except RecursionError:
            raise UserError(f"{label}{path}:{number}: JSON nested too deeply") from None
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
        fd = open_regular(file)
        try:
            _digest_fd(fd, digest)
        finally:
            os.close(fd)
    return digest.hexdigest()


def fd_sha256(fd: int) -> str:
    """The sha256 of what an open file holds, read through its descriptor."""
    digest = hashlib.sha256()
    _digest_fd(fd, digest)
    return digest.hexdigest()


def _digest_fd(fd: int, digest: Any) -> None:
    for chunk in _chunks(fd):
        digest.update(chunk)


def _chunks(fd: int) -> Iterator[bytes]:
    """An open file's bytes from its start, in pieces (its offset untouched: others may share it)."""
    offset = 0
    while chunk := os.pread(fd, 1 << 24, offset):
        yield chunk
        offset += len(chunk)

