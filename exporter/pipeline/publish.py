"""Putting a validated artifact in place so that a reader never sees half of it.

An artifact's files live in a version folder, `OUT/.NAME.v-<stamp>/`. `OUT/.NAME.artifact` is a
symlink to the current one, and `OUT/NAME.json`, `OUT/NAME.onnx`, ... are symlinks through it, so the
names users know stay put. Publishing is one atomic step, replacing `.NAME.artifact`; a reader that
resolves the manifest's real path (runtime.pinned.find_manifest does) reads every file from one
version. The version before stays until the next publish, for readers that opened it just before.

Invariants, whatever the file sets of the old and the new artifact:
- Killed at any instant, a publish leaves `OUT/NAME.json` giving the old artifact whole or the new one
  whole, and every `OUT/NAME.*` name resolves to a file (names of the new artifact are linked into its
  version before the switch; names only the old one had are linked straight into the old version
  before the switch and removed after it).
- A version is removed only when it is neither current, nor the one current just before, nor the
  target of any name; what a dead build leaves (its `.NAME.building-<pid>-*` staging folder, a version
  never switched to) goes with the next publish of that name.
- Publishes of one name take turns (a lock file, `OUT/.NAME.lock`), so one never collects the version
  that another is about to switch to.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from runtime.errors import UserError
from runtime.manifest import Manifest


def ordinary_file_mode() -> int:
    """The mode a new file gets under this process's umask (0644 under 022). Every published file gets
    it, whichever library wrote it: ONNX Runtime's quantizer leaves its external data private (0600),
    which a server running as another user could not open."""
    status = Path("/proc/self/status")
    umask = next((int(line.split()[1], 8) for line in status.read_text().splitlines() if line.startswith("Umask:")),
                 None) if status.exists() else None
    if umask is None:  # no procfs: read it the only other way, by setting it (and putting it back)
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def staging_folder(out: Path, name: str) -> Path:
    """A new private folder to build `name` in, after removing what dead builds of it left."""
    remove_leftovers(out, name)
    return Path(tempfile.mkdtemp(prefix=f".{name}.building-{os.getpid()}-", dir=out))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_leftovers(out: Path, name: str) -> None:
    """Staging folders and half-made links of builds of `name` whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(building|link)-(\d+)-")
    for entry in out.iterdir() if out.is_dir() else []:
        found = pattern.match(entry.name)
        if found and not _alive(int(found.group(2))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _link(path: Path, target: str, name: str) -> None:
    """Make `path` a symlink to `target` in one atomic step (whatever was there before)."""
    if path.is_symlink() and os.readlink(path) == target:
        return
    scratch = path.with_name(f".{name}.link-{os.getpid()}-{path.name}")
    scratch.unlink(missing_ok=True)
    os.symlink(target, scratch)
    os.replace(scratch, path)


def publish(staging: Path, out: Path, manifest: Manifest) -> None:
    """Make the validated artifact in `staging` the one `out/NAME.*` gives, in one atomic step."""
    name, mode = manifest.name, ordinary_file_mode()
    names = [f"{name}.json", *manifest.files]  # the manifest first: readers start from it
    for file in names:
        os.chmod(staging / file, mode)
    os.chmod(staging, mode | (mode & 0o444) >> 2)  # enterable by whoever may read the files
    with _turn(out, name):
        now = time.time_ns()  # versions sort by name in the order they were published
        stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}"
        version = out / f".{name}.v-{stamp}-{staging.name.rsplit('-', 1)[-1]}"
        os.replace(staging, version)
        current = out / f".{name}.artifact"
        previous = os.readlink(current) if current.is_symlink() else None
        old = _current_files(out, name)
        for file in set(names) - old:  # valid before the switch: straight into the new version
            _link(out / file, f"{version.name}/{file}", name)
        if previous:
            for file in old - set(names):  # still valid after it: straight into the old version
                _link(out / file, f"{previous}/{file}", name)
        _link(current, version.name, name)  # the switch
        for file in names:
            _link(out / file, f"{current.name}/{file}", name)
        for file in (old | _linked(out, name)) - set(names):  # and what a dead publish left linked
            (out / file).unlink(missing_ok=True)
        _drop_old_versions(out, name, keep={version.name, previous})


class _turn:
    """Holds `OUT/.NAME.lock` while one publish of NAME runs (released by the system if its process dies)."""

    def __init__(self, out: Path, name: str):
        self.path = out / f".{name}.lock"

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def _current_files(out: Path, name: str) -> set[str]:
    """The files `out/NAME.*` holds now: through the links, or an artifact from before versions."""
    try:
        return {f"{name}.json", *Manifest.load(out / f"{name}.json").files}
    except UserError:  # no previous artifact (or an unreadable one): nothing of it to tidy
        return set()


def _linked(out: Path, name: str) -> set[str]:
    """The names in `out` that are links into NAME's versions."""
    return {p.name for p in out.glob(f"{name}.*") if p.is_symlink() and os.readlink(p).startswith(f".{name}.")}


def _drop_old_versions(out: Path, name: str, keep: set[str | None]) -> None:
    """Every version but those in `keep` and those a name in `out` still points into."""
    pointed = {os.readlink(out / link).split("/", 1)[0] for link in _linked(out, name)}
    for old in out.glob(f".{name}.v-*"):
        if old.name not in keep and old.name not in pointed:
            shutil.rmtree(old, ignore_errors=True)
