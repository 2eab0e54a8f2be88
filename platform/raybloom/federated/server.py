"""The federated server: rounds of a Flower strategy around the engine, evaluated and recorded by the
server (`server_app` wraps this in Flower's ServerApp).

The round loop calls the strategy's own `configure_train` / `aggregate_train` (so every Flower strategy
and DP wrapper works unchanged) but screens the replies first: a client that raised, timed out or sent
non-finite weights is left out and counted in `clients_failed`; a round with fewer than
`min_train_clients` usable replies fails the run; an aggregate that is not finite is refused (the global
model keeps the previous round's weights), and so is one whose validation loss is not finite: the
global model never becomes NaN. After each round the
server evaluates the global model on the validation split, records the contract metrics, and applies
early stopping (patience in rounds). Finally it tests the global model and logs the model and plots.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from raybloom import data, engine, regularization, results, tracking
from raybloom.errors import UserError
from raybloom.federated import strategies
from raybloom.federated.client import SPEC_KEY
from raybloom.objective import make_objective
from raybloom.spec import FederatedSpec, JobSpec


class RoundFailed(UserError):
    """Too few clients replied with usable weights."""


@dataclass
class Outcome:
    rounds: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    early_stopped: bool = False
    best_round: int = 0


def finite(arrays) -> bool:
    return all(np.isfinite(a).all() for a in arrays.to_numpy_ndarrays() if np.issubdtype(a.dtype, np.floating))


def screen(replies: list) -> tuple[list, list[str]]:
    """(usable replies, reasons of the others): errors and non-finite weights are left out."""
    good, reasons = [], []
    for r in replies:
        if r.has_error():
            reasons.append(f"node {r.metadata.src_node_id}: {r.error.reason.strip().splitlines()[-1][:200]}")
        elif "arrays" not in r.content or not finite(r.content["arrays"]):
            reasons.append(f"node {r.metadata.src_node_id}: non-finite weights")
        else:
            good.append(r)
    return good, reasons


def _mean_train_loss(replies: list) -> float:
    w = [float(r.content["metrics"]["num-examples"]) for r in replies]
    v = [float(r.content["metrics"]["train_loss"]) for r in replies]
    return float(np.average(v, weights=w)) if sum(w) else math.nan


def _wait_for_clients(grid, fed: FederatedSpec, log: Callable[[str], None]) -> None:
    """Before round 1: wait (up to round_timeout) for `clients` nodes; go on with at least min_train_clients."""
    deadline = time.monotonic() + fed.round_timeout
    while (n := len(list(grid.get_node_ids()))) < fed.clients and time.monotonic() < deadline:
        time.sleep(0.2)
    if n < fed.min_train_clients:
        raise RoundFailed(f"only {n} client(s) connected within {fed.round_timeout:g} s, federated.min_train_clients is "
                          f"{fed.min_train_clients}; start more SuperNodes")
    if n < fed.clients:
        log(f"{n} of {fed.clients} clients connected; starting anyway (min_train_clients={fed.min_train_clients})")


class Rounds:
    """The server's state across rounds: the strategy, the global model (and its last accepted weights)."""

    def __init__(self, spec: JobSpec, grid, dataset: data.Dataset):
        from flwr.app import ArrayRecord

        self.spec, self.grid, self.dataset = spec, grid, dataset
        self.fed = spec.federated
        engine.seed_everything(spec.seed)
        self.model = engine.build(spec, dataset)
        self.objective = make_objective(spec, dataset)
        self.strategy = strategies.build(self.fed)
        self.spec_json = spec.model_dump_json()
        self.arrays = ArrayRecord(self.model.state_dict())

    def validate(self) -> dict[str, float]:
        return {f"server_val_{k}": v for k, v in engine.evaluate(self.model, self.dataset.val, self.objective).items()}

    def play(self, rnd: int) -> tuple[dict[str, float], list[str]]:
        """One round: sample and send, screen the replies, aggregate (unless the aggregate is not finite),
        validate. Returns the round's metrics and why clients were left out."""
        from flwr.app import ConfigRecord

        fed, t0 = self.fed, time.monotonic()
        messages = list(self.strategy.configure_train(rnd, self.arrays, ConfigRecord({SPEC_KEY: self.spec_json}), self.grid))
        replies = list(self.grid.send_and_receive(messages, timeout=fed.round_timeout))
        good, reasons = screen(replies)
        if len(replies) < len(messages):
            reasons.append(f"{len(messages) - len(replies)} client(s) did not reply within {fed.round_timeout:g} s")
        if len(good) < fed.min_train_clients:
            raise RoundFailed(f"round {rnd}: only {len(good)} of {len(messages)} clients replied with usable weights, "
                              f"federated.min_train_clients is {fed.min_train_clients} ({'; '.join(reasons[:5])})")
        aggregated, _ = self.strategy.aggregate_train(rnd, good)
        rejected = aggregated is None or not finite(aggregated)
        if not rejected:  # a finite aggregate can still overflow the forward pass (weights × 1e20)
            self.model.load_state_dict(aggregated.to_torch_state_dict())
            val = self.validate()
            rejected = not math.isfinite(val["server_val_loss"])
        if rejected:  # keep the previous round's global model
            self.model.load_state_dict(self.arrays.to_torch_state_dict())
            val = self.validate()
        else:
            self.arrays = aggregated
        return {**val, "clients_train_loss": _mean_train_loss(good), "clients_ok": len(good),
                "clients_failed": len(messages) - len(good), "aggregate_rejected": int(rejected),
                "round_seconds": time.monotonic() - t0}, reasons


def _round_line(rnd: int, total: int, elapsed: float, m: dict[str, float], reasons: list[str]) -> str:
    acc = f" acc {m['server_val_accuracy']:.4f}" if "server_val_accuracy" in m else ""
    note = f" | left out: {'; '.join(reasons[:3])}" if reasons else ""
    refused = " (aggregate refused: not finite)" if m["aggregate_rejected"] else ""
    return (f"[{elapsed:6.1f}s] round {rnd}/{total}: server val loss {m['server_val_loss']:.4f}{acc}, "
            f"clients ok {m['clients_ok']}, failed {m['clients_failed']}{refused}{note}")


def serve(spec: JobSpec, grid, recorder: tracking.RunRecorder, dataset: data.Dataset, log=None) -> tuple[Any, Outcome]:
    """Run `federated.rounds` rounds on `grid`; returns (the final global model, the outcome)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    fed = spec.federated
    rounds = Rounds(spec, grid, dataset)
    es = fed.early_stopping
    early = regularization.EarlyStopping(es.patience, es.min_delta) if es.enabled else None
    out = Outcome()
    _wait_for_clients(grid, fed, log)
    recorder.log_metrics(rounds.validate(), 0)
    started = time.monotonic()
    for rnd in range(1, fed.rounds + 1):
        m, reasons = rounds.play(rnd)
        recorder.log_metrics(m, rnd)
        out.rounds.append(m)
        log(_round_line(rnd, fed.rounds, time.monotonic() - started, m, reasons))
        if early is not None and early.step(rnd, m["server_val_loss"], rounds.model):
            out.early_stopped = True
            log(f"early stopping: server_val_loss has not improved for {es.patience} rounds (best round {early.best_epoch})")
            break
    if early is not None:
        early.restore(rounds.model)
        out.best_round = early.best_epoch
    else:
        out.best_round = int(np.argmin([r["server_val_loss"] for r in out.rounds])) + 1
    out.test = engine.evaluate(rounds.model, dataset.test, rounds.objective)
    return rounds.model, out


def record(run: tracking.TrackedRun, spec: JobSpec, model, out: Outcome, dataset: data.Dataset) -> None:
    """Final metrics, plots (loss curves over rounds, confusion matrix) and the model, through `results`."""
    history = [{"train_loss": r["clients_train_loss"], "val_loss": r["server_val_loss"], "lr": spec.optim.lr}
               for r in out.rounds]
    objective = make_objective(spec, dataset)
    result = engine.FitResult(model, objective, dataset, history,
                              best_epoch=out.best_round - 1, stopped_epoch=len(out.rounds) - 1,
                              early_stopped=out.early_stopped, test=out.test,
                              val=engine.evaluate(model, dataset.val, objective))
    results.record_result(run, result)
    run.log_metrics({"rounds_run": len(out.rounds), "best_round": out.best_round,
                     "clients_failed_total": sum(r["clients_failed"] for r in out.rounds),
                     **{f"final_server_val_{k}": v for k, v in result.val.items()}}, step=len(out.rounds))


def serve_and_record(spec: JobSpec, run_id: str, grid, dataset: data.Dataset | None = None) -> Outcome:
    """The ServerApp's body: resume the driver's run, serve, record; the run ends FINISHED or FAILED here.
    `dataset`: the driver's, when the server runs in its process (simulation); else read here, once."""
    with tracking.TrackedRun(spec, "federated", resume_run_id=run_id) as run:
        dataset = dataset if dataset is not None else data.load(spec.data, stream=("train",))  # the clients' split
        model, out = serve(spec, grid, run, dataset)
        record(run, spec, model, out, dataset)
    return out
