"""The state of `raybloom cluster`: where it lives, cluster.json (what `up` started) and cluster.env (how
jobs and users reach the cluster)."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import Optional

from raybloom.cluster.secure import write_private
from raybloom.cluster_env import ENV_FILE, read_env
from raybloom.ray_session import use_ray_token

RECORD_FILE = "cluster.json"
TEMP_PREFIX = "rb-"
PG_PREFIX = "rb-pg-"


def load_record(folder: Path) -> Optional[dict]:
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def save_record(folder: Path, record: dict) -> None:
    tmp = folder / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / RECORD_FILE)


def remove_temp_dirs(record: dict) -> None:
    """The Ray temp dir and (--secure) PostgreSQL's folder: only /tmp/rb-* folders, never anything else."""
    for temp in (record.get("temp_dir", ""), record.get("postgres_dir", "")):
        if temp and Path(temp).name.startswith(TEMP_PREFIX) and Path(temp).parent == Path("/tmp"):
            shutil.rmtree(temp, ignore_errors=True)


def write_env(folder: Path, record: dict, creds: Optional[dict[str, str]] = None) -> Path:
    """cluster.env, mode 600 (with --secure it holds the Ray token and the MLflow admin password)."""
    pairs = {"RAY_ADDRESS": record["ray_address"], "RAY_DASHBOARD_ADDRESS": record["dashboard"],
             "MLFLOW_TRACKING_URI": record["mlflow_uri"], "RAYBLOOM_CLUSTER_PIDS": str(folder / RECORD_FILE)}
    if record.get("flower_nodes"):
        pairs.update(RAYBLOOM_SUPERLINK=record["superlink"], FLWR_HOME=record["flwr_home"])
    if record.get("flower_tls"):
        pairs["RAYBLOOM_SUPERLINK_CA"] = record["flower_tls"]["ca"]
    pairs.update(creds or {})
    return write_private(
        folder / ENV_FILE, f"# written by `raybloom cluster up` at {record['created']}; `raybloom cluster down` removes it\n"
        + "".join(f"{k}={shlex.quote(v)}\n" for k, v in pairs.items()))


def use_cluster_token(record: dict, folder: Path) -> None:
    """A --secure cluster's Ray token (from cluster.env) for this process's dashboard requests."""
    token = record.get("secure") and read_env(folder).get("RAY_AUTH_TOKEN")
    if token:
        use_ray_token(token)

