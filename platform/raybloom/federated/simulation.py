"""Simulation on Flower's supported runtime: a SuperLink in simulation mode that the driver starts for one
run, reached through the same `flwr run` route as deployment (`flower_run`).

The app is submitted as soon as the SuperLink listens (`submit_when_ready`, in a thread), with only a
hand-off file's path in its run config: the ServerApp's process and the simulation's Ray start while the
driver imports torch, checks the data and opens its MLflow run, and the ServerApp waits for the file
(`hand_off` writes the spec, the run id and the tracking URI to it, at once, as `flower_run.run_config`
would have put them in the run config). On a machine of 2 cores that overlap is most of a short run's
start-up (README, federated benchmark).

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
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Optional

from raybloom import ray_session, timeline
from raybloom.errors import UserError
from raybloom.flwr_config import (DRIVER_FILE, HANDOFF_KEY, RECORDED_FILE, flwr_command, flwr_env, run_args, submitted_run,
                                  write_flwr_home)
from raybloom.net import free_ports, port_open
from raybloom.pids import read_proc, signal_if_alive
from raybloom.reaper import freeze_tree
from raybloom.spec import JobSpec
from raybloom.tracking_uri import absolute_uri, tracking_uri

CONNECTION = "raybloom-sim"


def simulation_options(spec: JobSpec) -> dict[str, object]:
    """The connection's `options.*`: Flower's simulation config (SimulationConfig: whole CPUs, a GPU share)."""
    fed = spec.federated
    return {"num-supernodes": fed.clients,
            "backend.client-resources.num-cpus": fed.client_cpus,
            "backend.client-resources.num-gpus": float(fed.client_gpus),
            "backend.init-args.logging-level": os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "ERROR"),
            "backend.init-args.log-to-driver": True}


def start_simulation(spec: JobSpec, extra: Optional[dict[str, str]] = None) -> "SimulationLink | None":
    """The SuperLink of a `mode: simulation` run, spawned (and the app submitted to it as soon as it
    listens, `extra` in the run config) before the driver imports torch, prepares its data and opens its
    run; None for any other spec."""
    fed = spec.federated
    if spec.kind != "federated" or fed is None or fed.mode != "simulation":
        return None
    return SimulationLink(spec, ray_address=ray_to_join(spec)).start().submit_when_ready(extra)


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
    """A SuperLink in simulation mode for one run: `start()` spawns it, `submit_when_ready()` submits the app
    to it as soon as it listens, `hand_off()` gives the ServerApp its run, `stop()` ends its whole process
    tree (`start_simulation` and the driver do this). `with SimulationLink(spec) as link:` is one up and
    answering, for submitting with `flower_run.submit` yourself. `link.address`, `link.home` ($FLWR_HOME),
    `link.connection`."""

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
        self.handoff = self.folder / "handoff.json"
        self.submitted: Future = Future()  # Flower's run id, once `submit_when_ready` has submitted the app
        self._submitting: subprocess.Popen | None = None
        self._submitter: threading.Thread | None = None
        self._lock = threading.Lock()  # `stop` against a submission about to start its `flwr run`
        self._stopped = False

    def start(self) -> "SimulationLink":
        """Spawn the SuperLink (and its reaper) and return at once: `submit_when_ready` or `wait_ready` next."""
        write_flwr_home(self.home, self.address, name=self.connection, options=simulation_options(self.spec))
        me = read_proc(os.getpid())  # a ServerApp waiting for the hand-off gives up once this process is gone
        self.handoff.with_name(DRIVER_FILE).write_text(f"{os.getpid()} {me.start if me else 0}")
        bin_dir = Path(sys.executable).parent
        env = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # as `ray_session` sets them
               **os.environ, "FLWR_HOME": str(self.home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               "MLFLOW_TRACKING_URI": absolute_uri(tracking_uri(self.spec)),
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
        """Until the SuperLink listens (stopped, and a UserError, if it does not)."""
        failure = self._not_ready()
        if failure:
            self.stop()
            raise UserError(failure)

    def _not_ready(self) -> Optional[str]:
        """None once the SuperLink listens, else why it never will: it exited, or `timeout` passed. A port
        answering while our SuperLink has exited is someone else's."""
        deadline = time.monotonic() + self.timeout
        while not port_open(self.port) or self.proc.poll() is not None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return f"Flower's SuperLink (simulation) did not start on {self.address}: {self.log_tail() or 'no output'}"
            time.sleep(0.1)
        return None

    def submit_when_ready(self, extra: Optional[dict[str, str]] = None) -> "SimulationLink":
        """In a thread: once the SuperLink listens, `flwr run` the app with the hand-off file's path (and
        `extra`) as its run config; `submitted` holds Flower's run id or the failure."""

        def submit() -> None:
            try:
                failure = self._not_ready()
                if failure:
                    raise UserError(failure)
                cmd = flwr_command(*run_args(self.home, self.connection, {HANDOFF_KEY: str(self.handoff), **(extra or {})},
                                             "handoff"))
                with self._lock:
                    if self._stopped:
                        raise UserError("the simulation was stopped before the app was submitted")
                    self._submitting = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                        stdin=subprocess.DEVNULL, text=True, env=flwr_env(self.home))
                out, err = self._submitting.communicate(timeout=120)
                flwr_run = submitted_run(subprocess.CompletedProcess(cmd, self._submitting.returncode, out, err))
                timeline.mark("submitted")
                self.submitted.set_result(flwr_run)
            except BaseException as e:  # noqa: BLE001 - handed to `hand_off`, in the driver's thread
                self.submitted.set_exception(e)

        self._submitter = threading.Thread(target=submit, name="raybloom-flwr-run", daemon=True)
        self._submitter.start()
        return self

    def recorded(self) -> bool:
        """Whether the ServerApp says it has ended the MLflow run (a file it creates beside the hand-off: a stat,
        where asking MLflow is a query)."""
        return self.handoff.with_name(RECORDED_FILE).exists()

    def hand_off(self, config: dict[str, str]) -> str:
        """Give the submitted run's ServerApp its run config (the spec, the run id, the tracking URI: written
        whole, at once); returns Flower's run id, once the submission is through."""
        if self._submitter is None:
            raise RuntimeError("hand_off without submit_when_ready: nothing was submitted to wait for")
        tmp = self.handoff.with_suffix(".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, self.handoff)
        return self.submitted.result()

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
        still there after `grace` s; at once when the ServerApp has recorded the run (`recorded`: all is in
        MLflow, Flower's own teardown is not waited for). The reaper goes first (it must not act on a reused pid), and a process
        is its pid and start time: only those still alive are killed. A submission not yet started never
        starts; one under way is killed."""
        with self._lock:  # no `flwr run` starts after this; one under way is ended
            self._stopped = True
            if self._submitting is not None and self._submitting.poll() is None:
                self._submitting.kill()
        if self.reaper is not None:
            self.reaper.kill()
            self.reaper.wait()
            self.reaper.stdin.close()
            self.reaper = None
        if self.proc is not None:  # frozen first: a ServerApp or a Ray still being started is caught whole
            tree = [p for p in map(read_proc, freeze_tree(self.proc.pid)) if p is not None]
            for p in tree:
                signal_if_alive(p, signal.SIGTERM)
                signal_if_alive(p, signal.SIGCONT)
            try:
                self.proc.wait(0.0 if self.recorded() else grace)
            except subprocess.TimeoutExpired:
                pass
            for p in tree:
                signal_if_alive(p, signal.SIGKILL)
            self.proc.wait()
            self.proc = None  # stopped once: a second stop must not look up a pid the system may have reused
        shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, *exc) -> None:
        self.stop()

