"""Every code block of the README runs as printed, taken from the README itself so they cannot drift.

Python blocks run in a folder where the README's own build command has made `artifacts/`; a
`print(...)` line's trailing comment is what it must print. Bash blocks run there with `bash -e`.
A `<!-- readme-test: KIND -->` line before a block says how else it is proven:
- `ci`: the set-up commands; the test command is `.ci/run`'s own, which CI runs.
- `slow`: minutes at the 345M size; runs with `pytest -m slow`.
- `gpu`: needs Docker and an NVIDIA GPU; runs where both are present.
- `serve`: the serving environment's set-up line is what the `serving_python` fixture makes (conftest.py);
  the rest runs with that environment as `.serve`, and its answer must be Session's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# One test process runs this module (pytest-xdist), so that its served artifact is made once.
pytestmark = pytest.mark.xdist_group("test_readme")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(?:<!-- readme-test: (\w+) -->\n)?```(python|bash)\n(.*?)```", flags=re.S)


def blocks(language: str, kind: str = "") -> list[str]:
    return [text for found_kind, lang, text in BLOCK.findall(README.read_text())
            if lang == language and found_kind == kind]


def commands(block: str) -> list[str]:
    """The block's commands: comments and blank lines dropped, continuations and && chains split."""
    lines = [line.split(" #")[0].strip() for line in block.replace("\\\n", " ").splitlines()]
    return [part.strip() for line in lines if line and not line.startswith("#") for part in line.split("&&")]


def expected_prints(block: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in block.splitlines()
            if line.startswith("print(") and "#" in line]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A folder that looks like the repository to the README's commands (its packages and benchmark
    scripts), holding what the README's first command builds."""
    folder = tmp_path_factory.mktemp("readme")
    for package in ("exporter", "runtime", "recipes"):
        (folder / package).symlink_to(ROOT / package)
    shutil.copytree(ROOT / "benchmarks", folder / "benchmarks")  # its results are written there
    build = next(c for c in commands(blocks("bash", "ci")[0]) if c.startswith("python -m exporter build"))
    subprocess.run([sys.executable, *build.split()[1:]], cwd=folder, check=True, capture_output=True)
    return folder


def run_bash(block: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, f"{block}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_the_readme_has_examples_each_with_expected_output():
    assert blocks("python") and all(expected_prints(b) for b in blocks("python"))
    assert blocks("bash") and all(blocks("bash", kind) for kind in ("ci", "slow", "gpu", "serve"))


def test_the_readme_test_command_is_what_ci_runs():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd "))]
    setup = commands(blocks("bash", "ci")[0])
    assert commands("\n".join(ci)) == setup[-2:] == ['python -m pip install -e ".[test]"', "python -m pytest"]


@pytest.mark.parametrize("number", range(len(blocks("python"))))
def test_readme_python_block_prints_what_the_readme_says(workspace, number):
    block = blocks("python")[number]
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"README.md python block {number}", "exec"), {})
    finally:
        os.chdir(cwd)
    assert printed.getvalue().splitlines() == expected_prints(block)


@pytest.mark.parametrize("number", range(len(blocks("bash"))))
def test_readme_bash_block_runs(workspace, number):
    run_bash(blocks("bash")[number], workspace)


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(blocks("bash", "slow"))))
def test_readme_slow_bash_block_runs(workspace, number):
    run_bash(blocks("bash", "slow")[number], workspace)


@pytest.mark.skipif(shutil.which("docker") is None or shutil.which("nvidia-smi") is None,
                    reason="needs Docker and an NVIDIA GPU")
@pytest.mark.parametrize("number", range(len(blocks("bash", "gpu"))))
def test_readme_gpu_bash_block_runs(workspace, number):
    run_bash(blocks("bash", "gpu")[number], ROOT)


def test_readme_serve_block_answers_as_the_session_does(workspace, serving_python):
    setup, rest = blocks("bash", "serve")[0].split("\n", 1)
    assert commands(setup) == ["python -m venv .serve", '.serve/bin/python -m pip install -e ".[serve]"']
    (workspace / ".serve").symlink_to(serving_python.parent.parent)
    printed = run_bash(rest, workspace)  # serve's lines and curl's response, which ends without a newline
    response = json.JSONDecoder().raw_decode(printed[printed.index('{"model_name"'):])[0]
    served = json.loads(response["outputs"][0]["data"][0])
    request = json.loads(re.search(r'"data": \["(.*)"\]', rest).group(1).replace('\\"', '"'))
    from runtime import Session

    expected = Session(workspace / "artifacts" / "qa.json", backend="onnxruntime").answer(**request)  # as served
    assert served == json.loads(json.dumps(expected)) and served["answer"]


def test_the_serving_environment_the_readme_makes_is_not_part_of_the_repository():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", ".serve/bin/python"], cwd=ROOT)
    assert result.returncode == 0, ".serve/ (the README's serving venv) is not ignored by git"
