"""The README's package table is the layout: its folders, their modules and what each stage may import."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = "exporter/"


def table() -> dict[str, tuple[set[str], set[str]]]:
    """package folder -> (the modules and folders its row names, the packages it may import)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Packages\n"):readme.index("## Building artifacts\n")]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `((?:exporter|runtime)/[a-z_]*/?)` \| (.*) \| (.*) \|$", line)
        if match:
            folder, holds, imports = match.groups()
            rows[folder] = (set(re.findall(r"`([a-z_0-9]+(?:\.py|/))`", holds)), set(re.findall(r"`([a-z_]+)`", imports)))
    return rows


def stages() -> list[str]:
    return sorted(f"exporter/{p.parent.name}/" for p in (ROOT / "exporter").glob("*/__init__.py"))


def test_the_table_names_every_stage_package_and_each_of_its_modules() -> None:
    rows = table()
    assert set(rows) == {*stages(), TOP, "runtime/"}
    for folder, (named, _) in rows.items():
        path = ROOT / folder
        present = {p.name for p in path.glob("*.py") if p.name != "__init__.py"}
        present |= {f"{p.name}/" for p in path.iterdir() if p.is_dir() and p.name != "__pycache__"}
        if folder == TOP:
            present -= {f"{p.name}/" for p in path.iterdir()}  # the stages have rows of their own
        assert named == present, f"{folder}: the README names {sorted(named - present)} that are not there, " \
                                 f"and not {sorted(present - named)}"


def test_each_stage_package_says_what_it_holds_and_what_it_may_import() -> None:
    for folder in stages():
        doc = ast.get_docstring(ast.parse((ROOT / folder / "__init__.py").read_text()))
        assert doc and "may import" in doc.lower(), f"{folder}__init__.py must say what the package holds and may import"


def imported(module: Path) -> set[str]:
    """The modules `module` imports by absolute name, wherever in it (`from a.b import c` -> a.b)."""
    found = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def exporter_imports(module: Path) -> set[str]:
    """The exporter packages or top-level modules `module` imports (`exporter.pipeline.build` -> pipeline)."""
    return {name.split(".")[1] for name in imported(module) if name.startswith("exporter.")}


def test_each_stage_imports_only_the_stages_its_row_allows() -> None:
    rows = table()
    top_modules = {p.stem for p in (ROOT / "exporter").glob("*.py")}
    for folder in stages():
        package = folder.split("/")[1]
        allowed = rows[folder][1] | {package} | top_modules
        for module in (ROOT / folder).rglob("*.py"):
            wrong = exporter_imports(module) - allowed
            assert not wrong, f"{module.relative_to(ROOT)} imports {sorted(wrong)}; the README's table allows " \
                              f"{sorted(rows[folder][1])}"


def test_the_import_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from exporter.pipeline.build import build\nimport exporter.delivery.serve\nfrom . import x\n")
    assert exporter_imports(module) == {"pipeline", "delivery"}


def test_runtime_imports_neither_the_exporter_nor_torch() -> None:
    for module in (ROOT / "runtime").glob("*.py"):
        wrong = sorted(n for n in imported(module) if n.split(".")[0] in ("exporter", "torch", "transformers"))
        assert not wrong, f"{module.relative_to(ROOT)} imports {wrong}: production machines have no torch"
