"""Ray Train adapter: the engine inside `TorchTrainer` workers (PyTorch DDP: gloo on CPU, NCCL on GPU).

Ray is confined to four steps, as in Ray's own examples: prepare the data (each worker reads the splits
it trains and validates on from the prepared Parquet folder the driver pinned, and takes its shard of
every global batch), prepare the model (`prepare_model` wraps it in DDP), report (the engine's epoch loop
calls `EpochReporter`: checkpoints and reports, rank 0 writes the epochs to MLflow), fit.

Batch semantics: `train.batch_size` is per worker; the global batch is `batch_size × workers`, cut so
that the union of the workers' batch i is exactly the 1-process batch i of that global size (see
`data.Batches`). Threads: each worker sets torch to `train.threads`, else `scaling.cpus_per_worker`.

Exactly-once metrics: rank 0 writes an epoch to MLflow only once the checkpoint that holds it is
persisted, and after a restart it first reads which steps the run already has, so epochs replayed
from a checkpoint are never written twice. The driver owns the run (opens it, ends it FINISHED, FAILED
or KILLED) and logs the final model from the last checkpoint.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from raybloom import data, engine, pids, ray_session, timeline
from raybloom.errors import TrackingLost, UserError
from raybloom.job import prepare_job
from raybloom.spec import JobSpec

STATE_FILE = "state.pt"
RNG_FILE = "rng_rank{}.pt"  # each rank's RNG states, in the same checkpoint folder (Ray merges the ranks' uploads)
CHECKPOINT_PREFIX = "raybloom-checkpoint-"  # + "<pid>.<start time>-": a rank's local part before Ray uploads it
# Fault injection (tests): "rank0_dies_writing_checkpoint=E": in a run's first attempt, rank 0 writes half of
# epoch E's checkpoint file and SIGKILLs itself, as a crash in the middle of the write would leave it.
FAILPOINT = "RAYBLOOM_FAILPOINT"
INGEST_BLOCK_BYTES, INGEST_AHEAD_BLOCKS = 8 * 2**20, 4  # ray_data: block size, blocks read ahead per worker
READ_TASK_BASE_BYTES = 128 * 2**20  # a Ray Data read task's process, before the shard it decodes
READ_TASK_SHARD_CAP_BYTES = 256 * 2**20  # shards past this still read a row group (~4 MB) at a time
PREFETCH_ENV = "RAYBLOOM_INGEST_PREFETCH"  # ray_data: blocks a worker fetches ahead (see ingest_prefetch)
ENV_FORWARDED = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAYBLOOM_DATA_DIR",
                 "RAYBLOOM_RAY_LOG_LEVEL", timeline.ENV, FAILPOINT)


# ----------------------------------------------------------------------------------------- worker
def _load_state(checkpoint) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _load_rng(checkpoint, rank: int, world: int) -> Optional[dict[str, Any]]:
    """Rank `rank`'s RNG states as they were at the checkpoint's epoch; None where it was written by a
    different number of ranks (each rank then goes on with the RNGs the seed gives it)."""
    with checkpoint.as_directory() as d:
        mine = Path(d) / RNG_FILE.format(rank)
        if len(list(Path(d).glob(RNG_FILE.format("*")))) != world or not mine.exists():
            return None
        return torch.load(mine, map_location="cpu", weights_only=True)


def _save_state(state: dict[str, Any], path: Path, epoch: int, first_attempt: bool) -> None:
    if first_attempt and os.environ.get(FAILPOINT) == f"rank0_dies_writing_checkpoint={epoch}":
        import ray.train
        from ray.train import CheckpointConsistencyMode

        # it blocks until every earlier report is committed: the checkpoint before is complete, however
        # slowly its background upload went, and the resume's epoch is the same on every machine
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getvalue()[: buffer.tell() // 2])
        print(f"{FAILPOINT}: rank 0 dies with {buffer.tell() // 2} of {buffer.tell()} bytes of epoch {epoch}'s "
              f"checkpoint written to {path}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save(state, path)


@functools.cache
def _folder_prefix(pid: int) -> str:
    """This process's checkpoint folder prefix, read from /proc once per process (not at every checkpoint)."""
    me = pids.read_proc(pid)  # None without /proc: a folder no sweep would know to be a dead worker's
    return f"{CHECKPOINT_PREFIX}{me.pid}.{me.start}-" if me else CHECKPOINT_PREFIX


def _checkpoint_folder() -> Path:
    """A new local folder for this rank's part of a checkpoint; Ray deletes it once it is uploaded."""
    return Path(tempfile.mkdtemp(prefix=_folder_prefix(os.getpid())))


def _sweep_checkpoint_folders() -> None:
    """Remove the local checkpoint folders of workers that died before Ray uploaded them (a worker killed in
    the middle of a checkpoint leaves one, the model's state in it): those whose process, pid and start
    time, no longer runs. A live worker's, on this node, are left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{CHECKPOINT_PREFIX}*.*-*"):
        pid, _, start = folder.name[len(CHECKPOINT_PREFIX):].partition("-")[0].partition(".")
        if pid.isdigit() and start.isdigit() and not pids.alive(int(pid), int(start)):
            shutil.rmtree(folder, ignore_errors=True)


class RayDataBatches:
    """A worker's shard of the Ray Data train split, streamed, as (x, y) batches: the blocks this epoch's
    (reshuffled) file order hands this worker are copied into a ShuffleBuffer of `data.shuffle_buffer` rows
    (the one in-process streaming uses: rows in their stored dtype) and leave it as tensors. Each block is
    let go once copied, so the object store can reuse its memory: Ray's own local shuffle concatenates
    and copies Arrow blocks (at 16,384 rows of 784 uint8 it held about 40 MB more here), and its torch
    conversion builds one Python object per row.

    `prefetch` (default: `ingest_prefetch()`) is Ray Data's `prefetch_batches`, in blocks here. Its
    pipeline of threads and queues pins several blocks per batch prefetched (2 M rows here: 8 blocks, 46 MB,
    per worker at 1; 3 at 0; results/scale-store.md), so prefetching pays only where it hides a transfer
    from another node."""

    def __init__(self, shard, batch_size: int, dataset: data.Dataset, seed: int, buffer_rows: int = 16384,
                 prefetch: Optional[int] = None):
        self.shard, self.batch_size, self.seed, self.epoch = shard, batch_size, seed, 0
        self.buffer_rows = buffer_rows
        self.meta = dataset.meta
        self.prefetch = ingest_prefetch() if prefetch is None else prefetch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from raybloom.data.streamed import shuffled_batches

        blocks = self.shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=self.prefetch)
        yield from shuffled_batches((("the Ray Data train split", b) for b in blocks), self.meta, self.batch_size,
                                    self.buffer_rows, np.random.default_rng([self.seed, self.epoch]))


def ingest_prefetch() -> int:
    """Blocks a `ray_data` worker fetches ahead: none on a one-node Ray, where every block is in the local
    object store already and prefetching only pins more of it (2 M rows here: the store held a median 142 MB
    during the epoch at 1, 72 MB at 0; results/scale-store.md); one on a cluster, to hide the next block's
    transfer from another node. RAYBLOOM_INGEST_PREFETCH=N sets it. The driver decides, once per run."""
    import ray

    if os.environ.get(PREFETCH_ENV, "").strip():
        try:
            return max(0, int(os.environ[PREFETCH_ENV]))
        except ValueError:
            raise UserError(f"{PREFETCH_ENV}={os.environ[PREFETCH_ENV]!r} is not a whole number of blocks "
                            f"(e.g. 0 or 1; unset: 0 on one node, 1 on a cluster)") from None
    return 0 if sum(1 for n in ray.nodes() if n.get("Alive")) <= 1 else 1


def _agree(decision: bool, device) -> bool:
    """Rank 0's decision, broadcast to every rank (all DDP workers must leave the loop together)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return decision
    flag = torch.tensor([int(decision)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


class MetricsWriter:
    """Rank 0's MLflow writes, off the training step: a thread writes the epochs handed to it in order, each
    batch only once the checkpoint holding those epochs is committed (`after`: uploaded, in the background,
    `CheckpointUploadMode.ASYNC`, and registered by Train's controller, so a restart resumes from it). Exactly
    once, also across restarts: it starts from the steps the run already has. The epochs handed over within
    `interval` seconds of the last write go in one MLflow write, after one wait for the latest of their
    checkpoints: a write and a wait cost rank 0 some milliseconds of CPU (and of the GIL) each, which DDP's
    other ranks would wait for at the next step. A write that fails is raised in the training loop at the next
    epoch (`check`) or at `close`, which waits for every write handed to it.

    The recorder is opened before training (MLflow's import, the store's set-up): in a thread it would only
    contend for the GIL with DDP's set-up and take longer."""

    def __init__(self, recorder, interval: float = 1.0):
        steps = recorder.history("train_loss")  # an earlier attempt may have written some epochs already
        self.logged = steps[-1][0] + 1 if steps else 0
        self.interval = interval
        self.tasks: queue.Queue = queue.Queue()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._work, args=(recorder,), name="raybloom-mlflow", daemon=True)
        self.thread.start()

    def write(self, epochs: list[dict[str, float]], upto: int, after: Optional[int] = None) -> None:
        """Write epochs [logged, upto) of `epochs` (the training's history), once checkpoint epoch `after` is persisted."""
        self.check()
        self.tasks.put((epochs, upto, after))

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self, failing: bool = False) -> None:
        """Wait for every write handed over. `failing`: the training raised; what is queued still reaches
        MLflow (for at most a minute: a checkpoint that never persists is not waited for), and the
        training's error, not a write's, is the one raised."""
        self.tasks.put(None)
        self.thread.join(60.0 if failing else None)
        if not failing:
            self.check()

    def _handed_over(self, since: float) -> tuple[list[tuple], bool]:
        """The next task and those handed over until `interval` after `since` (at once on `close`); closing?"""
        first = self.tasks.get()
        tasks = [] if first is None else [first]
        while first is not None:
            try:
                task = self.tasks.get(timeout=max(0.0, since + self.interval - time.monotonic()))
            except queue.Empty:
                break
            if task is None:
                return tasks, True
            tasks.append(task)
        return tasks, first is None

    def _work(self, recorder) -> None:
        try:
            written, closing = -math.inf, False
            while not closing:
                tasks, closing = self._handed_over(written)
                if not tasks:
                    continue
                epochs, upto = tasks[-1][0], max(t[1] for t in tasks)
                after = max((t[2] for t in tasks if t[2] is not None), default=None)
                if after is not None:  # its checkpoint's commit is also that of those before it
                    _wait_persisted(after)
                if upto > self.logged:
                    recorder.log_steps([(t, epochs[t]) for t in range(self.logged, upto)])
                    self.logged = upto
                written = time.monotonic()
        except BaseException as e:  # noqa: BLE001 - handed to the training loop, which raises it
            self.error = e


def _checkpoint_name(epoch: int, attempt: str) -> str:
    return f"epoch_{epoch:06d}-{attempt}"


def _epoch_of(checkpoint) -> int:
    name = Path(checkpoint.path).name if checkpoint is not None else ""
    epoch = name.removeprefix("epoch_").split("-")[0]
    return int(epoch) if name.startswith("epoch_") and epoch.isdigit() else -1


def _wait_persisted(epoch: int, poll_s: float = 0.05) -> None:
    """Until Ray Train has committed the checkpoint of `epoch` (uploaded, and registered by the controller:
    what a restart resumes from), or a later one: reports are committed in order."""
    import ray.train
    from ray.train import CheckpointConsistencyMode

    while True:  # the call blocks until every report made so far is committed
        reported = ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)
        if any(_epoch_of(r.checkpoint) >= epoch for r in reported):
            return
        time.sleep(poll_s)


class EpochReporter:
    """The worker's epoch hook. Rank 0's stop decision (`decide`, e.g. a search trial's pruner) is agreed by
    every rank; a checkpoint goes with a report every `train.checkpoint_every` epochs and at the last one,
    uploaded by Ray in the background; rank 0's `MetricsWriter` writes each epoch to MLflow once the
    checkpoint holding it is persisted (exactly once, also across restarts).

    No report between checkpoints: each report waits for the controller to collect the one before (it polls
    every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), which would pace every epoch."""

    def __init__(self, training: engine.Training, rank: int, device, writer: Optional[MetricsWriter], decide=None,
                 resumed: bool = False):
        self.training, self.rank, self.device, self.writer, self.decide = training, rank, device, writer, decide
        self.resumed = resumed
        self.every = training.spec.train.checkpoint_every
        self.attempt = uuid.uuid4().hex[:8]  # checkpoint folder names stay unique when a restart replays an epoch

    def flush(self, after: Optional[int] = None) -> None:
        if self.writer is not None:
            self.writer.write(self.training.history, len(self.training.history), after)

    def __call__(self, t: int, metrics: dict[str, float], last: bool) -> bool:
        import ray.train
        from ray.train import CheckpointUploadMode

        timeline.mark(f"epoch_end {t} rank{self.rank}")
        if self.writer is not None:
            self.writer.check()
        halted = False
        if self.decide is not None:
            halted = _agree(bool(self.rank == 0 and self.decide(t, metrics, last)), self.device)
            last = last or halted
        if (self.every and (t + 1) % self.every == 0) or last:
            # every rank's folder goes to the same checkpoint (Ray agrees its name): rank 0's the training
            # state, each rank its own RNG states (a resumed rank goes on with its own draws; no collective)
            folder = _checkpoint_folder()
            if self.rank == 0:
                _save_state(self.training.state_dict(), folder / STATE_FILE, t, not self.resumed)
            torch.save(self.training.rng_states(), folder / RNG_FILE.format(self.rank))
            ckpt = ray.train.Checkpoint.from_directory(str(folder))
            ray.train.report({"epoch": t, "halted": int(halted), **metrics}, checkpoint=ckpt,
                             checkpoint_dir_name=_checkpoint_name(t, self.attempt),
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
            self.flush(after=t)
        elif not self.every:
            self.flush()
        return halted

    def close(self, failing: bool = False) -> None:
        """Every epoch written (after the last checkpoint is persisted)."""
        if self.writer is not None:
            self.writer.close(failing)


def _worker_training(spec: JobSpec, config: dict[str, Any], rank: int, world: int, device) -> engine.Training:
    """The engine's Training on one worker: the splits it reads, the DDP model, its shard of every batch."""
    import ray.train
    import ray.train.torch

    ray_data = spec.scaling.ingest == "ray_data"
    if ray_data:  # training rows come from Ray Data; validation is streamed from its shards
        dataset = data.load(spec.data, splits=("val",), meta=config["meta"], stream=("val",))
    else:  # in memory, checked to fit first
        dataset = data.load(spec.data, splits=("train", "val"), meta=config["meta"])
    engine.seed_everything(spec.seed)
    model = ray.train.torch.prepare_model(engine.build(spec, dataset), move_to_device=device)
    full_batch = spec.optim.name == "gd"
    per_worker = math.ceil(config["train_rows"] / world) if full_batch else spec.train.batch_size
    if ray_data:
        batches = RayDataBatches(ray.train.get_dataset_shard("train"), per_worker, dataset, spec.seed,
                                 spec.data.shuffle_buffer, config["prefetch"])
    else:
        batches = data.Batches(dataset.train, per_worker, shuffle=not full_batch, seed=spec.seed, rank=rank, world=world)
    return engine.Training(spec, dataset, model=model, batches=batches, device=device)


def _rank0_recorder(config: dict[str, Any], tags: dict[str, Any]):
    """Rank 0's writer to the driver's run (the other workers never import MLflow)."""
    from raybloom import tracking

    recorder = tracking.RunRecorder(config["run_id"], config["tracking_uri"])
    recorder.set_tags(tags)
    timeline.mark("recorder_open rank0")
    return recorder


# ------------------------------------------------------------------------------- halting restarts
HALT_FILE = "raybloom-halt.json"


def halt_uri(storage: str, run_id: str) -> str:
    """Where a worker leaves an error no restart can mend (in the run's Ray storage: every node sees it)."""
    return f"{storage.rstrip('/')}/raybloom-{run_id}/{HALT_FILE}"


def _halt_file(uri: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(uri)


def _halted(fs, path: str) -> bool:
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_halt(uri: str) -> Optional[BaseException]:
    """The error left there, rebuilt as its raybloom.errors class from the arguments its `__reduce__` gives
    (JSON: nothing is unpickled)."""
    from raybloom import errors

    fs, path = _halt_file(uri)
    if not _halted(fs, path):
        return None
    try:
        with fs.open_input_stream(path) as f:
            left = json.loads(f.read())
        cls = getattr(errors, str(left["type"]), UserError)
        return (cls if isinstance(cls, type) and issubclass(cls, UserError) else UserError)(*left["args"])
    except (OSError, ValueError, KeyError, TypeError):
        return UserError(f"a worker stopped the run with an error it could not leave whole in {uri}")


def _write_halt(uri: str, err: BaseException) -> None:
    try:
        fs, path = _halt_file(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with fs.open_output_stream(temp) as f:
            f.write(json.dumps({"type": type(err).__name__, "args": list(err.__reduce__()[1])}).encode())
        fs.move(temp, path)  # whole or not at all: ranks failing together each write their own, then rename
    except Exception:  # noqa: BLE001 - the error the worker raises is the one that matters
        pass


def clear_halt(uri: str) -> None:
    fs, path = _halt_file(uri)
    if _halted(fs, path):
        fs.delete_file(path)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """A worker's training. A UserError (the MLflow server lost, bad data, a diverged loss) is one no restart
    mends: the worker leaves it in the run's storage before it raises, and the next attempt's workers return
    at once, so Ray's restarts (`scaling.max_failures`, even -1: forever) end there and the driver raises it."""
    halt = config.get("halt")
    if halt and read_halt(halt) is not None:
        return  # an earlier attempt met it: the driver raises it
    try:
        _train(config)
    except UserError as e:
        if halt:
            _write_halt(halt, e)
        raise


def _train(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    timeline.mark("worker_entry")
    _sweep_checkpoint_folders()
    level = os.environ.get("RAYBLOOM_RAY_LOG_LEVEL", "WARNING")  # Ray Train sets INFO on the workers' loggers
    for name in ("", "ray.train"):
        logging.getLogger(name).setLevel(level)
    spec = JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.train.threads or max(1, int(spec.scaling.cpus_per_worker)))
    device = ray.train.torch.get_device() if spec.scaling.use_gpu else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()
    state = _load_state(checkpoint) if checkpoint is not None else None
    writer = None
    if rank == 0:
        # where the workers train: "cuda:0 bf16 nccl x2", "cpu fp32 gloo x2"
        backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
        tags = {"raybloom.device": f"{device} {spec.train.precision} {backend} x{world}"}
        if state is not None:
            tags["raybloom.resumed_from_epoch"] = len(state["history"])
        writer = MetricsWriter(_rank0_recorder(config, tags))
    training = _worker_training(spec, config, rank, world, device)
    if state is not None:
        training.load_state_dict(state)
        rng = _load_rng(checkpoint, rank, world)
        if rng is not None:
            training.set_rng_states(rng)
    timeline.mark(f"worker_ready rank{rank}")
    reporter = EpochReporter(training, rank, device, writer, config.get("rank0_hook"), resumed=state is not None)
    reporter.flush()  # epochs a checkpoint holds but an interrupted attempt did not write yet
    try:
        training.run_epochs([reporter])
    except BaseException:
        reporter.close(failing=True)  # the epochs before the error are recorded, as they would be in process
        raise
    reporter.close()


# ----------------------------------------------------------------------------------------- driver
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


def train_on_ray(spec: JobSpec, dataset: data.Dataset, run_id: str, uri: str, *,
                 rank0_hook: Optional[engine.EpochHook] = None, storage: str | None = None):
    """Run `train_loop_per_worker` on `scaling.workers` DDP workers, writing epochs to run `run_id`.

    The Ray session is the caller's (`ray_session.start_for_training`); `spec.data.path` is the prepared
    folder and `dataset` the driver's copy of it (the workers take its metadata and size from here).
    `rank0_hook(epoch, metrics, last) -> stop?`, if given, runs on rank 0 after every epoch (it must pickle);
    True stops every worker after a final checkpoint (`Result.metrics["halted"] == 1`). `storage`: where
    checkpoints go (default `storage_path()`, resolved in this process's directory). Returns Ray's
    Result; a user error behind a worker failure (bad data, divergence) is raised as itself.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: os.environ[k] for k in ENV_FORWARDED if k in os.environ}
    env["MLFLOW_TRACKING_URI"] = uri
    scaling = spec.scaling
    datasets = {"train": streamed_train_split(spec)} if scaling.ingest == "ray_data" else None
    halt = halt_uri(storage or storage_path(), run_id)
    clear_halt(halt)  # a resumed run's: that error is what it resumes from
    trainer = TorchTrainer(
        train_loop_per_worker,
        datasets=datasets,
        dataset_config=DataConfig(execution_options=ingest_options(scaling)) if datasets else None,
        torch_config=TorchConfig(backend=backend_for(scaling.use_gpu)),
        train_loop_config={"spec": spec.model_dump(mode="json"), "meta": dataset.meta, "train_rows": len(dataset.train),
                           "run_id": run_id, "tracking_uri": uri, "rank0_hook": rank0_hook, "halt": halt,
                           "prefetch": ingest_prefetch() if scaling.ingest == "ray_data" else 0},
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=f"raybloom-{run_id}", storage_path=storage or storage_path(),
                             failure_config=FailureConfig(max_failures=scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             worker_runtime_env={"env_vars": env}),
    )
    timeline.mark("trainer_fit")
    try:
        with ray_session.handler_kept(signal.SIGINT):  # after fit(), the caller's again
            result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised as the user error behind it, when there is one
        user = read_halt(halt) or _user_error_in(e)
        if user is not None:
            raise user from None
        from ray.train import TrainingFailedError

        if isinstance(e, TrainingFailedError):  # workers died more often than the restarts allowed
            raise UserError(f"the training failed on Ray after scaling.max_failures={scaling.max_failures} "
                            f"worker-group restart(s): {_failures(e)}") from None
        raise
    stopped = read_halt(halt)  # a restart after it returned at once
    if stopped is not None:
        raise stopped
    return result


def _failures(err: BaseException) -> str:
    """What each worker (or the controller) died of, a line each."""
    found = getattr(err, "worker_failures", None) or {"controller": getattr(err, "controller_failure", err)}
    return "; ".join(f"{'rank ' if isinstance(who, int) else ''}{who}: {type(e).__name__}: "
                     f"{(str(e).strip().splitlines() or [''])[0][:300]}" for who, e in sorted(found.items(), key=str))


def streamed_train_split(spec: JobSpec):
    """The training split as a Ray Data dataset read from its shards, never materialized: each epoch the
    shard order is reshuffled (seeded by `seed` and the epoch), or with `data.shuffle: full` every row."""
    import ray.data
    from ray.data.datasource import FileShuffleConfig

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # per-operator bars, every epoch, on every terminal
    # Blocks of a few MB (Ray's default is up to 128 MB): a worker holds a block while it batches from it,
    # and small blocks keep what is in flight, and so the object-store pages a worker touches, small.
    ctx.target_max_block_size = INGEST_BLOCK_BYTES
    paths = data.split_files(Path(spec.data.path), "train")
    # The read tasks ask for no CPU: Train's workers may hold every CPU of a small cluster, and the reads
    # must run beside them (they are what the workers wait on). Without a CPU to count, Ray would run any
    # number at once (dozens of new worker processes on 2 cores): one read in flight per training worker.
    # They ask for the memory they use instead: a worker process and a shard decoded (measured here: about
    # 230 MB for 32 MB shards), which Ray schedules by (and without which it warns, for tasks of no CPU).
    largest = max((p.stat().st_size for p in paths if p.exists()), default=0)
    memory = READ_TASK_BASE_BYTES + 4 * min(largest, READ_TASK_SHARD_CAP_BYTES)  # a reservation a node can hold
    ds = ray.data.read_parquet([str(p) for p in paths], shuffle=FileShuffleConfig(seed=spec.seed), num_cpus=0,
                               memory=memory, concurrency=max(2, spec.scaling.workers))
    if spec.data.shuffle != "full":
        return ds
    # The shuffle's tasks too ask for no CPU (asking for one, they wait forever where the workers hold every
    # CPU), and for a shard's memory.
    return ds.random_shuffle(num_cpus=0, memory=memory)


def ingest_options(scaling):
    """Ray Data's options for the streamed training split: Train's ingest defaults, with the object store
    the reads may fill bounded to INGEST_AHEAD_BLOCKS blocks per worker. Unbounded, the reads (faster than
    training) run ahead until half the object store is full, and each worker ends up mapping most of the
    store: its RSS grows with the data read, up to the store's size. (With a limit set, Train no longer
    takes its workers' CPUs out of Ray Data's plan, and Ray Data refuses both a limit and an exclusion for
    CPUs: the reads ask for no CPU, so nothing here plans on the workers' CPUs.)"""
    from ray.data import ExecutionResources
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    ahead = ExecutionResources(object_store_memory=INGEST_AHEAD_BLOCKS * scaling.workers * INGEST_BLOCK_BYTES)
    options.resource_limits = options.resource_limits.min(ahead)
    return options


def finish_from(result, spec: JobSpec, dataset: data.Dataset) -> engine.FitResult:
    """The engine's final evaluation (best weights restored, test split) of the last checkpoint."""
    training = engine.Training(spec, dataset)
    training.load_state_dict(_load_state(result.checkpoint))
    return training.finish()


def check_workers_fit(job) -> None:
    """`ingest: arrays`: every worker holds the training and validation splits. With Ray started here, all of
    them share this machine; on a cluster each worker checks its own memory when it loads them."""
    local = not (job.spec.scaling.address or os.environ.get("RAY_ADDRESS"))
    rows = {"train": len(job.dataset.train), "val": len(job.dataset.val)}
    data.check_fits(job.dataset.meta, rows, Path(job.dataset.meta["folder"]), copies=job.spec.scaling.workers if local else 1)


def fit(spec: JobSpec, resume: Optional[str] = None):
    """Train `spec` with `scaling.workers` DDP workers on Ray; the driver owns the MLflow run. `resume`: a run
    id (or "latest") an MLflow outage stopped: the same run goes on from its latest Ray checkpoint."""
    from raybloom import outbox, results, runner, tracking  # the driver's: workers never import MLflow

    # the driver never trains: its training split stays on disk (and with ray_data, validation and test too)
    timeline.mark("driver_fit")
    # before any preparing; the same spec (scaling.workers too) trained where this one does
    kept = outbox.find(spec, resume) if resume is not None else None
    job = prepare_job(spec, stream=("train",) if spec.scaling.ingest == "arrays" else data.SPLITS)
    if spec.scaling.ingest == "arrays":
        check_workers_fit(job)
    timeline.mark("data_prepared")
    ray_session.start_for_training(job.spec)
    timeline.mark("ray_up")
    uri = tracking.tracking_uri(job.spec)
    with tracking.TrackedRun(job.spec, "train", tags={"raybloom.workers": str(spec.scaling.workers)},
                             resume_run_id=kept.run_id if kept else None) as run:
        timeline.mark("run_opened")
        # a resumed run's checkpoints are where the outbox says (whatever the storage setting is now)
        storage = str(Path(kept.checkpoints).parent) if kept is not None and kept.checkpoints else None
        try:  # a resumed run's trainer (same name, same storage) restores its latest checkpoint
            if storage is not None and not Path(kept.checkpoints).is_dir():
                raise UserError(f"--resume {kept.run_id}: its Ray checkpoints are gone from {kept.checkpoints}")
            result = train_on_ray(job.spec, job.dataset, run.run_id, uri, storage=storage)
            timeline.mark("trainer_returned")
            fit_result = finish_from(result, job.spec, job.dataset)
            timeline.mark("tested")
            results.record_result(run, fit_result)  # the server may go away here too: the last checkpoint has it all
        except TrackingLost as e:
            where = Path(storage or storage_path()) / f"raybloom-{run.run_id}"  # a resumed run's: where it was
            folder = outbox.keep(run.run_id, spec, str(e), checkpoints=str(where))
            raise outbox.lost(e, run.run_id, folder, f"Ray's checkpoints (with every epoch's metrics) in {where}, "
                              "and where they are") from None
        timeline.mark("recorded")
    if kept is not None:
        outbox.drop(kept)
    timeline.mark("run_closed")
    return runner.RunSummary(run.run_id, run.experiment_id, runner.summary_metrics(fit_result))
