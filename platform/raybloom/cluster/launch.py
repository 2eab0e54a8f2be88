"""`raybloom cluster up`'s work: start the Ray nodes, the MLflow server (and Flower, and with --secure the
secrets and PostgreSQL) as process groups of their own, record each as it starts, and stop it all again
when any step fails."""

from __future__ import annotations

import os
import secrets
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from raybloom.cluster import procs
from raybloom.cluster.flower import start_flower
from raybloom.cluster.health import alive_nodes, mlflow_healthy, tail, wait
from raybloom.cluster.launcher import Launcher
from raybloom.cluster.secure import Postgres, make_supernode_key, make_tls, password, write_mlflow_auth_ini
from raybloom.cluster.state import PG_PREFIX, RECORD_FILE, TEMP_PREFIX, remove_temp_dirs
from raybloom.net import free_ports
from raybloom.ray_session import use_ray_token


def _ray_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", *args, "--disable-usage-stats"]


def _secure_setup(record: dict, env: dict[str, str], pg_port: int, flower_nodes: int) -> dict[str, str]:
    """--secure: the secrets (made here, never written to cluster.json), the TLS material and SuperNode
    keys, the MLflow basic-auth config, a throwaway PostgreSQL. Every component gets the Ray token and
    the MLflow credentials through `env`; returns the credentials for cluster.env and the MLflow server."""
    private = Path(record["temp_dir"]) / "secure"
    private.mkdir(mode=0o700)
    creds = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
             "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password()}
    env.update(creds)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    use_ray_token(creds["RAY_AUTH_TOKEN"])  # this process asks the dashboard if nodes are alive
    if flower_nodes:
        tls = {k: str(v) for k, v in make_tls(private / "flower").items()}
        tls["supernode_keys"] = [str(make_supernode_key(private / "flower" / f"supernode-{i}")[0])
                                 for i in range(flower_nodes)]
        record["flower_tls"] = tls
    pg = Postgres(Path(record["postgres_dir"]), pg_port)
    superuser_pw, mlflow_pw = password(), password()
    pg.start(superuser_pw)
    pg.create_databases(superuser_pw, "mlflow", mlflow_pw, "mlflow", "mlflow_auth")
    ini = write_mlflow_auth_ini(private / "basic_auth.ini", pg.uri("mlflow", mlflow_pw, "mlflow_auth"),
                                               creds["MLFLOW_TRACKING_PASSWORD"])
    # passed as environment, not arguments: command lines are readable by every user (and cluster.json keeps them)
    creds["_mlflow_env"] = {"MLFLOW_BACKEND_STORE_URI": pg.uri("mlflow", mlflow_pw, "mlflow"),
                            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    return creds


def _new_record(folder: Path, workers: int, cpus: float, flower_nodes: int, secure: bool) -> tuple[dict, dict]:
    """The cluster's record (cluster.json) before anything starts, and the ports it will use."""
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
    ports = free_ports(4 + workers + 1 + (flower_nodes + 1 if flower_nodes else 0) + secure)
    pg_port = ports.pop() if secure else 0
    gcs, dash, client, mlflow_port, *rest = ports
    record = {
        "version": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "boot_id": procs.boot_id(), "since_ticks": procs.read_proc(os.getpid()).start, "state_dir": str(folder),
        "temp_dir": temp_dir, "workers": workers, "cpus_per_node": cpus,
        "ray_address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}",
        "mlflow_uri": f"http://127.0.0.1:{mlflow_port}", "pgids": [], "groups": [], "processes": [],
        "flower_nodes": flower_nodes, "secure": secure,
    }
    if secure:  # a folder of its own in /tmp (the postgres user's; the Ray temp dir stays root's alone), removed by `down`
        record["postgres_dir"] = tempfile.mkdtemp(prefix=PG_PREFIX, dir="/tmp")
        record["markers"] = [record["postgres_dir"]]  # its server's command line names it: `down` finds it
    ports = {"gcs": gcs, "dashboard": dash, "client": client, "mlflow": mlflow_port, "postgres": pg_port,
             "agents": rest[:workers + 1], "flower": rest[workers + 1:]}
    if flower_nodes:
        record["superlink"] = f"127.0.0.1:{ports['flower'][0]}"
        record["flwr_home"] = str(folder / "cluster" / "flwr_home")
    return record, ports


def _process_env(record: dict) -> dict[str, str]:
    """What every process of the cluster runs with."""
    env = {k: v for k, v in os.environ.items() if k != "RAYBLOOM_DATA_DIR"}
    # Ray code in this cluster's workers that looks its cluster up with no address (Train V2's placement
    # group cleaner does) finds several GCSes on a machine shared with other Ray instances, and fails
    env["RAY_ADDRESS"] = record["ray_address"]
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # jobs find `raybloom`
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["MLFLOW_TRACKING_URI"] = record["mlflow_uri"]  # any job on this cluster records to its MLflow server
    return env


def _ray_node_args(record: dict, node: int, object_store_mb: int) -> list[str]:
    # one temp dir per node: nodes sharing one would share runtime_resources/, and a node setting up
    # (or garbage-collecting) a job's working_dir deletes the copy another node's driver runs in
    return [f"--temp-dir={record['temp_dir']}/{node}", f"--num-cpus={record['cpus_per_node']:g}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}"]


def _spawn_head(launcher: Launcher, record: dict, ports: dict, object_store_mb: int):
    return launcher.spawn("ray-head", _ray_cmd(
        "--head", f"--port={ports['gcs']}", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}",
        "--include-dashboard=true", f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agents'][0]}", *_ray_node_args(record, 0, object_store_mb)))


def _start_ray_workers(launcher: Launcher, record: dict, ports: dict, head: tuple, object_store_mb: int,
                       timeout: float) -> None:
    """Once the head (its process and log) is up, the worker nodes, each a `ray start` of its own; wait until
    all are ALIVE."""
    workers, gcs, agents = record["workers"], ports["gcs"], ports["agents"]
    head_proc, head_log = head
    if head_proc.wait(timeout) != 0:
        raise RuntimeError(f"ray start --head exited with code {head_proc.returncode}:\n{tail(head_log)}")
    launcher.snapshot()
    nodes = [launcher.spawn(f"ray-worker-{i + 1}", _ray_cmd(
        f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agents[i + 1]}",
        *_ray_node_args(record, i + 1, object_store_mb))) for i in range(workers)]
    for proc, log in nodes:
        if proc.wait(timeout) != 0:
            raise RuntimeError(f"ray start (worker node) exited with code {proc.returncode}:\n{tail(log)}")
    launcher.snapshot()
    wait(f"Ray: {workers + 1} nodes alive", lambda: len(alive_nodes(record["dashboard"]) or []) >= workers + 1, timeout)


def _spawn_mlflow(launcher: Launcher, record: dict, ports: dict, folder: Path, creds: dict[str, str]):
    """The MLflow server (SQLite in the state folder; with --secure basic auth on PostgreSQL)."""
    store = folder / "cluster"
    args = ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}", "--artifacts-destination", str(store / "mlartifacts")]
    if record["secure"]:
        host_port = f"127.0.0.1:{ports['mlflow']}"
        args = ["--artifacts-destination", f"{record['temp_dir']}/mlartifacts", "--app-name", "basic-auth",
                "--allowed-hosts", f"{host_port},localhost:{ports['mlflow']}"]
    return launcher.spawn("mlflow", [
        sys.executable, "-m", "mlflow", "server", *args, "--host", "127.0.0.1", "--port", str(ports["mlflow"]),
        "--workers", "1"],
        # no MLflow job runner: its 7 huey consumers cost ~1.6 GB and raybloom submits no MLflow jobs
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
        **creds.pop("_mlflow_env", {}))


def start(folder: Path, workers: int, cpus: float, object_store_mb: int, timeout: float, flower_nodes: int = 0,
          secure: bool = False) -> tuple[dict, dict[str, str]]:
    """Start the whole cluster; returns its record and (--secure) the credentials for cluster.env.
    When a step fails, everything started so far is stopped and the record removed."""
    record, ports = _new_record(folder, workers, cpus, flower_nodes, secure)
    env = _process_env(record)
    launcher = Launcher(folder, record, env)
    creds: dict[str, str] = {}
    try:
        if secure:
            launcher.umask = 0o077
            creds = _secure_setup(record, env, ports["postgres"], flower_nodes)
            launcher.snapshot()  # the PostgreSQL processes (their command lines name the temp dir)
        head = _spawn_head(launcher, record, ports, object_store_mb)
        mlflow, mlflow_log = _spawn_mlflow(launcher, record, ports, folder, creds)
        _start_ray_workers(launcher, record, ports, head, object_store_mb, timeout)
        try:
            wait(f"MLflow server on {record['mlflow_uri']}", lambda: mlflow_healthy(record["mlflow_uri"]),
                 timeout, [mlflow])
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{tail(mlflow_log)}") from None
        if flower_nodes:
            start_flower(launcher, record, flower_nodes, ports["flower"], timeout)
        launcher.snapshot()
    except BaseException:
        Postgres.stop(record.get("postgres_dir"), timeout=10)
        procs.stop_processes(record, timeout=5)
        remove_temp_dirs(record)
        (folder / RECORD_FILE).unlink(missing_ok=True)
        raise
    return record, creds
