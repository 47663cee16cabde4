"""The packages type-check (mypy, configured in pyproject.toml), the TensorRT code against the
TensorRT API as `tensorrt-stubs` describes it."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# One test process runs this module (pytest-xdist), so that its tensorrt-stubs are unpacked once.
pytestmark = pytest.mark.xdist_group("test_types")

ROOT = Path(__file__).resolve().parent.parent


def mypy(*args: str, stubs: Path | None = None, cwd: Path = ROOT, cache: Path | None = None
         ) -> subprocess.CompletedProcess:
    """mypy as configured; with `cache`, incremental over the modules an earlier run checked (mypy
    checks again whatever an import that now resolves, such as tensorrt's stubs, changes)."""
    env = {**os.environ, **({"MYPYPATH": str(stubs)} if stubs else {})}
    caching = ["--cache-dir", str(cache)] if cache else ["--no-incremental"]
    return subprocess.run([sys.executable, "-m", "mypy", *caching, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory) -> Path:
    """One cache for this module's runs of mypy over the packages: the library stubs are read once."""
    return tmp_path_factory.mktemp("mypy-cache")


def test_mypy_passes(mypy_cache):
    result = mypy(cache=mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


STUBS = "tensorrt-stubs==10.13.0.35.1"  # TensorRT 10.13's API; the package requires tensorrt, which cannot install


def stub_packages(into: Path) -> Path:
    """The folder holding `tensorrt` and `tensorrt_bindings` stubs: the installed ones, else the wheel
    fetched from the package index without its requirements and unpacked."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).parent
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "download", "--quiet", "--no-deps",
                    "--dest", str(into), STUBS], check=True, capture_output=True, timeout=600)
    with zipfile.ZipFile(next(into.glob("tensorrt_stubs-*.whl"))) as wheel:
        wheel.extractall(into / "unpacked")
    return into / "unpacked"


@pytest.fixture(scope="module")
def tensorrt_stubs(tmp_path_factory):
    """tensorrt-stubs, copied with the two defects that stop mypy from reading them mended: parameters
    named `in` (a keyword) and one parameter without a default after defaulted ones."""
    installed = stub_packages(tmp_path_factory.mktemp("wheel"))
    root = tmp_path_factory.mktemp("stubs")
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(installed / package, root / package)
    for stub in root.rglob("*.pyi"):
        text = re.sub(r"([(,] )in: ", r"\1in_: ", stub.read_text())
        stub.write_text(text.replace("channel_axis: int) -> IScaleLayer", "channel_axis: int = ...) -> IScaleLayer"))
    return root


def test_tensorrt_code_type_checks_against_the_stubs(tensorrt_stubs, mypy_cache):
    result = mypy(stubs=tensorrt_stubs, cache=mypy_cache)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_stubs_are_really_used(tensorrt_stubs, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import tensorrt as trt\n"
                     "runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))\n"
                     "builder = trt.Builder()\n"  # wants a logger
                     "level = trt.HardwareCompatibilityLevel.NO_SUCH_LEVEL\n")
    result = mypy("--config-file", str(ROOT / "pyproject.toml"), str(probe), stubs=tensorrt_stubs, cwd=tmp_path)
    assert result.returncode == 1
    assert "probe.py:3:" in result.stdout and "NO_SUCH_LEVEL" in result.stdout, result.stdout
