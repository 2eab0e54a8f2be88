"""Simulation on Flower's supported runtime: a SuperLink in simulation mode that the driver starts for one
run, reached through the same `flwr run` route as deployment (`flower_run.submit_and_wait`).

The SuperLink listens on a free loopback port and gets a FLWR_HOME of its own whose connection
`raybloom-sim` names the simulated SuperNodes (`federated.clients`) and what each client actor holds
(`federated.client_cpus`, `federated.client_gpus`). It runs the ServerApp and the ClientApps (Ray actors:
on the Ray session the driver names, `ray_address`, which Flower's simulation process joins, so a
search's runs share one; else on a Ray the simulation starts for the run) in processes of its own, all in
the SuperLink's process tree. A reaper process (`raybloom.reaper`) holds a pipe from the driver and kills that tree when the pipe
closes, however the driver ended: a SIGKILLed driver leaves no server training on (`--resume` continues
the run).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raybloom import ray_session, timeline, tracking
from raybloom.errors import UserError
from raybloom.flwr_config import write_flwr_home
from raybloom.net import free_ports, port_open
from raybloom.pids import read_proc, signal_if_alive
from raybloom.reaper import process_tree
from raybloom.spec import JobSpec

CONNECTION = "raybloom-sim"


def simulation_options(spec: JobSpec) -> dict[str, object]:
    """The connection's `options.*`: Flower's simulation config (SimulationConfig: whole CPUs, a GPU share)."""
    fed = spec.federated
    return {"num-supernodes": fed.clients,
            "backend.client-resources.num-cpus": fed.client_cpus,
            "backend.client-resources.num-gpus": float(fed.client_gpus),
            "backend.init-args.logging-level": os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "ERROR"),
            "backend.init-args.log-to-driver": True}


def start_simulation(spec: JobSpec) -> "SimulationLink | None":
    """The SuperLink of a `mode: simulation` run, spawned before the driver prepares its data and opens its
    run (they take about as long as the SuperLink takes to start); None for any other spec."""
    fed = spec.federated
    if spec.kind != "federated" or fed is None or fed.mode != "simulation":
        return None
    return SimulationLink(spec, ray_address=ray_to_join(spec)).start()


def ray_to_join(spec: JobSpec) -> str | None:
    """The Ray session the simulation joins: this driver's when it has one (a search's trials share it) or
    the cluster's ($RAY_ADDRESS, scaling.address); else None, and Flower's simulation starts Ray in its
    own process (the SuperLink's tree, which ends with the run): a lone run then pays for one Ray start,
    not a start here plus a shutdown at this process's exit."""
    if not (ray_session.running_here() or spec.scaling.address or os.environ.get("RAY_ADDRESS")):
        return None
    ray_session.init_ray(spec)
    timeline.mark("ray_up")
    return ray_session.gcs_address()


class SimulationLink:
    """`with SimulationLink(spec) as link:` a SuperLink in simulation mode, up and answering; stopped (its
    whole process tree) on the way out. `link.address`, `link.home` ($FLWR_HOME), `link.connection`."""

    def __init__(self, spec: JobSpec, timeout: float = 60.0, ray_address: str | None = None):
        """`ray_address`: the Ray the simulation joins (the driver's session) instead of starting one of its own."""
        self.spec, self.timeout, self.ray_address = spec, timeout, ray_address
        self.folder = Path(tempfile.mkdtemp(prefix="raybloom-superlink-"))
        self.home = self.folder / "flwr_home"
        self.connection = CONNECTION
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.folder / "superlink.log"
        self.proc: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None

    def start(self) -> "SimulationLink":
        """Spawn the SuperLink (and its reaper) and return at once: `wait_ready` before using it."""
        write_flwr_home(self.home, self.address, name=self.connection, options=simulation_options(self.spec))
        bin_dir = Path(sys.executable).parent
        env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # as `ray_session` sets them
               **os.environ, "FLWR_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": tracking.absolute_uri(tracking.tracking_uri(self.spec)),
               **({"RAY_ADDRESS": self.ray_address} if self.ray_address else {})}
        cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--disable-runtime-dependency-installation", "--database", str(self.folder / "state.db"),
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as fh:  # the SuperExec it spawns needs this virtualenv's bin on PATH; the
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True)  # ServerApp works in the driver's folder
        self.reaper = subprocess.Popen([sys.executable, "-m", "raybloom.reaper", str(self.proc.pid)],
                                       stdin=subprocess.PIPE, start_new_session=True)
        timeline.mark("superlink_spawned")
        return self

    def on_driver_death(self, command: list[str]) -> None:
        """The command the reaper runs after killing the tree if this driver dies (ending the MLflow run
        KILLED: a dead run is not left RUNNING); a later call replaces it."""
        self.reaper.stdin.write((json.dumps(command) + "\n").encode())
        self.reaper.stdin.flush()

    def __enter__(self) -> "SimulationLink":
        self.start()
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        """Until the SuperLink listens; a port answering while our SuperLink has exited is someone else's."""
        deadline = time.monotonic() + self.timeout
        while not port_open(self.port) or self.proc.poll() is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_tail()
                self.stop()
                raise UserError(f"Flower's SuperLink (simulation) did not start on {self.address}: "
                                f"{tail or 'no output'}")
            time.sleep(0.2)

    def gone(self) -> str | None:
        """Why the SuperLink is no longer serving (it exited), or None while it runs."""
        if self.proc is None or self.proc.poll() is None:
            return None
        return f"it exited with code {self.proc.returncode}: {self.log_tail() or 'no output'}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the SuperLink's process tree (its SuperExec runs in a session of its own), SIGKILL what is
        still there after `grace` s. The reaper goes first (it must not act on a reused pid), and a process
        is its pid and start time: only those still alive are killed."""
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper.stdin.close()
            self.reaper = None
        if self.proc is not None:
            tree = [p for p in map(read_proc, process_tree(self.proc.pid)) if p is not None]
            for p in tree:
                signal_if_alive(p, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            for p in tree:
                signal_if_alive(p, signal.SIGKILL)
            self.proc.wait()
            self.proc = None  # stopped once: a second stop must not look up a pid the system may have reused
        shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()

