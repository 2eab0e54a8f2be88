"""The Optuna study's parts: its storage (a journal file or a database; what makes it resumable), sampler,
pruner, the grid, and how a trial's parameters are drawn from the search space."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import optuna

from raybloom import tracking
from raybloom.spec import JobSpec, ParamRange, SearchSpec


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


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """The storage for a URL from `storage_url` (a database URL, or a journal file); trials on Ray rebuild it
    from the same string."""
    if "://" in url:
        return optuna.storages.get_storage(url)
    from optuna.storages.journal import JournalFileBackend

    Path(url).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def sampler_for(search: SearchSpec, existing: int = 0):
    """The sampler; `existing` trials offset its seed so a resumed study does not redraw the same points."""
    seed = search.seed + existing
    if search.sampler in ("grid", "random"):  # grid points are enqueued (see `enqueue_grid`): the sampler never draws
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(5, max(1, (search.n_trials or 10) // 3)))


def pruner_for(search: SearchSpec, epochs: int) -> optuna.pruners.BasePruner:
    if search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    if search.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def enqueue_grid(study: optuna.Study, search: SearchSpec) -> None:
    """Queue every grid point not yet in the study: exactly the grid, each point once.

    (Optuna's GridSampler calls `study.stop()` after the last point, which ask/tell does not allow.)
    """
    import itertools

    keys = list(search.space)
    for combo in itertools.product(*(search.space[k].grid() for k in keys)):
        study.enqueue_trial({k: encode(v) for k, v in zip(keys, combo)}, skip_if_exists=True)


def encode(v: Any) -> Any:
    """Optuna choices are scalars: lists (model.filters) travel as JSON strings."""
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def decode(v: Any) -> Any:
    if isinstance(v, str) and v[:1] in "[{":
        return json.loads(v)
    return v


def suggest(trial: optuna.Trial, space: dict[str, ParamRange]) -> dict[str, Any]:
    params = {}
    for key, r in space.items():
        if r.type == "categorical":
            params[key] = decode(trial.suggest_categorical(key, [encode(c) for c in r.choices]))
        elif r.type == "int":
            params[key] = trial.suggest_int(key, int(r.low), int(r.high), step=int(r.step or 1), log=r.log)
        else:
            params[key] = trial.suggest_float(key, r.low, r.high, step=r.step, log=r.log)
    return params
