"""`raybloom cluster up|down|status`: a real Ray cluster and MLflow server on 127.0.0.1, as processes.

This module is the CLI; `launch` starts the processes (through `launcher`), `flower` the SuperLink and
SuperNodes, `secure` makes the secrets and PostgreSQL, `procs` finds and stops processes by pid, `state`
keeps cluster.json and writes cluster.env. No training code imports this package: what drivers share with
it (network checks, the Ray session, the Flower connection, reading cluster.env) lives in `raybloom.net`,
`raybloom.ray_session`, `raybloom.flwr_config` and `raybloom.cluster_env`.

`up` starts a Ray head, `--workers` worker nodes (each its own `ray start`, so each node is its own
raylet, object store and dashboard agent) and an `mlflow server` on SQLite (`--flower-nodes K`: also a
Flower SuperLink and K SuperNodes; `--secure`: see the end), all on free ports, with a
dedicated short Ray temp dir per node (`/tmp/rb-XXXXXXXX/0` for the head, `/1`... for the workers:
unix socket paths must stay under 100 chars; nodes must not share one, or one node's runtime-env setup
deletes the job working_dir another node's driver runs in; and an in-process `ray.init()` elsewhere on
the machine, which looks for `/tmp/ray/ray_current_cluster`, never attaches to this cluster). It waits
until every node is ALIVE and MLflow answers `/health`. The nodes run with this virtualenv's `bin/` first
on PATH (so a job's `raybloom run` is found), `RAY_ADDRESS` set to their own GCS (else Ray code that
looks its cluster up, like Train V2's placement-group cleaner, fails when other Ray instances run on the
machine) and `MLFLOW_TRACKING_URI` set to the cluster's server; the
MLflow server runs without its job runner (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`, ~1.6 GB saved).

State lives in `$RAYBLOOM_STATE_DIR` (or `--state-dir`, default `.raybloom/` in the current folder):
- `cluster.env`: shell `KEY=VALUE` lines (`RAY_ADDRESS`, `RAY_DASHBOARD_ADDRESS`,
  `MLFLOW_TRACKING_URI`, `RAYBLOOM_CLUSTER_PIDS`); `set -a; . .raybloom/cluster.env` points
  `raybloom run` and `raybloom submit` at the cluster;
- `cluster.json`: every process `up` started (pid, kernel start time, process group, command line);
- `cluster/mlflow.db`, `cluster/mlartifacts/`: the MLflow store (kept across `down`/`up`);
- `cluster/logs/`: the output of `ray start` and of the MLflow server.

Every `ray start` and the MLflow server run in a process group of their own; the Ray daemons and the
workers the raylets spawn stay in it. `down` signals exactly these processes (recorded pids checked
against their start time, members of the recorded groups, their descendants, anything whose command
line names the dedicated temp dir): SIGTERM, then SIGKILL after `--timeout`. It never runs `ray stop`,
so other Ray instances on the machine (an in-process `ray.init()` in a test) are left alone.
`down` with no cluster prints so and exits 0; `status` exits 0 when everything is up, else 1.
Linux only (reads /proc).

`up --secure` (secrets made on the spot with `secrets`, files holding them mode 600; see secure.py):
- Ray token authentication: every node runs with `RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN`, which
  their workers and job drivers inherit; the dashboard and Jobs API answer 401/403 without it;
- MLflow `--app-name basic-auth` (user `admin`, a generated password, default permission READ) on a
  throwaway PostgreSQL (initdb as `postgres` when run as root, 127.0.0.1 only, password auth; its data
  in `/tmp/rb-pg-XXXXXXXX`, stopped with `pg_ctl` and removed by `down`; the artifacts in the temp dir), with
  `--allowed-hosts` the loopback host:port; the store URI and secrets go to the server as environment,
  never on a command line (readable by every user, and recorded in cluster.json);
- Flower: the SuperLink serves TLS with a certificate from a CA made on the spot (SANs IP:127.0.0.1,
  DNS:localhost) and `--enable-supernode-auth`; each SuperNode's OpenSSH EC P-384 public key is
  registered (`flwr supernode register`) before it starts; FLWR_HOME's connection has `root-certificates`;
- cluster.env adds `RAY_AUTH_MODE`, `RAY_AUTH_TOKEN`, `MLFLOW_TRACKING_USERNAME`,
  `MLFLOW_TRACKING_PASSWORD` and `RAYBLOOM_SUPERLINK_CA`; every cluster process gets the Ray token and
  the MLflow credentials (the ServerApp inside the SuperLink logs to MLflow).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from raybloom.cluster import procs
from raybloom.cluster.flower import flower_nodes_registered
from raybloom.cluster.health import alive_nodes, mlflow_healthy
from raybloom.cluster.launch import start
from raybloom.cluster.secure import Postgres
from raybloom.cluster.state import RECORD_FILE, load_record, remove_temp_dirs, use_cluster_token, write_env
from raybloom.cluster_env import ENV_FILE, STATE_ENV, state_dir

app = typer.Typer(no_args_is_help=True, help="A real local cluster on 127.0.0.1: Ray head + worker nodes, MLflow server.")
out = Console(soft_wrap=True)
err = Console(stderr=True)

StateOpt = typer.Option(None, "--state-dir", help=f"Where cluster.env/cluster.json live (default: ${STATE_ENV}, else .raybloom)")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def up(
    workers: int = typer.Option(1, "--workers", min=0, help="Ray worker nodes besides the head"),
    cpus_per_node: float = typer.Option(1, "--cpus-per-node", min=0, help="CPUs each node (the head too) offers"),
    object_store_mb: int = typer.Option(128, "--object-store-mb", min=80, help="Object store per node, MiB"),
    flower_nodes: int = typer.Option(0, "--flower-nodes", min=0, help="Also a Flower SuperLink and this many SuperNodes (partition ids 0..K-1)"),
    secure: bool = typer.Option(False, "--secure", help="Ray token auth, MLflow basic auth on a throwaway PostgreSQL, Flower TLS + SuperNode auth; secrets made on the spot, written to cluster.env (mode 600)"),
    timeout: float = typer.Option(300, "--timeout", help="Seconds to wait for each step"),
    state: Optional[Path] = StateOpt,
) -> None:
    """Start a Ray head, K worker nodes and an MLflow server on 127.0.0.1 (and Flower); write cluster.env."""
    folder = state_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    old = load_record(folder)
    if old is not None:
        running = procs.cluster_processes(old)
        if running:
            fail(f"a cluster is already running ({len(running)} processes, started {old.get('created')}, "
                 f"dashboard {old.get('dashboard')}, state {folder}): run `raybloom cluster down` first")
        out.print(f"removing the record of a cluster that is no longer running ({folder / RECORD_FILE})")
        (folder / RECORD_FILE).unlink()
    t0 = time.monotonic()
    flower = f", a Flower SuperLink and {flower_nodes} SuperNode(s)" if flower_nodes else ""
    extra = (" (secure: Ray token auth, MLflow basic auth on PostgreSQL" + (", Flower TLS + SuperNode auth" if flower_nodes else "")
             + ")") if secure else ""
    out.print(f"starting Ray head + {workers} worker node(s) ({cpus_per_node:g} CPU each), MLflow{flower}{extra} ...")
    try:
        record, creds = start(folder, workers, cpus_per_node, object_store_mb, timeout, flower_nodes, secure)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        fail(f"cluster up failed, everything it started is stopped (logs in {folder / 'cluster' / 'logs'}): {e}")
    except KeyboardInterrupt:
        fail("interrupted; everything started so far is stopped", 130)
    env_file = write_env(folder, record, creds)
    out.print(f"cluster up in {time.monotonic() - t0:.0f} s: {workers + 1} Ray nodes, MLflow healthy, "
              f"{len(record['processes'])} processes recorded in {folder / RECORD_FILE}")
    out.print(f"  RAY_ADDRESS={record['ray_address']}\n  RAY_DASHBOARD_ADDRESS={record['dashboard']}  (dashboard, jobs)"
              f"\n  MLFLOW_TRACKING_URI={record['mlflow_uri']}", highlight=False)
    if flower_nodes:
        out.print(f"  RAYBLOOM_SUPERLINK={record['superlink']}  ({flower_nodes} SuperNodes; FLWR_HOME={record['flwr_home']})",
                  highlight=False)
    if secure:
        out.print(f"  credentials (Ray token, MLflow user admin and its password"
                  f"{', the SuperLink CA' if flower_nodes else ''}) in {env_file} (mode 600)", highlight=False)
    out.print(f"use it: set -a; . {env_file}; set +a   then   raybloom submit jobs/cnn_digits.yaml scaling.workers=2",
              highlight=False, soft_wrap=True)


@app.command()
def status(state: Optional[Path] = StateOpt) -> None:
    """What is running: Ray nodes alive, MLflow health, processes; exit 0 when all is up, else 1."""
    folder = state_dir(state)
    record = load_record(folder)
    if record is None:
        out.print(f"no cluster (no {folder / RECORD_FILE}); start one with `raybloom cluster up`")
        raise typer.Exit(1)
    running = procs.cluster_processes(record)
    use_cluster_token(record, folder)
    nodes = alive_nodes(record["dashboard"]) if running else None
    want = record["workers"] + 1
    n_alive = len(nodes) if nodes is not None else 0
    healthy = mlflow_healthy(record["mlflow_uri"]) if running else False
    out.print(f"cluster started {record['created']} (state {folder}, Ray temp dir {record['temp_dir']})", highlight=False)
    out.print(f"  Ray     {record['ray_address']}  {n_alive}/{want} nodes alive"
              + (f", {sum(n.resources_total.get('CPU', 0) for n in nodes):g} CPUs" if nodes else ""), highlight=False)
    out.print(f"  Jobs    {record['dashboard']}  {'up' if nodes is not None else 'not answering'}", highlight=False)
    out.print(f"  MLflow  {record['mlflow_uri']}  {'healthy' if healthy else 'not healthy'}", highlight=False)
    flower_ok = True
    if record.get("flower_nodes"):
        flower_ok = bool(running) and flower_nodes_registered(Path(record["flwr_home"]), record["flower_nodes"])
        out.print(f"  Flower  {record['superlink']}  {record['flower_nodes']} SuperNodes "
                  f"{'online' if flower_ok else 'not all online'}", highlight=False)
    out.print(f"  {len(running)} processes running", highlight=False)
    raise typer.Exit(0 if n_alive >= want and healthy and flower_ok else 1)


@app.command()
def down(
    timeout: float = typer.Option(15, "--timeout", help="Seconds to wait after SIGTERM before SIGKILL (split over raylets, the rest, the GCS)"),
    state: Optional[Path] = StateOpt,
) -> None:
    """Stop exactly what `up` started (by pid: SIGTERM, then SIGKILL); remove cluster.env. No cluster: exit 0."""
    folder = state_dir(state)
    record = load_record(folder)
    if record is None:
        (folder / ENV_FILE).unlink(missing_ok=True)
        out.print(f"no cluster to stop (no {folder / RECORD_FILE}); nothing to do")
        return
    Postgres.stop(record.get("postgres_dir"))  # a clean shutdown first; the signals catch the rest
    terminated, killed, survivors = procs.stop_processes(record, timeout)
    if survivors:
        fail(f"{len(survivors)} processes survived SIGKILL: {', '.join(str(p.pid) for p in survivors)}")
    (folder / ENV_FILE).unlink(missing_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)
    remove_temp_dirs(record)
    hard = f" ({', '.join(sorted({p.cmd.split()[0].rsplit('/', 1)[-1] for p in killed}))})" if killed else ""
    store = ("the secure cluster's PostgreSQL and artifacts were in its temp dir, removed" if record.get("secure")
             else f"the MLflow store stays in {folder / 'cluster'}")
    out.print(f"cluster down: {terminated} processes stopped by SIGTERM, {len(killed)} by SIGKILL{hard}; removed "
              f"{folder / ENV_FILE} ({store})", highlight=False)
