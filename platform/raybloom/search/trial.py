"""One trial: `spec.with_overrides(params)` trained by the engine in a Ray task (or as a Ray Train DDP run),
reporting each epoch to Optuna, whose pruner may stop it, and to the trial's MLflow run."""

from __future__ import annotations

from typing import Any

import optuna
import torch

from raybloom import data, engine, tracking
from raybloom.errors import TrainingDiverged
from raybloom.search.study import open_storage, pruner_for
from raybloom.spec import JobSpec


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
