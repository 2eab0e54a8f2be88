"""The one route of every federated run: `flwr run` of the app on a SuperLink, through a connection in
$FLWR_HOME/config.toml, then the run followed to its real end.

In simulation the SuperLink is one the driver starts (`simulation.SimulationLink`); in deployment a running
one, whose address comes from `federated.superlink` or `$RAYBLOOM_SUPERLINK` (written to cluster.env by
`raybloom cluster up --flower-nodes K`), reached through a `[superlink.raybloom]` entry (written by
`flwr_config`; never a `[tool.flwr.federations]` section in pyproject.toml): TLS checked against
`$RAYBLOOM_SUPERLINK_CA` when that is set (`cluster up --secure`), else plain. The spec, the MLflow run id
and the tracking URI travel in the run config (in simulation, in a hand-off file the run config names:
`simulation.SimulationLink.hand_off`); the SuperNodes (simulated or real) hold their partition ids
(`partition-id` in the node config). `flwr run` returns once the run is submitted, so the driver streams
`flwr log` to stderr (the stream ends with the run) and asks `flwr ls --run-id` until the run has really
finished, and returns Flower's final status; `driver.run_federated` then reports the outcome the ServerApp
recorded on the MLflow run (or fails the run if it recorded none).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from raybloom import timeline, tracking
from raybloom.errors import UserError
from raybloom.flwr_config import (CONNECTION, RUN_ID_KEY, SPEC_KEY, URI_KEY, flwr_answer, flwr_cli, flwr_command, flwr_env,
                                  run_args, submitted_run, write_flwr_home)
from raybloom.net import unreachable
from raybloom.spec import JobSpec

def connection() -> str:
    return os.environ.get("RAYBLOOM_FLWR_CONNECTION") or CONNECTION


def superlink_address(spec: JobSpec) -> str:
    address = spec.federated.superlink or os.environ.get("RAYBLOOM_SUPERLINK")
    if not address and os.environ.get("RAYBLOOM_FLWR_CONNECTION"):
        return ""  # the named connection says where
    if not address:
        raise UserError("federated.superlink: deployment mode needs a SuperLink; start one with "
                        "`raybloom cluster up --flower-nodes K` and `set -a; . .raybloom/cluster.env`, "
                        "or set federated.superlink=HOST:PORT")
    reason = unreachable(address, timeout=3)
    if reason:
        raise UserError(f"federated.superlink: no SuperLink answers at {address} ({reason}); is the cluster up?")
    return address


def flwr_home(address: str) -> Path:
    """$FLWR_HOME (cluster.env sets it), with a `[superlink.raybloom]` entry for `address`: TLS with
    `root-certificates = $RAYBLOOM_SUPERLINK_CA` when that is set (a SuperLink of `raybloom cluster up
    --secure`), else `insecure = true` (a plain SuperLink on loopback).

    With $RAYBLOOM_FLWR_CONNECTION set, that connection of $FLWR_HOME/config.toml is used as it is
    (e.g. one with TLS root certificates for a SuperLink on Kubernetes) and nothing is written."""
    home = Path(os.environ.get("FLWR_HOME") or Path(".raybloom") / "flwr_home").resolve()
    if os.environ.get("RAYBLOOM_FLWR_CONNECTION"):
        return home
    ca = os.environ.get("RAYBLOOM_SUPERLINK_CA")
    if ca and not Path(ca).is_file():
        raise UserError(f"RAYBLOOM_SUPERLINK_CA: no CA certificate at {ca}; is the cluster up (cluster.env sourced)?")
    write_flwr_home(home, address, str(Path(ca).resolve()) if ca else None)
    return home


@dataclass(frozen=True)
class Target:
    """Where `flwr run` submits: a SuperLink's address, the $FLWR_HOME holding its connection, the
    connection's name; `gone()` says why the SuperLink is no longer there (None while it is)."""
    address: str
    home: Path
    connection: str
    gone: Callable[[], Optional[str]] = lambda: None
    status_every: float = 15.0  # seconds between `flwr ls` asks while the log still streams (see `follow`)
    signalled: Callable[[], bool] = lambda: False  # a cheap sign the ServerApp has ended the MLflow run (simulation)


def deployment_target(spec: JobSpec) -> Target:
    """The running SuperLink of `federated.superlink` / $RAYBLOOM_SUPERLINK (or $RAYBLOOM_FLWR_CONNECTION)."""
    address = superlink_address(spec)
    return Target(address, flwr_home(address), connection())


def submit(spec: JobSpec, run_id: str, target: Target, extra: Optional[dict[str, str]] = None) -> str:
    """`flwr run` of the app with the spec, the MLflow run id and the tracking URI (and `extra`) in its run
    config; returns Flower's run id."""
    flwr_run = submitted_run(flwr_cli(*run_args(target.home, target.connection, run_config(spec, run_id, extra), run_id),
                                      home=target.home, timeout=120))
    timeline.mark("submitted")
    announce(spec, run_id, target, flwr_run)
    return flwr_run


def run_config(spec: JobSpec, run_id: str, extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """What the ServerApp is handed: the spec, the MLflow run id and the tracking URI (and `extra`)."""
    return {SPEC_KEY: spec.model_dump_json(), RUN_ID_KEY: run_id, URI_KEY: tracking.tracking_uri(spec), **(extra or {})}


def announce(spec: JobSpec, run_id: str, target: Target, flwr_run: str) -> None:
    """Say which Flower run serves the MLflow run (on stderr, and as its tag `raybloom.flower_run_id`)."""
    print(f"submitted Flower run {flwr_run} to the SuperLink at {target.address}", file=sys.stderr, flush=True)
    tracking.RunRecorder(run_id, tracking.tracking_uri(spec)).set_tags({"raybloom.flower_run_id": flwr_run})


def stream_log(target: Target, flwr_run: str) -> subprocess.Popen:
    """`flwr log --stream` of the run, line by line to this process's `sys.stderr` (whatever that is now):
    the ServerApp's round lines as they come."""
    proc = subprocess.Popen(flwr_command("log", flwr_run, target.connection, "--stream"), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True, errors="replace",
                            env=flwr_env(target.home))
    err = sys.stderr

    def pump() -> None:
        for line in proc.stdout:
            err.write(line)
            err.flush()

    threading.Thread(target=pump, daemon=True, name=f"flwr-log-{flwr_run}").start()
    return proc


class SuperLinkUnreachable(UserError):
    """`flwr ls` could not reach the SuperLink (Flower's CLI says so in its JSON, with exit code 0)."""


def flower_status(target: Target, flwr_run: str) -> str:
    listed = flwr_answer(flwr_cli("ls", target.connection, "--run-id", flwr_run, "--format", "json", home=target.home), "flwr ls")
    if listed.get("success") is False:
        message = " ".join(str(listed.get("error-message", "")).split())
        if "unavailable" in message.lower():
            raise SuperLinkUnreachable(message)
        raise UserError(f"flwr ls failed: {message[-1500:]}")
    runs = listed.get("runs") or []
    return str(runs[0].get("status", "")) if runs else ""


UNREACHABLE_TRIES = 3  # `flwr ls` answers in a row that the SuperLink is unavailable before the run is given up
UNREACHABLE_GAP_S = 3.0  # between them (each takes a few seconds itself: Flower's CLI retries the connection)


def check_ended(target: Target, flwr_run: str, run_id: str) -> None:
    """`--resume` in deployment: the run's Flower run must have ended on the SuperLink (its ServerApp there
    outlives a killed driver), or two servers would write one run."""
    status = flower_status(target, flwr_run)
    if status and not status.startswith("finished"):
        raise UserError(f"--resume {run_id}: its Flower run {flwr_run} is still {status} on the SuperLink at "
                        f"{target.address}; stop it first (`flwr stop {flwr_run} {target.connection}`) or let it end")


def stop_submitted(target: Optional[Target], rec: tracking.RunRecorder) -> None:
    """Best effort, when the driver fails or is interrupted in deployment: `flwr stop` the run it submitted."""
    flwr_run = rec.record().tags.get("raybloom.flower_run_id")
    if target is None or not flwr_run:
        return
    try:
        flwr_cli("stop", flwr_run, target.connection, home=target.home, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pass


RECORDED = "recorded"  # what `follow` returns when the ServerApp ended the MLflow run first


def follow(spec: JobSpec, target: Target, flwr_run: str, poll: float = 0.25,
           recorded: Optional[Callable[[], bool]] = None) -> str:
    """Show the submitted run's log, wait for the run to finish; returns Flower's final
    status (`finished:completed`, `finished:failed`, ...), or RECORDED as soon as `recorded()` says the
    ServerApp has ended the MLflow run (everything is written: Flower's own end comes 2-4 s later, once
    the ServerApp's process has exited and Flower has noticed): asked every 0.5 s, and at once when
    `target.signalled()`. The log stream ends with the run, so
    `flwr ls` (a Python process each time: CPU a small machine lacks) is asked then, and every
    `target.status_every` s meanwhile (15 s on a remote SuperLink; a minute on the simulation's own, whose
    exit `target.gone` sees at once)."""
    log = stream_log(target, flwr_run)
    fed = spec.federated  # a round may wait round_timeout for training and again for the evaluation
    deadline = time.monotonic() + (fed.rounds * (1 + (fed.evaluate_every > 0)) + 1) * fed.round_timeout + 600
    status, ask_at, look_at, unreachable, signal_seen = "", time.monotonic() + target.status_every, 0.0, 0, False
    try:
        while True:
            if time.monotonic() > deadline:
                raise UserError(f"Flower run {flwr_run} did not finish in time (last status {status!r})")
            reason = target.gone()
            if reason:
                raise UserError(f"Flower run {flwr_run}: the SuperLink is gone ({reason})")
            if recorded is not None and (time.monotonic() >= look_at or (not signal_seen and target.signalled())):
                signal_seen = signal_seen or target.signalled()  # acted on once: then every 0.5 s again
                if recorded():
                    return RECORDED
                look_at = time.monotonic() + 0.5
            streamed_to_the_end = log.poll() is not None
            if (streamed_to_the_end and not unreachable) or time.monotonic() >= ask_at:
                try:
                    status, unreachable = flower_status(target, flwr_run), 0
                except SuperLinkUnreachable as e:  # it died, or the network to it: a few tries, then the run is lost
                    unreachable += 1
                    if unreachable >= UNREACHABLE_TRIES:
                        raise UserError(f"Flower run {flwr_run}: the SuperLink at {target.address} stopped answering "
                                        f"({UNREACHABLE_TRIES} tries of flwr ls: {e}); the run cannot go on without it") from None
                    ask_at = time.monotonic() + UNREACHABLE_GAP_S  # a restart or a busy moment may pass
                    time.sleep(poll)
                    continue
                if status.startswith("finished"):
                    break
                ask_at = time.monotonic() + (1 if streamed_to_the_end else target.status_every)
            time.sleep(poll)
    finally:
        log.terminate()
        log.wait()
    if status != "finished:completed":  # the caller reports the reason the ServerApp recorded on the run
        print(f"Flower run {flwr_run} ended {status}", file=sys.stderr, flush=True)
    return status
