"""`raybloom cluster up|down|status`: a real Ray cluster and MLflow server on 127.0.0.1, as processes.

`up` starts a Ray head, `--workers` worker nodes (each its own `ray start`, so each node is its own
raylet, object store and dashboard agent) and an `mlflow server` on SQLite, all on free ports, with a
dedicated short Ray `--temp-dir` (`/tmp/rb-XXXXXXXX`: unix socket paths must stay under 100 chars, and
an in-process `ray.init()` elsewhere on the machine, which looks for `/tmp/ray/ray_current_cluster`,
never attaches to this cluster). It waits until every node is ALIVE and MLflow answers `/health`.

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
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

STATE_ENV = "RAYBLOOM_STATE_DIR"
ENV_FILE = "cluster.env"
RECORD_FILE = "cluster.json"
TEMP_PREFIX = "rb-"

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


# ------------------------------------------------------------------------------------------- /proc
@dataclass
class Proc:
    pid: int
    ppid: int
    pgid: int
    start: int  # clock ticks after boot: with the pid, identifies a process (pids are reused)
    state: str
    cmd: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def read_proc(pid: int) -> Optional[Proc]:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cmd = raw.replace(b"\0", b" ").decode(errors="replace").strip() or stat[stat.index("(") + 1:stat.rindex(")")]
    return Proc(pid, int(fields[1]), int(fields[2]), int(fields[19]), fields[0], cmd)


def _all_procs() -> dict[int, Proc]:
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            p = read_proc(int(entry))
            if p is not None and p.state not in ("Z", "X"):
                procs[p.pid] = p
    return procs


def alive(pid: int, start: int) -> bool:
    """Is this exact process (pid and start time) still running? Zombies count as gone."""
    p = read_proc(pid)
    return p is not None and p.start == start and p.state not in ("Z", "X")


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        p = read_proc(pid)
        pid = p.ppid if p else 0
    return pids


def cluster_processes(record: dict) -> dict[int, Proc]:
    """The live processes of the cluster `record` describes, and nothing else."""
    if record.get("boot_id") != _boot_id():
        return {}
    procs = _all_procs()
    ours = {p["pid"] for p in record.get("processes", []) if p["pid"] in procs and procs[p["pid"]].start == p["start"]}
    groups = set(record.get("pgids", []))
    since = record.get("since_ticks", 0)
    marker = re.compile(re.escape(record["temp_dir"]) + r"(?![\w-])") if record.get("temp_dir") else None
    for p in procs.values():
        if p.start >= since and (p.pgid in groups or (marker and marker.search(p.cmd))):
            ours.add(p.pid)
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(ours)
    while stack:  # descendants: raylet workers, a job's driver (Ray Jobs puts it in a session of its own)
        for c in children.get(stack.pop(), []):
            if c not in ours:
                ours.add(c)
                stack.append(c)
    ours -= _ancestors()
    return {pid: procs[pid] for pid in ours}


def _signal(procs: dict[int, Proc], sig: int) -> None:
    for p in procs.values():
        if alive(p.pid, p.start):
            try:
                os.kill(p.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


def stop_processes(record: dict, timeout: float = 15.0) -> tuple[int, list[Proc], list[Proc]]:
    """SIGTERM every process of the cluster, SIGKILL what is left after `timeout` s.
    Returns (how many ended on SIGTERM, those that needed SIGKILL, survivors)."""
    targets = cluster_processes(record)
    total = dict(targets)
    _signal(targets, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p.pid, p.start) for p in total.values()):
        time.sleep(0.25)
    killed: dict[int, Proc] = {}
    for _ in range(3):  # a dying raylet may still have started a worker: look again
        left = {pid: p for pid, p in {**total, **cluster_processes(record)}.items() if alive(p.pid, p.start)}
        if not left:
            break
        total.update(left)
        killed.update(left)
        _signal(left, signal.SIGKILL)
        end = time.monotonic() + 5
        while time.monotonic() < end and any(alive(p.pid, p.start) for p in left.values()):
            time.sleep(0.1)
    survivors = [p for p in total.values() if alive(p.pid, p.start)]
    return len(total) - len(killed), list(killed.values()), survivors


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
        self.logs = folder / "cluster" / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def spawn(self, role: str, cmd: list[str], **env: str) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{role}.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env={**self.env, **env}, start_new_session=True, cwd=self.folder)
        self.record["pgids"].append(proc.pid)
        self.record["groups"].append({"role": role, "pgid": proc.pid, "log": str(log), "cmd": shlex.join(cmd)})
        self.snapshot()
        return proc, log

    def snapshot(self) -> None:
        """Record every live process of the cluster (pid, start time, group, command line)."""
        known = {(p["pid"], p["start"]) for p in self.record["processes"]}
        for p in cluster_processes(self.record).values():
            if (p.pid, p.start) not in known:
                self.record["processes"].append({"pid": p.pid, "start": p.start, "pgid": p.pgid, "cmd": p.cmd[:300]})
        _save_record(self.folder, self.record)


def _ray_cmd(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("ray")), "start", *args, "--disable-usage-stats"]


def _up(folder: Path, workers: int, cpus: float, object_store_mb: int, timeout: float) -> dict:
    temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir="/tmp")
    gcs, dash, client, mlflow_port, *agents = free_ports(4 + workers + 1)
    record = {
        "version": 1, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "boot_id": _boot_id(), "since_ticks": read_proc(os.getpid()).start, "state_dir": str(folder),
        "temp_dir": temp_dir, "workers": workers, "cpus_per_node": cpus,
        "ray_address": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}",
        "mlflow_uri": f"http://127.0.0.1:{mlflow_port}", "pgids": [], "groups": [], "processes": [],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYBLOOM_DATA_DIR")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # jobs find `raybloom`
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["MLFLOW_TRACKING_URI"] = record["mlflow_uri"]  # any job on this cluster records to its MLflow server
    launcher = _Launcher(folder, record, env)
    store = folder / "cluster"
    common = [f"--num-cpus={cpus:g}", f"--object-store-memory={object_store_mb * 1024 * 1024}"]
    # one temp dir per node: nodes sharing one would share runtime_resources/, and a node setting up
    # (or garbage-collecting) a job's working_dir deletes the copy another node's driver runs in
    node_tmp = [f"--temp-dir={temp_dir}/{i}" for i in range(workers + 1)]
    try:
        head, head_log = launcher.spawn("ray-head", _ray_cmd(
            "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
            "--include-dashboard=true", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agents[0]}", node_tmp[0], *common))
        mlflow, mlflow_log = launcher.spawn("mlflow", [
            sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
            "--artifacts-destination", str(store / "mlartifacts"), "--host", "127.0.0.1",
            "--port", str(mlflow_port), "--workers", "1"],
            # no MLflow job runner: its 7 huey consumers cost ~1.6 GB and raybloom submits no MLflow jobs
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION=os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false"))
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
        launcher.snapshot()
    except BaseException:
        stop_processes(record, timeout=5)
        shutil.rmtree(temp_dir, ignore_errors=True)
        (folder / RECORD_FILE).unlink(missing_ok=True)
        raise
    return record


def _write_env(folder: Path, record: dict) -> Path:
    pairs = {"RAY_ADDRESS": record["ray_address"], "RAY_DASHBOARD_ADDRESS": record["dashboard"],
             "MLFLOW_TRACKING_URI": record["mlflow_uri"], "RAYBLOOM_CLUSTER_PIDS": str(folder / RECORD_FILE)}
    path = folder / ENV_FILE
    path.write_text(f"# written by `raybloom cluster up` at {record['created']}; `raybloom cluster down` removes it\n"
                    + "".join(f"{k}={shlex.quote(v)}\n" for k, v in pairs.items()))
    return path


@app.command()
def up(
    workers: int = typer.Option(1, "--workers", min=0, help="Ray worker nodes besides the head"),
    cpus_per_node: float = typer.Option(1, "--cpus-per-node", min=0, help="CPUs each node (the head too) offers"),
    object_store_mb: int = typer.Option(128, "--object-store-mb", min=80, help="Object store per node, MiB"),
    timeout: float = typer.Option(300, "--timeout", help="Seconds to wait for each step"),
    state: Optional[Path] = StateOpt,
) -> None:
    """Start a Ray head, K worker nodes and an MLflow server on 127.0.0.1; write cluster.env."""
    folder = state_dir(state)
    folder.mkdir(parents=True, exist_ok=True)
    old = _load_record(folder)
    if old is not None:
        running = cluster_processes(old)
        if running:
            fail(f"a cluster is already running ({len(running)} processes, started {old.get('created')}, "
                 f"dashboard {old.get('dashboard')}, state {folder}): run `raybloom cluster down` first")
        out.print(f"removing the record of a cluster that is no longer running ({folder / RECORD_FILE})")
        (folder / RECORD_FILE).unlink()
    t0 = time.monotonic()
    out.print(f"starting Ray head + {workers} worker node(s) ({cpus_per_node:g} CPU each) and MLflow ...")
    try:
        record = _up(folder, workers, cpus_per_node, object_store_mb, timeout)
    except RuntimeError as e:
        fail(f"cluster up failed, everything it started is stopped: {e}")
    except KeyboardInterrupt:
        fail("interrupted; everything started so far is stopped", 130)
    env_file = _write_env(folder, record)
    out.print(f"cluster up in {time.monotonic() - t0:.0f} s: {workers + 1} Ray nodes, MLflow healthy, "
              f"{len(record['processes'])} processes recorded in {folder / RECORD_FILE}")
    out.print(f"  RAY_ADDRESS={record['ray_address']}\n  RAY_DASHBOARD_ADDRESS={record['dashboard']}  (dashboard, jobs)"
              f"\n  MLFLOW_TRACKING_URI={record['mlflow_uri']}", highlight=False)
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
    procs = cluster_processes(record)
    nodes = alive_nodes(record["dashboard"]) if procs else None
    want = record["workers"] + 1
    n_alive = len(nodes) if nodes is not None else 0
    healthy = mlflow_healthy(record["mlflow_uri"]) if procs else False
    out.print(f"cluster started {record['created']} (state {folder}, Ray temp dir {record['temp_dir']})", highlight=False)
    out.print(f"  Ray     {record['ray_address']}  {n_alive}/{want} nodes alive"
              + (f", {sum(n.resources_total.get('CPU', 0) for n in nodes):g} CPUs" if nodes else ""), highlight=False)
    out.print(f"  Jobs    {record['dashboard']}  {'up' if nodes is not None else 'not answering'}", highlight=False)
    out.print(f"  MLflow  {record['mlflow_uri']}  {'healthy' if healthy else 'not healthy'}", highlight=False)
    out.print(f"  {len(procs)} processes running", highlight=False)
    raise typer.Exit(0 if n_alive >= want and healthy else 1)


@app.command()
def down(
    timeout: float = typer.Option(15, "--timeout", help="Seconds between SIGTERM and SIGKILL"),
    state: Optional[Path] = StateOpt,
) -> None:
    """Stop exactly what `up` started (by pid: SIGTERM, then SIGKILL); remove cluster.env. No cluster: exit 0."""
    folder = state_dir(state)
    record = _load_record(folder)
    if record is None:
        (folder / ENV_FILE).unlink(missing_ok=True)
        out.print(f"no cluster to stop (no {folder / RECORD_FILE}); nothing to do")
        return
    terminated, killed, survivors = stop_processes(record, timeout)
    if survivors:
        fail(f"{len(survivors)} processes survived SIGKILL: {', '.join(str(p.pid) for p in survivors)}")
    (folder / ENV_FILE).unlink(missing_ok=True)
    (folder / RECORD_FILE).unlink(missing_ok=True)
    temp = record.get("temp_dir", "")
    if Path(temp).name.startswith(TEMP_PREFIX) and Path(temp).parent == Path("/tmp"):
        shutil.rmtree(temp, ignore_errors=True)
    hard = f" ({', '.join(sorted({p.cmd.split()[0].rsplit('/', 1)[-1] for p in killed}))})" if killed else ""
    out.print(f"cluster down: {terminated} processes stopped by SIGTERM, {len(killed)} by SIGKILL{hard}; removed "
              f"{folder / ENV_FILE} (the MLflow store stays in {folder / 'cluster'})", highlight=False)
