"""Deployment mode: run the Flower app on a running SuperLink with SuperNodes, through `flwr run`.

The SuperLink address comes from `federated.superlink` or `$RAYBLOOM_SUPERLINK` (written to cluster.env
by `raybloom cluster up --flower-nodes K`). The connection is a `[superlink.<name>]` entry in
`$FLWR_HOME/config.toml` (written by `flwr_config`; never a `[tool.flwr.federations]` section in pyproject.toml): TLS checked
against `$RAYBLOOM_SUPERLINK_CA` when that is set (`cluster up --secure`), else plain. The spec, the
MLflow run id and the tracking URI travel in the run config; the SuperNodes hold their partition ids
(`--node-config partition-id=N`). `flwr run` returns once the run is submitted, so the driver then polls
`flwr ls --run-id` until the run has really finished, and returns Flower's final status; `driver.run_federated`
then reports the outcome the ServerApp recorded on the MLflow run (or fails the run if it recorded none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from raybloom import tracking
from raybloom.errors import UserError
from raybloom.flwr_config import CONNECTION, flwr_cli, flwr_json, write_flwr_home
from raybloom.net import unreachable
from raybloom.spec import JobSpec


def connection() -> str:
    return os.environ.get("RAYBLOOM_FLWR_CONNECTION") or CONNECTION


def app_dir() -> Path:
    """The folder whose pyproject.toml declares the Flower app (the repository root)."""
    root = Path(__file__).resolve().parents[3]
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise UserError(f"federated.mode: deployment needs the raybloom source tree (pyproject.toml with [tool.flwr.app]); "
                        f"not found at {root}")
    return root


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


def _json(proc: subprocess.CompletedProcess, what: str) -> dict:
    found = flwr_json(proc)
    if found is None:
        raise UserError(f"{what} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-1500:]}")
    return found


def submit(spec: JobSpec, run_id: str, address: str, home: Path) -> str:
    """`flwr run` of the app with the spec, the MLflow run id and the tracking URI in its run config;
    returns Flower's run id."""
    config = home / f"run-{run_id}.toml"
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in {
        "raybloom-spec": spec.model_dump_json(), "raybloom-run-id": run_id,
        "raybloom-tracking-uri": tracking.tracking_uri(spec)}.items()))
    submitted = _json(flwr_cli("run", str(app_dir()), connection(), "--run-config", str(config), "--format", "json",
                               home=home, timeout=120), "flwr run")
    if not submitted.get("success", True) or "run-id" not in submitted:
        raise UserError(f"flwr run did not submit the app: {submitted}")
    flwr_run = str(submitted["run-id"])
    print(f"submitted Flower run {flwr_run} to the SuperLink at {address}", file=sys.stderr, flush=True)
    tracking.RunRecorder(run_id, tracking.tracking_uri(spec)).set_tags({"raybloom.flower_run_id": flwr_run})
    return flwr_run


def submit_and_wait(spec: JobSpec, run_id: str, poll: float = 1.0) -> str:
    """Submit the app with `flwr run`, wait for the run to finish; returns Flower's final status
    (`finished:completed`, `finished:failed`, ...)."""
    address = superlink_address(spec)
    home = flwr_home(address)
    flwr_run = submit(spec, run_id, address, home)
    deadline = time.monotonic() + spec.federated.rounds * spec.federated.round_timeout + 600
    status = ""
    while time.monotonic() < deadline:
        listed = _json(flwr_cli("ls", connection(), "--run-id", flwr_run, "--format", "json", home=home), "flwr ls")
        runs = listed.get("runs") or []
        status = str(runs[0].get("status", "")) if runs else ""
        if status.startswith("finished"):
            break
        time.sleep(poll)
    else:
        raise UserError(f"Flower run {flwr_run} did not finish in time (last status {status!r})")
    if status != "finished:completed":  # the caller reports the reason the ServerApp recorded on the run
        print(f"Flower run {flwr_run} ended {status}", file=sys.stderr, flush=True)
    return status
