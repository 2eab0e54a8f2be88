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
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch

from raybloom import data, engine, tracking
from raybloom.errors import TrainingDiverged, UserError
from raybloom.spec import JobSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# ------------------------------------------------------------------------------------- study set-up
def storage_url(spec: JobSpec) -> str:
    """`search.storage` (a database URL or a journal file path), else optuna.journal beside the SQLite store."""
    url = spec.search.storage
    if url and "://" in url:
        return url
    if url:
        path = Path(url)
    else:
        uri = tracking.tracking_uri(spec)
        base = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:///") else Path(".raybloom")
        path = base / "optuna.journal"
    return str(path.resolve())


def open_storage(url: str):
    """A storage object for a URL from `storage_url`; trials on Ray rebuild it from the same string."""
    if "://" in url:
        return url
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def sampler_for(s, existing: int = 0):
    """The sampler; `existing` trials offset its seed so a resumed study does not redraw the same points."""
    seed = s.seed + existing
    if s.sampler in ("grid", "random"):  # grid points are enqueued (see `enqueue_grid`): the sampler never draws
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, (s.n_trials or 10) // 3)))


def pruner_for(s, epochs: int):
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if s.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def enqueue_grid(study: optuna.Study, s) -> None:
    """Queue every grid point not yet in the study: exactly the grid, each point once.

    (Optuna's GridSampler calls `study.stop()` after the last point, which ask/tell does not allow.)
    """
    import itertools

    keys = list(s.space)
    for combo in itertools.product(*(s.space[k].grid() for k in keys)):
        study.enqueue_trial({k: _encode(v) for k, v in zip(keys, combo)}, skip_if_exists=True)


def _encode(v: Any) -> Any:
    """Optuna choices are scalars: lists (model.filters) travel as JSON strings."""
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _decode(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


def suggest(trial: optuna.Trial, space) -> dict[str, Any]:
    params = {}
    for key, r in space.items():
        if r.type == "categorical":
            params[key] = _decode(trial.suggest_categorical(key, [_encode(c) for c in r.choices]))
        elif r.type == "int":
            params[key] = trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            params[key] = trial.suggest_float(key, r.low, r.high, step=r.step, log=r.log)
    return params


def trial_spec(spec: JobSpec, params: dict[str, Any]) -> JobSpec:
    """The train spec of one trial: in its Ray task, or as a DDP run of `workers_per_trial` workers."""
    s = spec.search
    scaling = {"scaling.workers": 0}
    if s is not None and s.workers_per_trial > 1:
        scaling = {"scaling.workers": s.workers_per_trial, "scaling.cpus_per_worker": s.threads_per_trial,
                   "scaling.max_failures": 0, "train.checkpoint_every": 0}  # only the final checkpoint
    return spec.with_overrides({"kind": "train", "search": None, **scaling, **params})


class TrialReporter:
    """Reports each epoch's metric to the Optuna trial and says when its pruner stops the trial.

    Picklable (it travels to a DDP trial's rank-0 worker) and connects to the storage on first use.
    Never prunes at the last epoch: that epoch is already paid for.
    """

    def __init__(self, study_name: str, storage_url: str, trial_id: int, s, epochs: int):
        self.study_name, self.storage_url, self.trial_id = study_name, storage_url, trial_id
        self.search, self.epochs = s, epochs
        self.metric, self.sign = s.metric, 1.0 if s.goal == "minimize" else -1.0
        self.trial: optuna.Trial | None = None
        self.best: float | None = None
        self.reason: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "trial": None}

    def __call__(self, epoch: int, metrics: dict[str, float], last: bool) -> bool:
        if self.trial is None:  # the pruner is not in the storage: build the same one the driver has
            study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url),
                                      pruner=pruner_for(self.search, self.epochs))
            self.trial = optuna.trial.Trial(study, self.trial_id)
        value = metrics[self.metric]
        if self.best is None or self.sign * value < self.sign * self.best:
            self.best = value
        self.trial.report(value, epoch)
        if not last and self.trial.should_prune():
            self.reason = f"pruned after epoch {epoch}"
            return True
        return False


# ------------------------------------------------------------------------------------- one trial
def run_trial(spec_json: dict, params: dict, study_name: str, storage_url: Any, trial_id: int, run_id: str,
              uri: str, ray_storage: str | None = None) -> dict[str, Any]:
    """Train one configuration, reporting each epoch to Optuna (which may prune it) and to its MLflow run."""
    spec = JobSpec.model_validate(spec_json)
    s = spec.search
    tspec = trial_spec(spec, params)
    torch.set_num_threads(s.threads_per_trial)
    recorder = tracking.RunRecorder(run_id, uri)
    report = TrialReporter(study_name, storage_url, trial_id, s, tspec.train.epochs)
    epochs = 0
    try:
        if s.cv_folds:
            value, epochs = _cv_objective(tspec, s, recorder)
            return {"state": "COMPLETE", "value": value, "epochs": epochs, "test": {}}
        if s.workers_per_trial > 1:
            return _ddp_trial(tspec, report, run_id, uri, recorder, ray_storage)
        training = engine.Training(tspec, data.load(tspec.data))
        while training.next_epoch < tspec.train.epochs and not training.stopped:
            m = training.run_epoch()
            t = training.next_epoch - 1
            epochs += 1
            recorder.log_epoch(t, m)
            if report(t, m, training.next_epoch >= tspec.train.epochs):
                return {"state": "PRUNED", "value": report.best, "epochs": epochs, "reason": report.reason}
        result = training.finish()
        _log_finish(recorder, result)
        return {"state": "COMPLETE", "value": report.best, "epochs": epochs, "test": result.test}
    except TrainingDiverged as e:
        return {"state": "PRUNED", "value": None, "epochs": epochs, "reason": str(e)}


def _log_finish(recorder: tracking.RunRecorder, result) -> None:
    recorder.log_metrics(result.final, step=max(result.stopped_epoch, 0))
    recorder.set_tags({"raybloom.early_stopped": str(result.early_stopped).lower()})


def _ddp_trial(tspec: JobSpec, report: TrialReporter, run_id: str, uri: str, recorder, ray_storage) -> dict[str, Any]:
    """One trial as a Ray Train DDP run: rank 0 reports to Optuna and all ranks stop when it is pruned."""
    from raybloom import ray_train

    result = ray_train.train_on_ray(tspec, run_id, uri, on_epoch=report, storage=ray_storage)
    epochs = int(result.metrics["epoch"]) + 1
    reported = [v for _, v in recorder.history(report.metric)]  # rank 0 wrote each epoch
    best = (min if report.sign > 0 else max)(reported)
    recorder.set_tags({"raybloom.workers": str(tspec.scaling.workers)})
    if result.metrics.get("halted"):
        return {"state": "PRUNED", "value": best, "epochs": epochs, "reason": f"pruned after epoch {epochs - 1}"}
    fit = ray_train.finish_from(result, tspec, data.load(tspec.data))
    _log_finish(recorder, fit)
    return {"state": "COMPLETE", "value": best, "epochs": epochs, "test": fit.test}


def _cv_objective(tspec: JobSpec, s, recorder) -> tuple[float, int]:
    """The mean validation metric over k folds of train+val (the foundation's CV); no pruning."""
    from raybloom import regularization, runner

    dataset = data.load(tspec.data)
    n = len(dataset.train) + len(dataset.val)
    values, epochs = [], 0
    for fold, (tr_idx, held) in enumerate(regularization.kfold_indices(n, s.cv_folds, tspec.seed)):
        log = lambda t, m, f=fold: recorder.log_epoch(t, {f"fold{f}_{k}": v for k, v in m.items()})  # noqa: E731
        result = engine.fit(tspec, runner.fold_dataset(dataset, tr_idx, held), on_epoch=[log])
        values.append(result.val[s.metric.removeprefix("val_")])
        epochs += len(result.history)
    mean, std = tracking.summarize(values)
    recorder.log_metrics({f"cv_{s.metric}_mean": mean, f"cv_{s.metric}_std": std})
    return mean, epochs


# ------------------------------------------------------------------------------------- the driver
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

    params = {k: _decode(v) for k, v in study.best_trial.params.items()}
    best = trial_spec(spec, params)
    dataset = data.load(best.data)
    merged = data.Dataset(data.Arrays(torch.cat([dataset.train.x, dataset.val.x]), torch.cat([dataset.train.y, dataset.val.y])),
                          dataset.val, dataset.test, dataset.meta)
    summary = runner.train(best, merged, nested=True, run_name=f"best of {study.study_name} (train+val)",
                           tags={"raybloom.study": study.study_name, "raybloom.retrain": "true"})
    return {f"retrained_{k}": v for k, v in summary.metrics.items() if k.startswith("test_")}
