"""Ray Train adapter: the engine inside `TorchTrainer` workers (PyTorch DDP: gloo on CPU, NCCL on GPU).

Ray is confined to four steps, as in Ray's own examples: prepare the data (each worker reads the
prepared Parquet folder and takes its shard of every global batch), prepare the model (`prepare_model`
wraps it in DDP), report (rank 0 checkpoints the engine state and writes the epochs to MLflow), fit.

Batch semantics: `train.batch_size` is per worker; the global batch is `batch_size × workers`, cut so
that the union of the workers' batch i is exactly the 1-process batch i of that global size (see
`engine.Batches`). Threads: each worker sets torch to `train.threads`, else `scaling.cpus_per_worker`.

Exactly-once metrics: rank 0 writes an epoch to MLflow only once the checkpoint that holds it is
persisted, and after a restart it first reads which steps the run already has, so epochs replayed
from a checkpoint are never written twice. The driver owns the run (opens it, ends it FINISHED, FAILED
or KILLED) and logs the final model from the last checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import tempfile
from pathlib import Path
from typing import Any

import torch

from raybloom import data, engine
from raybloom.errors import UserError
from raybloom.spec import JobSpec

STATE_FILE = "state.pt"
ENV_FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAYBLOOM_DATA_DIR",
                 "RAYBLOOM_RAY_LOG_LEVEL")


# ----------------------------------------------------------------------------------------- worker
def _load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _logged_epochs(recorder) -> int:
    """How many epochs the run already holds (an earlier attempt may have written them)."""
    steps = recorder.history("train_loss")
    return steps[-1][0] + 1 if steps else 0


class RayDataBatches:
    """A worker's shard of the Ray Data train split as (x, y) batches, locally shuffled per epoch."""

    def __init__(self, shard, batch_size: int, dataset: data.Dataset, seed: int):
        self.shard, self.batch_size, self.seed, self.epoch = shard, batch_size, seed, 0
        self.shape = dataset.shape
        self.regression = not dataset.is_classification

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for batch in self.shard.iter_torch_batches(batch_size=self.batch_size, local_shuffle_buffer_size=4 * self.batch_size,
                                                   local_shuffle_seed=self.seed * 100003 + self.epoch):
            x = batch["x"].reshape(-1, *self.shape)
            y = batch["y"].reshape(-1, 1) if self.regression else batch["y"]
            yield x, y


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    level = os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "WARNING")  # Ray Train sets INFO on the workers' loggers
    for name in ("", "ray.train"):
        logging.getLogger(name).setLevel(level)
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.train.threads or max(1, int(spec.scaling.cpus_per_worker)))
    dataset = data.load(spec.data)
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    engine.seed_everything(spec.seed)
    model = ray.train.torch.prepare_model(engine.build(spec, dataset), move_to_device=device)
    per_worker = math.ceil(len(dataset.train) / world) if spec.optim.name == "gd" else spec.train.batch_size
    if spec.scaling.ingest == "ray_data":
        batches = RayDataBatches(ray.train.get_dataset_shard("train"), per_worker, dataset, spec.seed)
    else:
        batches = engine.Batches(dataset.train, per_worker, shuffle=spec.optim.name != "gd", seed=spec.seed,
                                 rank=rank, world=world)
    tr = engine.Training(spec, dataset, model=model, batches=batches, device=device)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        tr.load_state_dict(_load_state(checkpoint))
    recorder = None
    if rank == 0:  # one writer; the other workers never import MLflow
        from raybloom import tracking

        recorder = tracking.RunRecorder(config["run_id"], config["tracking_uri"])
    logged = 0
    if recorder is not None:
        logged = _logged_epochs(recorder)
        # where the workers trained: "cuda:0 bf16 nccl x2", "cpu fp32 gloo x2"
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        recorder.set_tags({"raybloom.device": f"{device} {spec.train.precision} {backend} x{world}"})
        if checkpoint is not None:
            recorder.set_tags({"raybloom.resumed_from_epoch": tr.next_epoch})

    def flush() -> None:
        nonlocal logged
        if recorder is not None and len(tr.history) > logged:
            recorder.log_epochs([(t, tr.history[t]) for t in range(logged, len(tr.history))])
            logged = len(tr.history)

    flush()  # epochs a checkpoint holds but an interrupted attempt did not write yet
    every = spec.train.checkpoint_every
    on_epoch = config.get("on_epoch")  # e.g. a search trial's pruner: rank 0 decides, every rank stops
    while tr.next_epoch < spec.train.epochs and not tr.stopped:
        metrics = tr.run_epoch()
        t = tr.next_epoch - 1
        last = tr.stopped or tr.next_epoch >= spec.train.epochs
        halted = False
        if on_epoch is not None:
            halted = _agree(bool(rank == 0 and on_epoch(t, metrics, last)), device)
            last = last or halted
        if (every and (t + 1) % every == 0) or last:
            with tempfile.TemporaryDirectory() as d:
                ckpt = None
                if rank == 0:
                    torch.save(tr.state_dict(), Path(d) / STATE_FILE)
                    ckpt = ray.train.Checkpoint.from_directory(d)
                ray.train.report({"epoch": t, "halted": int(halted), **metrics}, checkpoint=ckpt)
            flush()
            if halted:
                return
        elif not every:
            flush()
        # No report between checkpoints: each report waits for the controller to collect the one before
        # (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), which would pace every epoch.


def _agree(decision: bool, device) -> bool:
    """Rank 0's decision, broadcast to every rank (all DDP workers must leave the loop together)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decision
    flag = torch.tensor([int(decision)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


# ----------------------------------------------------------------------------------------- driver
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
    # is unavailable; the workers' own level is set in train_loop_per_worker.
    quiet = ray.LoggingConfig(log_level=os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "ERROR"))
    previous = signal.getsignal(signal.SIGTERM)  # ray.init replaces it with sys.exit: keep the caller's
    if address:
        ray.init(address=address, log_to_driver=True, logging_config=quiet)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, logging_config=quiet,
                 object_store_memory=256 * 1024 * 1024)
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)


def check_address(address: str, source: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where no Ray cluster answers: ray.init would retry it for minutes."""
    if address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return  # Ray's own lookups, or a form Ray itself rejects with a message
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{source}: {address!r} is not a Ray address; expected HOST:PORT of the cluster's GCS "
                        "(e.g. 127.0.0.1:6379), ray://HOST:PORT, or auto")
    from raybloom.cluster.health import unreachable  # only drivers with an address get here

    reason = unreachable(hostport, timeout)
    if reason:
        raise UserError(f"{source}: no Ray cluster answers at {address} ({reason}); start one "
                        "(`raybloom cluster up`, `ray start --head`) or leave the address unset to start Ray in "
                        "this process")


def check_resources(spec: JobSpec) -> None:
    """Refuse at once what the cluster can never hold (instead of Ray waiting forever)."""
    import ray

    total = ray.cluster_resources()
    s = spec.scaling
    need_cpu = s.workers * s.cpus_per_worker
    if need_cpu > total.get("CPU", 0):
        raise UserError(f"scaling.workers: {s.workers} workers × {s.cpus_per_worker} CPU need {need_cpu:g} CPUs, "
                        f"the Ray cluster has {total.get('CPU', 0):g}; lower scaling.workers or scaling.cpus_per_worker")
    if s.use_gpu and s.workers > total.get("GPU", 0):
        raise UserError(f"scaling.use_gpu: {s.workers} workers need {s.workers} GPUs, the Ray cluster has "
                        f"{total.get('GPU', 0):g}; set scaling.use_gpu=false or add GPU nodes")


def _user_error_in(err: BaseException) -> BaseException | None:
    """The first UserError (spec, data, divergence) behind a Ray worker failure, if any."""
    stack = [err, *getattr(err, "worker_failures", {}).values()]
    seen = set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


def backend_for(use_gpu: bool) -> str:
    """The torch.distributed backend: NCCL between GPUs, gloo on CPU."""
    return "nccl" if use_gpu else "gloo"


def storage_path() -> str:
    return str(Path(os.environ.get("RAYBLOOM_RAY_STORAGE", ".raybloom/ray_results")).resolve())


def train_on_ray(spec: JobSpec, run_id: str, uri: str, *, on_epoch=None, storage: str | None = None):
    """Run `train_loop_per_worker` on `scaling.workers` DDP workers, writing epochs to run `run_id`.

    `on_epoch(epoch, metrics, last) -> bool`, if given, runs on rank 0 after every epoch (it must pickle);
    True stops every worker after a final checkpoint (`Result.metrics["halted"] == 1`). `storage`: where
    checkpoints go (default `storage_path()`, resolved in this process's directory). Returns Ray's
    Result; a user error behind a worker failure (bad data, divergence) is raised as itself.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(spec)
    check_resources(spec)
    env = {k: os.environ[k] for k in ENV_FORWARDED if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = uri
    s = spec.scaling
    datasets = None
    if s.ingest == "ray_data":
        import ray.data

        # Read up front: once the workers hold every CPU, streaming read tasks could never be scheduled.
        datasets = {"train": ray.data.read_parquet(str(Path(spec.data.path) / "train.parquet")).materialize()}
    trainer = TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        torch_config=TorchConfig(backend=backend_for(s.use_gpu)),
        train_loop_config={"spec": spec.model_dump(mode="json"), "run_id": run_id, "tracking_uri": uri,
                           "on_epoch": on_epoch},
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=f"raybloom-{run_id}", storage_path=storage or storage_path(),
                             failure_config=FailureConfig(max_failures=s.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}),
    )
    try:
        return trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised as the user error behind it, when there is one
        user = _user_error_in(e)
        if user is not None:
            raise user from None
        raise


def finish_from(result, spec: JobSpec, dataset: data.Dataset):
    """The engine's final evaluation (best weights restored, test split) of the last checkpoint."""
    training = engine.Training(spec, dataset)
    training.load_state_dict(_load_state(result.checkpoint))
    return training.finish()


def fit(spec: JobSpec):
    """Train `spec` with `scaling.workers` DDP workers on Ray; the driver owns the MLflow run."""
    from raybloom import runner, tracking

    dataset = runner.prepare(spec)
    spec = spec.with_overrides({"data.path": str(Path(dataset.meta["folder"]).resolve())})
    init_ray(spec)
    check_resources(spec)
    uri = tracking.tracking_uri(spec)
    with tracking.TrackedRun(spec, "train", tags={"raybloom.workers": str(spec.scaling.workers)}) as run:
        fit_result = finish_from(train_on_ray(spec, run.run_id, uri), spec, dataset)
        run.log_result(fit_result)
        metrics = {**{f"val_{k}": v for k, v in fit_result.val.items()}, **fit_result.final}
    return runner.RunSummary(run.run_id, run.experiment_id, metrics)
