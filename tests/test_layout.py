"""The package layout follows the pipeline: no module imports a later stage (issue 17), and the
allocators stay torch-free (../shared/STYLE.md: plan/ is numbers in, plan out)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import layerwise

SOURCE = Path(layerwise.__file__).parent

# Earlier stages first; a module may import its own stage and any earlier one.
STAGES = ["errors", "util", "models", "data", "engine", "profile", "quant", "plan", "prune", "measure",
          "apply", "evaluate", "export", "report", "compress", "cli", "__main__", "__init__"]


def stage_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(SOURCE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 2:
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("layerwise.")}


def later_stage_imports() -> list[str]:
    rank = {name: index for index, name in enumerate(STAGES)}
    found = []
    for path in sorted(SOURCE.rglob("*.py")):
        importer = module_name(path)
        for imported in sorted(imported_modules(path)):
            target = stage_of(imported)
            if target in rank and rank[target] > rank[stage_of(importer)]:
                found.append(f"{importer} imports {imported}")
    return found


def test_every_stage_is_known():
    stages = {path.name for path in SOURCE.iterdir() if path.is_dir() and (path / "__init__.py").exists()}
    stages |= {path.stem for path in SOURCE.glob("*.py")}
    assert stages <= set(STAGES), sorted(stages - set(STAGES))


def test_no_module_imports_a_later_stage():
    assert later_stage_imports() == []


def test_the_check_sees_a_later_stage_import(tmp_path, monkeypatch):
    package = tmp_path / "layerwise"
    (package / "plan").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plan" / "__init__.py").write_text("")
    (package / "plan" / "bad.py").write_text("def f():\n    from layerwise.measure.run import run_plan\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", package)
    assert later_stage_imports() == ["layerwise.plan.bad imports layerwise.measure.run",
                                     "layerwise.plan.bad imports layerwise.measure.run.run_plan"]


def test_the_allocators_and_the_table_do_not_load_torch():
    code = ("import sys; import layerwise.plan, layerwise.plan.table, layerwise.plan.check, "
            "layerwise.plan.objectives, layerwise.plan.units, layerwise.plan.plan; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
