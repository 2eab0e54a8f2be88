"""The architecture rules, checked on the source: the core knows no framework, MLflow lives in tracking."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "platform" / "raybloom"
CORE = ("spec", "data", "models", "schedules", "regularization", "engine", "tracking", "plots", "runner", "errors")
ADAPTERS = ("ray_train", "search", "federated", "cli", "cluster", "submit", "procs")


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


def test_no_platform_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_mlflow_is_imported_only_by_tracking():
    for path in PKG.glob("*.py"):
        if path.stem != "tracking":
            assert not any(n.split(".")[0] == "mlflow" for n in imports(path)), path.name


def test_engine_knows_no_framework():
    for name in ("engine", "models", "schedules", "regularization", "data", "spec"):
        found = {n.split(".")[0] for n in imports(PKG / f"{name}.py")}
        assert not found & {"ray", "flwr", "mlflow", "optuna"}, (name, found)


def test_core_imports_no_adapter():
    for name in CORE:
        found = {n for n in imports(PKG / f"{name}.py") if n.startswith("raybloom.")}
        assert not {n.split(".")[1] for n in found} & set(ADAPTERS), (name, found)
