"""Optuna searches on a real Ray, read back from the real Optuna storage and MLflow store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from raybloom import data, engine, ray_session, ray_train, spec
from raybloom.pids import alive, read_proc
from raybloom.reaper import process_tree
from raybloom.search.driver import FINISHED, run_study
from raybloom.errors import UserError
from raybloom.search.study import open_storage, storage_url

from conftest import JOBS, RAYBLOOM, all_runs


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray_session.init_ray(spec.JobSpec())
    yield ray
    ray.shutdown()


def _children(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def _study(s: spec.JobSpec) -> optuna.Study:
    return optuna.load_study(study_name=s.search.study_name or f"{s.experiment}-search",
                             storage=open_storage(storage_url(s)))


def test_lr_grid_on_linear_gd_prunes_the_unstable_rates(ray_local, client):
    s = spec.load(JOBS / "search_lr_linear.yaml")
    summary = run_study(s)
    # the stability bound of gradient descent on the MSE: lr < 2 / L, L = largest eigenvalue of the Hessian
    ds = data.load(s.data)
    x = ds.train.x.numpy().reshape(-1).astype(np.float64)
    X = np.stack([x, np.ones_like(x)], 1)
    L = float(np.linalg.eigvalsh(2.0 / len(x) * X.T @ X).max())
    bound = 2.0 / L
    study = _study(s)
    grid = s.search.space["optim.lr"].grid()
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.params["optim.lr"] for t in trials) == sorted(grid)  # exactly the grid, once each
    unstable = [t for t in trials if t.params["optim.lr"] > bound]
    assert unstable, f"the grid has no rate above 2/L = {bound:.3f}"
    for t in unstable:
        assert t.state in (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL), (t.params, t.state)
        assert "train_loss" in t.user_attrs["reason"]
    assert study.best_params["optim.lr"] < bound
    # MLflow: one parent, one child per trial, best.* = the study's best params
    parent = client.get_run(summary.run_id)
    assert parent.data.tags["raybloom.kind"] == "search" and parent.info.status == "FINISHED"
    assert float(parent.data.params["best.optim.lr"]) == study.best_params["optim.lr"]
    assert parent.data.metrics["best_value"] == pytest.approx(study.best_value)
    children = _children(client, summary.run_id)
    assert len(children) == len(grid)
    assert all(c.data.tags["raybloom.kind"] == "trial" and c.info.status in ("FINISHED", "FAILED") for c in children)
    states = {c.data.tags["trial_state"] for c in children}
    assert states <= {"COMPLETE", "PRUNED"}
    for c in children:
        if float(c.data.params["optim.lr"]) > bound:
            assert c.data.tags["trial_state"] == "PRUNED" and "train_loss" in c.data.tags["raybloom.failure_reason"]
    plots = {a.path for a in client.list_artifacts(summary.run_id, "plots")}
    assert "plots/search_optimization_history.png" in plots


def test_cnn_search_beats_the_default_cnn(ray_local, client):
    """The best of ~12 trials of 8 epochs reaches at least the validation accuracy of the default
    cnn_digits.yaml configuration trained with the same 8-epoch budget (a search picks settings; it is
    compared with the default settings, not with a 5x longer training)."""
    s = spec.load(JOBS / "search_cnn_lr_filters.yaml")
    summary = run_study(s)
    study = _study(s)
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == s.search.n_trials
    default = spec.load(JOBS / "cnn_digits.yaml", [f"train.epochs={s.train.epochs}"])
    baseline = engine.fit(default, data.load(default.data))
    default_val_acc = max(h["val_accuracy"] for h in baseline.history)
    assert study.best_value >= default_val_acc, (study.best_value, default_val_acc)
    best_child = [c for c in _children(client, summary.run_id)
                  if c.data.tags["raybloom.trial"] == str(study.best_trial.number)][0]
    assert "test_accuracy" in best_child.data.metrics
    parent = client.get_run(summary.run_id)
    assert json.loads(parent.data.params["best.model.filters"]) == json.loads(study.best_params["model.filters"])


def _dead_drivers_ray(pid: int) -> list[str]:
    """Processes of the Ray a driver started (its session folder ends in the driver's pid) still running."""
    pattern = re.compile(rf"session_[0-9_-]+_{pid}(?![0-9])")
    left = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if entry.name.isdigit() and pattern.search(cmd):
            left.append(f"{entry.name} {cmd[:120]}")
    return left


def test_killed_driver_resumes_to_exactly_n_trials(client, store):
    """The driver (and the Ray it started) is SIGKILLed while exactly 2 trials run: no process of that Ray is
    left, and the rerun fails both, retries them (`retry_of`), ends their child runs KILLED, and finishes
    exactly n trials in the same parent run."""
    n = 4
    args = [RAYBLOOM, "run", str(JOBS / "search_random_cnn.yaml"), f"search.n_trials={n}", "train.epochs=4",
            "search.pruner=none", "experiment=search-resume"]
    s = spec.load(JOBS / "search_random_cnn.yaml", [f"search.n_trials={n}", "experiment=search-resume"])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no moment with 1 finished and 2 running trials in time"
            try:
                trials = _study(s).get_trials(deepcopy=False)
            except KeyError:
                trials = []
            running = {t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING}
            if len(running) == 2 and any(t.state in FINISHED for t in trials):
                opened = {r.data.tags.get("raybloom.trial") for r in all_runs(client) if r.info.status == "RUNNING"}
                if {str(k) for k in running} <= opened:  # both trials' child runs are open
                    break
            time.sleep(0.2)
        # every process below the driver: Ray's head, the raylet's agents (they rename themselves, so the
        # session pattern misses them) and workers, the trials' processes
        below = [q for q in map(read_proc, process_tree(proc.pid)[1:]) if q is not None]
        assert any("Agent" in q.cmd for q in below), [q.cmd[:80] for q in below]
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: the Ray it started must die with it
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

    def left() -> list[str]:
        return _dead_drivers_ray(proc.pid) + [f"{q.pid} {q.cmd[:120]}" for q in below if alive(q.pid, q.start)]

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), left()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing of its group is left either (checked above by its session)
    except ProcessLookupError:
        pass
    again = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    study = _study(s)
    finished = [t for t in study.trials if t.state in FINISHED]
    assert len(finished) == n
    # no parameter set evaluated twice, except declared retries of interrupted trials
    retries = {t.user_attrs.get("retry_of") for t in study.trials if "retry_of" in t.user_attrs}
    seen = {}
    for t in study.trials:
        key = json.dumps(t.params, sort_keys=True)
        if key in seen:
            assert t.user_attrs.get("retry_of") == seen[key].number or seen[key].state == optuna.trial.TrialState.FAIL, key
        seen.setdefault(key, t)
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert {t.number for t in failed} == retries == running, (retries, running)
    runs = all_runs(client)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.data.tags.get("raybloom.trial") in {str(k) for k in running}]
    assert len(killed) == 2 and {r.info.status for r in killed} == {"KILLED"}, [(r.data.tags, r.info.status) for r in killed]
    parents = [r for r in runs if r.data.tags.get("raybloom.kind") == "search"]
    assert len(parents) == 1  # the resumed driver went on in the same parent run


def test_ray_started_again_in_one_process_is_left_alone_by_the_reaper_of_the_one_before():
    """A process that shuts its Ray down and starts another (tests, notebooks) keeps the new one: the reaper of
    the first must not take the second's processes for its own (it did: the GCS killed, the process ended)."""
    script = ("import sys, time, ray\n"
              "from raybloom import ray_session, spec\n"
              "f = ray.remote(lambda: 1)\n"
              "for i in range(2):\n"
              "    ray_session.init_ray(spec.JobSpec())\n"
              "    assert ray.get(f.remote()) == 1\n"
              "    time.sleep(1.5)  # the reaper scans each second\n"
              "    ray.shutdown()\n"
              "ray_session.init_ray(spec.JobSpec())\n"
              "time.sleep(2)\n"
              "print('alive', ray.get(f.remote()))\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "alive 1" in r.stdout, r.stderr[-3000:]


def test_cv_objective_and_retrain_best_registers_the_winner(ray_local, client):
    s = spec.load(JOBS / "search_random_cnn.yaml", [
        "experiment=search-cv", "search.n_trials=2", "search.cv_folds=2", "search.pruner=none", "train.epochs=2",
        "model.filters=[8,16]", "search.retrain_best=true", "tracking.register_as=digits-search-best",
        "tracking.log_model=true"])
    summary = run_study(s)
    study = _study(s)
    assert len([t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]) == 2
    children = _children(client, summary.run_id)
    trials = [c for c in children if c.data.tags.get("raybloom.kind") == "trial"]
    assert len(trials) == 2
    for c in trials:  # the objective is the mean over the folds, each fold's epochs recorded
        assert c.data.metrics["cv_val_loss_mean"] > 0
        assert len(client.get_metric_history(c.info.run_id, "fold1_val_loss")) == 2
    best = [c for c in trials if c.data.tags["raybloom.trial"] == str(study.best_trial.number)][0]
    assert best.data.metrics["cv_val_loss_mean"] == pytest.approx(study.best_value)
    retrained = [c for c in children if c.data.tags.get("raybloom.retrain") == "true"]
    assert len(retrained) == 1 and "test_accuracy" in retrained[0].data.metrics
    versions = client.search_model_versions("name='digits-search-best'")
    assert [v.run_id for v in versions] == [retrained[0].info.run_id]
    assert client.get_run(summary.run_id).data.metrics["retrained_test_accuracy"] == pytest.approx(
        retrained[0].data.metrics["test_accuracy"])


def test_a_trial_can_be_a_ddp_run_that_its_pruner_stops_on_every_rank(ray_local, client):
    """workers_per_trial=2: each trial is a 2-worker Ray Train run; rank 0 reports to Optuna and a prune
    stops both ranks together (a rank left behind would hang in DDP and the test would time out).
    Successive halving with 3 trials promotes only the best at epoch 1, so the slow rate 0.001 is pruned
    there while 0.3 (the fastest stable rate for this data) runs to the end."""
    s = spec.load(JOBS / "search_lr_linear.yaml", {
        "experiment": "search-ddp", "search.study_name": "ddp-trials", "train.epochs": 6,
        "search.space": {"optim.lr": {"type": "categorical", "choices": [0.3, 0.001]}},
        "search.workers_per_trial": 2, "search.concurrency": 1, "search.pruner": "successive_halving"})
    summary = run_study(s)
    study = _study(s)
    by_lr = {t.params["optim.lr"]: t for t in study.trials}
    assert by_lr[0.3].state == optuna.trial.TrialState.COMPLETE and by_lr[0.3].user_attrs["epochs"] == 6
    assert by_lr[0.001].state == optuna.trial.TrialState.PRUNED and by_lr[0.001].user_attrs["epochs"] < 6
    assert study.best_params["optim.lr"] == 0.3
    children = {float(c.data.params["optim.lr"]): c for c in _children(client, summary.run_id)}
    for lr, c in children.items():
        assert c.data.params["scaling.workers"] == "2" and c.info.status == "FINISHED"
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "val_loss")]
        assert steps == list(range(by_lr[lr].user_attrs["epochs"]))  # each epoch once, by rank 0
        assert (Path(ray_train.storage_path()) / f"raybloom-{c.info.run_id}").is_dir()  # a real TorchTrainer run
    assert children[0.3].data.tags["trial_state"] == "COMPLETE" and "test_loss" in children[0.3].data.metrics
    assert children[0.001].data.tags["trial_state"] == "PRUNED"


def test_ddp_trials_larger_than_the_cluster_are_refused_before_any_run(ray_local, client):
    s = spec.load(JOBS / "search_lr_linear.yaml", {"experiment": "search-too-big", "search.workers_per_trial": 8})
    with pytest.raises(UserError, match=r"search.workers_per_trial: 8 workers .* need 8 CPUs"):
        run_study(s)
    assert not [r for r in all_runs(client) if r.data.tags.get("raybloom.study") == "search-too-big-search"]
