"""The ServerApp: rounds of a Flower strategy around the engine, evaluated and recorded by the server.

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
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raybloom import data, engine, regularization, tracking
from raybloom.errors import UserError
from raybloom.federated import strategies
from raybloom.federated.client import SPEC_KEY
from raybloom.spec import JobSpec

RUN_ID_KEY = "raybloom-run-id"
URI_KEY = "raybloom-tracking-uri"


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


def _wait_for_clients(grid, f, log) -> None:
    """Before round 1: wait (up to round_timeout) for `clients` nodes; go on with at least min_train_clients."""
    deadline = time.monotonic() + f.round_timeout
    while (n := len(list(grid.get_node_ids()))) < f.clients and time.monotonic() < deadline:
        time.sleep(0.2)
    if n < f.min_train_clients:
        raise RoundFailed(f"only {n} client(s) connected within {f.round_timeout:g} s, federated.min_train_clients is "
                          f"{f.min_train_clients}; start more SuperNodes")
    if n < f.clients:
        log(f"{n} of {f.clients} clients connected; starting anyway (min_train_clients={f.min_train_clients})")


def serve(spec: JobSpec, grid, recorder: tracking.RunRecorder, dataset: data.Dataset, log=None) -> tuple[Any, Outcome]:
    """Run `federated.rounds` rounds on `grid`; returns (the final global model, the outcome)."""
    from flwr.app import ArrayRecord, ConfigRecord

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    f = spec.federated
    engine.seed_everything(spec.seed)
    model = engine.build(spec, dataset)
    objective = engine.make_objective(spec, dataset)
    strategy = strategies.build(f)
    spec_json = spec.model_dump_json()
    arrays = ArrayRecord(model.state_dict())
    early = regularization.EarlyStopping(f.early_stopping.patience, f.early_stopping.min_delta) if f.early_stopping.enabled else None
    out = Outcome()
    _wait_for_clients(grid, f, log)
    val0 = engine.evaluate(model, dataset.val, objective)
    recorder.log_epoch(0, {f"server_val_{k}": v for k, v in val0.items()})
    started = time.monotonic()
    for rnd in range(1, f.rounds + 1):
        t0 = time.monotonic()
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord({SPEC_KEY: spec_json}), grid))
        replies = list(grid.send_and_receive(messages, timeout=f.round_timeout))
        good, reasons = screen(replies)
        failed = len(messages) - len(good)
        if len(replies) < len(messages):
            reasons.append(f"{len(messages) - len(replies)} client(s) did not reply within {f.round_timeout:g} s")
        if len(good) < f.min_train_clients:
            raise RoundFailed(f"round {rnd}: only {len(good)} of {len(messages)} clients replied with usable weights, "
                              f"federated.min_train_clients is {f.min_train_clients} ({'; '.join(reasons[:5])})")
        aggregated, _ = strategy.aggregate_train(rnd, good)
        rejected = aggregated is None or not finite(aggregated)
        if not rejected:  # a finite aggregate can still overflow the forward pass (weights × 1e20)
            model.load_state_dict(aggregated.to_torch_state_dict())
            val = engine.evaluate(model, dataset.val, objective)
            rejected = not math.isfinite(val["loss"])
        if rejected:  # keep the previous round's global model
            model.load_state_dict(arrays.to_torch_state_dict())
            val = engine.evaluate(model, dataset.val, objective)
        else:
            arrays = aggregated
        m = {f"server_val_{k}": v for k, v in val.items()}
        m.update(clients_train_loss=_mean_train_loss(good), clients_ok=len(good), clients_failed=failed,
                 aggregate_rejected=int(rejected), round_seconds=time.monotonic() - t0)
        recorder.log_epoch(rnd, m)
        out.rounds.append(m)
        acc = f" acc {m['server_val_accuracy']:.4f}" if "server_val_accuracy" in m else ""
        note = f" | left out: {'; '.join(reasons[:3])}" if reasons else ""
        log(f"[{time.monotonic() - started:6.1f}s] round {rnd}/{f.rounds}: server val loss {m['server_val_loss']:.4f}{acc}, "
            f"clients ok {len(good)}, failed {failed}{' (aggregate refused: not finite)' if rejected else ''}{note}")
        if early is not None and early.step(rnd, m["server_val_loss"], model):
            out.early_stopped = True
            log(f"early stopping: server_val_loss has not improved for {f.early_stopping.patience} rounds "
                f"(best round {early.best_epoch})")
            break
    if early is not None:
        early.restore(model)
        out.best_round = early.best_epoch
    else:
        out.best_round = int(np.argmin([r["server_val_loss"] for r in out.rounds])) + 1
    out.test = engine.evaluate(model, dataset.test, objective)
    return model, out


def record(run: tracking.TrackedRun, spec: JobSpec, model, out: Outcome, dataset: data.Dataset) -> None:
    """Final metrics, plots (loss curves over rounds, confusion matrix) and the model, through tracking."""
    history = [{"train_loss": r["clients_train_loss"], "val_loss": r["server_val_loss"], "lr": spec.optim.lr}
               for r in out.rounds]
    objective = engine.make_objective(spec, dataset)
    result = engine.FitResult(model, objective, dataset, history,
                              best_epoch=out.best_round - 1, stopped_epoch=len(out.rounds) - 1,
                              early_stopped=out.early_stopped, test=out.test,
                              val=engine.evaluate(model, dataset.val, objective))
    run.log_result(result)
    run.log_metrics({"rounds_run": len(out.rounds), "best_round": out.best_round,
                     "clients_failed_total": sum(r["clients_failed"] for r in out.rounds),
                     **{f"final_server_val_{k}": v for k, v in result.val.items()}}, step=len(out.rounds))


def main(spec: JobSpec, run_id: str, grid) -> Outcome:
    """The ServerApp body: resume the driver's run, serve, record; the run ends FINISHED or FAILED here."""
    with tracking.TrackedRun(spec, "federated", resume_run_id=run_id) as run:
        dataset = data.load(spec.data)  # read once for the rounds and the final record
        model, out = serve(spec, grid, run, dataset)
        record(run, spec, model, out, dataset)
    return out


def make_app(spec: JobSpec | None = None, run_id: str | None = None, sink: dict | None = None):
    """The ServerApp. In simulation the spec and run id come from the caller (Flower hands simulated apps
    an empty run config); in deployment from the run config `raybloom-spec` / `raybloom-run-id`."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        s, rid = spec, run_id
        if s is None:
            cfg = context.run_config
            if not cfg.get(SPEC_KEY):
                raise UserError("the ServerApp needs the run config raybloom-spec (the job spec as JSON): "
                                "start federated runs with `raybloom run SPEC`")
            s = JobSpec.model_validate_json(str(cfg[SPEC_KEY]))
            if cfg.get(URI_KEY) and not os.environ.get("MLFLOW_TRACKING_URI"):  # where the driver created the run,
                os.environ["MLFLOW_TRACKING_URI"] = str(cfg[URI_KEY])                # unless this node knows its own
            rid = str(cfg.get(RUN_ID_KEY) or "") or None
            if rid is None:
                rid = tracking.create_run(s, "federated").run_id
        out = main(s, rid, grid)
        if sink is not None:
            sink["outcome"] = out

    return app


app = make_app()  # `raybloom.federated.server:app` for flwr run
