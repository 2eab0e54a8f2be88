"""A real `mlflow server` SIGKILLed mid-run, in process and on Ray.

Each run meets two outages. The first is shorter than MLflow's client retries (the server is restarted on
the same port and store at once) and costs nothing. The second outlasts them (the server stays down): the
run stops with exit 75 and a message naming what it kept and the command that goes on; nothing already
recorded is lost. With the server back, that command finishes the run in the same MLflow run, every
epoch recorded exactly once; in process the resumed training equals an uninterrupted one (its state, RNGs
included, was kept). MLflow's retries are shortened for the test (4 retries, backoff factor 1: 15-19 s of
waiting, time for a restart) so that the second outage outlasts them in seconds, not minutes.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from raybloom import engine, spec
from raybloom.net import free_ports

from conftest import JOBS, RAYBLOOM, wait_healthy

pytestmark = pytest.mark.slow

RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class Server:
    """`mlflow server` on a SQLite store; killed (SIGKILL, its whole process group) and restarted on the same port."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                      f"sqlite:///{self.folder / 'mlflow.db'}", "--artifacts-destination",
                                      str(self.folder / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                                      "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        wait_healthy(self.proc, self.uri, self.folder / "server.log")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    if s.proc is not None and s.proc.poll() is None:
        s.kill()


def _epochs(client: MlflowClient, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _wait_for_epochs(client: MlflowClient, proc: subprocess.Popen, n: int, run_id: str | None = None) -> str:
    """Poll the server until the (only) run holds `n` epochs; returns its id."""
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{n} epochs not recorded in time"
        if run_id is None:
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            run_id = runs[0].info.run_id if runs else None
        if run_id is not None and len(_epochs(client, run_id)) >= n:
            return run_id
        time.sleep(0.1)


def _two_outages(server: Server, args: list[str], first: int, second: int, env: dict) -> tuple[str, str]:
    """Run `raybloom run ARGS`; kill the server after `first` epochs and restart it at once (within MLflow's
    retries), kill it again after `second` epochs and leave it down. Returns (run id, the error output)."""
    client = MlflowClient(server.uri)
    proc = subprocess.Popen([RAYBLOOM, "run", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        run_id = _wait_for_epochs(client, proc, first)
        server.kill()
        server.start()  # the run blocked in a write meanwhile: MLflow's client retries carry it
        _wait_for_epochs(client, proc, second, run_id)
        server.kill()
        output, _ = proc.communicate(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 75, output[-3000:]
    return run_id, output


def _check_stopped(output: str, run_id: str, kept: str, args: list[str]) -> None:
    """raybloom's last word is one `error:` line (Ray streams its workers' logs beside it, tracebacks too)."""
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert lines, output[-3000:]
    text = lines[-1]
    assert "stopped answering" in text or "does not answer" in text, text
    assert f"--resume {run_id}" in text and "Nothing is lost" in text and kept in text, text
    assert f"{shlex.join(['raybloom', 'run', *args])} --resume {run_id}" in text, text  # the command that ran


def _env(tmp_path: Path, server: Server) -> dict:
    return {**os.environ, **RETRIES, "MLFLOW_TRACKING_URI": server.uri, "RAYBLOOM_OUTBOX": str(tmp_path / "outbox"),
            "RAYBLOOM_RAY_STORAGE": str(tmp_path / "ray_results"), "COLUMNS": "200"}


def test_in_process_outages_cost_nothing_and_the_kept_training_resumes_as_if_uninterrupted(server, tmp_path):
    epochs = 20
    args = [str(JOBS / "cnn_digits.yaml"), f"train.epochs={epochs}", "model.filters=[8,16]", "model.head_hidden=32",
            "train.threads=1", "tracking.log_model=false", "tracking.explain=false", "experiment=outage"]
    env = _env(tmp_path, server)
    run_id, output = _two_outages(server, args, 3, 8, env)
    _check_stopped(output, run_id, str(tmp_path / "outbox" / run_id), args)
    assert (tmp_path / "outbox" / run_id / "state.pt").is_file()
    server.start()
    client = MlflowClient(server.uri)
    before = _epochs(client, run_id)
    assert before == list(range(len(before))) and 8 <= len(before) < epochs, before  # what was written stays
    resumed = subprocess.run([RAYBLOOM, "run", *args, "--resume", run_id], capture_output=True, text=True, env=env,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    for key in ("train_loss", "val_loss", "lr"):
        assert _epochs(client, run_id, key) == list(range(epochs)), key
    assert not (tmp_path / "outbox" / run_id).exists()
    # the same training uninterrupted (no MLflow): every epoch's losses equal the resumed run's
    s = spec.load(JOBS / "cnn_digits.yaml", args[1:-1])
    reference = engine.fit(s).history
    logged = sorted(client.get_metric_history(run_id, "val_loss"), key=lambda m: m.step)
    assert [m.value for m in logged] == pytest.approx([h["val_loss"] for h in reference], rel=1e-5)


def test_ray_outages_cost_nothing_and_the_run_resumes_from_its_checkpoint(server, tmp_path):
    """...also with unlimited restarts (max_failures=-1): a lost server is no worker failure a restart mends,
    the worker group stops at the first (once Ray restarted it without end, retrying MLflow each time)."""
    # the kill after 6 lands mid-training: rank 0 writes the epochs of up to a second at once, and after the
    # first outage a write may wait out MLflow's retries while training goes on (80 epochs were all written
    # before the kill in a fresh-clone make test); a report every 2 epochs waits for the 0.1 s poll: >= 15 s
    epochs = 300
    args = [str(JOBS / "cnn_digits.yaml"), "scaling.workers=2", "scaling.max_failures=-1", f"train.epochs={epochs}",
            "train.checkpoint_every=2",
            "model.filters=[8,16]", "model.head_hidden=32", "tracking.log_model=false", "tracking.explain=false",
            "experiment=outage-ray"]
    env = _env(tmp_path, server)
    run_id, output = _two_outages(server, args, 2, 6, env)
    _check_stopped(output, run_id, str(tmp_path / "ray_results" / f"raybloom-{run_id}"), args)
    server.start()
    client = MlflowClient(server.uri)
    before = _epochs(client, run_id)
    assert before == list(range(len(before))) and 6 <= len(before) < epochs, before
    resumed = subprocess.run([RAYBLOOM, "run", *args, "--resume", run_id], capture_output=True, text=True, env=env,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_accuracy" in run.data.metrics
    assert int(run.data.tags["raybloom.resumed_from_epoch"]) >= 6
    for key in ("train_loss", "val_loss", "lr"):
        assert _epochs(client, run_id, key) == list(range(epochs)), key
