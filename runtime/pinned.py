"""An artifact held open while it loads, so that what runs is what was checked.

The manifest and every file it lists are opened once. Sizes and hashes (and the signature, where one
is required) are checked through those descriptors, and the backends read the files through
`PinnedArtifact.folder`, a private folder of links to the descriptors (`/proc/self/fd/N`), never by
the artifact's own path again. A file renamed, replaced or deleted after the check (by a publish, or
by anyone who can write the artifact's folder) changes nothing that loads. The limit: whoever can
write a file itself, in place, can still change its bytes between the check and the load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Collection
from pathlib import Path

from . import signatures
from .errors import UserError
from .files import JSON_LIMIT, Vanished, cache_root, fd_sha256, open_regular, read_fd
from .manifest import Manifest

FD_FOLDER = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
FORM_SUFFIXES = (".qdq", ".prefill", ".decode")  # of graph files: NAME.prefill.qdq.onnx belongs to NAME


def manifest_beside(path: Path) -> Path:
    """`qa.json` itself, or the manifest beside `qa.onnx`, `qa.plan`, `lm.prefill.onnx` ... (as named,
    links not followed)."""
    if path.suffix == ".json":
        return path
    if path.suffix not in (".onnx", ".plan"):
        raise UserError(f"{path}: expected an artifact's manifest (.json) or model file (.onnx, .plan)")
    stem = path.name[:-len(path.suffix)]
    for form in FORM_SUFFIXES:  # lm.prefill.qdq.onnx -> lm
        stem = stem.removesuffix(form)
    manifest = path.with_name(f"{stem}.json")
    if not manifest.exists():
        raise UserError(f"{path}: no manifest {manifest.name} beside it (artifacts are written by "
                        "`python -m exporter build`)")
    return manifest


def find_manifest(path: Path) -> Path:
    """The real path of the manifest `manifest_beside` names, so that every file is read from one
    published version of the artifact (exporter.pipeline.publish). Links may lead only within the folder the
    path names (as published versions do)."""
    manifest = manifest_beside(path)
    if not manifest.exists():
        return manifest
    real, folder = manifest.resolve(), manifest.parent.resolve()
    if folder != real.parent and folder not in real.parent.parents:
        raise UserError(f"{manifest}: a symlink leading out of its folder (to {real}); an artifact's files live "
                        "in its folder")
    return real


class PinnedArtifact:
    def __init__(self, manifest_path: Path, public_key: Path | None = None):
        """`manifest_path`: the manifest's real path (runtime.session.find_manifest). `public_key`: require
        NAME.sig, a signature of the manifest and all its files by its private key. `check` checks the
        files' hashes."""
        self.directory = manifest_path.parent
        self.folder = Path(tempfile.mkdtemp(prefix="megatron-open-"))
        self._fds: dict[str, int] = {}
        self._copies: list[Path] = []
        self._release = weakref.finalize(self, _release, self._fds, self.folder, self._copies)
        try:
            self._pin(manifest_path.name)
            raw = self.read(manifest_path.name, JSON_LIMIT)
            if public_key is not None:  # before the manifest is trusted to parse: a changed one fails here
                self._check_signature(manifest_path, raw, public_key)
            self.manifest = Manifest.from_bytes(raw, manifest_path)
        except BaseException:
            self.close()
            raise

    def _check_signature(self, manifest_path: Path, raw: bytes, public_key: Path) -> None:
        """Pin the signature and every file the manifest lists, and check the signature over them."""
        signature = signatures.signature_path(manifest_path)
        try:
            self._pin(signature.name)
        except Vanished:
            raise UserError(f"{manifest_path}: not signed (no {signature.name} beside it), and a signature is "
                            "required") from None
        for name in _listed(raw):
            try:
                self._pin(name)
            except Vanished:  # missing: the signature check names it
                pass
        signatures.check(self.folder / manifest_path.name, public_key, manifest_path)

    def check(self, only: Collection[str] | None = None) -> None:
        """Every listed file (or those of `only`: the others run elsewhere) has its recorded size and hash."""
        try:
            for name in self.manifest.files:
                if only is None or name in only:
                    self._check(name)
        except BaseException:
            self.close()
            raise

    def _pin(self, name: str) -> int:
        if name not in self._fds:
            path = self.directory / name
            fd = open_regular(path)
            self._fds[name] = fd
            real = Path(os.readlink(f"{FD_FOLDER}/{fd}"))  # what was opened, wherever links led
            if real.parent != self.directory.resolve():
                raise UserError(f"{path}: a symlink leading out of the artifact's folder (to {real}); an artifact's "
                                "files live in its folder")
            os.symlink(f"/proc/{os.getpid()}/fd/{fd}" if FD_FOLDER.startswith("/proc") else f"{FD_FOLDER}/{fd}",
                       self.folder / name)
        return self._fds[name]

    def _check(self, name: str) -> None:
        expected, fd = self.manifest.files[name], self._pin(name)
        if os.fstat(fd).st_size != expected["bytes"] or fd_sha256(fd) != expected["sha256"]:
            raise UserError(f"{self.directory / name}: contents differ from the manifest (sha256 mismatch); the "
                            "file was modified or replaced after the build; rebuild the artifact")

    def path(self, name: str) -> Path:
        """Where a backend reads the pinned file."""
        self._pin(name)
        return self.folder / name

    def read(self, name: str, limit: int | None = None) -> bytes:
        return read_fd(self._pin(name), self.directory / name, limit)

    def copies(self, names: Collection[str]) -> Path:
        """A private folder of real copies of `names`, made through the pinned descriptors, for a library
        that refuses links (OpenVINO will not follow external data out of a graph's folder). Removed on close."""
        folder = Path(tempfile.mkdtemp(prefix="open-", dir=_scratch()))
        self._copies.append(folder)
        for name in names:
            with os.fdopen(os.dup(self._pin(name)), "rb") as source, open(folder / name, "wb") as target:
                source.seek(0)
                shutil.copyfileobj(source, target, 1 << 24)
        return folder

    def close(self) -> None:
        """Let go of the descriptors and the private folders (backends already hold what they loaded)."""
        self._release()


def _scratch() -> Path:
    """On the disk of the runtime's cache (a temporary folder may be memory, too small for weights)."""
    folder = cache_root() / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _release(fds: dict[str, int], folder: Path, copies: list[Path]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()
    for path in (folder, *copies):
        shutil.rmtree(path, ignore_errors=True)


def verify(path: Path, only: Collection[str] | None = None, public_key: Path | None = None) -> Manifest:
    """The manifest of the artifact at `path` (as find_manifest takes it), after checking its files as a
    Session opening it would: raise UserError naming the first problem."""
    pinned = PinnedArtifact(find_manifest(path), public_key)
    pinned.check(only)
    pinned.close()
    return pinned.manifest


def _listed(raw: bytes) -> list[str]:
    """The plain file names a manifest lists, read leniently: it is not trusted before its signature is checked."""
    try:
        files = json.loads(raw).get("files")
    except (ValueError, RecursionError, AttributeError):
        return []
    return [name for name in files if isinstance(name, str) and name and "/" not in name and "\0" not in name
            and name not in (".", "..")] if isinstance(files, dict) else []
