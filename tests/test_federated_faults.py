"""Faults and inputs the federated runs had not met yet (issue 18), in Flower's real simulation on a real Ray,
read back from the real MLflow store: a client slower than the round's time-out, a client actor SIGKILLed
mid-round, a client sending its weights x100 against Krum, Bulyan and FedTrimmedAvg, and the server optimizers
FedAdam, FedYogi and FedAvgM.

What a run costs here is mostly its start (a SuperLink, Flower's simulation process, the client actors), not
its rounds, so every run is a small one (the CNN at 8-16 filters, up to 7 clients), the runs join one Ray
started for the module (a search's route: `simulation.ray_to_join`) and each has only the rounds its check needs.
"""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest

from raybloom import ray_session, spec
from raybloom.federated.driver import in_thread, run_federated
from raybloom.reaper import process_tree

from conftest import JOBS, module_store

JOB = JOBS / "fedavg_cnn_digits_iid.yaml"
CHEAP = ["tracking.log_model=false", "model.filters=[8,16]", "model.head_hidden=32", "regularization.dropout=0",
         "regularization.augment.shift=0", "optim.lr=0.01", "federated.evaluate_every=0"]
# the robust strategies' runs: Bulyan with f=1 needs 4f+3 = 7 sampled clients; by round 10 the clean FedAvg run
# has levelled off (server validation accuracy 0.94-0.97 from round 7 on), so the accuracies compared are final ones
ROBUST = [*CHEAP, "federated.clients=7", "federated.local_epochs=2", "federated.rounds=10"]
X100 = ["federated.faults.byzantine_client=0", "federated.faults.byzantine=scale", "federated.faults.scale=100"]


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    import ray

    with module_store(tmp_path_factory.mktemp("federated-faults")) as s:
        ray_session.init_ray(spec.JobSpec())
        try:
            yield s
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def clean(fed):
    """`clean(strategy)`: the ROBUST run of `strategy` without the attacker (made once, on first use)."""
    runs = {}

    def get(strategy: str):
        if strategy not in runs:
            runs[strategy] = _run(*ROBUST, f"federated.strategy={strategy}", f"experiment=fed-clean-{strategy}")
        return runs[strategy]

    return get


def _run(*overrides: str):
    return run_federated(spec.load(JOB, list(overrides)))


def _history(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# Krum keeps one client's model a round (the one nearest the others): without any attacker it ends 7-9 points
# below FedAvg here (0.874 against 0.967 at round 10), so its clean reference is Krum's own clean run
@pytest.mark.parametrize("strategy, reference", [("krum", "krum"), ("bulyan", "fedavg"), ("fedtrimmedavg", "fedavg")])
def test_a_x100_client_is_kept_out(fed, clean, strategy, reference, capsys):
    """Client 0 sends its weights x100 every round: the strategy alone keeps it out. Every reply is finite, so
    the server screens none (clients_failed 0) and never has to refuse an aggregate (aggregate_rejected 0),
    and the test accuracy is within 3 points of the clean run."""
    attacked = _run(*ROBUST, f"federated.strategy={strategy}", *X100, f"experiment=fed-x100-{strategy}")
    base = clean(reference)
    c = fed.client
    run = c.get_run(attacked.run_id)
    assert run.info.status == "FINISHED" and run.data.params["federated.strategy"] == strategy
    assert run.data.params["federated.faults.scale"] == "100.0"
    assert _history(c, attacked.run_id, "clients_ok") == [7.0] * 10
    assert _history(c, attacked.run_id, "clients_failed") == [0.0] * 10
    assert _history(c, attacked.run_id, "aggregate_rejected") == [0.0] * 10
    losses = _history(c, attacked.run_id, "server_val_loss")
    assert len(losses) == 11 and all(math.isfinite(v) for v in losses)
    acc, ref = attacked.metrics["test_accuracy"], base.metrics["test_accuracy"]
    with capsys.disabled():
        print(f"\n  x100 client: {strategy} test accuracy {acc:.4f}, clean {reference} {ref:.4f}")
    assert acc >= ref - 0.03, (strategy, acc, reference, ref)


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm"])
def test_a_server_optimizer_runs_and_records_its_rounds(fed, clean, strategy):
    """Two rounds of the ROBUST configuration against the clean FedAvg run's first two. The same initial model
    (round 0); FedAvgM (server learning rate 1, momentum 0.9) starts its momentum at round 1's update, so its
    round 1 is FedAvg's and its round 2 is not; FedAdam and FedYogi take a step of their own from round 1."""
    s = _run(*ROBUST, f"federated.strategy={strategy}", "federated.rounds=2", f"experiment=fed-opt-{strategy}")
    avg = _history(fed.client, clean("fedavg").run_id, "server_val_loss")
    c = fed.client
    run = c.get_run(s.run_id)
    assert run.info.status == "FINISHED" and run.data.params["federated.strategy"] == strategy
    assert run.data.tags["raybloom.strategy"] == strategy and run.data.metrics["rounds_run"] == 2
    for key in ("server_val_loss", "server_val_accuracy"):
        assert _steps(c, s.run_id, key) == [0, 1, 2], key
    for key in ("clients_ok", "clients_failed", "aggregate_rejected", "clients_train_loss", "lr", "round_seconds"):
        assert _steps(c, s.run_id, key) == [1, 2], key
    assert _history(c, s.run_id, "clients_ok") == [7.0, 7.0]
    assert _history(c, s.run_id, "clients_failed") == _history(c, s.run_id, "aggregate_rejected") == [0.0, 0.0]
    losses = _history(c, s.run_id, "server_val_loss")
    assert all(math.isfinite(v) for v in losses) and losses[0] == pytest.approx(avg[0], abs=1e-6)
    if strategy == "fedavgm":
        assert run.data.params["federated.server_momentum"] == "0.9"
        assert losses[1] == pytest.approx(avg[1], abs=1e-5) and abs(losses[2] - avg[2]) > 1e-3, (losses, avg[:3])
    else:
        assert abs(losses[1] - avg[1]) > 1e-3, (losses, avg[:3])
    assert losses[1] != losses[0] and losses[2] != losses[1]  # the global model moved every round


def test_a_client_slower_than_the_round_timeout_counts_as_failed(fed):
    """Client 0 of 3 sleeps 40 s before it replies, the round times out at 20 s: the server goes on with the
    other two at 20 s (not 40 s) and counts client 0 failed; the run FINISHES."""
    timeout, slow = 20, 40
    s = _run(*CHEAP, "federated.clients=3", "federated.rounds=1", f"federated.round_timeout={timeout}",
             "federated.faults.byzantine_client=0", "federated.faults.scale=1.0",
             f"federated.faults.slow_seconds={slow}", "experiment=fed-slow-client")
    c = fed.client
    run = c.get_run(s.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["rounds_run"] == 1
    assert _history(c, s.run_id, "clients_failed") == [1.0] and _history(c, s.run_id, "clients_ok") == [2.0]
    assert s.metrics["clients_failed_total"] == 1
    (seconds,) = _history(c, s.run_id, "round_seconds")
    assert timeout <= seconds < slow, seconds


def _client_actors() -> dict[int, str]:
    """Flower's client actors in this process's tree (the module's Ray: other sessions' on the machine are not
    touched), pid -> process title (`ray::ClientAppActor.run` while it works on a message)."""
    found = {}
    for pid in process_tree(os.getpid()):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if title.startswith("ray::ClientAppActor"):
            found[pid] = title
    return found


def _kill_an_actor_mid_message(future, busy_for: float = 1.0) -> tuple[float, int, set[int]]:
    """SIGKILL the first client actor seen working on a message for `busy_for` s (in the cold first round, or
    the slow client asleep in its reply), then watch the actors until the run ends. Returns the kill's time,
    the pid killed, and the client actor processes that were not there before the kill."""
    busy_since: dict[int, float] = {}
    killed, at, before, new = None, 0.0, set(), set()
    while not future.done():
        if killed is None or not new:  # (a scan of /proc is CPU the run needs: none once both are known)
            now, actors = time.monotonic(), _client_actors()
            busy_since = {p: busy_since.get(p, now) for p, title in actors.items() if title.endswith(".run")}
        if killed is None:
            before |= set(actors)
            working = [p for p, since in busy_since.items() if now - since >= busy_for]
            if working:
                killed, at = working[0], time.time()
                os.kill(killed, signal.SIGKILL)
        else:
            new |= set(actors) - before
        time.sleep(0.1)
    assert killed is not None, "no client actor was seen working on a message"
    return at, killed, new


def _wait_for_rounds(client, experiment: str, future, rounds: int, timeout: float = 180) -> None:
    """Until the run of `experiment` has logged `rounds` rounds (or ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not future.done():
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and len(client.get_metric_history(runs[0].info.run_id, "clients_failed")) >= rounds:
            return
        time.sleep(0.2)


def test_a_client_actor_sigkilled_mid_round_counts_as_failed_and_the_run_goes_on(fed):
    """A client actor is SIGKILLed while it works on a round's message: Ray restarts it (a new process), that
    round counts the lost reply failed, the run goes on to its last round with every client back, FINISHED.
    The kill comes after round 1, in the slow client's reply: in the cold first round every message of the
    round may be queued on the killed actor, and on a slow machine all of them failed (1 of 6 replied, below
    min_train_clients: a FAILED run, which is right, but not this test's case). Seven rounds: Ray's restart of
    the actor (a new process importing torch and flwr) took more than the two rounds after the kill that four
    rounds left on a loaded 2-core machine (failed [0, 1, 1, 1]: seen once in make test)."""
    clients, rounds = 6, 7
    job = spec.load(JOB, [*CHEAP, f"federated.clients={clients}", f"federated.rounds={rounds}",
                          "federated.faults.byzantine_client=0", "federated.faults.scale=1.0",
                          "federated.faults.slow_seconds=2", "experiment=fed-actor-killed"])
    future = in_thread("raybloom-fed-actor-killed", run_federated, job)
    _wait_for_rounds(fed.client, "fed-actor-killed", future, 1)
    at, killed, new = _kill_an_actor_mid_message(future)
    s = future.result()
    c = fed.client
    assert c.get_run(s.run_id).info.status == "FINISHED" and s.metrics["rounds_run"] == rounds
    assert killed not in new and new, "Ray did not restart the killed client actor"
    # the round the kill came in: the first whose metrics were logged after it
    logged = {m.step: m.timestamp / 1000 for m in c.get_metric_history(s.run_id, "clients_failed")}
    assert sorted(logged) == list(range(1, rounds + 1))
    hit = min(r for r, t in logged.items() if t > at)
    failed, ok = _history(c, s.run_id, "clients_failed"), _history(c, s.run_id, "clients_ok")
    assert hit < rounds and failed[hit - 1] >= 1, (hit, failed)
    assert [f + o for f, o in zip(failed, ok)] == [clients] * rounds
    assert failed[-1] == 0 and ok[-1] == clients, (hit, failed)  # the restarted actor serves the last round
