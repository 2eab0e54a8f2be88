"""Run a `train` job in this process: load the data, open the tracking run, fit, record the result.

k-fold cross-validation (`train.cv_folds: k`) runs k nested child runs and records their mean and std on
the parent. Adapters (Ray, Optuna, Flower) reuse `prepare` and `TrackedRun` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from raybloom import data, engine, regularization, tracking
from raybloom.errors import UserError


@dataclass
class RunSummary:
    run_id: str
    experiment_id: str
    metrics: dict[str, float] = field(default_factory=dict)
    children: list[str] = field(default_factory=list)


def prepare(spec) -> data.Dataset:
    """Everything that can fail on bad input, done before a run is opened (so nothing half-recorded is left)."""
    dataset = data.load(spec.data)
    engine.build(spec, dataset)  # refuses a model that cannot fit this data, naming the field
    return dataset


def run(spec) -> RunSummary:
    if spec.kind != "train":
        raise UserError(f"kind: {spec.kind!r} is run by its adapter (raybloom.search / raybloom.federated), "
                        "or by `raybloom run`, which dispatches")
    if spec.scaling.workers > 0:
        raise UserError(f"scaling.workers: {spec.scaling.workers} runs on Ray: use raybloom.ray_train.fit, "
                        "or `raybloom run`, which dispatches")
    dataset = prepare(spec)
    if spec.train.cv_folds:
        return cross_validate(spec, dataset)
    return train(spec, dataset)


def train(spec, dataset: data.Dataset, *, nested: bool = False, run_name: str | None = None,
          tags: dict[str, str] | None = None) -> RunSummary:
    with tracking.TrackedRun(spec, "train", run_name=run_name, nested=nested, tags=tags) as tr:
        result = engine.fit(spec, dataset, on_epoch=[tr.log_epoch])
        tr.log_result(result)
        metrics = {**{f"val_{k}": v for k, v in result.val.items()}, **result.final}
    return RunSummary(tr.run_id, tr.experiment_id, metrics)


def fold_dataset(dataset: data.Dataset, train_idx: np.ndarray, held_idx: np.ndarray) -> data.Dataset:
    pool = data.Arrays(torch.cat([dataset.train.x, dataset.val.x]), torch.cat([dataset.train.y, dataset.val.y]))
    return data.Dataset(pool.subset(torch.from_numpy(train_idx)), pool.subset(torch.from_numpy(held_idx)),
                        dataset.test, dataset.meta)


def cross_validate(spec, dataset: data.Dataset) -> RunSummary:
    """k folds over train+val, each a nested run; the parent logs mean and std of the fold metrics."""
    k = spec.train.cv_folds
    n = len(dataset.train) + len(dataset.val)
    if n < k:
        raise UserError(f"train.cv_folds: {k} folds need at least {k} samples in train+val, got {n}")
    name = f"cv{k} {spec.tracking.run_name or tracking.default_run_name(spec)}"
    with tracking.TrackedRun(spec, "train", run_name=name, tags={"raybloom.cv": "parent"}) as parent:
        children, per_fold = [], []
        for i, (tr_idx, held_idx) in enumerate(regularization.kfold_indices(n, k, spec.seed)):
            child = train(spec, fold_dataset(dataset, tr_idx, held_idx), nested=True, run_name=f"fold {i}",
                          tags={"raybloom.cv": "fold", "raybloom.fold": str(i)})
            children.append(child.run_id)
            per_fold.append(child.metrics)
        summary: dict[str, Any] = {}
        for key in ("val_loss", "val_accuracy", "test_loss", "test_accuracy"):
            vals = [m[key] for m in per_fold if key in m]
            if vals:
                summary[f"cv_{key}_mean"], summary[f"cv_{key}_std"] = tracking.summarize(vals)
        parent.log_metrics(summary)
    return RunSummary(parent.run_id, parent.experiment_id, summary, children)
