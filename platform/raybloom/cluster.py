"""`raybloom cluster up|down|status`: a real Ray cluster and MLflow server on 127.0.0.1, as processes.

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

`up --secure` (secrets made on the spot with `secrets`, files holding them mode 600; see cluster_secure):
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

import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from raybloom import cluster_secure, procs

STATE_ENV = "RAYBLOOM_STATE_DIR"
ENV_FILE = "cluster.env"
RECORD_FILE = "cluster.json"
TEMP_PREFIX = "rb-"
PG_PREFIX = "rb-pg-"

app = typer.Typer(no_args_is_help=True, help="A real local cluster on 127.0.0.1: Ray head + worker nodes, MLflow server.")
out = Console(soft_wrap=True)
err = Console(stderr=True)

StateOpt = typer.Option(None, "--state-dir", help=f"Where cluster.env/cluster.json live (default: ${STATE_ENV}, else .raybloom)")


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------------- state
def state_dir(explicit: Optional[Path] = None) -> Path:
    return Path(explicit or os.environ.get(STATE_ENV) or ".raybloom").resolve()


def read_env(folder: Optional[Path] = None) -> dict[str, str]:
    """The KEY=VALUE pairs of cluster.env ({} when there is none)."""
    path = state_dir(folder) / ENV_FILE
    if not path.is_file():
        return {}
    pairs = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            pairs[key.strip()] = (shlex.split(value) or [""])[0]
    return pairs


def _load_record(folder: Path) -> Optional[dict]:
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _save_record(folder: Path, record: dict) -> None:
    tmp = folder / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(folder / RECORD_FILE)


# ------------------------------------------------------------------------------------------ health
def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def mlflow_healthy(uri: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def alive_nodes(dashboard: str) -> Optional[list]:
    """ALIVE Ray nodes, asked of the dashboard's state API (no driver joins the cluster); None when
    the dashboard does not answer."""
    try:
        from ray.util.state import list_nodes

        return list_nodes(address=dashboard, filters=[("state", "=", "ALIVE")], timeout=10)
    except Exception:  # noqa: BLE001 - not up yet, or gone
        return None


def _wait(what: str, check, timeout: float, procs: list[subprocess.Popen] = ()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: the process exited with code {p.returncode}")
        time.sleep(0.5)
    raise RuntimeError(f"{what}: not ready after {timeout:.0f} s")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- up
class _Launcher:
    """Starts processes in groups of their own and records them as it goes."""

    def __init__(self, folder: Path, record: dict, env: dict[str, str]):
        self.folder, self.record, self.env = folder, record, env
        self.umask = -1  # --secure: 0o077, so what the processes write (logs, artifacts, state) is theirs alone
        self.logs = folder / "cluster" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, role: str, cmd: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{role}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **env}, start_new_session=True, cwd=self.folder, umask=self.umask)
        self.record["pgids"].append(proc.pid)
        self.record["groups"].append({"role": role, "pgid": proc.pid, "log": str(log), "cmd": shlex.join(cmd)})
        self.snapshot()
        return proc, log

    def snapshot(self) -> None:
        """Record every live process of the cluster (pid, start time, group, command line)."""
        known = {(p["pid"], p["start"]) for p in self.record["processes"]}
        for p in procs.cluster_processes(self.record).values():
            if (p.pid, p.start) not in known:
                self.record["processes"].append({"pid": p.pid, "start": p.start, "pgid": p.pgid, "cmd": p.cmd[:300]})
        _save_record(self.folder, self.record)


def _ray_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", *args, "--disable-usage-stats"]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def flower_nodes_registered(home: Path, want: int) -> bool:
    """True when the SuperLink lists `want` online SuperNodes (`flwr supernode ls`)."""
    proc = flwr_cli("supernode", "ls", "raybloom", "--format", "json", home=home)
    try:
        nodes = json.loads(proc.stdout[proc.stdout.index("{"):]).get("nodes", [])
    except ValueError:
        return False
    return sum(str(n.get("status", "online")).lower() == "online" for n in nodes) >= want


def write_flwr_home(home: Path, address: str, ca: Optional[str] = None) -> None:
    """$FLWR_HOME/config.toml with this cluster's SuperLink as the default connection: TLS checked
    against `ca` when given, else plain (loopback). Left as it is when it already says exactly that."""
    home.mkdir(parents=True, exist_ok=True)
    trust = f'root-certificates = "{ca}"' if ca else "insecure = true"
    text = f'[superlink]\ndefault = "raybloom"\n\n[superlink.raybloom]\naddress = "{address}"\n{trust}\n'
    config = home / "config.toml"
    if not config.is_file() or config.read_text() != text:
        config.write_text(text)


def flwr_cli(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """This virtualenv's `flwr` command with FLWR_HOME=home (used here and by federated.deploy)."""
    return subprocess.run([str(Path(sys.executable).with_name("flwr")), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "FLWR_HOME": str(home)})


def _start_flower(launcher: "_Launcher", record: dict, nodes: int, ports: list[int], timeout: float) -> None:
    """A SuperLink and `nodes` SuperNodes on loopback; SuperNode i holds partition i of `nodes`."""
    bin_dir = Path(sys.executable).parent
    link_port, node_ports = ports[0], ports[1:]
    home = Path(record["flwr_home"])
    tls = record.get("flower_tls")  # --secure: {"ca", "cert", "key"} paths and one key pair per SuperNode
    write_flwr_home(home, record["superlink"], tls and tls["ca"])
    security = (["--ssl-ca-certfile", tls["ca"], "--ssl-certfile", tls["cert"], "--ssl-keyfile", tls["key"],
                 "--enable-supernode-auth"] if tls else ["--insecure"])
    link, link_log = launcher.spawn("flower-superlink", [
        str(bin_dir / "flower-superlink"), *security, "--disable-runtime-dependency-installation",
        "--database", f"{record['temp_dir']}/flower-state.db", "--host", "127.0.0.1", "--port", str(link_port)],
        FLWR_HOME=str(home))
    try:
        _wait(f"Flower SuperLink on {record['superlink']}", lambda: port_open(link_port), timeout, [link])
    except RuntimeError as e:
        raise RuntimeError(f"{e}\n{_tail(link_log)}") from None
    for i in range(nodes):
        if tls:  # only registered public keys may connect: register before the SuperNode starts
            reg = flwr_cli("supernode", "register", f"{tls['supernode_keys'][i]}.pub", "raybloom", home=home)
            if reg.returncode != 0 or "registered successfully" not in reg.stdout:
                raise RuntimeError(f"flwr supernode register failed: {(reg.stdout + reg.stderr).strip()[-1500:]}")
        security = (["--root-certificates", tls["ca"], "--auth-supernode-private-key", tls["supernode_keys"][i]]
                    if tls else ["--insecure"])
        launcher.spawn(f"flower-supernode-{i}", [
            str(bin_dir / "flower-supernode"), *security, "--superlink", record["superlink"], "--host", "127.0.0.1",
            "--port", str(node_ports[i]), "--node-config", f"partition-id={i} num-partitions={nodes}"], FLWR_HOME=str(home))
    _wait(f"Flower: {nodes} SuperNodes online", lambda: flower_nodes_registered(home, nodes), timeout, [link])


def _secure_setup(record: dict, env: dict[str, str], pg_port: int, flower_nodes: int) -> dict[str, str]:
    """--secure: the secrets (made here, never written to cluster.json), the TLS material and SuperNode
    keys, the MLflow basic-auth config, a throwaway PostgreSQL. Every component gets the Ray token and
    the MLflow credentials through `env`; returns the credentials for cluster.env and the MLflow server."""
    secure = Path(record["temp_dir"]) / "secure"
    secure.mkdir(mode=0o700)
    creds = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
             "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": cluster_secure.password()}
    env.update(creds)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    cluster_secure.use_ray_token(creds["RAY_AUTH_TOKEN"])  # this process asks the dashboard if nodes are alive
    if flower_nodes:
        tls = {k: str(v) for k, v in cluster_secure.make_tls(secure / "flower").items()}
        tls["supernode_keys"] = [str(cluster_secure.make_supernode_key(secure / "flower" / f"supernode-{i}")[0])
                                 for i in range(flower_nodes)]
        record["flower_tls"] = tls
    pg = cluster_secure.Postgres(Path(record["postgres_dir"]), pg_port)
    superuser_pw, mlflow_pw = cluster_secure.password(), cluster_secure.password()
    pg.start(superuser_pw)
    pg.create_databases(superuser_pw, "mlflow", mlflow_pw, "mlflow", "mlflow_auth")
    ini = cluster_secure.write_mlflow_auth_ini(secure / "basic_auth.ini", pg.uri("mlflow", mlflow_pw, "mlflow_auth"),
                                               creds["MLFLOW_TRACKING_PASSWORD"])
    # passed as environment, not arguments: command lines are readable by every user (and cluster.json keeps them)
    creds["_mlflow_env"] = {"MLFLOW_BACKEND_STORE_URI": pg.uri("mlflow", mlflow_pw, "mlflow"),
                            "MLFLOW_AUTH_CONFIG_PATH": str(ini),
                            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32)}
    return creds


def _up(folder: Path, workers: int, cpus: float, object_store_mb: int, timeout: float, flower_nodes: int = 0,
        secure: bool = False) -> tuple[dict, dict[str, str]]:
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
    ports = free_ports(4 + workers + 1 + (flower_nodes + 1 if flower_nodes else 0) + secure)
    pg_port = ports.pop() if secure else 0
    gcs, dash, client, mlflow_port, *rest = ports
    agents, flower_ports = rest[:workers + 1], rest[workers + 1:]
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
    if flower_nodes:
        record["superlink"] = f"127.0.0.1:{flower_ports[0]}"
        record["flwr_home"] = str(folder / "cluster" / "flwr_home")
    env = {k: v for k, v in os.environ.items() if k != "RAYBLOOM_DATA_DIR"}
    # Ray code in this cluster's workers that looks its cluster up with no address (Train V2's placement
    # group cleaner does) finds several GCSes on a machine shared with other Ray instances, and fails
    env["RAY_ADDRESS"] = record["ray_address"]
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # jobs find `raybloom`
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["MLFLOW_TRACKING_URI"] = record["mlflow_uri"]  # any job on this cluster records to its MLflow server
    launcher = _Launcher(folder, record, env)
    store = folder / "cluster"
    creds: dict[str, str] = {}
    mlflow_args: list[str] = ["--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                              "--artifacts-destination", str(store / "mlartifacts")]
    common = [f"--num-cpus={cpus:g}", f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    # one temp dir per node: nodes sharing one would share runtime_resources/, and a node setting up
    # (or garbage-collecting) a job's working_dir deletes the copy another node's driver runs in
    node_tmp = [f"--temp-dir={temp_dir}/{i}" for i in range(workers + 1)]
    try:
        if secure:
            launcher.umask = 0o077
            creds = _secure_setup(record, env, pg_port, flower_nodes)
            launcher.snapshot()  # the PostgreSQL processes (their command lines name the temp dir)
            host_port = f"127.0.0.1:{mlflow_port}"
            mlflow_args = ["--artifacts-destination", f"{temp_dir}/mlartifacts", "--app-name", "basic-auth",
                           "--allowed-hosts", f"{host_port},localhost:{mlflow_port}"]
        head, head_log = launcher.spawn("ray-head", _ray_cmd(
            "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agents[0]}", node_tmp[0], *common))
        mlflow, mlflow_log = launcher.spawn("mlflow", [
            sys.executable, "-m", "mlflow", "server", *mlflow_args, "--host", "127.0.0.1",
            "--port", str(mlflow_port), "--workers", "1"],
            # no MLflow job runner: its 7 huey consumers cost ~1.6 GB and raybloom submits no MLflow jobs
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"),
            **creds.pop("_mlflow_env", {}))
        if head.wait(timeout) != 0:
            raise RuntimeError(f"ray start --head exited with code {head.returncode}:\n{_tail(head_log)}")
        launcher.snapshot()
        nodes = [launcher.spawn(f"ray-worker-{i + 1}", _ray_cmd(
            f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agents[i + 1]}", node_tmp[i + 1], *common))
            for i in range(workers)]
        for proc, log in nodes:
            if proc.wait(timeout) != 0:
                raise RuntimeError(f"ray start (worker node) exited with code {proc.returncode}:\n{_tail(log)}")
        launcher.snapshot()
        _wait(f"Ray: {workers + 1} nodes alive", lambda: len(alive_nodes(record["dashboard"]) or []) >= workers + 1,
              timeout)
        try:
            _wait(f"MLflow server on {record['mlflow_uri']}", lambda: mlflow_healthy(record["mlflow_uri"]),
                  timeout, [mlflow])
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{_tail(mlflow_log)}") from None
        if flower_nodes:
            _start_flower(launcher, record, flower_nodes, flower_ports, timeout)
        launcher.snapshot()
    except BaseException:
        cluster_secure.Postgres.stop(record.get("postgres_dir"), timeout=10)
        procs.stop_processes(record, timeout=5)
        _remove_temp_dirs(record)
        (folder / RECORD_FILE).unlink(missing_ok=True)
        raise
    return record, creds


def _remove_temp_dirs(record: dict) -> None:
    """The Ray temp dir and (--secure) PostgreSQL's folder: only /tmp/rb-* folders, never anything else."""
    for temp in (record.get("temp_dir", ""), record.get("postgres_dir", "")):
        if temp and Path(temp).name.startswith(TEMP_PREFIX) and Path(temp).parent == Path("/tmp"):
            shutil.rmtree(temp, ignore_errors=True)


def _write_env(folder: Path, record: dict, creds: Optional[dict[str, str]] = None) -> Path:
    """cluster.env, mode 600 (with --secure it holds the Ray token and the MLflow admin password)."""
    pairs = {"RAY_ADDRESS": record["ray_address"], "RAY_DASHBOARD_ADDRESS": record["dashboard"],
             "MLFLOW_TRACKING_URI": record["mlflow_uri"], "RAYBLOOM_CLUSTER_PIDS": str(folder / RECORD_FILE)}
    if record.get("flower_nodes"):
        pairs.update(RAYBLOOM_SUPERLINK=record["superlink"], FLWR_HOME=record["flwr_home"])
    if record.get("flower_tls"):
        pairs["RAYBLOOM_SUPERLINK_CA"] = record["flower_tls"]["ca"]
    pairs.update(creds or {})
    return cluster_secure.write_private(
        folder / ENV_FILE, f"# written by `raybloom cluster up` at {record['created']}; `raybloom cluster down` removes it\n"
        + "".join(f"{k}={shlex.quote(v)}\n" for k, v in pairs.items()))


def use_cluster_token(record: dict, folder: Path) -> None:
    """A --secure cluster's Ray token (from cluster.env) for this process's dashboard requests."""
    token = record.get("secure") and read_env(folder).get("RAY_AUTH_TOKEN")
    if token:
        cluster_secure.use_ray_token(token)


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
    old = _load_record(folder)
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
        record, creds = _up(folder, workers, cpus_per_node, object_store_mb, timeout, flower_nodes, secure)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        fail(f"cluster up failed, everything it started is stopped (logs in {folder / 'cluster' / 'logs'}): {e}")
    except KeyboardInterrupt:
        fail("interrupted; everything started so far is stopped", 130)
    env_file = _write_env(folder, record, creds)
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
    record = _load_record(folder)
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
    record = _load_record(folder)
    if record is None:
        (folder / ENV_FILE).unlink(missing_ok=True)
        out.print(f"no cluster to stop (no {folder / RECORD_FILE}); nothing to do")
        return
    cluster_secure.Postgres.stop(record.get("postgres_dir"))  # a clean shutdown first; the signals catch the rest
    terminated, killed, survivors = procs.stop_processes(record, timeout)
    if survivors:
        fail(f"{len(survivors)} processes survived SIGKILL: {', '.join(str(p.pid) for p in survivors)}")
    (folder / ENV_FILE).unlink(missing_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)
    _remove_temp_dirs(record)
    hard = f" ({', '.join(sorted({p.cmd.split()[0].rsplit('/', 1)[-1] for p in killed}))})" if killed else ""
    store = ("the secure cluster's PostgreSQL and artifacts were in its temp dir, removed" if record.get("secure")
             else f"the MLflow store stays in {folder / 'cluster'}")
    out.print(f"cluster down: {terminated} processes stopped by SIGTERM, {len(killed)} by SIGKILL{hard}; removed "
              f"{folder / ENV_FILE} ({store})", highlight=False)
