"""The federated runtime: `flwr run` on a SuperLink in simulation mode that the driver starts, the
schedule as a function of the round, the global model evaluated on every client, crash-resume, GPU
shares. Real Flower, Ray and MLflow; the driver is SIGKILLed for real.

One uninterrupted 5-round FedAdam run with a step schedule is the reference: its per-round lr and
per-client metrics are checked, and a second run of the same spec, killed after round 2 and resumed,
must end with the same weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch
from mlflow import MlflowClient

from raybloom import schedules, spec, tracking
from raybloom.errors import UserError
from raybloom.federated import checkpoint, resume
from raybloom.federated.driver import run_federated
from raybloom.federated.simulation import CONNECTION, simulation_options
from raybloom.flwr_config import write_flwr_home

from conftest import JOBS, RAYBLOOM, all_runs, module_store

ROUNDS = 5
OVERRIDES = ["tracking.log_model=false", "federated.clients=2", f"federated.rounds={ROUNDS}",
             "federated.local_epochs=1", "federated.strategy=fedadam", "federated.server_lr=0.01",
             "schedule.name=step", "schedule.step_size=1", "schedule.gamma=0.5", "experiment=fed-runtime",
             "federated.client_val_fraction=0.2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with module_store(tmp_path_factory.mktemp("fed-runtime")) as s:
        yield s


def _spec(*extra: str) -> spec.JobSpec:
    return spec.load(JOBS / "fedavg_cnn_digits_iid.yaml", [*OVERRIDES, *extra])


@pytest.fixture(scope="module")
def reference(store):
    return run_federated(_spec())


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _values(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_each_round_trains_at_the_schedules_lr_and_is_evaluated_on_every_client(store, reference):
    c, job = store.client, _spec()
    run = c.get_run(reference.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raybloom.kind"] == "federated"
    lrs = _values(c, reference.run_id, "lr")
    assert lrs == [0.003, 0.0015, 0.00075, 0.000375, 0.0001875]  # lr0 · 0.5^(r-1), round by round
    assert lrs == [schedules.lr_at(r - 1, job.optim.lr, job.schedule, ROUNDS) for r in range(1, ROUNDS + 1)]
    for key in ("clients_val_accuracy_mean", "clients_val_accuracy_min", "clients_val_accuracy_std",
                "client_val_accuracy_p0", "client_val_accuracy_p1"):
        assert _steps(c, reference.run_id, key) == list(range(1, ROUNDS + 1)), key
    means, mins = (_values(c, reference.run_id, f"clients_val_accuracy_{k}") for k in ("mean", "min"))
    assert all(lo <= m for lo, m in zip(mins, means))
    per_client = [_values(c, reference.run_id, f"client_val_accuracy_p{p}") for p in (0, 1)]
    assert mins == [min(a, b) for a, b in zip(*per_client)]
    assert means == pytest.approx([(a + b) / 2 for a, b in zip(*per_client)])
    # the global model learned on the clients' own held-out rows: better than round 1, and twice chance
    assert means[-1] > means[0] and means[-1] > 2 / 10


def _wait_for_round(client, rnd: int, proc: subprocess.Popen, timeout: float = 400) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`raybloom.kind` = 'federated' and attributes.status = 'RUNNING'")
        for r in runs:
            if rnd in _steps(client, r.info.run_id, "server_val_loss"):
                return r.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"no round {rnd} within {timeout} s")


def test_a_run_sigkilled_after_round_2_resumes_to_the_uninterrupted_weights(store, reference):
    c = store.client
    proc = subprocess.Popen([RAYBLOOM, "run", str(JOBS / "fedavg_cnn_digits_iid.yaml"), *OVERRIDES],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=store.folder)
    run_id = _wait_for_round(c, 2, proc)
    with pytest.raises(UserError, match="still running"):  # its driver is alive: no second one
        resume.resumable(_spec(), resume.LATEST)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone: what it started must go with it
    proc.wait()
    deadline = time.monotonic() + 60
    while c.get_run(run_id).info.status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    run = c.get_run(run_id)  # the reaper killed the SuperLink's tree and ended the run: not left RUNNING
    assert run.info.status == "KILLED" and "its driver died" in run.data.tags["raybloom.failure_reason"]
    killed_at = _steps(c, run_id, "server_val_loss")
    time.sleep(5)
    assert _steps(c, run_id, "server_val_loss") == killed_at, "the ServerApp trained on after its driver died"

    resumed = run_federated(_spec(), resume=resume.LATEST)
    assert resumed.run_id == run_id
    assert c.get_run(run_id).info.status == "FINISHED"
    for key in ("server_val_loss", "lr", "clients_ok", "clients_val_accuracy_min"):
        steps = _steps(c, run_id, key)
        assert steps == sorted(set(steps)) and steps[-ROUNDS:] == list(range(1, ROUNDS + 1)), (key, steps)
    done, ref = (checkpoint.load(tracking.RunRecorder(r)) for r in (run_id, reference.run_id))
    assert done.round == ref.round == ROUNDS
    for k, v in ref.weights.items():
        torch.testing.assert_close(done.weights[k], v, rtol=0, atol=1e-5, msg=k)
    assert _values(c, run_id, "server_val_loss") == pytest.approx(_values(c, reference.run_id, "server_val_loss"), abs=1e-5)

    with pytest.raises(UserError, match="already FINISHED"):
        resume.resumable(_spec(), run_id)
    with pytest.raises(UserError, match="no unfinished federated run"):
        resume.resumable(_spec(), resume.LATEST)


def test_client_gpus_reach_flowers_client_resources(tmp_path):
    from flwr.cli.flower_config import read_superlink_connection

    job = _spec("federated.client_gpus=0.5", "federated.client_cpus=2")
    write_flwr_home(tmp_path, "127.0.0.1:1", name=CONNECTION, options=simulation_options(job))
    os.environ["FLWR_HOME"], before = str(tmp_path), os.environ.get("FLWR_HOME")
    try:
        conn = read_superlink_connection(CONNECTION)
    finally:
        os.environ.pop("FLWR_HOME") if before is None else os.environ.__setitem__("FLWR_HOME", before)
    assert conn.options.num_supernodes == 2
    assert conn.options.backend.client_resources.num_gpus == 0.5
    assert conn.options.backend.client_resources.num_cpus == 2


def _processes_mentioning(text: str) -> list[str]:
    """Command lines of the live processes whose command line or environment mentions `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            environ = open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline or text in environ:
            found.append(f"{pid}: {cmdline[:200]}")
    return found


def test_client_gpus_without_gpus_exits_2_naming_the_setting(tmp_path):
    """Refused after the simulation's SuperLink was spawned and the app submitted to it (the driver checks
    while they start): the SuperLink and whatever it started are stopped with the refusal."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([RAYBLOOM, "run", str(JOBS / "fedavg_cnn_digits_iid.yaml"), "federated.client_gpus=0.5"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "MLFLOW_TRACKING_URI": uri, "COLUMNS": "200",
                               "TMPDIR": str(tmp_path)})  # the SuperLink's folder: in its processes' command line
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "federated.client_gpus: 0.5" in proc.stderr and "0 GPUs" in proc.stderr
    assert all_runs(MlflowClient(uri)) == []  # refused before any run was opened
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(tmp_path)) == []


def test_the_serverapp_waits_for_the_drivers_hand_off(tmp_path):
    """The simulation's app is submitted before the driver has its run: the ServerApp waits for the file the
    driver writes (whole, at once), and gives up with the reason once the driver's folder is gone."""
    import shutil
    import threading

    from raybloom.federated.server_app import handed_off
    from raybloom.pids import read_proc

    path = tmp_path / "link" / "handoff.json"
    path.parent.mkdir()
    (tmp_path / "handoff.tmp").write_text('{"raybloom-run-id": "abc"}')
    threading.Timer(0.5, os.replace, (tmp_path / "handoff.tmp", path)).start()  # as the driver writes it
    t0 = time.monotonic()
    assert handed_off(path) == {"raybloom-run-id": "abc"}
    assert time.monotonic() - t0 >= 0.45
    path.unlink()
    (path.parent / "driver").write_text(f"{os.getpid()} {read_proc(os.getpid()).start}")  # alive: waited for
    threading.Timer(0.3, shutil.rmtree, (path.parent,)).start()
    with pytest.raises(UserError, match="hand-off folder .* is gone: the driver has stopped"):
        handed_off(path)
    path.parent.mkdir()
    (path.parent / "driver").write_text("4194305 0")  # above Linux's largest pid: a driver that is gone
    with pytest.raises(UserError, match=r"the driver \(pid \d+\) exited without handing off the run"):
        handed_off(path)


def test_a_federated_search_prunes_trials_on_their_round_metric_and_nests_federated_runs(store):
    """4 trials of jobs/search_fed_dirichlet.yaml, shortened: each a federated simulation reporting the
    server's validation accuracy every round; successive halving prunes at least one after a few rounds."""
    import optuna

    from raybloom.search.driver import run_study
    from raybloom.search.study import open_storage, storage_url

    rounds = 3
    job = spec.load(JOBS / "search_fed_dirichlet.yaml", ["federated.clients=3", f"federated.rounds={rounds}",
                                                         "search.n_trials=4", "experiment=fed-search"])
    summary = run_study(job)
    c = store.client
    exp = c.get_experiment_by_name("fed-search").experiment_id
    runs = c.search_runs([exp])
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    (parent,) = [r for r in runs if r.data.tags["raybloom.kind"] == "search"]
    assert parent.info.run_id == summary.run_id
    trials = [r for r in runs if r.data.tags["raybloom.kind"] == "trial"]
    assert len(trials) == 4 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in trials)
    study = optuna.load_study(study_name="fed-search-search", storage=open_storage(storage_url(job)))
    states = {t.number: t.state for t in study.trials}
    assert list(states.values()).count(optuna.trial.TrialState.PRUNED) >= 1, states
    for r in trials:
        t = study.trials[int(r.data.tags["raybloom.trial"])]
        steps = _steps(c, r.info.run_id, "server_val_accuracy")  # step 0 is the initial model
        assert steps == list(range(0, len(steps))) and sorted(t.intermediate_values) == list(range(len(steps) - 1))
        assert r.data.tags["trial_state"] == t.state.name
        if t.state == optuna.trial.TrialState.PRUNED:
            assert len(steps) - 1 < rounds and r.data.tags["raybloom.halted"].startswith("pruned after round")
        else:
            assert len(steps) - 1 == rounds and t.value == max(_values(c, r.info.run_id, "server_val_accuracy")[1:])
        assert r.data.params["federated.strategy"] == t.params["federated.strategy"]


def test_the_app_declared_for_an_installed_package_is_the_source_trees(tmp_path):
    """Without the source tree (raybloom installed, not a checkout), `flwr run` builds from a folder whose
    pyproject.toml declares the same app: the same components and run-config keys."""
    import tomllib

    from raybloom.flwr_config import app_pyproject

    repo = tomllib.loads((JOBS.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    written = tomllib.loads(app_pyproject())["tool"]["flwr"]["app"]
    repo.pop("fab-include")
    assert written == repo


def test_resume_stands_alone_or_takes_a_run_id():
    from raybloom.cli import resume_argv

    rid = "0123456789abcdef0123456789abcdef"
    assert resume_argv(["run", "job.yaml", "--resume"]) == ["run", "job.yaml", "--resume=latest"]
    assert resume_argv(["run", "job.yaml", "--resume", "seed=1"]) == ["run", "job.yaml", "--resume=latest", "seed=1"]
    assert resume_argv(["run", "job.yaml", "--resume", rid]) == ["run", "job.yaml", "--resume", rid]
    assert resume_argv(["run", "job.yaml", "x=1"]) == ["run", "job.yaml", "x=1"]


def test_the_installed_command_takes_a_bare_resume_and_keeps_its_exit_code(tmp_path):
    """`raybloom` is `cli:main` (argv through resume_argv; the exit functions run, the interpreter's teardown
    is skipped): a bare --resume reaches the command, whose refusal exits 2 with its message."""
    import shutil
    import sys
    from pathlib import Path

    exe = Path(sys.executable).parent / "raybloom"
    assert exe.exists() or shutil.which("raybloom"), "the raybloom command is not installed"
    job = Path(__file__).resolve().parents[1] / "jobs" / "cnn_digits.yaml"
    r = subprocess.run([str(exe if exe.exists() else shutil.which("raybloom")), "run", str(job), "--resume"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--resume: no training of this spec (same file and overrides) is kept in" in " ".join(r.stderr.split())


def test_a_tree_still_spawning_is_killed_whole(tmp_path):
    """`kill_tree` (the reaper's, and `SimulationLink.stop`'s freeze) stops the tree before it kills: a
    process that keeps starting children (as a ServerApp starting Ray does) leaves none behind."""
    from raybloom.reaper import kill_tree

    marker = str(tmp_path / "spawner")
    spawner = subprocess.Popen(["bash", "-c", "while true; do sleep 60 & sleep 0.005; done"], start_new_session=True,
                               env={**os.environ, "RAYBLOOM_TEST_MARKER": marker})
    time.sleep(0.5)
    assert len(_processes_mentioning(marker)) > 10
    kill_tree(spawner.pid)
    spawner.wait(10)
    deadline = time.monotonic() + 5
    while _processes_mentioning(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(marker) == []
