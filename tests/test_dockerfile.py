"""The Dockerfile, read as text (no registry is reachable here to build it): its stages, base image,
sources, users, and a runtime stage without torch."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (keyword, arguments), with ARG defaults substituted."""
    text = (ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    result: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        keyword, _, rest = line.strip().partition(" ")
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        if keyword == "FROM":
            image, _, name = rest.partition(" AS ")
            current = name.strip()
            result[current] = [("FROM", image.strip())]
        elif current:
            result[current].append((keyword, rest))
    return result


def test_stages_and_base_image():
    found = stages()
    assert {"base", "runtime", "exporter"} <= set(found)
    assert list(found)[-1] == "exporter"  # `docker build .` (no --target) gives the exporter
    image = found["base"][0][1]
    assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d{2}\.\d{2}-py3", image), image
    for name in ("runtime", "exporter"):
        assert found[name][0] == ("FROM", "base")


def test_every_copy_source_exists():
    for name, instructions in stages().items():
        for keyword, rest in instructions:
            if keyword == "COPY" and "--from" not in rest:
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), (name, source)


def test_final_stages_run_as_a_user_and_exporter_is_the_entrypoint():
    found = stages()
    for name in ("runtime", "exporter"):
        users = [rest for keyword, rest in found[name] if keyword == "USER"]
        assert users and users[-1] not in ("root", "0"), name
    assert ("ENTRYPOINT", '["python3", "-m", "exporter"]') in found["exporter"]
    installs = " ".join(rest for keyword, rest in found["exporter"] if keyword == "RUN")
    assert "export" in installs and "gpu" in installs


def test_runtime_stage_installs_no_torch():
    runs = " ".join(rest for keyword, rest in stages()["runtime"] + stages()["base"] if keyword == "RUN")
    extras = re.findall(r'pip install "\.\[([\w,]+)\]"', runs)
    assert extras == ["gpu"] and "torch" not in runs, runs
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    installed = project["dependencies"] + project["optional-dependencies"]["gpu"]
    assert not [d for d in installed if d.startswith("torch") or d.startswith("megatron-deploy")], installed
