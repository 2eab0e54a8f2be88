"""Simulation on Flower's supported runtime: a SuperLink in simulation mode that the driver starts for one
run, reached through the same `flwr run` route as deployment (`flower_run.submit_and_wait`).

The SuperLink listens on a free loopback port and gets a FLWR_HOME of its own whose connection
`raybloom-sim` names the simulated SuperNodes (`federated.clients`) and what each client actor holds
(`federated.client_cpus`, `federated.client_gpus`). It runs the ServerApp and the ClientApps (Ray actors,
Ray started there or joined through $RAY_ADDRESS) in processes of its own, all in the SuperLink's process
tree. A reaper process (`raybloom.reaper`) holds a pipe from the driver and kills that tree when the pipe
closes, however the driver ended: a SIGKILLed driver leaves no server training on (`--resume` continues
the run).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raybloom.errors import UserError
from raybloom.flwr_config import write_flwr_home
from raybloom.net import free_ports, port_open
from raybloom.reaper import kill_tree, process_tree
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


class SimulationLink:
    """`with SimulationLink(spec) as link:` a SuperLink in simulation mode, up and answering; stopped (its
    whole process tree) on the way out. `link.address`, `link.home` ($FLWR_HOME), `link.connection`."""

    def __init__(self, spec: JobSpec, timeout: float = 60.0):
        self.spec, self.timeout = spec, timeout
        self.folder = Path(tempfile.mkdtemp(prefix="raybloom-superlink-"))
        self.home = self.folder / "flwr_home"
        self.connection = CONNECTION
        self.port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.port}"
        self.log = self.folder / "superlink.log"
        self.proc: subprocess.Popen | None = None
        self.reaper: subprocess.Popen | None = None

    def __enter__(self) -> "SimulationLink":
        write_flwr_home(self.home, self.address, name=self.connection, options=simulation_options(self.spec))
        bin_dir = Path(sys.executable).parent
        env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # as `ray_session` sets them
               **os.environ, "FLWR_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        cmd = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--disable-runtime-dependency-installation", "--database", str(self.folder / "state.db"),
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log, "w") as fh:  # the SuperExec it spawns needs this virtualenv's bin on PATH
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         start_new_session=True, cwd=self.folder)
        self.reaper = subprocess.Popen([sys.executable, "-m", "raybloom.reaper", str(self.proc.pid)],
                                       stdin=subprocess.PIPE, start_new_session=True)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"Flower's SuperLink (simulation) did not start on {self.address}: "
                                f"{self.log_tail() or 'no output'}")
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
        left after `grace` s. The reaper goes first: once the SuperLink is gone its pid may be reused."""
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper.stdin.close()
        if self.proc is not None:
            tree = kill_tree(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            for pid in {*tree, *process_tree(self.proc.pid)}:  # what did not end on SIGTERM, and its children
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()
