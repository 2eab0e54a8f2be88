"""The server's state after every round, kept with the MLflow run so that `raybloom run SPEC --resume`
continues a federated run whose processes were killed (two slots, `checkpoint/server_state_{0,1}.pt`,
alternating by round).

It holds what the next round depends on: the global weights, the strategy's state (FedAdam / FedYogi
moments, FedAvgM momentum, the current arrays: Flower keeps it as attributes of the strategy, which is
rebuilt from the spec on resume and gets them back; DP wrappers' inner strategy too), the round,
the early-stopping state, every round's metrics (the loss curves, and the one round whose metrics may
not have reached MLflow before the kill) and the RNG states (Python's, which Flower samples clients
with; NumPy's, which DP noise draws from; torch's). The state is written before the round's metrics, so
on resume a round is either replayed from the start (no checkpoint of it) or complete (its metrics are
logged then if the kill came between the two writes): each round's metrics appear exactly once.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from raybloom import tracking
from raybloom.engine import rng_state, set_rng_state  # noqa: F401 - the server's, from the core

SLOTS = ("checkpoint/server_state_0.pt", "checkpoint/server_state_1.pt")  # rounds alternate between them


@dataclass
class ServerState:
    round: int
    weights: dict[str, torch.Tensor]
    strategy: dict[str, Any]  # `strategy_state`: the strategy's arrays and numbers, as tensors and plain data
    rounds: list[dict[str, float]]
    early: Optional[dict[str, Any]] = None  # EarlyStopping.state_dict()
    early_stopped: bool = False
    rng: dict[str, Any] = field(default_factory=dict)


def _plain(value: Any) -> Any:
    """A strategy attribute as data `torch.load(weights_only=True)` reads, or `_SKIP` (functions, ...)."""
    from flwr.app import ArrayRecord

    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": value.to_torch_state_dict()}
    if isinstance(value, dict) and all(isinstance(v, np.ndarray) for v in value.values()):
        return {"__ndarrays__": {k: torch.from_numpy(np.array(v)) for k, v in value.items()}}
    return _SKIP


_SKIP = object()


def _restored(value: Any) -> Any:
    from flwr.app import ArrayRecord

    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord(value["__arrayrecord__"])
    if isinstance(value, dict) and "__ndarrays__" in value:
        return {k: v.numpy() for k, v in value["__ndarrays__"].items()}
    return value


def strategy_state(strategy) -> dict[str, Any]:
    """What a strategy holds that changes over rounds (FedAdam / FedYogi moments, FedAvgM momentum, the
    current arrays, counters), attribute by attribute, a DP wrapper's inner strategy under `strategy`;
    what cannot be data (its functions) is rebuilt from the spec instead."""
    out: dict[str, Any] = {}
    for name, value in vars(strategy).items():
        if name == "strategy" and hasattr(value, "aggregate_train"):
            out["strategy"] = {"__strategy__": strategy_state(value)}
        elif (plain := _plain(value)) is not _SKIP:
            out[name] = plain
    return out


def restore_strategy(strategy, state: dict[str, Any]) -> None:
    """Put `strategy_state` back on a strategy built from the same spec."""
    for name, value in state.items():
        if isinstance(value, dict) and "__strategy__" in value:
            restore_strategy(getattr(strategy, name), value["__strategy__"])
        else:
            setattr(strategy, name, _restored(value))


def save(recorder: tracking.RunRecorder, state: ServerState) -> None:
    """Into the slot of the round's parity: a kill while one is written leaves the other, a round older."""
    buf = io.BytesIO()
    torch.save(state.__dict__, buf)
    recorder.log_bytes(buf.getvalue(), SLOTS[state.round % 2])


def load(recorder: tracking.RunRecorder) -> Optional[ServerState]:
    """The run's latest server state that reads whole, or None for a run that has not finished a round.
    Tensors and plain data only: read with `weights_only=True`."""
    found = []
    for path in SLOTS:
        raw = recorder.read_bytes(path)
        if raw is None:
            continue
        try:
            found.append(ServerState(**torch.load(io.BytesIO(raw), weights_only=True)))
        except (EOFError, RuntimeError, pickle.UnpicklingError, TypeError):
            continue  # written partly when the run was killed
    return max(found, key=lambda st: st.round, default=None)
