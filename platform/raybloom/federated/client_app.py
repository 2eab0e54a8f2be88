"""The Flower ClientApp (`raybloom.federated.client_app:app` for `flwr run` and SuperNodes): Flower's
messages in, `client.local_train` / `client.evaluate_global` on this node's partition, messages out."""

from __future__ import annotations

import logging
import sys

from raybloom.federated.client import (LR_KEY, PROX_KEY, InjectedFault, corrupt, evaluate_global, faulty_clients,
                                       local_train, spec_from_json)
from raybloom.flwr_config import SPEC_KEY


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
    restart_dead_actors()
    app = ClientApp(mods=[dp_clip_mod])

    @app.train()
    def train(msg: Message, context) -> Message:
        config = msg.content["config"]
        spec_json = str(config[SPEC_KEY])
        spec = spec_from_json(spec_json)
        pid, rnd = _partition_id(context), int(config["server-round"])
        if pid in faulty_clients(spec, rnd):
            raise InjectedFault(f"client {pid} raised in round {rnd} (federated.faults.raise_fraction)")
        state = msg.content["arrays"].to_torch_state_dict()
        new, metrics = local_train(spec, pid, state, rnd, float(config.get(LR_KEY, spec.optim.lr)),
                                   float(config.get(PROX_KEY, 0.0)), spec_json)
        new = corrupt(spec, pid, new)
        content = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context) -> Message:
        spec_json = str(msg.content["config"][SPEC_KEY])
        metrics = evaluate_global(spec_json, _partition_id(context), msg.content["arrays"].to_torch_state_dict())
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


SIMULATION_MODULE = "flwr.server.superlink.fleet.vce.vce_api"  # loaded in Flower's simulation process


def restart_dead_actors() -> None:
    """In Flower's simulation process (it loads this app before it builds its pool of client actors): Ray
    restarts a client actor whose process died (SIGKILL, the OOM killer). Flower 1.42 creates the actors
    with Ray's default max_restarts=0 and puts a dead one back in its pool, where every later message
    handed to it fails at once: one lost process left a round too few clients, and the run FAILED.
    Restarted, the message the actor held fails (the server counts that client failed), as may one handed
    to it in the second or two the new process takes to start; later ones run there. Flower has no setting
    for it, so its Ray backend's actor class is wrapped to ask for it. Where Flower's simulation is not
    loaded (a SuperNode's ClientApp) nothing is touched."""
    if SIMULATION_MODULE not in sys.modules:
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    if not isinstance(raybackend.ClientAppActor, Restarting):
        raybackend.ClientAppActor = Restarting(raybackend.ClientAppActor)


class Restarting:
    """A Ray actor class whose actors are restarted when their process dies (the task in flight still fails:
    max_task_retries stays 0); Flower's backend calls only `.options(num_cpus=..., num_gpus=...)` on it."""

    def __init__(self, actor_class):
        self.actor_class = actor_class

    def options(self, **options):
        return self.actor_class.options(max_restarts=-1, **options)


def dp_clip_mod(msg, context, call_next):
    """Client-side DP: Flower's `fixedclipping_mod` when the server sent a clipping norm, else a pass-through."""
    from flwr.clientapp.mod import fixedclipping_mod
    from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = make_app()
