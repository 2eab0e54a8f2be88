"""The server's state after every round, kept with the MLflow run (artifact `checkpoint/server_state.pt`)
so that `raybloom run SPEC --resume` continues a federated run whose processes were killed.

It holds what the next round depends on: the global weights, the strategy object itself (FedAdam /
FedYogi moments, FedAvgM momentum, DP wrappers: Flower keeps that state on the strategy), the round,
the early-stopping state, every round's metrics (the loss curves, and the one round whose metrics may
not have reached MLflow before the kill) and the RNG states (Python's, which Flower samples clients
with; NumPy's, which DP noise draws from; torch's). The state is written before the round's metrics, so
on resume a round is either replayed from the start (no checkpoint of it) or complete (its metrics are
logged then if the kill came between the two writes): each round's metrics appear exactly once.
"""

from __future__ import annotations

import io
import pickle
import random
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from raybloom import tracking

PATH = "checkpoint/server_state.pt"


@dataclass
class ServerState:
    round: int
    weights: dict[str, torch.Tensor]
    strategy: bytes  # the pickled strategy
    rounds: list[dict[str, float]]
    early: Optional[dict[str, Any]] = None  # EarlyStopping.state_dict()
    early_stopped: bool = False
    rng: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(recorder: tracking.RunRecorder, state: ServerState) -> None:
    buf = io.BytesIO()
    torch.save({**state.__dict__, "strategy": state.strategy}, buf)
    recorder.log_bytes(buf.getvalue(), PATH)


def load(recorder: tracking.RunRecorder) -> Optional[ServerState]:
    """The run's latest server state, or None for a run that has not finished a round."""
    raw = recorder.read_bytes(PATH)
    if raw is None:
        return None
    # our own file, written by `save` above: it holds the pickled strategy, so not weights_only
    return ServerState(**torch.load(io.BytesIO(raw), weights_only=False))


def pickled(strategy) -> bytes:
    return pickle.dumps(strategy)


def unpickled(raw: bytes):
    return pickle.loads(raw)
