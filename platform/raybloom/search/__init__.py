"""Optuna adapter: a study whose trials are engine runs, in parallel as Ray tasks.

Why plain Optuna (ask/tell) with Ray tasks, and not Ray Tune with `OptunaSearch`: on Ray 2.55 with
Optuna 5, `OptunaSearch` never prunes by itself (only a Tune scheduler can stop trials, and it does not
see Optuna's pruners), `Tuner(trainer)` is deprecated under Ray Train V2, and Tune's MLflow callback is
refused by V2's RunConfig. With ask/tell the study driver keeps Optuna's own samplers (grid, random,
TPE) and pruners (median, successive halving, Hyperband) unchanged; each trial is a Ray task that
rebuilds its `optuna.Trial` from the shared storage and calls `report` / `should_prune` after every
epoch, so pruning works while trials run side by side. The storage (a journal file, or PostgreSQL on a
cluster) is also what makes a study resumable.

A trial is `spec.with_overrides(params)` trained by the engine; nothing here has a training loop.
This module is the study's driver; `study` holds its storage, sampler, pruner and parameter drawing,
`trial` what runs in each trial's Ray task.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from raybloom import data, tracking
from raybloom.errors import UserError
from raybloom.search.study import decode, enqueue_grid, open_storage, pruner_for, sampler_for, storage_url, suggest
from raybloom.search.trial import run_trial, trial_spec
from raybloom.spec import JobSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _recover(study: optuna.Study, spec: JobSpec) -> int:
    """Trials a dead driver left RUNNING end FAIL and are queued again (declared retries)."""
    retried = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        retried += 1
    tracking.end_stale_runs(spec, f"tags.`raybloom.study` = '{study.study_name}'")
    return retried


class Progress:
    """One line per finished trial: done / pruned / failed, best so far."""

    def __init__(self, total: int, goal: str, metric: str):
        self.total, self.goal, self.metric = total, goal, metric
        self.started = time.monotonic()

    def update(self, study: optuna.Study, number: int, state: str, value, note: str = "") -> None:
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
        failed = sum(t.state == optuna.trial.TrialState.FAIL for t in trials)
        try:
            best = f"best {self.metric}={study.best_value:.4g} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        shown = f"{value:.4g}" if isinstance(value, float) else "-"
        print(f"[{time.monotonic() - self.started:6.1f}s] trial {number} {state} {self.metric}={shown} {note}".rstrip()
              + f" | finished {done + pruned}/{self.total}: complete {done}, pruned {pruned}, failed {failed} | {best}",
              file=sys.stderr, flush=True)


def _n_trials(s) -> int:
    return s.n_trials or (s.grid_size() if s.sampler == "grid" else 10)


def run(spec: JobSpec):
    """Run (or resume) the study `spec.search` describes; the driver writes the parent run and ends children."""
    import ray

    from raybloom import ray_train, runner

    s = spec.search
    base = trial_spec(spec, {})
    dataset = runner.prepare(base)  # bad data or model fail here, before any run is opened
    folder = str(Path(dataset.meta["folder"]).resolve())
    spec = spec.with_overrides({"data.path": folder})
    study_name = s.study_name or f"{spec.experiment}-search"
    storage = storage_url(spec)
    study = optuna.create_study(study_name=study_name, storage=open_storage(storage), sampler=sampler_for(s),
                                pruner=pruner_for(s, spec.train.epochs), direction=s.goal, load_if_exists=True)
    study.sampler = sampler_for(s, len(study.get_trials(deepcopy=False)))
    n_trials = _n_trials(s)
    retried = _recover(study, spec)
    if s.sampler == "grid":
        enqueue_grid(study, s)
    previous = tracking.find_run(spec, f"tags.`raybloom.study` = '{study_name}' and tags.`raybloom.kind` = 'search'")
    ray_train.init_ray(spec)
    uri = tracking.tracking_uri(spec)
    if s.workers_per_trial > 1:  # the task only drives a TorchTrainer, whose workers hold the CPUs
        cpus = ray.cluster_resources().get("CPU", 0)
        if s.workers_per_trial * s.threads_per_trial > cpus:
            raise UserError(f"search.workers_per_trial: {s.workers_per_trial} workers × {s.threads_per_trial} threads_per_trial "
                            f"need {s.workers_per_trial * s.threads_per_trial} CPUs, the Ray cluster has {cpus:g}; lower them")
        remote = ray.remote(num_cpus=0, max_retries=0)(run_trial)
    else:
        remote = ray.remote(num_cpus=s.threads_per_trial, max_retries=0)(run_trial)
    progress = Progress(n_trials, s.goal, s.metric)
    name = spec.tracking.run_name or f"search {study_name}"
    with tracking.TrackedRun(spec, "search", run_name=name, tags={"raybloom.study": study_name},
                             resume_run_id=previous.info.run_id if previous else None) as parent:
        if retried:
            print(f"resuming study {study_name}: {retried} interrupted trial(s) queued again", file=sys.stderr)
        running: dict[Any, tuple[optuna.Trial, tracking.RunRecorder]] = {}
        deadline = time.monotonic() + s.timeout if s.timeout else math.inf
        try:
            while True:
                finished = len(study.get_trials(deepcopy=False, states=FINISHED))
                while finished + len(running) < n_trials and len(running) < s.concurrency and time.monotonic() < deadline:
                    trial = study.ask()
                    params = suggest(trial, s.space)
                    tags = {"raybloom.study": study_name, "raybloom.trial": str(trial.number)}
                    if "retry_of" in trial.user_attrs:
                        tags["raybloom.retry_of"] = str(trial.user_attrs["retry_of"])
                    child = tracking.create_child(trial_spec(spec, params), parent, f"trial {trial.number}", "trial", tags)
                    ref = remote.remote(spec.model_dump(mode="json"), params, study_name, storage, trial._trial_id,
                                        child.run_id, uri, ray_train.storage_path())
                    running[ref] = (trial, child)
                if not running:
                    break
                ready, _ = ray.wait(list(running), num_returns=1)
                trial, child = running.pop(ready[0])
                _finish(study, trial, child, ready[0], progress)
        except BaseException:
            for trial, child in running.values():  # interrupted: no trial or run is left RUNNING
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                child.set_tags({"trial_state": "FAIL"})
                child.end("KILLED", "the search was interrupted")
            raise
        summary = _log_best(study, parent, spec)
        if s.retrain_best and summary.get("best_value") is not None:
            summary.update(_retrain_best(spec, study))
            parent.log_metrics({k: v for k, v in summary.items() if k.startswith("retrained_test_")})
    return runner.RunSummary(parent.run_id, parent.experiment_id, summary)


def _finish(study: optuna.Study, trial: optuna.Trial, child: tracking.RunRecorder, ref, progress: Progress) -> None:
    import ray

    try:
        out = ray.get(ref)
    except Exception as e:  # noqa: BLE001 - a crashed trial is a FAIL, not a crashed study
        out = {"state": "FAIL", "value": None, "reason": f"{type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}"}
    state, value, reason = out["state"], out.get("value"), out.get("reason")
    if state == "COMPLETE" and (value is None or not math.isfinite(value)):
        state, reason = "FAIL", f"non-finite objective {value}"
    trial.set_user_attr("epochs", out.get("epochs", 0))
    if reason:
        trial.set_user_attr("reason", reason)
    if state == "COMPLETE":
        study.tell(trial, value)
    elif state == "PRUNED":
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    child.log_metrics({"epochs_run": out.get("epochs", 0)})
    child.set_tags({"trial_state": state})
    if out.get("test"):
        child.log_metrics({f"test_{k}": v for k, v in out["test"].items()})
    child.end("FAILED" if state == "FAIL" else "FINISHED", reason if state != "COMPLETE" else None)
    progress.update(study, trial.number, state, value, f"({reason})" if reason else "")


def _log_best(study: optuna.Study, parent: tracking.TrackedRun, spec: JobSpec) -> dict[str, Any]:
    trials = study.get_trials(deepcopy=False)
    counts = {st.name.lower(): sum(t.state == st for t in trials) for st in optuna.trial.TrialState}
    summary: dict[str, Any] = {f"trials_{k}": v for k, v in counts.items() if k in ("complete", "pruned", "fail")}
    summary["epochs_total"] = sum(int(t.user_attrs.get("epochs", 0)) for t in trials)
    try:
        best = study.best_trial
    except ValueError:
        parent.log_metrics(summary)
        parent.set_tags({"raybloom.best_trial": "none"})
        return summary
    summary["best_value"] = best.value
    parent.log_metrics(summary)
    parent.log_params({f"best.{k}": v for k, v in best.params.items()})
    parent.set_tags({"raybloom.best_trial": str(best.number)})
    _log_plots(study, parent)
    return summary


def _log_plots(study: optuna.Study, parent: tracking.TrackedRun) -> None:
    import warnings

    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": lambda: ovm.plot_optimization_history(study),
             "parallel_coordinate": lambda: ovm.plot_parallel_coordinate(study)}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) >= 2 and len(study.best_trial.params) >= 1:
        plots["param_importances"] = lambda: ovm.plot_param_importances(study)
        plots["slice"] = lambda: ovm.plot_slice(study)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's "experimental" warnings
        for name, make in plots.items():
            try:
                ax = make()
            except (ValueError, RuntimeError, ZeroDivisionError):
                continue  # e.g. importances of a one-value space
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.set_size_inches(8, 5)
            parent.log_figure(fig, f"plots/search_{name}.png")


def _retrain_best(spec: JobSpec, study: optuna.Study) -> dict[str, Any]:
    """Train the best configuration once more on train+val, test it, and register it if asked."""
    from raybloom import runner

    params = {k: decode(v) for k, v in study.best_trial.params.items()}
    best = trial_spec(spec, params)
    dataset = data.load(best.data)
    merged = data.Dataset(data.Arrays(torch.cat([dataset.train.x, dataset.val.x]), torch.cat([dataset.train.y, dataset.val.y])),
                          dataset.val, dataset.test, dataset.meta)
    summary = runner.train(best, merged, nested=True, run_name=f"best of {study.study_name} (train+val)",
                           tags={"raybloom.study": study.study_name, "raybloom.retrain": "true"})
    return {f"retrained_{k}": v for k, v in summary.metrics.items() if k.startswith("test_")}
