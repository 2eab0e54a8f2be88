"""The architecture rules, checked on the source: the core knows no framework, MLflow lives in tracking."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "platform" / "raybloom"
CORE = ("spec", "data", "models", "schedules", "regularization", "engine", "tracking", "plots", "runner", "errors")
ADAPTERS = ("ray_train", "search", "federated", "cli", "cluster", "submit", "report")  # cluster/, federated/: packages


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "raybloom":
                names |= {f"raybloom.{a.name}" for a in node.names}
    return names


def module_files(name: str) -> list[Path]:
    """A module's source: name.py, or every file of the package name/."""
    return [PKG / f"{name}.py"] if (PKG / f"{name}.py").exists() else sorted((PKG / name).rglob("*.py"))


def test_no_platform_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_mlflow_is_imported_only_by_tracking():
    for path in PKG.rglob("*.py"):  # federated/ and cluster/ included
        if path.stem != "tracking":
            assert not any(n.split(".")[0] == "mlflow" for n in imports(path)), path.name


def test_engine_knows_no_framework():
    for name in ("engine", "models", "schedules", "regularization", "data", "spec"):
        found = {n.split(".")[0] for path in module_files(name) for n in imports(path)}
        assert not found & {"ray", "flwr", "mlflow", "optuna"}, (name, found)


def test_every_module_is_core_or_adapter():
    """A new module says which side it is on (here), so the rules below check it."""
    found = {p.stem for p in PKG.glob("*.py")} | {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert found - {"__init__", "__main__"} == set(CORE) | set(ADAPTERS)


def test_core_imports_no_adapter():
    for name in CORE:
        found = {n for path in module_files(name) for n in imports(path) if n.startswith("raybloom.")}
        assert not {n.split(".")[1] for n in found} & set(ADAPTERS), (name, found)


def test_every_benchmark_is_in_the_summary_table():
    """`make bench` ends with tests/benchmarks/summary.py: each bench_*.py has results and rows in its table."""
    import importlib.util

    bench = ROOT / "tests" / "benchmarks"
    spec = importlib.util.spec_from_file_location("bench_summary", bench / "summary.py")
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    rows = summary.rows()
    scripts = {p.name for p in bench.glob("bench_*.py")}
    assert scripts == {r["script"].split()[0] for r in rows}, "a benchmark without summary rows (or rows of a removed one)"
    assert all(r["verdict"] in ("PASS", "MISS") for r in rows)
    assert summary.table(rows) in (ROOT / "README.md").read_text()  # README shows the latest table
