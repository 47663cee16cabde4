"""A wheel built from the repository, installed like any package (not editable), builds an artifact:
recipes, their evaluation and calibration data, and the demo checkpoints ship inside it."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path

import pytest

# One test process runs this module (pytest-xdist), so that its installed wheel is made once.
pytestmark = pytest.mark.xdist_group("test_install")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel's files in a folder of their own (pip install --target), from a copy of the source tree
    so that the build leaves nothing behind in the repository."""
    work = tmp_path_factory.mktemp("install")
    shutil.copytree(ROOT, work / "source", ignore=shutil.ignore_patterns(
        ".git", "build", "artifacts", "*.egg-info", "__pycache__", ".mypy_cache"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "wheel"),
                    str(work / "source")], check=True, capture_output=True)
    wheel = next((work / "wheel").glob("megatron_deploy-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(work / "site"), str(wheel)],
                   check=True, capture_output=True)
    return work / "site"


def run_installed(site_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """Python without site (-S), so this checkout's editable install is not seen: the installed wheel
    first, then the environment's other packages (torch, onnx, ...)."""
    path = os.pathsep.join([str(site_dir), *site.getsitepackages()])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_installed_wheel_holds_recipes_data_and_demo(installed):
    assert (installed / "recipes" / "qa.toml").is_file()
    assert (installed / "recipes" / "data" / "eval" / "qa.jsonl").is_file()
    assert (installed / "recipes" / "data" / "calibration" / "qa.jsonl").is_file()
    assert (installed / "exporter" / "sources" / "demo" / "qa" / "model.safetensors").is_file()


def test_a_non_editable_install_builds_the_readme_artifact(installed, tmp_path):
    where = run_installed(installed, tmp_path, "-c", "import exporter, recipes; print(exporter.__file__, recipes.__file__)")
    assert where.stdout.split() == [str(installed / "exporter" / "__init__.py"), str(installed / "recipes" / "__init__.py")]

    result = run_installed(installed, tmp_path, "-m", "exporter", "build", "--head", "qa")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((tmp_path / "artifacts" / "qa.json").read_text())
    assert manifest["head"] == "qa" and manifest["validation"]["passed"]
    assert manifest["accuracy"]["data"].endswith("qa.jsonl")  # the shipped evaluation set was found and used


def setuptools_builds_wheels() -> bool:
    """Whether the setuptools installed here meets the build's requirement and builds wheels by itself
    (bdist_wheel built in since 70.1; pyproject.toml asks for 68 or later)."""
    try:
        version = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1)


def resolved(extras: str) -> dict[str, str]:
    """What pip would install for `.[extras]` on a clean machine: name -> version (from the package index)."""
    # The project's own metadata is read with the setuptools installed here where it can (an isolated build
    # environment would fetch and install setuptools first, for the same metadata)
    isolation = ["--no-build-isolation"] if setuptools_builds_wheels() else []
    report = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "install", "--dry-run",
                             "--ignore-installed", "--quiet", *isolation, "--report", "-", f".[{extras}]"],
                            cwd=ROOT, check=True, capture_output=True, text=True, timeout=600)
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.stdout)["install"]}


def test_the_test_extra_downgrades_nothing_the_export_extra_installs():
    with ThreadPoolExecutor(2) as pool:  # two resolutions, each mostly waiting on the package index
        export, test = pool.map(resolved, ("export", "test"))
    changed = {name: (version, test[name]) for name, version in export.items() if test.get(name, version) != version}
    assert not changed, f"[test] changes what [export] installs: {changed}"
