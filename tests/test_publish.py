"""Publishing is atomic: a build killed at any step of putting its artifact in place leaves the old
artifact whole or the new one whole, never a mix, and every name resolving, also when the new artifact
has other files than the old; the next build cleans up what the dead one left; publishers of one name
take turns, and a reader opening during publishes gets the old or the new artifact, never an error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.pipeline.build import BuildOptions, build
from exporter.cli import main
from exporter.pipeline.publish import publish, staging_folder
from runtime import Session
from runtime.manifest import Manifest

# One test process runs this module (pytest-xdist), so that its builds of one name are made once.
pytestmark = pytest.mark.xdist_group("test_publish")

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(head="qa", checkpoint="demo-random", max_batch=2, max_sequence=16, eval_data="none", name="art")
# The same name as a causal LM: other files (art.prefill.onnx, art.decode.onnx instead of art.onnx)
LM = dict(SMALL, head="causal-lm", max_past=8)

# Runs in a process of its own: stage the NEW artifact in `out` and publish it, dying (os._exit, like a
# kill) just before the K-th change to the file system while publishing, or counting them when K is 0.
KILLER = """
import os, shutil, sys
from pathlib import Path
from exporter.pipeline.publish import publish, staging_folder
from runtime.manifest import Manifest

new, out, k = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
staging = staging_folder(out, "art")
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
publish(staging, out, Manifest.load(staging / "art.json"))
print(calls)
"""


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, Path]:
    """Builds of one artifact name: the old one published as this version publishes, the same files laid
    out flat (as builds before versioned publishing left them), a newer build's files, and a causal LM's
    (another file set) both published and as files to publish."""
    root = tmp_path_factory.mktemp("versions")
    old = build(BuildOptions(**SMALL, out=root / "old"), log=lambda message: None)
    build(BuildOptions(**SMALL, out=root / "new"), log=lambda message: None)
    build(BuildOptions(**LM, out=root / "lm"), log=lambda message: None)
    (root / "flat").mkdir()
    for name in [old.name, *Manifest.load(old).files]:
        shutil.copy(old.parent / name, root / "flat" / name)
    return {"old": root / "old", "flat": root / "flat", "new": root / "new", "lm": root / "lm"}


def staged(versions: dict[str, Path], out: Path, which: str = "new") -> Path:
    staging = staging_folder(out, "art")
    new = versions[which] / "art.json"
    for name in [new.name, *Manifest.load(new).files]:
        shutil.copy(new.parent / name, staging / name)
    return staging


def publish_dying_at(versions: dict[str, Path], layout: str, out: Path, k: int, which: str = "new"
                     ) -> subprocess.CompletedProcess:
    shutil.copytree(versions[layout], out, symlinks=True)
    return subprocess.run([sys.executable, "-c", KILLER, str(versions[which] / "art.json"), str(out), str(k)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def created(folder: Path) -> str:
    return json.loads((folder / "art.json").read_text())["created"]


def every_name_resolves(out: Path) -> None:
    names = [p for p in out.iterdir() if p.name.startswith("art.")]
    assert names and all(p.exists() for p in names), [(p.name, os.readlink(p)) for p in names if not p.exists()]


@pytest.mark.parametrize("layout, which", [("old", "new"), ("flat", "new"), ("old", "lm"), ("lm", "new")],
                         ids=["same-files", "from-flat", "qa-to-lm", "lm-to-qa"])
def test_a_publish_killed_at_any_step_leaves_one_whole_artifact(versions, tmp_path, layout, which, capsys):
    counted = publish_dying_at(versions, layout, tmp_path / "count", 0, which)
    steps = int(counted.stdout)
    assert steps >= 5, counted.stderr
    old, new = created(versions[layout]), created(versions[which])
    assert old != new
    for k in range(1, steps + 1):
        out = tmp_path / f"killed-{k}"
        result = publish_dying_at(versions, layout, out, k, which)
        assert result.returncode == 9, (k, result.stderr)
        session = Session(out / "art.json")  # whole: every file matches its manifest's hash
        assert session.manifest.created in (old, new), k
        every_name_resolves(out)
        assert main(["verify", str(out)]) == 0, (k, capsys.readouterr().out)
        # The next build of that name cleans up after the dead one and publishes whole.
        publish(staged(versions, out, which), out, Manifest.load(versions[which] / "art.json"))
        assert Session(out / "art.json").manifest.created == new
        every_name_resolves(out)
        leftovers = [p.name for p in out.iterdir() if ".building-" in p.name or ".link-" in p.name]
        assert not leftovers, (k, leftovers)
        assert len(list(out.glob(".art.v-*"))) <= 2


def test_a_version_never_switched_to_is_collected_and_the_current_kept(versions, tmp_path):
    """A build killed after making its version but before the switch: the next publish keeps the version
    that was current (readers may have it open) and removes the never-used one."""
    out = tmp_path / "out"
    shutil.copytree(versions["old"], out, symlinks=True)
    current = os.readlink(out / ".art.artifact")
    never = out / ".art.v-99991231T000000.000000000-dead"  # sorts after every real version
    shutil.copytree(out / current, never)
    publish(staged(versions, out), out, Manifest.load(versions["new"] / "art.json"))
    assert (out / current).is_dir() and not never.exists()
    assert Session(out / "art.json").manifest.created == created(versions["new"])


def test_two_publishers_and_a_reader_never_see_an_error(versions, tmp_path):
    """2 publishers x 15 publishes of one name, alternating file sets, while a reader opens in a loop."""
    out = tmp_path / "out"
    shutil.copytree(versions["old"], out, symlinks=True)
    publisher = ("import sys\nfrom pathlib import Path\nfrom test_publish import staged, versions_at\n"
                 "from exporter.pipeline.publish import publish\nfrom runtime.manifest import Manifest\n"
                 "versions, out = versions_at(Path(sys.argv[1])), Path(sys.argv[2])\n"
                 "for i in range(15):\n"
                 "    which = ('new', 'lm')[(i + int(sys.argv[3])) % 2]\n"
                 "    publish(staged(versions, out, which), out, Manifest.load(versions[which] / 'art.json'))\n")
    root = versions["old"].parent
    runs = [subprocess.Popen([sys.executable, "-c", publisher, str(root), str(out), str(i)], cwd=ROOT / "tests",
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
            for i in range(2)]
    opened, failures = 0, []
    while any(run.poll() is None for run in runs):
        try:
            Session(out / "art.json", backend="onnxruntime")
            opened += 1
        except Exception as err:  # noqa: BLE001 - every failure counts
            failures.append(f"{type(err).__name__}: {err}")
    assert [run.wait() for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert opened >= 10 and not failures, (opened, failures[:3])
    every_name_resolves(out)
    assert Session(out / "art.json").manifest.created in (created(versions["new"]), created(versions["lm"]))


def versions_at(root: Path) -> dict[str, Path]:
    return {name: root / name for name in ("old", "flat", "new", "lm")}


def test_a_session_reads_one_version_while_the_links_move(versions, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(versions["old"], out, symlinks=True)
    session = Session(out / "art.json")
    publish(staged(versions, out), out, Manifest.load(versions["new"] / "art.json"))
    assert session.answer("Who sat?", "The cat sat.")["score"] >= 0  # its version is still there
    assert Session(out / "art.onnx").manifest.created == created(versions["new"])
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "art.json", "art.onnx", "art.tokenizer.json"]
    assert all((out / name).is_symlink() for name in ("art.json", "art.onnx", "art.tokenizer.json"))


def test_stale_staging_of_a_dead_build_is_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".art.building-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "art.onnx").write_bytes(b"half")
    mine = tmp_path / f".art.building-{os.getpid()}-xyz"  # a live build's: left alone
    mine.mkdir()
    build(BuildOptions(**SMALL, out=tmp_path), log=lambda message: None)
    assert not stale.exists() and mine.exists()
