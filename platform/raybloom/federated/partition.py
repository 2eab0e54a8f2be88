"""How a federated run's training split is divided among its clients (deterministic by seed): iid, label
skew by Dirichlet(alpha), or label-sorted shards; and the clients × classes histogram of a division."""

from __future__ import annotations

import numpy as np

from raybloom.errors import DataError
from raybloom.spec import JobSpec


def client_partitions(spec: JobSpec, labels: np.ndarray) -> list[np.ndarray]:
    """The indices of the training split each of `federated.clients` clients holds (from its labels alone:
    `Split.labels()` reads only the label column of a streamed split)."""
    fed = spec.federated
    seed = spec.seed if fed.partition_seed is None else fed.partition_seed
    return partition(labels, fed.clients, fed.partition, alpha=fed.alpha, shards_per_client=fed.shards_per_client,
                     seed=seed)


def partition(y: np.ndarray, clients: int, scheme: str = "iid", *, alpha: float = 0.5, shards_per_client: int = 2,
              seed: int = 0, min_size: int = 2) -> list[np.ndarray]:
    """Indices of each client's share of a training split, deterministic by seed.

    iid: a random permutation cut in equal parts. dirichlet: each class divided among clients with
    proportions ~ Dir(alpha) (redrawn until every client has `min_size` samples). shards: samples
    sorted by label, cut into clients × shards_per_client shards, dealt at random.
    """
    y = np.asarray(y)
    n = len(y)
    if n < clients * min_size:
        raise DataError(f"federated.clients: {clients} clients need at least {clients * min_size} training samples, "
                        f"the training split has {n}; lower federated.clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    if scheme == "shards":
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, clients * shards_per_client)
        deal = rng.permutation(len(shards))
        return [np.sort(np.concatenate([shards[j] for j in deal[i::clients]])) for i in range(clients)]
    if scheme != "dirichlet":
        raise DataError(f"federated.partition: unknown scheme {scheme!r}; use iid, dirichlet or shards")
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha))) * len(idx)).astype(int)[:-1]
            for i, chunk in enumerate(np.split(idx, cuts)):
                parts[i].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= min_size:
            return out
    raise DataError(f"federated.alpha: no Dirichlet({alpha}) draw gave each of {clients} clients {min_size} samples; "
                    "raise federated.alpha or lower federated.clients")


def class_histogram(y: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """clients × classes sample counts."""
    return np.stack([np.bincount(np.asarray(y)[p], minlength=num_classes) for p in parts])
