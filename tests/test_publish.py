"""Publishing is atomic: a build killed at any step of putting its artifact in place leaves the old
artifact whole or the new one whole, never a mix; the next build cleans up what the dead one left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.build import BuildOptions, build
from exporter.publish import publish, staging_folder
from runtime import Session
from runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(head="nsp", checkpoint="demo-random", max_batch=2, max_sequence=16, eval_data="none")

# Runs in a process of its own: stage the NEW artifact in `out` and publish it, dying (os._exit, like a
# kill) just before the K-th change to the file system while publishing, or counting them when K is 0.
KILLER = """
import os, shutil, sys
from pathlib import Path
from exporter.publish import publish, staging_folder
from runtime.manifest import Manifest

new, out, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
staging = staging_folder(out, "nsp")
for name in [new.name, *Manifest.load(new).files]:
    shutil.copy(new.parent / name, staging / name)
calls = 0

def dying(real):
    def call(*args, **kwargs):
        global calls
        calls += 1
        if calls == k:
            os._exit(9)
        return real(*args, **kwargs)
    return call

for module, name in ((os, "replace"), (os, "symlink"), (os, "chmod"), (os, "unlink"), (shutil, "rmtree")):
    setattr(module, name, dying(getattr(module, name)))
publish(staging, out, Manifest.load(staging / "nsp.json"))
print(calls)
"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """Two builds of one artifact: the old one published as this version publishes, the same files laid
    out flat (as builds before versioned publishing left them), and a newer build's files."""
    root = tmp_path_factory.mktemp("versions")
    old = build(BuildOptions(**SMALL, out=root / "old"), log=lambda message: None)
    new = build(BuildOptions(**SMALL, out=root / "new"), log=lambda message: None)
    (root / "flat").mkdir()
    for name in [old.name, *Manifest.load(old).files]:
        shutil.copy(old.parent / name, root / "flat" / name)
    return {"old": root / "old", "flat": root / "flat", "new": new.parent}


def staged_new(versions: dict[str, Path], out: Path) -> Path:
    staging = staging_folder(out, "nsp")
    new = versions["new"] / "nsp.json"
    for name in [new.name, *Manifest.load(new).files]:
        shutil.copy(new, staging / name) if name == new.name else shutil.copy(new.parent / name, staging / name)
    return staging


def publish_dying_at(versions: dict[str, Path], layout: str, out: Path, k: int) -> subprocess.CompletedProcess:
    shutil.copytree(versions[layout], out, symlinks=True)
    return subprocess.run([sys.executable, "-c", KILLER, str(versions["new"] / "nsp.json"), str(out), str(k)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def created(folder: Path) -> str:
    return json.loads((folder / "nsp.json").read_text())["created"]


@pytest.mark.parametrize("layout", ["old", "flat"])
def test_a_publish_killed_at_any_step_leaves_one_whole_artifact(versions, tmp_path, layout):
    counted = publish_dying_at(versions, layout, tmp_path / "count", 0)
    steps = int(counted.stdout)
    assert steps >= 5, counted.stderr
    old, new = created(versions["old"]), created(versions["new"])
    assert old != new
    for k in range(1, steps + 1):
        out = tmp_path / f"killed-{k}"
        result = publish_dying_at(versions, layout, out, k)
        assert result.returncode == 9, (k, result.stderr)
        session = Session(out / "nsp.json")  # whole: every file matches its manifest's hash
        assert session.manifest.created in (old, new), k
        assert session.next_sentence("The cat sat.", "It slept.")["score"] >= 0
        # The next build of that name cleans up after the dead one and publishes whole.
        publish(staged_new(versions, out), out, Manifest.load(versions["new"] / "nsp.json"))
        assert Session(out / "nsp.json").manifest.created == new
        leftovers = [p.name for p in out.iterdir() if ".building-" in p.name or ".link-" in p.name]
        assert not leftovers, (k, leftovers)
        assert len(list(out.glob(".nsp.v-*"))) <= 2


def test_a_session_reads_one_version_while_the_links_move(versions, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(versions["old"], out, symlinks=True)
    session = Session(out / "nsp.json")
    publish(staged_new(versions, out), out, Manifest.load(versions["new"] / "nsp.json"))
    assert session.next_sentence("The cat sat.", "It slept.")["score"] >= 0  # its version is still there
    assert Session(out / "nsp.onnx").manifest.created == created(versions["new"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "nsp.json", "nsp.onnx", "nsp.tokenizer.json"]
    assert all((out / name).is_symlink() for name in ("nsp.json", "nsp.onnx", "nsp.tokenizer.json"))


def test_stale_staging_of_a_dead_build_is_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".nsp.building-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "nsp.onnx").write_bytes(b"half")
    mine = tmp_path / f".nsp.building-{os.getpid()}-xyz"  # a live build's: left alone
    mine.mkdir()
    build(BuildOptions(**SMALL, out=tmp_path), log=lambda message: None)
    assert not stale.exists() and mine.exists()
