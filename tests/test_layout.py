"""The architecture rules, checked on the source (the real imports, so they can fail): the core knows no
framework, MLflow lives in tracking, package inits only re-export, the cluster package is ops only, no
import cycle, no function a reader cannot hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "platform" / "raybloom"
CORE = ("spec", "data", "models", "objective", "schedules", "regularization", "engine", "job", "tracking", "tracking_uri", "results",
        "plots", "runner", "errors", "timeline", "pretrained", "explain", "outbox")
SHARED = ("net", "ray_session", "flwr_config", "cluster_env", "pids", "reaper")  # what drivers and the ops CLI both use
ADAPTERS = ("ray_train", "search", "federated", "cli", "cluster", "submit", "report")  # cluster/, federated/: packages
TRAINING_ADAPTERS = ("ray_train", "search", "federated", "submit")
MAX_FUNCTION_LINES = 60


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (`from raybloom import data` names raybloom.data)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def module_files(name: str) -> list[Path]:
    """A module's source: name.py, or every file of the package name/."""
    return [PKG / f"{name}.py"] if (PKG / f"{name}.py").exists() else sorted((PKG / name).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """raybloom module -> the raybloom modules it imports (a `from pkg import name` edge goes to pkg.name when
    that is a module, else to pkg)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        targets = set()
        for name in imports(path):
            if name in files:
                targets.add(name)
            elif name.rpartition(".")[0] in files:
                targets.add(name.rpartition(".")[0])
        graph[mod] = targets - {mod}
    return graph


def test_no_platform_package():
    assert not (ROOT / "platform" / "__init__.py").exists()


def test_mlflow_is_imported_only_by_tracking():
    for path in PKG.rglob("*.py"):  # federated/ and cluster/ included
        if path.stem != "tracking":
            assert not any(n.split(".")[0] == "mlflow" for n in imports(path)), path.name


def test_engine_knows_no_framework():
    for name in ("engine", "objective", "models", "schedules", "regularization", "data", "spec", "job", "explain"):
        found = {n.split(".")[0] for path in module_files(name) for n in imports(path)}
        assert not found & {"ray", "flwr", "mlflow", "optuna"}, (name, found)


def test_every_module_is_core_shared_or_adapter():
    """A new module says which side it is on (here), so the rules below check it."""
    found = {p.stem for p in PKG.glob("*.py")} | {p.parent.name for p in PKG.glob("*/__init__.py")}
    assert found - {"__init__", "__main__"} == set(CORE) | set(SHARED) | set(ADAPTERS)


def _raybloom_imports(name: str) -> set[str]:
    return {n.split(".")[1] for path in module_files(name) for n in imports(path)
            if n.startswith("raybloom.") and n.count(".") >= 1}


def test_core_imports_no_adapter_and_shared_no_adapter():
    for name in CORE:
        assert not _raybloom_imports(name) & (set(ADAPTERS) | set(SHARED)), name
    for name in SHARED:
        assert not _raybloom_imports(name) & set(ADAPTERS), name


def test_training_adapters_do_not_import_the_cluster_package():
    """`cluster/` is the ops CLI: what training code shares with it lives in the SHARED modules."""
    for name in TRAINING_ADAPTERS:
        for path in module_files(name):
            found = {n for n in imports(path) if n == "raybloom.cluster" or n.startswith("raybloom.cluster.")}
            assert not found, (path.relative_to(PKG), found)


def test_package_inits_only_reexport():
    """An __init__.py holds a docstring, imports of what it re-exports, `__all__` and `__version__`; no driver."""
    for path in PKG.rglob("__init__.py"):
        for i, node in enumerate(ast.parse(path.read_text()).body):
            docstring = i == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            reexport = isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("raybloom", "__future__"))
            dunder = (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                      and node.targets[0].id in ("__all__", "__version__"))
            assert docstring or reexport or dunder, f"{path.relative_to(PKG)}:{node.lineno}: {ast.dump(node)[:80]}"


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the DFS stack, 2 done
    stack: list[str] = []

    def visit(mod: str) -> list[str] | None:
        state[mod] = 1
        stack.append(mod)
        for nxt in sorted(graph.get(mod, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[mod] = 2
        return None

    for mod in sorted(graph):
        if mod not in state and (found := visit(mod)):
            return found
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert "raybloom.engine" in graph["raybloom.runner"]  # the graph sees real edges
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_longer_than_60_lines():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PKG)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("module, banned", [
    ("raybloom.federated.client", ("mlflow", "typer", "raybloom.cluster", "raybloom.tracking", "flwr", "captum",
                                   "raybloom.explain", "opacus", "raybloom.federated.privacy")),
    ("raybloom.federated.client_app", ("mlflow", "raybloom.cluster", "raybloom.tracking", "raybloom.federated.driver",
                                       "captum", "raybloom.explain", "opacus", "raybloom.federated.privacy")),
    ("raybloom.net", ("typer", "rich", "raybloom.cluster", "torch")),
    ("raybloom.cluster.health", ("typer", "rich", "raybloom.cluster.cli", "raybloom.cluster.launch", "raybloom.cluster.secure")),
    ("raybloom.search.trial", ("raybloom.search.driver", "typer")),
    ("raybloom.ray_train", ("mlflow", "matplotlib", "raybloom.tracking", "raybloom.results", "captum",
                            "raybloom.explain", "opacus")),  # what every Ray worker loads
])
def test_importing_a_leaf_loads_no_driver(module, banned):
    loaded = _loaded_by(module)
    found = sorted(m for m in loaded if any(m == b or m.startswith(b + ".") for b in banned))
    assert not found, f"importing {module} loaded {found[:8]}"


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
    assert all(r["verdict"] in ("PASS", "MISS", "NOISY") for r in rows)  # NOISY: measured on a busy machine, never a PASS
    assert summary.table(rows) in (ROOT / "README.md").read_text()  # README shows the latest table
