"""The one job preparation: a spec resolved, before any run is opened, into the spec pinned to its prepared
data and the dataset itself. Every driver (in process, Ray, search, federated) does this once, so bad data
or a model that cannot fit it fails before anything is recorded, and everything downstream (Ray workers,
trials, simulated clients) reads the same prepared folder without preparing it again."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from raybloom import data, engine, pretrained
from raybloom.errors import UserError
from raybloom.objective import make_objective
from raybloom.spec import JobSpec


@dataclass(frozen=True)
class PreparedJob:
    spec: JobSpec  # `data.path` is the prepared folder's absolute path (unless the preparation was told not to pin
    # it); `model.init_from` is always a local weights file's
    dataset: data.Dataset


def prepare_job(spec: JobSpec, *, pin_data: bool = True, stream: Sequence[str] | None = None) -> PreparedJob:
    """Prepare (or find) the spec's data, open it, check that the model can be built for it.

    `stream`: the splits this driver reads from their shards instead of holding (default: all of them when
    in-process training streams, `data.wants_stream`; none otherwise); the others must fit in memory.
    `pin_data=False` keeps the spec's data section as given: for processes on other machines (SuperNodes)
    that resolve the same source themselves, where this machine's folder means nothing."""
    spec = pretrained.pin(spec)  # model.init_from: a local weights file (fetched from its MLflow run)
    pools = _pools(spec)
    if pools and spec.data.stream:
        raise UserError(f"data.stream: true streams the splits, and {', '.join(pools)} holds train + validation in "
                        "memory as one pool; leave data.stream unset, or turn those off")
    if stream is None:
        stream = data.SPLITS if data.wants_stream(spec.data) and not pools else ()
    dataset = data.load(spec.data, stream=stream)
    engine.build(spec, dataset)  # refuses a model that cannot fit this data, naming the field
    # the fractions the folder was prepared with (a data.path folder's own, not this spec's defaults)
    fractions = {s: dataset.meta.get(f"{s}_fraction", getattr(spec.data, f"{s}_fraction")) for s in ("val", "test")}
    data.check_splits(dataset, spec.data.path or spec.data.source, fractions, make_objective(spec, dataset).classify)
    _check_folds(spec, dataset, pools)
    if spec.kind == "train" and spec.scaling.workers == 0 and spec.optim.name == "gd" and "train" in stream:
        raise UserError("optim.name: gd takes the whole training split as one batch; this one is streamed (data.stream, "
                        "or over data.stream_above_mb): use sgd, adam or adagrad")
    if pin_data:
        spec = spec.with_overrides({"data.path": str(Path(dataset.meta["folder"]).resolve())})
    return PreparedJob(spec, dataset)


def _pools(spec: JobSpec) -> list[str]:
    """The settings that train on train + validation as one pool in memory (so the data cannot be streamed)."""
    found = ["train.cv_folds"] if spec.kind == "train" and spec.train.cv_folds else []
    if spec.kind == "search" and spec.search is not None:
        found += [k for k, on in (("search.cv_folds", spec.search.cv_folds), ("search.retrain_best", spec.search.retrain_best)) if on]
    return found


def _check_folds(spec: JobSpec, dataset: data.Dataset, pools: list[str]) -> None:
    n = len(dataset.train) + len(dataset.val)
    if pools:  # refused now, not after the study: they hold train + validation in memory
        data.check_fits(dataset.meta, {"train": len(dataset.train), "val": len(dataset.val)}, Path(dataset.meta["folder"]),
                        way_out=f"{', '.join(pools)} hold(s) them in memory as one pool: set data.train_limit, or turn it off")
    in_process_cv = spec.kind == "train" and spec.scaling.workers == 0
    for key, k in (("train.cv_folds", spec.train.cv_folds if in_process_cv else 0),
                   ("search.cv_folds", spec.search.cv_folds if spec.kind == "search" else 0)):
        if k and n < k:
            raise UserError(f"{key}: {k} folds need at least {k} samples in train+val, got {n}")
