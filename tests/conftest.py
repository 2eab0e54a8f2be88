"""Shared fixtures: a per-session data cache, a fresh SQLite tracking store per test, the real CLI."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"
RAYBLOOM = str(Path(sys.executable).with_name("raybloom"))


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory) -> Path:
    """Prepared datasets are shared by all tests of the session (each is prepared once)."""
    folder = tmp_path_factory.mktemp("data")
    os.environ["RAYBLOOM_DATA_DIR"] = str(folder)
    return folder


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store for one test; the URI reaches the CLI through the environment."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)  # an in-process run of an earlier test may have set another one
    yield uri
    mlflow.set_tracking_uri(None)


@contextlib.contextmanager
def module_store(folder: Path):
    """A fresh SQLite tracking store in `folder` for a whole test module (the env, cwd and fluent URI)."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(folder)
    mlflow.set_tracking_uri(uri)
    try:
        yield SimpleNamespace(uri=uri, client=MlflowClient(uri), folder=folder)
    finally:
        mlflow.set_tracking_uri(None)
        mp.undo()


@pytest.fixture
def client(store) -> MlflowClient:
    return MlflowClient(store)


def cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `raybloom` command; returns the completed process (stdout, stderr, returncode)."""
    return subprocess.run([RAYBLOOM, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def all_runs(client: MlflowClient) -> list:
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=5000) if exps else []


def run_id_from(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("run id:"):
            return line.split()[2]
    raise AssertionError(f"no run id in output:\n{output}")


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 90, poll: float = 0.2) -> None:
    """Wait until the `mlflow server` `proc` answers 200 on {base}/health (its log's tail if it exits first)."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"mlflow server not healthy in {timeout:.0f} s"
        time.sleep(poll)
