"""One trial: `spec.with_overrides(params)` trained by the engine in a Ray task (or as a Ray Train DDP run),
reporting each epoch to Optuna, whose pruner may stop it, and to the trial's MLflow run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import optuna
import torch

from raybloom import data, engine, results, tracking
from raybloom.errors import TrainingDiverged
from raybloom.search.study import open_storage, pruner_for
from raybloom.spec import JobSpec, SearchSpec


@dataclass
class TrialOutcome:
    """What a trial's task hands back to the study driver."""

    state: str  # COMPLETE, PRUNED or FAIL (as Optuna names them)
    value: Optional[float] = None  # the best epoch's metric (the objective), None when there is none
    epochs: int = 0
    reason: Optional[str] = None  # why it was pruned or failed
    test: dict[str, float] = field(default_factory=dict)


@dataclass
class TrialRef:
    """Where a trial lives: its study (name, storage) and number, and its MLflow run."""

    study_name: str
    storage_url: str
    number: int
    run_id: str
    tracking_uri: str


def trial_spec(spec: JobSpec, params: dict[str, Any]) -> JobSpec:
    """The train spec of one trial: in its Ray task, or as a DDP run of `workers_per_trial` workers."""
    search = spec.search
    scaling = {"scaling.workers": 0}
    if search is not None and search.workers_per_trial > 1:
        scaling = {"scaling.workers": search.workers_per_trial, "scaling.cpus_per_worker": search.threads_per_trial,
                   "scaling.max_failures": 0, "train.checkpoint_every": 0}  # only the final checkpoint
    if spec.federated is not None:  # a federated search: each trial is a federated run
        return spec.with_overrides({"kind": "federated", "search": None, **params})
    return spec.with_overrides({"kind": "train", "search": None, **scaling, **params})


class TrialReporter:
    """An epoch hook: reports each epoch's metric to the Optuna trial and stops the training when its
    pruner says so. Picklable (it travels to a DDP trial's rank-0 worker) and connects to the storage on
    first use. Never prunes at the last epoch of the budget (`train.epochs`): that epoch is already paid for.
    A federated trial's ServerApp calls it once a round (`unit="round"`, the budget `federated.rounds`).
    """

    def __init__(self, ref: TrialRef, search: SearchSpec, epochs: int, unit: str = "epoch"):
        self.ref, self.search, self.epochs, self.unit = ref, search, epochs, unit
        self.metric, self.sign = search.metric, 1.0 if search.goal == "minimize" else -1.0
        self.trial: optuna.Trial | None = None
        self.best: float | None = None
        self.reason: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "trial": None}

    def _connect(self) -> optuna.Trial:
        storage = open_storage(self.ref.storage_url)
        # the pruner is not in the storage: build the same one the driver has
        study = optuna.load_study(study_name=self.ref.study_name, storage=storage,
                                  pruner=pruner_for(self.search, self.epochs))
        trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(self.ref.study_name),
                                                                   self.ref.number)
        return optuna.trial.Trial(study, trial_id)

    def __call__(self, epoch: int, metrics: dict[str, float], last: bool) -> bool:
        if self.trial is None:
            self.trial = self._connect()
        value = metrics[self.metric]
        if self.best is None or self.sign * value < self.sign * self.best:
            self.best = value
        self.trial.report(value, epoch)
        if epoch + 1 < self.epochs and self.trial.should_prune():
            self.reason = f"pruned after {self.unit} {epoch + 1 if self.unit == 'round' else epoch}"
            return True
        return False


def run_trial(spec_json: dict, params: dict, ref: TrialRef, ray_storage: str | None = None) -> TrialOutcome:
    """Train one configuration, reporting each epoch to Optuna (which may prune it) and to its MLflow run."""
    spec = JobSpec.model_validate(spec_json)
    search = spec.search
    tspec = trial_spec(spec, params)
    torch.set_num_threads(search.threads_per_trial)
    recorder = tracking.RunRecorder(ref.run_id, ref.tracking_uri)
    report = TrialReporter(ref, search, tspec.train.epochs)
    dataset = _trial_data(tspec)
    if search.cv_folds:
        return _cv_trial(tspec, search, dataset, recorder)
    if search.workers_per_trial > 1:
        return _ddp_trial(tspec, dataset, report, ref, recorder, ray_storage)
    training = engine.Training(tspec, dataset)
    try:
        training.run_epochs([lambda epoch, metrics, last: recorder.log_metrics(metrics, epoch), report])
    except TrainingDiverged as e:
        return TrialOutcome("PRUNED", None, len(training.history), str(e))
    if training.halted:
        return TrialOutcome("PRUNED", report.best, len(training.history), report.reason)
    result = training.finish()
    results.record_final(recorder, result)
    return TrialOutcome("COMPLETE", report.best, len(training.history), test=result.test)


def _trial_data(tspec: JobSpec) -> data.Dataset:
    """The driver's prepared folder (`tspec.data.path`), opened as the trial trains on it: a DDP trial's
    driver task reads its workers' data from disk (all of it with ray_data); an in-process one streams
    when in-process training would (`data.wants_stream`)."""
    if tspec.scaling.workers > 1:
        return data.load(tspec.data, stream=("train",) if tspec.scaling.ingest == "arrays" else data.SPLITS)
    return data.load(tspec.data, stream=data.SPLITS if data.wants_stream(tspec.data) else ())


def _ddp_trial(tspec: JobSpec, dataset: data.Dataset, report: TrialReporter, ref: TrialRef, recorder,
               ray_storage) -> TrialOutcome:
    """One trial as a Ray Train DDP run: rank 0 reports to Optuna and all ranks stop when it is pruned."""
    from raybloom import ray_train

    try:
        result = ray_train.train_on_ray(tspec, dataset, ref.run_id, ref.tracking_uri, rank0_hook=report, storage=ray_storage)
    except TrainingDiverged as e:
        return TrialOutcome("PRUNED", None, 0, str(e))
    epochs = int(result.metrics["epoch"]) + 1
    reported = [v for _, v in recorder.history(report.metric)]  # rank 0 wrote each epoch
    best = (min if report.sign > 0 else max)(reported)
    recorder.set_tags({"raybloom.workers": str(tspec.scaling.workers)})
    if result.metrics.get("halted"):
        return TrialOutcome("PRUNED", best, epochs, f"pruned after epoch {epochs - 1}")
    fit = ray_train.finish_from(result, tspec, dataset)
    results.record_final(recorder, fit)
    return TrialOutcome("COMPLETE", best, epochs, test=fit.test)


def _cv_trial(tspec: JobSpec, search: SearchSpec, dataset: data.Dataset, recorder) -> TrialOutcome:
    """The objective is the mean validation metric over k folds of train+val; no pruning."""
    epochs = 0
    metric = search.metric.removeprefix("val_")

    def train_fold(fold: int, fold_data: data.Dataset) -> dict[str, float]:
        nonlocal epochs
        log = lambda t, m, last: recorder.log_metrics({f"fold{fold}_{k}": v for k, v in m.items()}, t)  # noqa: E731
        result = engine.fit(tspec, fold_data, hooks=[log])
        epochs += len(result.history)
        return {search.metric: result.val[metric]}

    try:
        summary = engine.cross_validate(dataset, search.cv_folds, tspec.seed, train_fold)
    except TrainingDiverged as e:
        return TrialOutcome("PRUNED", None, 0, str(e))
    recorder.log_metrics(summary)
    return TrialOutcome("COMPLETE", summary[f"cv_{search.metric}_mean"], epochs)
