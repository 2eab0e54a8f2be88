"""What a federated client does, in plain PyTorch: train `local_epochs` with the engine on its partition
from the global weights, or evaluate the global weights on it. No Flower here (`client_app` wraps these
in a Flower ClientApp), no MLflow: clients never write to the run.

Everything a client needs arrives in the message: the spec (JSON, in the train config) and the global
weights; the partition id comes from the node config (`partition-id`: set by Flower's simulation, by
`flower-supernode --node-config` in deployment). So the same app runs in both modes, and a client never
reads a run config.
"""

from __future__ import annotations

import functools
import time
from collections import OrderedDict

import numpy as np
import torch

from raybloom import data, engine
from raybloom.federated.partition import client_partitions
from raybloom.objective import make_objective
from raybloom.spec import JobSpec

PROX_KEY = "proximal-mu"  # set by Flower's FedProx strategy in the train config
LR_KEY = "raybloom-lr"  # the round's learning rate, set by the server


class InjectedFault(RuntimeError):
    """A failure `federated.faults` asked for (tests and benchmarks)."""


@functools.lru_cache(maxsize=4)
def spec_from_json(spec_json: str) -> JobSpec:
    return JobSpec.model_validate_json(spec_json)


_PARTITIONS: OrderedDict[tuple[str, int], data.Dataset] = OrderedDict()
CACHE_SHARE = 0.25  # of the memory available: what a process keeps of the partitions it served


def client_dataset(spec_json: str, partition_id: int) -> data.Dataset:
    """This client's share of the training split (validation and test stay with the server). A simulation
    actor serves several clients: it keeps the partitions it read, the least recently used dropped first
    once they take over a quarter of its memory, so it never ends up holding the whole split."""
    key = (spec_json, partition_id)
    if key in _PARTITIONS:
        _PARTITIONS.move_to_end(key)
        return _PARTITIONS[key]
    _PARTITIONS[key] = found = read_partition(spec_json, partition_id)
    held = lambda ds: sum(t.nbytes for split in (ds.train, ds.val) for t in (split.x, split.y))  # noqa: E731
    budget = CACHE_SHARE * data.available_memory()
    while len(_PARTITIONS) > 1 and sum(held(d) for d in _PARTITIONS.values()) > budget:
        _PARTITIONS.popitem(last=False)
    return found


def read_partition(spec_json: str, partition_id: int) -> data.Dataset:
    """The labels decide the partition; then only this partition's rows are kept, read shard by shard (one
    shard in memory at a time besides them). `federated.client_val_fraction` of them (by seed and partition)
    are the client's held-out share, where the global model is evaluated (`evaluate_global`)."""
    spec = spec_from_json(spec_json)
    train = data.load(spec.data, splits=("train",), stream=("train",))
    parts = client_partitions(spec, train.train.labels())
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} is not in 0..{len(parts) - 1} "
                         f"(federated.clients={spec.federated.clients})")
    local, held_out = held_out_share(parts[partition_id], spec.federated.client_val_fraction, spec.seed, partition_id)
    empty = data.empty_split(train.meta)
    return data.Dataset(train.train.take(local), train.train.take(held_out) if len(held_out) else empty, empty,
                        train.meta)


def held_out_share(indices: np.ndarray, fraction: float, seed: int, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(the rows a client trains on, its held-out rows): `fraction` of its partition, at least one row
    each way when the partition has two or more, drawn by seed and partition id."""
    n = len(indices)
    k = min(max(int(round(fraction * n)), 1), n - 1) if fraction > 0 and n >= 2 else 0
    chosen = np.random.default_rng([seed, partition_id, 0xE7A1]).permutation(n)
    return np.sort(indices[chosen[k:]]), np.sort(indices[chosen[:k]])


def faulty_clients(spec: JobSpec, server_round: int) -> set[int]:
    """The partition ids that raise in this round: `faults.raise_fraction` of the clients, by seed and round."""
    fed = spec.federated
    k = int(round(fed.faults.raise_fraction * fed.clients))
    if not k:
        return set()
    return set(np.random.default_rng([spec.seed, server_round]).choice(fed.clients, size=k, replace=False).tolist())


def client_device(spec: JobSpec) -> torch.device:
    """CUDA when the client was given a GPU share (`federated.client_gpus`) and Ray handed it one."""
    return torch.device("cuda") if spec.federated.client_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def local_train(spec: JobSpec, partition_id: int, global_state: dict[str, torch.Tensor], server_round: int,
                lr: float, proximal_mu: float = 0.0,
                spec_json: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`local_epochs` epochs of the engine on this client's partition, from the global weights, at the
    round's learning rate `lr` (the server's `schedules.lr_at` of the round: constant within a round)."""
    fed = spec.federated
    torch.set_num_threads(fed.client_cpus)
    dataset = client_dataset(spec_json or spec.model_dump_json(), partition_id)
    # a per-client, per-round seed (batch order, dropout)
    local = spec.with_overrides({"seed": spec.seed * 100003 + server_round * 1009 + partition_id,
                                 "train.epochs": fed.local_epochs, "optim.lr": lr, "schedule.name": "constant",
                                 "regularization.early_stopping.enabled": False})
    device = client_device(spec)
    model = engine.build(local, dataset)
    model.load_state_dict(global_state)
    model.to(device)
    extra = None
    if proximal_mu > 0:  # FedProx: mu/2 · ||w - w_global||², through the engine's hook
        anchor = [p.detach().clone() for p in model.parameters()]

        def extra(m: torch.nn.Module) -> torch.Tensor:
            return proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    training = engine.Training(local, dataset, model=model, extra_loss=extra, device=device)
    training.run_epochs()  # raises TrainingDiverged on NaN/inf: the reply becomes an error
    metrics = {"train_loss": float(training.history[-1]["train_loss"]), "num-examples": len(dataset.train),
               "grad_norm": float(np.mean([h["grad_norm"] for h in training.history])),
               "on-gpu": int(device.type == "cuda")}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, metrics


def evaluate_global(spec_json: str, partition_id: int, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
    """The global weights' loss (and accuracy) on this client's held-out share (its whole partition when
    `federated.client_val_fraction` is 0)."""
    spec = spec_from_json(spec_json)
    dataset = client_dataset(spec_json, partition_id)
    model = engine.build(spec, dataset)
    model.load_state_dict(global_state)
    held_out = dataset.val if len(dataset.val) else dataset.train
    m = engine.evaluate(model, held_out, make_objective(spec, dataset))
    return {f"eval_{k}": v for k, v in m.items()} | {"num-examples": len(held_out), "partition-id": partition_id}


def corrupt(spec: JobSpec, partition_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The byzantine client's weights: scaled by `faults.scale`, or NaN."""
    faults = spec.federated.faults
    if faults.byzantine_client != partition_id:
        return state
    if faults.slow_seconds:
        time.sleep(faults.slow_seconds)
    if faults.byzantine == "nan":
        return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v * faults.scale if v.is_floating_point() else v for k, v in state.items()}
