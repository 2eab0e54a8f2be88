"""The Ray session of a driver: connect to a cluster or start Ray in this process, once, and refuse what it
can never run. Shared by Ray Train runs, searches and Flower simulations (Flower's simulation process
joins the session at `gcs_address()`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading

from raybloom.errors import UserError
from raybloom.net import unreachable
from raybloom.spec import JobSpec


def init_ray(spec: JobSpec) -> None:
    """Connect to `scaling.address` / $RAY_ADDRESS, or start Ray in this process sized to the machine."""
    import ray

    if ray.is_initialized():
        return
    address = spec.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(address, "scaling.address (--address)" if spec.scaling.address else "$RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # keep CUDA_VISIBLE_DEVICES as Ray assigns it
    # Train's controller poll (default 2 s): a checkpoint report waits for it; 0.1 s costs ~0.2 CPU-s a run
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    # ERROR: without the dashboard, Train's placement-group cleaner warns every second that the state API
    # is unavailable; the workers' own level is set in ray_train's worker loop.
    quiet = ray.LoggingConfig(log_level=os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "ERROR"))
    # Ray's thread that prints the cluster's logs imports this module the first time an autoscaler event
    # comes (ray._private.worker.filter_autoscaler_events); meanwhile this thread's import of Ray Train loads
    # ray.autoscaler._private.util, which it needs too, and one of the two imports fails with "partially
    # initialized module" (a submitted job died of it). Loaded here, before ray.init starts that thread.
    import ray.autoscaler.v2.utils  # noqa: F401
    with handler_kept(signal.SIGTERM):  # ray.init replaces it with sys.exit: keep the caller's
        if address:
            ray.init(address=address, log_to_driver=True, logging_config=quiet)
        else:
            # "local": a Ray of its own, as documented; a bare init() would join the newest `ray start` cluster
            # on the machine (its /tmp/ray/ray_current_cluster), which is another user's or test's
            _retire_reaper()  # before this Ray's processes exist: the reaper of the one before must not take them
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True,
                     logging_config=quiet, object_store_memory=256 * 1024 * 1024)
            _reap_with_this_process()


@contextlib.contextmanager
def handler_kept(sig: int):
    """The caller's handler of `sig` is put back after the block: Ray replaces SIGTERM's in `ray.init` and
    SIGINT's in Train's `fit()` (abort the controller, `sys.exit(0)` at the third), and leaves them. Main
    thread only (no other can set one)."""
    previous = signal.getsignal(sig) if threading.current_thread() is threading.main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(sig, previous)


_REAPER: list[subprocess.Popen] = []  # held for the life of the process: its pipe closes when the process ends


def _reap_with_this_process() -> None:
    """The Ray started here dies whole with this process, however it ends (SIGKILL included): a reaper holding
    a pipe from it kills the raylet's agents, which Ray itself leaves running up to a minute (`raybloom.reaper`)."""
    import ray

    _REAPER[:] = [subprocess.Popen([sys.executable, "-m", "raybloom.reaper", "--ray", str(os.getpid()),
                                    os.path.dirname(ray.__file__)],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)]  # not holding the caller's output pipes open


def _retire_reaper() -> None:
    """The reaper of a Ray this process started before (shut down since) kills what is left of it, and ends."""
    for earlier in _REAPER:
        earlier.stdin.close()
        earlier.wait()
    _REAPER.clear()


def running_here() -> bool:
    """Whether this process already has a Ray session (a search driver's), without importing Ray."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def start_for_training(spec: JobSpec) -> None:
    """The session of a Ray Train run: Ray up (or joined), and the workers the spec asks for fit in it."""
    init_ray(spec)
    check_resources(spec)


def check_address(address: str, source: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where no Ray cluster answers: ray.init would retry it for minutes."""
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return  # Ray's own lookups, or a form Ray itself rejects with a message
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{source}: {address!r} is not a Ray address; expected HOST:PORT of the cluster's GCS "
                        "(e.g. 127.0.0.1:6379), ray://HOST:PORT, or auto")
    reason = unreachable(hostport, timeout)
    if reason:
        raise UserError(f"{source}: no Ray cluster answers at {address} ({reason}); start one "
                        "(`raybloom cluster up`, `ray start --head`) or leave the address unset to start Ray in "
                        "this process")


def check_resources(spec: JobSpec) -> None:
    """Refuse at once what the cluster can never hold (instead of Ray waiting forever)."""
    import ray

    total = ray.cluster_resources()
    scaling = spec.scaling
    need_cpu = scaling.workers * scaling.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UserError(f"scaling.workers: {scaling.workers} workers × {scaling.cpus_per_worker} CPU need {need_cpu:g} "
                        f"CPUs, the Ray cluster has {total.get('CPU', 0):g}; lower scaling.workers or "
                        "scaling.cpus_per_worker")
    if scaling.use_gpu and scaling.workers > total.get("GPU", 0):
        raise UserError(f"scaling.use_gpu: {scaling.workers} workers need {scaling.workers} GPUs, the Ray cluster has "
                        f"{total.get('GPU', 0):g}; set scaling.use_gpu=false or add GPU nodes")


def cluster_cpus() -> float:
    import ray

    return float(ray.cluster_resources().get("CPU", 0))


def gcs_address() -> str:
    """Where other processes join this session's Ray (HOST:PORT of its GCS): Flower's simulation does."""
    import ray

    return ray.get_runtime_context().gcs_address


def cluster_gpus() -> float:
    import ray

    return float(ray.cluster_resources().get("GPU", 0))


def use_ray_token(token: str) -> None:
    """Token auth for this process's Ray client code (Jobs API, state API), through Ray's own variables.
    Ray reads them once, when its core is first imported, and has no public way to read them again: so
    this must come before Ray is imported (the CLI imports Ray lazily, after it)."""
    if "ray._raylet" in sys.modules and os.environ.get("RAY_AUTH_TOKEN") != token:
        raise RuntimeError("the Ray token must be set before Ray is imported in this process "
                           "(set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the environment instead)")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
