"""The README's Python examples run as printed and print what the README says they print.

Each ```python block is taken from the README itself and run in a folder where the README's own
build command has made `artifacts/`; a `print(...)` line's trailing comment is what it must print.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def expected_prints(block: str) -> list[str]:
    return [line.split("#", 1)[1].strip() for line in block.splitlines()
            if line.startswith("print(") and "#" in line]


@pytest.fixture(scope="module")
def readme_artifacts(tmp_path_factory):
    """What the README's first command builds (`python -m exporter build --head qa --precision fp16`)."""
    folder = tmp_path_factory.mktemp("readme")
    command = re.search(r"python -m exporter build --head qa[^\n]*", README.read_text()).group(0)
    subprocess.run([sys.executable, *command.split()[1:]], cwd=folder, check=True, capture_output=True)
    return folder


def test_the_readme_has_python_examples_with_expected_output():
    blocks = python_blocks()
    assert blocks and all(expected_prints(b) for b in blocks)


@pytest.mark.parametrize("number", range(len(python_blocks())))
def test_readme_python_block_prints_what_the_readme_says(readme_artifacts, number):
    block = python_blocks()[number]
    printed = io.StringIO()
    cwd = os.getcwd()
    os.chdir(readme_artifacts)
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"README.md python block {number}", "exec"), {})
    finally:
        os.chdir(cwd)
    assert printed.getvalue().splitlines() == expected_prints(block)
