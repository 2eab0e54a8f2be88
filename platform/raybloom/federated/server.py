"""The federated server: rounds of a Flower strategy around the engine, evaluated and recorded by the
server (`server_app` wraps this in Flower's ServerApp).

The round loop calls the strategy's own `configure_train` / `aggregate_train` (so every Flower strategy
and DP wrapper works unchanged) but screens the replies first: a client that raised, timed out or sent
non-finite weights is left out and counted in `clients_failed`; a round with fewer than
`min_train_clients` usable replies fails the run; an aggregate that is not finite is refused (the global
model keeps the previous round's weights), and so is one whose validation loss is not finite: the
global model never becomes NaN. Round r trains at the spec's schedule taken as a function of the round
(`lr_at(r - 1)`, constant within the round, logged as `lr`). After each round the server evaluates the
global model on the validation split and (every `evaluate_every` rounds) on each sampled client's
held-out share, records the contract metrics, applies early stopping (patience in rounds) and
checkpoints its state with the run (`checkpoint`: `--resume` goes on from there). Finally it tests the
global model and logs the model and plots."""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from raybloom import data, engine, regularization, results, schedules, timeline, tracking
from raybloom.errors import UserError
from raybloom.federated import checkpoint, privacy, strategies
from raybloom.federated.client import LR_KEY
from raybloom.flwr_config import SPEC_KEY
from raybloom.objective import make_objective
from raybloom.spec import FederatedSpec, JobSpec


RoundHook = Callable[[int, dict[str, float], bool], bool]


class RoundFailed(UserError):
    """Too few clients replied with usable weights."""


@dataclass
class Outcome:
    rounds: list[dict[str, float]] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    early_stopped: bool = False
    best_round: int = 0
    halted: str | None = None  # why a hook stopped the rounds (a search trial pruned)
    budget_stop: str | None = None  # why the privacy budget (federated.dp.target_epsilon) stopped the rounds


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


def _mean_of_clients(replies: list, key: str) -> float:
    """The clients' `key` (their train_loss, grad_norm) averaged with their sample counts as weights."""
    w = [float(r.content["metrics"]["num-examples"]) for r in replies]
    v = [float(r.content["metrics"][key]) for r in replies]
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
    """The server's state across rounds: the strategy, the global model (and its last accepted weights),
    the rounds played; `state()` / `restore()` are what a checkpoint holds."""

    def __init__(self, spec: JobSpec, grid, dataset: data.Dataset):
        from flwr.app import ArrayRecord

        self.spec, self.grid, self.dataset = spec, grid, dataset
        self.fed = spec.federated
        engine.seed_everything(spec.seed)
        random.seed(spec.seed)  # Flower samples the clients of a round with `random`
        self.model = engine.build(spec, dataset)
        self.objective = make_objective(spec, dataset)
        self.strategy = strategies.build(self.fed)
        self.spec_json = spec.model_dump_json()
        self.arrays = ArrayRecord(self.model.state_dict())
        es = self.fed.early_stopping
        self.early = regularization.EarlyStopping(es.patience, es.min_delta) if es.enabled else None
        self.out = Outcome()
        # the last round: federated.rounds, or the last that federated.dp.target_epsilon affords (refused when
        # none is: the driver checked already; a ServerApp run by hand had not)
        self.last = privacy.check_budget(self.fed)

    def state(self) -> checkpoint.ServerState:
        return checkpoint.ServerState(len(self.out.rounds), self.arrays.to_torch_state_dict(),
                                      checkpoint.strategy_state(self.strategy), list(self.out.rounds),
                                      self.early.state_dict() if self.early else None, self.out.early_stopped,
                                      checkpoint.rng_state())

    def restore(self, state: checkpoint.ServerState) -> None:
        from flwr.app import ArrayRecord

        self.model.load_state_dict(state.weights)
        self.arrays = ArrayRecord(self.model.state_dict())
        checkpoint.restore_strategy(self.strategy, state.strategy)
        self.out.rounds, self.out.early_stopped = list(state.rounds), state.early_stopped
        if self.early is not None and state.early is not None:
            self.early.load_state_dict(state.early)
        checkpoint.set_rng_state(state.rng)

    def validate(self) -> dict[str, float]:
        return {f"server_val_{k}": v for k, v in engine.evaluate(self.model, self.dataset.val, self.objective).items()}

    def lr(self, rnd: int) -> float:
        """The learning rate of round `rnd`: the spec's schedule as a function of the round (plateau: of
        the server's validation losses so far; gradient: of the clients' mean gradient norms so far)."""
        return schedules.lr_at(rnd - 1, self.spec.optim.lr, self.spec.schedule, self.fed.rounds,
                               [r["server_val_loss"] for r in self.out.rounds],
                               [r["clients_grad_norm"] for r in self.out.rounds if "clients_grad_norm" in r])

    def play(self, rnd: int) -> tuple[dict[str, float], list[str]]:
        """One round: sample and send, screen the replies, aggregate (unless the aggregate is not finite),
        validate, evaluate on the clients' held-out shares (every `evaluate_every` rounds). Returns the
        round's metrics and why clients were left out."""
        from flwr.app import ConfigRecord

        fed, t0, lr = self.fed, time.monotonic(), self.lr(rnd)
        config = ConfigRecord({SPEC_KEY: self.spec_json, LR_KEY: lr})
        messages = list(self.strategy.configure_train(rnd, self.arrays, config, self.grid))
        replies = list(self.grid.send_and_receive(messages, timeout=fed.round_timeout))
        good, reasons = screen(replies)
        if len(replies) < len(messages):
            reasons.append(f"{len(messages) - len(replies)} client(s) did not reply within {fed.round_timeout:g} s")
        if len(good) < fed.min_train_clients:
            raise RoundFailed(f"round {rnd}: only {len(good)} of {len(messages)} clients replied with usable weights, "
                              f"federated.min_train_clients is {fed.min_train_clients} ({'; '.join(reasons[:5])})")
        val, rejected = self.aggregate(rnd, good)
        m = {**val, "clients_train_loss": _mean_of_clients(good, "train_loss"),
             "clients_grad_norm": _mean_of_clients(good, "grad_norm"), "clients_ok": len(good), "lr": lr,
             "clients_on_gpu": sum(int(r.content["metrics"].get("on-gpu", 0)) for r in good),
             "clients_failed": len(messages) - len(good), "aggregate_rejected": int(rejected)}
        if fed.dp.enabled:
            m["dp_epsilon"] = privacy.epsilon(fed, rnd)  # after this round, at federated.dp.delta
        every = fed.evaluate_every
        if every and (rnd % every == 0 or rnd == self.last):
            m.update(self.evaluate_clients([r.metadata.src_node_id for r in good]))
        return {**m, "round_seconds": time.monotonic() - t0}, reasons

    def aggregate(self, rnd: int, good: list) -> tuple[dict[str, float], bool]:
        """The strategy's aggregate becomes the global model unless it (or its validation loss) is not
        finite; returns (the server's validation metrics, whether the aggregate was refused)."""
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
        return val, rejected

    def evaluate_clients(self, nodes: list[int]) -> dict[str, float]:
        """The global model on each node's held-out share: mean, worst (`_min` accuracy; `_max` loss for a
        regression) and spread of the clients' values, and each client's own (`client_val_accuracy_p<id>`)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        content = RecordDict({"arrays": self.arrays, "config": ConfigRecord({SPEC_KEY: self.spec_json})})
        messages = [Message(content=content, dst_node_id=n, message_type="evaluate") for n in nodes]
        replies = [r for r in self.grid.send_and_receive(messages, timeout=self.fed.round_timeout) if not r.has_error()]
        key = "accuracy" if self.dataset.is_classification else "loss"
        values = {int(r.content["metrics"]["partition-id"]): float(r.content["metrics"][f"eval_{key}"]) for r in replies}
        if not values:
            return {}
        v = np.array(list(values.values()))
        worst = ("min", v.min()) if key == "accuracy" else ("max", v.max())  # the worst client
        return {f"clients_val_{key}_mean": float(v.mean()), f"clients_val_{key}_{worst[0]}": float(worst[1]),
                f"clients_val_{key}_std": float(v.std()), "clients_evaluated": len(v),
                **{f"client_val_{key}_p{pid}": val for pid, val in sorted(values.items())}}


def _round_line(rnd: int, total: int, elapsed: float, m: dict[str, float], reasons: list[str]) -> str:
    acc = f" acc {m['server_val_accuracy']:.4f}" if "server_val_accuracy" in m else ""
    worst = f", worst client acc {m['clients_val_accuracy_min']:.4f}" if "clients_val_accuracy_min" in m else ""
    note = f" | left out: {'; '.join(reasons[:3])}" if reasons else ""
    refused = " (aggregate refused: not finite)" if m["aggregate_rejected"] else ""
    return (f"[{elapsed:6.1f}s] round {rnd}/{total}: server val loss {m['server_val_loss']:.4f}{acc}{worst}, "
            f"clients ok {m['clients_ok']}, failed {m['clients_failed']}{refused}{note}")


def _resume(rounds: Rounds, recorder: tracking.RunRecorder, log: Callable[[str], None]) -> int:
    """Continue after the run's last checkpointed round (0: a fresh run); a round checkpointed but whose
    metrics the kill kept from MLflow gets them now."""
    state = checkpoint.load(recorder)
    if state is None:
        return 0
    rounds.restore(state)
    if state.round and state.round not in {step for step, _ in recorder.history("server_val_loss")}:
        recorder.log_metrics(state.rounds[-1], state.round)
    log(f"resuming after round {state.round}/{rounds.fed.rounds} (from the run's checkpoint)")
    return state.round


def _val_view(m: dict[str, float]) -> dict[str, float]:
    """A round's metrics as an epoch hook reads them: `server_val_loss` is also `val_loss`, and so on."""
    return {**m, **{k.removeprefix("server_"): v for k, v in m.items() if k.startswith("server_val_")}}


def serve(spec: JobSpec, grid, recorder: tracking.RunRecorder, dataset: data.Dataset, log=None,
          hooks: Sequence[RoundHook] = ()) -> tuple[Any, Outcome]:
    """Run `federated.rounds` rounds on `grid` (after the run's last checkpoint, if it has one); returns
    (the final global model, the outcome). `hooks`: the engine's epoch-hook contract with the round for
    the epoch (`hook(round - 1, metrics, last) -> stop?`: a search trial's pruner)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    fed = spec.federated
    rounds = Rounds(spec, grid, dataset)
    done = _resume(rounds, recorder, log)
    out, early = rounds.out, rounds.early
    _wait_for_clients(grid, fed, log)
    if done == 0 and not recorder.history("server_val_loss"):  # (a run resumed before its first round has it)
        recorder.log_metrics(rounds.validate(), 0)
    started = time.monotonic()
    for rnd in range(done + 1, fed.rounds + 1):
        if out.early_stopped or out.halted:
            break
        if rnd > rounds.last:
            out.budget_stop = (f"privacy budget: round {rnd} would spend epsilon {privacy.epsilon(fed, rnd):.4g} > "
                               f"federated.dp.target_epsilon {fed.dp.target_epsilon:g} (delta {fed.dp.delta:g})")
            log(f"stopped after round {rnd - 1}: {out.budget_stop}")
            break
        m, reasons = rounds.play(rnd)
        out.rounds.append(m)
        out.early_stopped = early is not None and early.step(rnd, m["server_val_loss"], rounds.model)
        checkpoint.save(recorder, rounds.state())  # before the metrics: see `checkpoint`
        recorder.log_metrics(m, rnd)
        timeline.mark(f"round_end {rnd}")
        log(_round_line(rnd, fed.rounds, time.monotonic() - started, m, reasons))
        if out.early_stopped:
            log(f"early stopping: server_val_loss has not improved for {fed.early_stopping.patience} rounds "
                f"(best round {early.best_epoch})")
        last = rnd == rounds.last or out.early_stopped
        for hook in hooks:
            if hook(rnd - 1, _val_view(m), last):
                out.halted = getattr(hook, "reason", None) or f"stopped after round {rnd}"
                log(f"stopped: {out.halted}")
    _finish_rounds(rounds)
    return rounds.model, out


def _finish_rounds(rounds: Rounds) -> None:
    """The best round (early stopping restores its weights), and the global model tested."""
    out, early = rounds.out, rounds.early
    if early is not None:
        early.restore(rounds.model)
        out.best_round = early.best_epoch
    else:
        out.best_round = int(np.argmin([r["server_val_loss"] for r in out.rounds])) + 1
    out.test = engine.evaluate(rounds.model, rounds.dataset.test, rounds.objective)


def record(run: tracking.TrackedRun, spec: JobSpec, model, out: Outcome, dataset: data.Dataset) -> None:
    """Final metrics, plots (loss curves over rounds, confusion matrix) and the model, through `results`."""
    history = [{"train_loss": r["clients_train_loss"], "val_loss": r["server_val_loss"], "lr": r["lr"]}
               for r in out.rounds]
    objective = make_objective(spec, dataset)
    result = engine.FitResult(model, objective, dataset, history,
                              best_epoch=out.best_round - 1, stopped_epoch=len(out.rounds) - 1,
                              early_stopped=out.early_stopped, test=out.test,
                              val=engine.evaluate(model, dataset.val, objective))
    results.record_result(run, result)
    if out.halted:
        run.set_tags({"raybloom.halted": out.halted})
    if out.budget_stop:
        run.set_tags({"raybloom.stopped_reason": out.budget_stop})
    run.log_metrics({"rounds_run": len(out.rounds), "best_round": out.best_round,
                     "clients_failed_total": sum(r["clients_failed"] for r in out.rounds),
                     **{f"final_server_val_{k}": v for k, v in result.val.items()}}, step=len(out.rounds))


def serve_and_record(spec: JobSpec, run_id: str, grid, hooks: Sequence[RoundHook] = ()) -> Outcome:
    """The ServerApp's body: go on in the driver's run, serve, record; the run ends FINISHED or FAILED here."""
    timeline.mark("serverapp_started")
    results.warm_up(spec)  # while the clients start and train
    with tracking.TrackedRun(spec, "federated", resume_run_id=run_id) as run:
        dataset = data.load(spec.data, stream=("train",))  # the training split is the clients': streamed, unread
        model, out = serve(spec, grid, run, dataset, hooks=hooks)
        timeline.mark("rounds_done")
        record(run, spec, model, out, dataset)
        timeline.mark("recorded")
    return out
