"""The ClientApp: load the global weights, train `local_epochs` with the engine on this client's
partition, reply with the new weights and metrics.

Everything a client needs arrives in the message: the spec (JSON, in the train config) and the global
weights; the partition id comes from the node config (`partition-id`: set by Flower's simulation, by
`flower-supernode --node-config` in deployment). So the same app runs in both modes, and a client never
reads a run config.
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np
import torch

from raybloom import data, engine
from raybloom.spec import JobSpec

SPEC_KEY = "raybloom-spec"
PROX_KEY = "proximal-mu"  # set by Flower's FedProx strategy in the train config


class InjectedFault(RuntimeError):
    """A failure `federated.faults` asked for (tests and benchmarks)."""


@functools.lru_cache(maxsize=4)
def _spec(spec_json: str) -> JobSpec:
    return JobSpec.model_validate_json(spec_json)


@functools.lru_cache(maxsize=64)
def client_dataset(spec_json: str, partition_id: int) -> data.Dataset:
    """This client's share of the training split (validation and test stay with the server)."""
    spec = _spec(spec_json)
    f = spec.federated
    full = data.load(spec.data)
    parts = partitions(spec, full)
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} is not in 0..{len(parts) - 1} (federated.clients={f.clients})")
    empty = full.val.subset(torch.arange(0))
    return data.Dataset(full.train.subset(torch.from_numpy(parts[partition_id])), empty, empty, full.meta)


def partitions(spec: JobSpec, dataset: data.Dataset) -> list[np.ndarray]:
    f = spec.federated
    seed = spec.seed if f.partition_seed is None else f.partition_seed
    return data.partition(dataset.train.y.numpy(), f.clients, f.partition, alpha=f.alpha,
                          shards_per_client=f.shards_per_client, seed=seed)


def faulty_clients(spec: JobSpec, server_round: int) -> set[int]:
    """The partition ids that raise in this round: `faults.raise_fraction` of the clients, by seed and round."""
    f = spec.federated
    k = int(round(f.faults.raise_fraction * f.clients))
    if not k:
        return set()
    return set(np.random.default_rng([spec.seed, server_round]).choice(f.clients, size=k, replace=False).tolist())


def local_train(spec: JobSpec, partition_id: int, global_state: dict[str, torch.Tensor], server_round: int,
                proximal_mu: float = 0.0, spec_json: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """`local_epochs` epochs of the engine on this client's partition, from the global weights."""
    f = spec.federated
    torch.set_num_threads(max(1, int(f.client_cpus)))
    dataset = client_dataset(spec_json or spec.model_dump_json(), partition_id)
    # a per-client, per-round seed (batch order, dropout); the lr is constant within a round
    local = spec.with_overrides({"seed": spec.seed * 100003 + server_round * 1009 + partition_id,
                                 "train.epochs": f.local_epochs, "schedule.name": "constant",
                                 "regularization.early_stopping.enabled": False})
    model = engine.build(local, dataset)
    model.load_state_dict(global_state)
    extra = None
    if proximal_mu > 0:  # FedProx: mu/2 · ||w - w_global||², through the engine's hook
        anchor = [p.detach().clone() for p in model.parameters()]

        def extra(m: torch.nn.Module) -> torch.Tensor:
            return proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    training = engine.Training(local, dataset, model=model, extra_loss=extra)
    for _ in range(f.local_epochs):
        m = training.run_epoch()  # raises TrainingDiverged on NaN/inf: the reply becomes an error
    metrics = {"train_loss": float(m["train_loss"]), "num-examples": len(dataset.train)}
    return model.state_dict(), metrics


def corrupt(spec: JobSpec, partition_id: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The byzantine client's weights: scaled by `faults.scale`, or NaN."""
    fl = spec.federated.faults
    if fl.byzantine_client != partition_id:
        return state
    if fl.slow_seconds:
        time.sleep(fl.slow_seconds)
    if fl.byzantine == "nan":
        return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v * fl.scale if v.is_floating_point() else v for k, v in state.items()}


def _partition_id(context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this SuperNode has no partition-id: start it with "
                         "--node-config 'partition-id=N num-partitions=K'") from None


def make_app():
    """The Flower ClientApp (one per process; the spec comes with each message)."""
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    logging.getLogger("flwr").setLevel(logging.WARNING)
    app = ClientApp(mods=[dp_clip_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        config = msg.content["config"]
        spec_json = str(config[SPEC_KEY])
        spec = _spec(spec_json)
        pid, rnd = _partition_id(context), int(config["server-round"])
        if pid in faulty_clients(spec, rnd):
            raise InjectedFault(f"client {pid} raised in round {rnd} (federated.faults.raise_fraction)")
        state = msg.content["arrays"].to_torch_state_dict()
        new, metrics = local_train(spec, pid, state, rnd, float(config.get(PROX_KEY, 0.0)), spec_json)
        new = corrupt(spec, pid, new)
        content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        config = msg.content["config"]
        spec_json = str(config[SPEC_KEY])
        spec = _spec(spec_json)
        dataset = client_dataset(spec_json, _partition_id(context))
        model = engine.build(spec, dataset)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        m = engine.evaluate(model, dataset.train, engine.make_objective(spec, dataset))
        metrics = {f"eval_{k}": v for k, v in m.items()} | {"num-examples": len(dataset.train)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def dp_clip_mod(msg, context, call_next):
    """Client-side DP: Flower's `fixedclipping_mod` when the server sent a clipping norm, else a pass-through."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = make_app()  # `raybloom.federated.client:app` for flwr run / SuperNodes
