"""Putting a validated artifact in place so that a reader never sees half of it.

An artifact's files live in a version folder, `OUT/.NAME.v-<stamp>/`. `OUT/.NAME.artifact` is a
symlink to the current one, and `OUT/NAME.json`, `OUT/NAME.onnx`, ... are symlinks through it, so the
names users know stay put. Publishing is one atomic step, replacing `.NAME.artifact`; a reader that
resolves the manifest's real path (runtime.session.find_manifest does) reads every file from one
version. The version before stays until the next publish, for readers that opened it just before.

Killed at any instant, a build leaves the old artifact whole or the new one whole; what it leaves
behind (its `.NAME.building-<pid>-*` staging folder, a version never switched to) is removed by the
next build of that name.
"""

from __future__ import annotations

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
    now = time.time_ns()  # versions sort by name in the order they were published
    stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now % 10**9:09d}"
    version = out / f".{name}.v-{stamp}-{staging.name.rsplit('-', 1)[-1]}"
    os.replace(staging, version)
    current = out / f".{name}.artifact"
    old = _current_files(out, name)
    _link(current, version.name, name)  # the switch
    for file in names:
        _link(out / file, f"{current.name}/{file}", name)
    for stale in old - set(names):
        (out / stale).unlink(missing_ok=True)
    _drop_old_versions(out, name, keep=version.name)


def _current_files(out: Path, name: str) -> set[str]:
    """The files `out/NAME.*` holds now: through the links, or an artifact from before versions."""
    try:
        return {f"{name}.json", *Manifest.load(out / f"{name}.json").files}
    except UserError:  # no previous artifact (or an unreadable one): nothing of it to tidy
        return set()


def _drop_old_versions(out: Path, name: str, keep: str) -> None:
    """All versions but the current and the newest before it (which readers may still be opening)."""
    versions = sorted((p for p in out.glob(f".{name}.v-*") if p.name != keep), key=lambda p: p.name)
    for old in versions[:-1]:
        shutil.rmtree(old, ignore_errors=True)
