"""A `train` job in this process: prepare it, open the tracking run, fit, record the result.

k-fold cross-validation (`train.cv_folds: k`) runs k nested child runs and records their mean and std on
the parent (`engine.cross_validate`, which a search's `search.cv_folds` shares).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raybloom import data, engine, outbox, results, tracking
from raybloom.errors import TrackingLost, UserError
from raybloom.job import prepare_job
from raybloom.spec import JobSpec


@dataclass
class RunSummary:
    """What `raybloom run` prints: the run, its headline metrics, its child runs."""

    run_id: str
    experiment_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)


def summary_metrics(result: engine.FitResult) -> dict[str, float]:
    """The headline metrics of a finished training: `val_*` of the final weights, `test_*`, best and stopped epoch."""
    return {**{f"val_{k}": v for k, v in result.val.items()}, **result.final}


def train_in_process(spec: JobSpec, resume: str | None = None) -> RunSummary:
    """`raybloom run` of a `kind: train` spec with `scaling.workers: 0` (`resume`: a run id, or "latest", kept
    in the outbox when its MLflow server stopped answering)."""
    if spec.kind != "train":
        raise UserError(f"kind: {spec.kind!r} is run by its adapter (raybloom.search / raybloom.federated), "
                        "or by `raybloom run`, which dispatches")
    if spec.scaling.workers > 0:
        raise UserError(f"scaling.workers: {spec.scaling.workers} runs on Ray: use raybloom.ray_train.fit, "
                        "or `raybloom run`, which dispatches")
    pinned = spec.model.init_from is not None
    kept = outbox.find(spec, resume) if resume is not None and not pinned else None  # before any preparing
    job = prepare_job(spec)  # the run records the spec as given (data.path unpinned): it trains on this dataset
    if pinned:  # recorded as the weights file the preparation fetched (pretrained/<run id>/); so is a kept run
        spec = job.spec.with_overrides({"data.path": spec.data.path})
        kept = outbox.find(spec, resume) if resume is not None else None
    if kept is not None:
        return resume_recorded(spec, job.dataset, kept)
    if spec.train.cv_folds:
        return cross_validate(spec, job.dataset)
    return train_recorded(spec, job.dataset)


def train_recorded(spec: JobSpec, dataset: data.Dataset, *, nested: bool = False, run_name: str | None = None,
                   tags: dict[str, str] | None = None) -> RunSummary:
    """Fit in this process inside a tracked run: every epoch logged, the result recorded."""
    with tracking.TrackedRun(spec, "train", run_name=run_name, nested=nested, tags=tags) as run:
        result = _fit_kept(spec, run, engine.Training(spec, dataset))
    return RunSummary(run.run_id, run.experiment_id, summary_metrics(result))


def resume_recorded(spec: JobSpec, dataset: data.Dataset, kept: outbox.Kept) -> RunSummary:
    """Go on in a run an MLflow outage stopped: its epochs the run does not hold written first (each once),
    then the training from its kept state; the outbox entry is dropped once the result is recorded."""
    training = engine.Training(spec, dataset)
    training.load_state_dict(kept.state())
    with tracking.TrackedRun(spec, "train", resume_run_id=kept.run_id) as run:
        try:
            have = {step for step, _ in run.history("train_loss")}
            for t, metrics in enumerate(training.history):
                if t not in have:
                    run.log_metrics(metrics, t)
        except TrackingLost as e:  # gone again: what was kept stays kept
            raise outbox.lost(e, run.run_id, kept.folder, "the training's state as kept before") from None
        result = _fit_kept(spec, run, training)
    outbox.drop(kept)
    return RunSummary(run.run_id, run.experiment_id, summary_metrics(result))


def _fit_kept(spec: JobSpec, run: tracking.TrackedRun, training: engine.Training) -> engine.FitResult:
    """The epochs and the result of `training` into `run`; if the server stops answering, the training's
    state (its epochs not yet written among them) is kept in the outbox, and the error says how to go on."""
    written = [len(training.history)]

    def log(epoch: int, metrics: dict[str, float], last: bool) -> None:
        run.log_metrics(metrics, epoch)
        written[0] = epoch + 1

    try:
        result = engine.fit(spec, training.dataset, hooks=[log], training=training)
        results.record_result(run, result)
    except TrackingLost as e:
        folder = outbox.keep(run.run_id, spec, str(e), state=training.state_dict())
        done = len(training.history)
        unwritten = f"epoch {done - 1}" if written[0] == done - 1 else f"epochs {written[0]}..{done - 1}"
        what = f"the training's state after epoch {done - 1}"
        if written[0] < done:
            what += f" ({unwritten} not written yet)"
        raise outbox.lost(e, run.run_id, folder, what) from None
    return result


def cross_validate(spec: JobSpec, dataset: data.Dataset) -> RunSummary:
    """k folds over train+val, each a nested run; the parent logs mean and std of the fold metrics."""
    k = spec.train.cv_folds
    name = f"cv{k} {spec.tracking.run_name or tracking.default_run_name(spec)}"
    children: list[str] = []
    with tracking.TrackedRun(spec, "train", run_name=name, tags={"raybloom.cv": "parent"}) as parent:
        def train_fold(i: int, fold: data.Dataset) -> dict[str, float]:
            child = train_recorded(spec, fold, nested=True, run_name=f"fold {i}",
                                   tags={"raybloom.cv": "fold", "raybloom.fold": str(i)})
            children.append(child.run_id)
            return {key: child.metrics[key] for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy")
                    if key in child.metrics}

        summary = engine.cross_validate(dataset, k, spec.seed, train_fold)
        parent.log_metrics(summary)
    return RunSummary(parent.run_id, parent.experiment_id, summary, children)
