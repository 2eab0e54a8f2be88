"""`raybloom submit SPEC [k=v ...]`: the same job as `raybloom run`, through the Ray Jobs API.

The project root (the nearest folder at or above the current one holding `pyproject.toml`, or
`--working-dir`) is uploaded as the job's `working_dir`, without the virtualenv, local state, MLflow
stores, test output, `.git` and data caches. The entrypoint is `raybloom run SPEC k=v ...` (SPEC made
relative to that folder); its driver joins the cluster through the `RAY_ADDRESS` Ray Jobs sets, and runs
the `raybloom` installed on the cluster. `MLFLOW_TRACKING_URI` (and `MLFLOW_TRACKING_USERNAME` /
`_PASSWORD`) go into the runtime env, from the environment or else from `.raybloom/cluster.env`.

Ray token authentication (`raybloom cluster up --secure`, KubeRay `authOptions`): the token comes from
`RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` with `RAY_AUTH_MODE=token` in the environment, or else from
cluster.env when the address is that cluster's own dashboard (a token is never sent to another
address). Credentials from cluster.env are likewise only used with that cluster's tracking URI.

The spec is validated here first (a bad one exits 2 without submitting); `--no-validate` skips that
and lets the job fail on the cluster, with the spec error in its logs. The job's logs stream to the
terminal; the exit code is the job's outcome: 0 SUCCEEDED, 1 FAILED or STOPPED (Ctrl-C stops the job,
130), 2 bad input or no cluster at the address.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from raybloom import spec as spec_mod
from raybloom.cluster_env import read_env
from raybloom.errors import UserError
from raybloom.ray_session import use_ray_token

EXCLUDES = ["/.venv", "/.raybloom", "/mlflow.db", "/mlruns", "/mlartifacts", "/tests/_output", "/.git",
            "/data", "/.tools", "/dist", "/build", "__pycache__", ".pytest_cache", "*.egg-info"]
FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
err = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def project_root(start: Path) -> Path:
    for folder in [start, *start.parents]:
        if (folder / "pyproject.toml").is_file():
            return folder
    return start


def runtime_env(root: Path, cluster_env: dict[str, str]) -> dict:
    """The job's working_dir and MLflow variables: the environment's, else cluster.env's when they name
    the same server (its credentials are not handed to another one)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    same_server = not uri or uri == cluster_env.get("MLFLOW_TRACKING_URI")
    env_vars = {k: v for k in FORWARDED if (v := os.environ.get(k) or (cluster_env.get(k) if same_server else None))}
    return {"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars}


def ray_token_from(cluster_env: dict[str, str], address: str) -> None:
    """The cluster's Ray token for the Jobs API, unless the environment already says which to use."""
    if os.environ.get("RAY_AUTH_MODE") or not cluster_env.get("RAY_AUTH_TOKEN"):
        return
    if address.rstrip("/") == cluster_env.get("RAY_DASHBOARD_ADDRESS", "").rstrip("/"):
        use_ray_token(cluster_env["RAY_AUTH_TOKEN"])


def _quiet_ray_client() -> None:
    """Keep Ray's packaging chatter (which files it skips, that .git/.venv are skipped by default) out
    of the terminal; real warnings still show."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk"):  # the latter sets INFO on itself
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray._private.runtime_env.working_dir").addFilter(
        lambda record: "is now ignored by default" not in record.getMessage())


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def follow(client, job_id: str, poll: float = 1.0):
    """Stream the job's logs until it ends (the websocket tail; polling get_job_logs if that breaks)."""
    printed, tailed = 0, False

    async def tail() -> None:
        nonlocal printed
        async for lines in client.tail_job_logs(job_id):
            _out(lines)
            printed += len(lines)

    try:
        asyncio.run(tail())
        tailed = True
    except Exception as e:  # noqa: BLE001 - the socket closed before the job ended: poll instead
        err.print(f"(log stream interrupted: {e}; polling)", highlight=False)
    while True:
        status = client.get_job_status(job_id)
        if not tailed:
            logs = client.get_job_logs(job_id)
            if len(logs) > printed:
                _out(logs[printed:])
                printed = len(logs)
        if status.is_terminal():
            return client.get_job_info(job_id)
        time.sleep(poll)


def _spec_in(root: Path, spec_path: Path, overrides: list[str], validate: bool) -> Path:
    """SPEC relative to the working dir (what the job runs), after checking it here unless told not to."""
    try:
        rel = spec_path.resolve().relative_to(root)
    except ValueError:
        fail(f"SPEC {spec_path} is not inside the job's working dir {root} (see --working-dir)")
    if not spec_path.is_file():
        fail(f"SPEC {spec_path}: no such file")
    if validate:
        try:
            spec_mod.load(spec_path, overrides)
        except UserError as e:
            fail(str(e))
    return rel


def _jobs_address(address: Optional[str], cluster_env: dict[str, str]) -> str:
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS") or cluster_env.get("RAY_DASHBOARD_ADDRESS")
    if not address:
        fail("no cluster: pass --address http://HEAD:8265, set RAY_DASHBOARD_ADDRESS, or run `raybloom cluster up`")
    return address if "://" in address else f"http://{address}"


def submit(
    spec_path: Path = typer.Argument(..., metavar="SPEC"),
    overrides: List[str] = typer.Argument(None, metavar="[KEY=VALUE]..."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray Jobs API, http://HEAD:8265 (default: $RAY_DASHBOARD_ADDRESS, else RAY_DASHBOARD_ADDRESS in .raybloom/cluster.env)"),
    no_validate: bool = typer.Option(False, "--no-validate", help="Skip the local spec check: a bad spec then fails the job on the cluster (its logs name the field)"),
    working_dir: Optional[Path] = typer.Option(None, "--working-dir", help="Folder uploaded as the job's working_dir (default: the project root, the nearest folder with pyproject.toml)"),
) -> None:
    """Run a job on a Ray cluster through the Ray Jobs API; stream its logs; exit with its outcome."""
    overrides = overrides or []
    root = (working_dir or project_root(Path.cwd())).resolve()
    rel = _spec_in(root, spec_path, overrides, validate=not no_validate)
    cluster_env = read_env()
    address = _jobs_address(address, cluster_env)
    env = runtime_env(root, cluster_env)
    ray_token_from(cluster_env, address)
    if "MLFLOW_TRACKING_URI" not in env["env_vars"]:
        err.print("note: no MLFLOW_TRACKING_URI here or in cluster.env: the job records where the cluster's "
                  "environment or the spec's tracking.uri says", highlight=False)

    from ray.job_submission import JobSubmissionClient, JobStatus

    _quiet_ray_client()
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - ConnectionError, or a RuntimeError naming the address
        fail(f"no Ray Jobs API at {address}: {e}")
    entrypoint = shlex.join(["raybloom", "run", str(rel), *overrides])
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=env,
                               metadata={"raybloom.spec": str(rel), "raybloom.overrides": " ".join(overrides)})
    print(f"submission id: {job_id}  ({address}, entrypoint: {entrypoint})", flush=True)
    try:
        info = follow(client, job_id)
    except KeyboardInterrupt:
        client.stop_job(job_id)
        fail(f"interrupted; job {job_id} stopped", 130)
    print(f"job {job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""), flush=True)
    raise typer.Exit(0 if info.status == JobStatus.SUCCEEDED else 1)
