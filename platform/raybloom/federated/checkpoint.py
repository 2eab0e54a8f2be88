"""The server's state after every round, kept with the MLflow run so that `raybloom run SPEC --resume`
continues a federated run whose processes were killed (two slots, `checkpoint/server_state_{0,1}.pt`,
alternating by round).

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

SLOTS = ("checkpoint/server_state_0.pt", "checkpoint/server_state_1.pt")  # rounds alternate between them


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
    """Into the slot of the round's parity: a kill while one is written leaves the other, a round older."""
    buf = io.BytesIO()
    torch.save(state.__dict__, buf)
    recorder.log_bytes(buf.getvalue(), SLOTS[state.round % 2])


def load(recorder: tracking.RunRecorder) -> Optional[ServerState]:
    """The run's latest server state that reads whole, or None for a run that has not finished a round.
    The file is a pickle (it holds the strategy object): it is trusted as the tracking store is."""
    found = []
    for path in SLOTS:
        raw = recorder.read_bytes(path)
        if raw is None:
            continue
        try:
            found.append(ServerState(**torch.load(io.BytesIO(raw), weights_only=False)))
        except (EOFError, RuntimeError, pickle.UnpicklingError, TypeError):
            continue  # written partly when the run was killed
    return max(found, key=lambda st: st.round, default=None)


def pickled(strategy) -> bytes:
    return pickle.dumps(strategy)


def unpickled(raw: bytes):
    return pickle.loads(raw)
