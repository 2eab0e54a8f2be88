"""Benchmark: raybloom on Ray Train (2 DDP workers) vs a hand-written torch.distributed script; start-up; ingest.

Three acceptance items of the Ray issue, all on jobs/cnn_digits.yaml with augmentation off
(`regularization.augment.shift=0`, so both sides do the same work), `train.threads=1`, batch 32 per worker:

(a) Whole epochs, target raybloom / hand-written <= 1.10: what a user waits for per epoch.
    raybloom: `ray_train.fit(spec)` with `scaling.workers=2`, `tracking.log_model=false`, a checkpoint every
    epoch; rank 0's whole epochs (one epoch's end to the next: training pass, validation, checkpoint,
    `ray.train.report`, MLflow write) from its `raybloom.timeline` marks, the epochs after the warm-up ones.
    hand-written: `_handwritten_worker`, two processes from `torch.multiprocessing.spawn`, gloo over
    tcp://127.0.0.1, one torch thread each, the model of `raybloom.engine.build` (same seed) in
    `DistributedDataParallel`, the data of `raybloom.data.load`, one seeded permutation per epoch with each
    global batch of 2 x 32 cut in halves (what `data.Batches` does), Adam at the same lr,
    forward / cross_entropy / backward / step; then the same per-epoch work: the validation loss and
    accuracy, and on rank 0 a `torch.save` of model and optimizer and one MLflow write of the epoch's
    metrics; its whole epoch is one epoch's start to the next (`time.perf_counter`).
    The two sides alternate (Ray first, then hand-written first, ...), so load from other processes hits
    both alike. Reported: the ratio of the medians of the pooled steady-state epochs, and the per-round
    ratios as spread; the training pass alone (`epoch_seconds`) as information.
(b) Fixed start-up cost (no target): `import ray`, `ray_session.init_ray` (Ray started in this process) and,
    for every Ray fit, the time from the `fit()` call to the start of epoch 0's training pass, estimated from
    MLflow as t(epoch 0 metric written) - epoch_seconds[0] - (median per-epoch non-training time: validation,
    checkpoint, `ray.train.report`, MLflow write); versus the same for the in-process path
    (`raybloom.runner.train_in_process` with `scaling.workers=0`). Also: the per-epoch non-training time and the tail (last
    epoch written -> `fit()` returns).
(c) Ingest rate delivered to one worker (rank 0 of 2), in samples/s: `arrays` (`data.Batches` over the
    in-memory split) and `ray_data` (read_parquet of the shards, streamed, streaming_split(2, equal=True)[0],
    read through `ray_train.RayDataBatches`, i.e. iter_torch_batches(batch_size=32, local_shuffle_buffer_size=
    data.shuffle_buffer) plus the reshape; split 1 is drained at the same time by a Ray task, as the second worker would). Versus
    what cnn_digits consumes on one worker: train samples per worker per epoch / median epoch_seconds of (a).
    Target: the default (arrays) >= 10x that.

Where the time goes: during each run of (a) a thread samples /proc every second and sums the CPU seconds of
every process of this process tree by name (ray::RayTrainWorker, ray::TrainController, raylet, ...; with its
nice value: Ray runs its workers at nice 15).

Noise: besides the load average, the script measures how many cores processes *outside* its own process tree
(the Ray daemons and workers it starts, the spawned DDP processes) used during each phase; a run where others
used > 0.25 core on average is flagged noisy. `--wait-quiet S` first waits (up to S seconds) for a 1-minute
load average < 1.0.

Diagnostics (off by default, recorded in the results): `--ray-poll-s S` sets RAY_TRAIN_HEALTH_CHECK_INTERVAL_S
(Ray's default 2 s): each `ray.train.report` waits for the controller to collect the previous one, so the poll
interval paces the epochs. `--ray-worker-niceness N` sets RAY_worker_niceness (Ray's default 15) and `--hand-nice N`
renices the hand-written processes: on a busy machine a nice-15 worker loses the CPU to every nice-0 process,
which the hand-written side (nice 0) does not.

    .venv/bin/python tests/benchmarks/bench_ray.py [--quick] [--rounds 6] [--epochs 12] [--wait-quiet 600]
        [--ray-poll-s S] [--ray-worker-niceness N] [--hand-nice N] [--strict]

Writes tests/benchmarks/results/ray.json and ray.md (--quick: ray-quick.json / ray-quick.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import raybloom  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "platform"))

import torch

from raybloom import data as data_mod
from raybloom import engine
from raybloom import spec as spec_mod

import benchlib  # noqa: E402 - beside this script
from benchlib import OthersMeter, SampledOthersMeter, loadavg, quartiles, wait_quiet  # noqa: E402

TARGET_EPOCH_RATIO = 1.10  # (a) raybloom-on-Ray epoch / hand-written DDP epoch, at most
TARGET_INGEST_RATIO = 10.0  # (c) arrays ingest rate / consumption rate, at least
NOISE_CORES = 0.25  # others using more than this many cores on average -> noisy
DEFAULT_SPEC = ROOT / "jobs" / "cnn_digits.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
WORLD = 2


# ------------------------------------------------------------------------------------------ hand-written DDP
def _handwritten_worker(rank: int, world: int, port: int, spec_json: dict, epochs: int, out_dir: str,
                        nice: int = 0, run_id: str = "") -> None:
    """One process of the hand-written reference (the target of torch.multiprocessing.spawn). Every epoch it
    does the work raybloom's epoch does: the training pass, the validation loss and accuracy, and on rank 0
    a `torch.save` of model and optimizer and one MLflow write of the epoch's metrics (to the store the
    raybloom runs use). Times: the training pass, and the whole epoch (its start to the next one's)."""
    import torch.distributed as dist
    from torch.nn import functional as F
    from torch.nn.parallel import DistributedDataParallel

    if nice:
        os.nice(nice)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec = spec_mod.JobSpec.model_validate(spec_json)
        dataset = data_mod.load(spec.data)
        if rank == 0 and run_id:
            import mlflow

            mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        engine.seed_everything(spec.seed)
        model = DistributedDataParallel(engine.build(spec, dataset))
        optimizer = torch.optim.Adam(model.parameters(), lr=spec.optim.lr)
        x, y = dataset.train.x, dataset.train.y
        vx, vy = dataset.val.x, dataset.val.y
        n, step = len(x), spec.train.batch_size * world
        times, starts, samples = [], [], 0
        for epoch in range(epochs):
            model.train()
            t0 = time.perf_counter()
            starts.append(t0)
            order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed * 100003 + epoch))
            total = 0.0
            for start in range(0, n, step):
                idx = order[start:start + step].tensor_split(world)[rank]
                xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                if epoch == 0:
                    samples += len(idx)
            times.append(time.perf_counter() - t0)
            model.eval()
            with torch.no_grad():
                out = model.module(vx)
                metrics = {"train_loss": total / max(samples, 1), "val_loss": float(F.cross_entropy(out, vy)),
                           "val_accuracy": float((out.argmax(1) == vy).float().mean()), "epoch_seconds": times[-1]}
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
                           Path(out_dir, "checkpoint.pt"))
                if run_id:
                    mlflow.log_metrics(metrics, step=epoch, run_id=run_id)
        whole = [b - a for a, b in zip(starts, starts[1:])]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"epoch_seconds": times, "whole_epoch_seconds": whole,
                                                                 "samples_per_epoch": samples}))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def handwritten(spec, epochs: int, nice: int = 0, client=None) -> dict:
    import torch.multiprocessing as mp

    run_id = ""
    if client is not None:  # the same kind of store raybloom writes to, one run per hand-written run
        run_id = client.create_run(client.get_experiment_by_name(spec.experiment).experiment_id).info.run_id
    with tempfile.TemporaryDirectory(prefix="raybloom-bench-ddp-") as out:
        t0 = time.perf_counter()
        mp.spawn(_handwritten_worker, args=(WORLD, free_port(), spec.model_dump(mode="json"), epochs, out, nice, run_id),
                 nprocs=WORLD, join=True)
        wall = time.perf_counter() - t0
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]
    if client is not None:
        client.set_terminated(run_id)
    return {"epoch_seconds": ranks[0]["epoch_seconds"], "rank1_epoch_seconds": ranks[1]["epoch_seconds"],
            "whole_epoch_seconds": ranks[0]["whole_epoch_seconds"],
            "samples_per_epoch": ranks[0]["samples_per_epoch"], "wall_s": wall}


# ------------------------------------------------------------------------------------------ raybloom runs
def _timeline(client, run_id: str, t_call: float, t_return: float) -> dict:
    """Epoch times and the start-up estimate of one run, from the MLflow metric history of epoch_seconds."""
    hist = sorted(client.get_metric_history(run_id, "epoch_seconds"), key=lambda m: m.step)
    es = [m.value for m in hist]
    ts = [m.timestamp / 1000.0 for m in hist]
    # Between two metric writes: one training pass + that epoch's validation, checkpoint, report, MLflow write.
    other = [ts[i] - ts[i - 1] - es[i] for i in range(1, len(ts))]
    other_med = statistics.median(other) if other else 0.0
    # Epoch 0's pass began at most ts[0] - es[0] (its validation / checkpoint / report come on top; on Ray the
    # later epochs' gaps are no estimate of that, since their report waits for the controller's poll).
    first_begin = ts[0] - es[0]
    return {"run_id": run_id, "epoch_seconds": es, "metric_ts": ts,
            "non_training_per_epoch_s": other, "non_training_per_epoch_median_s": other_med,
            "call_to_first_metric_s": ts[0] - t_call, "startup_s": first_begin - t_call,
            "tail_s": t_return - ts[-1], "wall_s": t_return - t_call}


def ray_run(spec, client) -> dict:
    """One `ray_train.fit`; rank 0's whole epochs from its `raybloom.timeline` marks (one epoch's end to the
    next: training pass, validation, checkpoint, report, MLflow write), the rest from MLflow."""
    from raybloom import ray_train, timeline

    with tempfile.NamedTemporaryFile(prefix="raybloom-bench-timeline-", suffix=".txt") as tl:
        os.environ[timeline.ENV] = tl.name
        try:
            t_call = time.time()
            summary = ray_train.fit(spec)
            t_return = time.time()
        finally:
            del os.environ[timeline.ENV]
        ends = [t for t, _pid, step in timeline.read(tl.name) if step.startswith("epoch_end") and step.endswith("rank0")]
    run = _timeline(client, summary.run_id, t_call, t_return)
    run["pass_seconds"] = run["epoch_seconds"]  # the training pass alone (`epoch_seconds` in MLflow)
    # without the marks (raybloom before 2026-12-02, run with --pythonpath): rank 0 wrote each epoch to MLflow
    # in line, at the same point of every epoch, so the metric timestamps (ms) are one a whole epoch apart
    if ends:  # MLflow's timestamps are the writer thread's: the epochs' own ends are the marks
        es = run["epoch_seconds"]
        run["non_training_per_epoch_s"] = other = [ends[i] - ends[i - 1] - es[i] for i in range(1, len(ends))]
        run["non_training_per_epoch_median_s"] = statistics.median(other) if other else 0.0
        run["startup_s"] = ends[0] - es[0] - t_call
        run["tail_s"] = t_return - ends[-1]
    ends = ends or run["metric_ts"]
    run["whole_epoch_seconds"] = [b - a for a, b in zip(ends, ends[1:])]
    return run


def inprocess_run(spec, client) -> dict:
    from raybloom import runner

    t_call = time.time()
    summary = runner.train_in_process(spec)
    t_return = time.time()
    return _timeline(client, summary.run_id, t_call, t_return)


# ------------------------------------------------------------------------------------------ ingest
def ingest_arrays(dataset, batch_size: int, seed: int, samples: int, epochs_per_sample: int) -> dict:
    batches = data_mod.Batches(dataset.train, batch_size, shuffle=True, seed=seed, rank=0, world=WORLD)
    rates, epoch = [], 0
    for _ in range(samples + 1):  # the first sample is a warm-up
        n = 0
        t0 = time.perf_counter()
        for _ in range(epochs_per_sample):
            batches.set_epoch(epoch)
            epoch += 1
            for xb, yb in batches:
                n += len(xb)
        rates.append(n / (time.perf_counter() - t0))
    return {"samples_per_s": rates[1:], "samples_per_epoch": n // epochs_per_sample,
            "epochs_per_sample": epochs_per_sample}


def _drain_split(it, shape, regression: bool, batch_size: int, seed: int, epochs: int) -> int:
    """The second worker: reads its split epoch after epoch (streaming_split starts each epoch on all splits)."""
    from raybloom import ray_train

    class _D:
        pass

    ds = _D()
    ds.shape, ds.is_classification = tuple(shape), not regression
    ds.meta = {"scale": 1.0, "shape": list(shape), "task": "regress" if regression else "classify"}
    batches = ray_train.RayDataBatches(it, batch_size, ds, seed)
    n = 0
    for e in range(epochs):
        batches.set_epoch(e)
        for xb, _ in batches:
            n += len(xb)
    return n


def ingest_ray_data(dataset, batch_size: int, seed: int, epochs: int) -> dict:
    import ray
    import ray.data

    from raybloom import ray_train

    files = [str(f) for f in data_mod.split_files(Path(dataset.meta["folder"]), "train")]
    t0 = time.perf_counter()
    # streamed from the shards, as `ray_train.streamed_train_split` reads them (no materialize)
    streamed = ray.data.read_parquet(files, num_cpus=0, concurrency=WORLD)
    splits = streamed.streaming_split(WORLD, equal=True)
    setup = time.perf_counter() - t0
    other = ray.remote(num_cpus=1)(_drain_split).remote(splits[1], list(dataset.shape), not dataset.is_classification,
                                                         batch_size, seed, epochs)
    batches = ray_train.RayDataBatches(splits[0], batch_size, dataset, seed)
    rates, counts = [], []
    for e in range(epochs):
        batches.set_epoch(e)
        n = 0
        t0 = time.perf_counter()
        for xb, _ in batches:
            n += len(xb)
        rates.append(n / (time.perf_counter() - t0))
        counts.append(n)
    ray.get(other, timeout=300)
    return {"samples_per_s": rates[1:], "first_epoch_samples_per_s": rates[0], "samples_per_epoch": counts[-1],
            "setup_s": setup}


# ------------------------------------------------------------------------------------------ noise
def _label(pid: int) -> str:
    """A short name for a process: Ray titles its workers (ray::RayTrainWorker, ray::TrainController...)."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    word = argv[0].split()[0] if argv[0].split() else "?"
    if word.startswith("ray::"):
        return word.split(".")[0]  # ray::RayTrainWorker.init_train_context -> ray::RayTrainWorker
    if "python" not in Path(word).name:
        return Path(word).name if "/" in word else word  # ray::X, raylet, gcs_server, a retitled helper
    if "-c" in argv and any("spawn_main" in a for a in argv):
        return "python multiprocessing child (spawn)"
    if "-m" in argv[:-1]:
        return f"python -m {argv[argv.index('-m') + 1]}"
    script = next((a for a in argv[1:] if a.endswith(".py") or ("/" in a and not a.startswith("-"))), None)
    return f"python {Path(script).name}" if script else "python"


class TreeCpu(threading.Thread):
    """Samples (every `interval` s) the CPU time of each process of this process tree, to say where it goes.

    Per process: utime + stime (its own, not its reaped children's); the last < `interval` s of a process that
    exits between two samples is missed. `window(t0, t1)` sums, by process name, the CPU seconds spent between
    two wall-clock times (resolution: `interval`). Also records each name's nice value.
    """

    DRIVER = "benchmark driver (Ray driver, MLflow)"

    def __init__(self, interval: float = 1.0):
        super().__init__(daemon=True)
        self.interval, self.done = interval, threading.Event()
        self.labels: dict[int, str] = {}
        self.nice: dict[int, int] = {}
        self.history: list[tuple[float, dict[int, int]]] = []  # (time.time(), pid -> utime+stime ticks)
        self.hz = os.sysconf("SC_CLK_TCK")

    def _tree(self) -> dict[int, tuple[int, int]]:
        """pid -> (utime+stime, nice) for this process and its descendants."""
        fields = benchlib.proc_fields()
        parent = {pid: int(f[1]) for pid, f in fields.items()}
        return {pid: (int(fields[pid][11]) + int(fields[pid][12]), int(fields[pid][16]))
                for pid in benchlib.descendants(parent, os.getpid()) if pid in fields}

    def record(self) -> None:
        now, tree = time.time(), self._tree()
        for pid, (_, nice) in tree.items():
            self.nice[pid] = nice
            label = self.labels.get(pid)
            if pid == os.getpid():
                self.labels[pid] = self.DRIVER
            elif label is None or label in ("ray::IDLE", "?") or not label.startswith("ray::"):
                # a Ray worker process retitles itself once it runs an actor or task: keep its last real title
                self.labels[pid] = _label(pid)
        self.history.append((now, {pid: t for pid, (t, _) in tree.items()}))

    def start(self) -> "TreeCpu":
        self.record()
        super().start()
        return self

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.record()

    def stop(self) -> "TreeCpu":
        self.done.set()
        self.join()
        self.record()
        return self

    def _at(self, t: float) -> dict[int, int]:
        """Ticks of every process seen, as of the last sample at or before t (a later process: 0)."""
        out: dict[int, int] = {}
        for ts, ticks in self.history:
            if ts > t and out:
                break
            out.update(ticks)
        return out

    def window(self, t0: float | None = None, t1: float | None = None) -> dict[str, dict]:
        a = self._at(t0) if t0 is not None else self.history[0][1]
        b = self._at(t1) if t1 is not None else {}
        if t1 is None:
            for _, ticks in self.history:
                b.update(ticks)
        by: dict[str, dict] = {}
        for pid, ticks in b.items():
            cpu = (ticks - a.get(pid, 0)) / self.hz
            if cpu <= 0:
                continue
            e = by.setdefault(self.labels.get(pid, "?"), {"cpu_s": 0.0, "processes": 0, "nice": self.nice.get(pid)})
            e["cpu_s"] += cpu
            e["processes"] += 1
        return {k: {**v, "cpu_s": round(v["cpu_s"], 2)} for k, v in sorted(by.items(), key=lambda kv: -kv[1]["cpu_s"])}


def merge_cpu(total: dict, part: dict) -> None:
    for k, v in part.items():
        e = total.setdefault(k, {"cpu_s": 0.0, "processes": 0, "nice": v["nice"]})
        e["cpu_s"] = round(e["cpu_s"] + v["cpu_s"], 2)
        e["processes"] += v["processes"]


# ------------------------------------------------------------------------------------------ stats
def summary(v: list[float]) -> dict:
    q1, q3 = quartiles(v)
    return {"median": statistics.median(v), "q1": q1, "q3": q3, "min": min(v), "max": max(v), "n": len(v),
            "values": v}


def machine() -> dict:
    import ray

    return benchlib.machine(torch=torch.__version__, ray=ray.__version__)


def ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 4 epochs, short ingest (~1.5 min)")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds of (a) (default 6; quick 1): the machine drifts between runs, a round's ratio by 0.1-0.2")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each run of (a) (default 12; quick 4)")
    p.add_argument("--warmup", type=int, default=None, help="first epochs of each run left out (default 2; quick 1)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for a 1-minute load average < 1.0 (polled every 15 s)")
    p.add_argument("--ray-poll-s", type=float, default=None, metavar="S",
                   help="set RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (the Train controller's poll interval; Ray's default "
                        "2 s) for the Ray runs, to measure its effect (default: leave Ray's setting)")
    p.add_argument("--ray-worker-niceness", type=int, default=None, metavar="N",
                   help="set RAY_worker_niceness (Ray runs its workers at nice 15 by default) before Ray starts")
    p.add_argument("--hand-nice", type=int, default=0, metavar="N",
                   help="run the hand-written DDP processes at nice N (e.g. 15, Ray's worker niceness; default 0)")
    p.add_argument("--out", default=str(RESULTS), help="folder for ray.json / ray.md")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 6)
    epochs = args.epochs or (4 if args.quick else 12)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if epochs - warmup < 2:
        raise SystemExit("bench_ray: need at least 2 epochs after the warm-up")

    quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    load_start = loadavg()
    t_bench = time.perf_counter()

    # Everything the runs write (data, MLflow store and artifacts, Ray checkpoints) goes to a temp folder.
    tmp = benchlib.scratch("raybloom-bench-ray-")
    work = Path(tmp.name)
    os.environ["RAYBLOOM_RAY_STORAGE"] = str(work / "ray_results")
    if args.ray_poll_s is not None:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = str(args.ray_poll_s)
    if args.ray_worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.ray_worker_niceness)
    os.chdir(work)

    overrides = ["scaling.workers=2", "train.threads=1", "regularization.augment.shift=0",
                 "regularization.augment.noise=0", "regularization.augment.hflip=false", "tracking.log_model=false",
                 f"train.epochs={epochs}", "train.progress=false", "experiment=bench-ray"]
    spec = spec_mod.load(DEFAULT_SPEC, overrides)
    dataset = data_mod.load(spec.data)  # prepares the Parquet folder once, outside every timing
    spec = spec.with_overrides({"data.path": str(Path(dataset.meta["folder"]).resolve())})
    inproc_spec = spec.with_overrides({"scaling.workers": 0, "train.epochs": 3})
    bs = spec.train.batch_size

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    client.search_experiments()  # creates the SQLite schema outside every timing

    # (b) start Ray in this process
    t0 = time.perf_counter()
    import ray  # noqa: F401

    import_ray_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    import ray.train.torch  # noqa: F401  (fit imports it; timed apart so the first fit is not charged for it)

    import_train_s = time.perf_counter() - t0
    from raybloom import ray_session

    t0 = time.perf_counter()
    ray_session.init_ray(spec)
    init_ray_s = time.perf_counter() - t0
    # as the runs see them (init_ray may set defaults of its own)
    ray_poll = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2 (Ray's default)")
    ray_nice = os.environ.get("RAY_worker_niceness", "15 (Ray's default)")
    print(f"import ray {import_ray_s:.2f} s, import ray.train.torch {import_train_s:.2f} s, "
          f"init_ray {init_ray_s:.2f} s", flush=True)

    # (a) alternate the sides; (b) one in-process run per round
    ray_runs, hand_runs, inproc_runs = [], [], []
    phases = ("startup", "training", "tail")
    cpu = {"ray": {ph: {} for ph in phases}, "hand": {}}
    windows = {ph: 0.0 for ph in phases}
    meter_a = SampledOthersMeter().start()
    for r in range(rounds):
        order = ["ray", "hand"] if r % 2 == 0 else ["hand", "ray"]
        for side in order:
            sampler, others = TreeCpu().start(), SampledOthersMeter().start()
            run = ray_run(spec, client) if side == "ray" else handwritten(spec, epochs, args.hand_nice, client)
            sampler.stop()
            run["others"] = others.stop()
            if side == "ray":  # CPU by process: fit() call -> epoch 0 begins -> last epoch logged -> fit returns
                t_call = run["metric_ts"][0] - run["call_to_first_metric_s"]
                t_first = t_call + run["startup_s"]
                bounds = {"startup": (t_call, t_first), "training": (t_first, run["metric_ts"][-1]),
                          "tail": (run["metric_ts"][-1], t_call + run["wall_s"])}
                run["cpu_by_process"] = {ph: sampler.window(*bounds[ph]) for ph in phases}
                for ph in phases:
                    merge_cpu(cpu["ray"][ph], run["cpu_by_process"][ph])
                    windows[ph] += bounds[ph][1] - bounds[ph][0]
            else:
                run["cpu_by_process"] = sampler.window()
                merge_cpu(cpu["hand"], run["cpu_by_process"])
            if side == "ray":
                ray_runs.append(run)
                print(f"round {r}: raybloom on Ray: steady median {ms(statistics.median(run['epoch_seconds'][warmup:]))} ms, "
                      f"start-up {run['startup_s']:.2f} s", flush=True)
            else:
                hand_runs.append(run)
                print(f"round {r}: hand-written DDP: steady median {ms(statistics.median(run['epoch_seconds'][warmup:]))} ms",
                      flush=True)
    others_a = meter_a.stop()
    others_side = {side: round(statistics.mean(r["others"]["others_cores"] for r in runs), 2) if runs[0]["others"] else None
                   for side, runs in (("ray", ray_runs), ("hand", hand_runs))}
    for r in range(rounds):
        run = inprocess_run(inproc_spec, client)
        inproc_runs.append(run)
        print(f"in-process run {r}: start-up {run['startup_s']:.2f} s", flush=True)

    # whole epochs from epoch `warmup` on (raybloom's list starts at epoch 1: one end to the next)
    ray_whole = summary([t for run in ray_runs for t in run["whole_epoch_seconds"][max(warmup - 1, 0):]])
    hand_whole = summary([t for run in hand_runs for t in run["whole_epoch_seconds"][warmup:]])
    ratio = ray_whole["median"] / hand_whole["median"]
    per_round = [statistics.median(a["whole_epoch_seconds"][max(warmup - 1, 0):]) / statistics.median(b["whole_epoch_seconds"][warmup:])
                 for a, b in zip(ray_runs, hand_runs)]
    # the training pass alone (what this benchmark compared before), for reference
    ray_steady = [t for run in ray_runs for t in run["epoch_seconds"][warmup:]]
    hand_steady = [t for run in hand_runs for t in run["epoch_seconds"][warmup:]]
    ray_s, hand_s = summary(ray_steady), summary(hand_steady)
    pass_ratio = ray_s["median"] / hand_s["median"]

    # (c) ingest, one worker's view (torch on one thread, as in the workers)
    torch.set_num_threads(1)
    meter_c = OthersMeter().start()
    t0 = time.perf_counter()
    data_mod.load(spec.data)
    arrays_setup = time.perf_counter() - t0
    arrays = ingest_arrays(dataset, bs, spec.seed, samples=5 if args.quick else 15, epochs_per_sample=20)
    arrays["setup_s"] = arrays_setup
    raydata = ingest_ray_data(dataset, bs, spec.seed, epochs=4 if args.quick else 12)
    others_c = meter_c.stop()
    per_worker_samples = hand_runs[0]["samples_per_epoch"]
    consumption = per_worker_samples / ray_s["median"]
    ingest = {}
    for name, res in (("arrays", arrays), ("ray_data", raydata)):
        rates = summary(res["samples_per_s"])
        ingest[name] = {**res, "rate": rates, "ratio_to_consumption": rates["median"] / consumption,
                        "ratio_min_max": [rates["min"] / consumption, rates["max"] / consumption]}
    verdict_c = "PASS" if ingest["arrays"]["ratio_to_consumption"] >= TARGET_INGEST_RATIO else "MISS"
    faster = max(ingest, key=lambda k: ingest[k]["rate"]["median"])
    slower = min(ingest, key=lambda k: ingest[k]["rate"]["median"])
    speedup = ingest[faster]["rate"]["median"] / ingest[slower]["rate"]["median"]

    import ray as _ray

    mach = machine()
    _ray.shutdown()
    load_end = loadavg()
    bench_wall = time.perf_counter() - t_bench
    cores = mach["usable_cores"] or 1
    busy = [o["others_cores"] for o in (others_a, others_c) if o]
    noisy = (bool(busy) and max(busy) > NOISE_CORES) or (load_start is not None and load_start[0] > cores + 0.5)
    verdict_a = "NOISY" if noisy else ("PASS" if ratio <= TARGET_EPOCH_RATIO else "MISS")
    verdict_c = "NOISY" if noisy and verdict_c == "PASS" else verdict_c

    startup = {
        "import_ray_s": import_ray_s, "import_ray_train_torch_s": import_train_s, "init_ray_s": init_ray_s,
        "ray_fit_startup_s": summary([r["startup_s"] for r in ray_runs]),
        "ray_fit_call_to_first_metric_s": summary([r["call_to_first_metric_s"] for r in ray_runs]),
        "ray_non_training_per_epoch_s": summary([r["non_training_per_epoch_median_s"] for r in ray_runs]),
        "ray_tail_s": summary([r["tail_s"] for r in ray_runs]),
        "ray_fit_wall_s": summary([r["wall_s"] for r in ray_runs]),
        "inprocess_startup_s": summary([r["startup_s"] for r in inproc_runs]),
        "inprocess_call_to_first_metric_s": summary([r["call_to_first_metric_s"] for r in inproc_runs]),
        "inprocess_non_training_per_epoch_s": summary([r["non_training_per_epoch_median_s"] for r in inproc_runs]),
        "inprocess_tail_s": summary([r["tail_s"] for r in inproc_runs]),
        "handwritten_spawn_wall_s": summary([r["wall_s"] for r in hand_runs]),
    }
    result = {
        "benchmark": "raybloom on Ray Train (2 workers) vs hand-written torch.distributed DDP; start-up; ingest",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "spec": os.path.relpath(DEFAULT_SPEC, ROOT), "overrides": overrides,
        "model": spec.model.name, "optimizer": f"{spec.optim.name} lr={spec.optim.lr}", "schedule": spec.schedule.name,
        "batch_size_per_worker": bs, "workers": WORLD, "threads_per_worker": 1,
        "train_samples": len(dataset.train), "train_samples_per_worker_epoch": per_worker_samples,
        "rounds": rounds, "epochs_per_run": epochs, "warmup_epochs": warmup,
        "machine": mach, "wait_quiet": quiet, "loadavg_start": load_start, "loadavg_end": load_end,
        "others_cores_during_a": others_a, "others_cores_during_c": others_c, "noisy": noisy,
        "others_cores_during_a_by_side": others_side,
        "ray_train_health_check_interval_s": ray_poll, "ray_worker_niceness": ray_nice,
        "handwritten_nice": args.hand_nice,
        "cpu_by_process_during_a": {"ray_runs_wall_s": sum(r["wall_s"] for r in ray_runs),
                                    "ray_runs_window_s": windows, "ray_runs": cpu["ray"],
                                    "handwritten_runs_wall_s": sum(r["wall_s"] for r in hand_runs),
                                    "handwritten_runs": cpu["hand"]},
        "bench_wall_s": bench_wall,
        "a_epoch": {"raybloom_ray_whole_epoch_s": ray_whole, "handwritten_ddp_whole_epoch_s": hand_whole,
                    "ratio_of_medians": ratio, "per_round_ratios": per_round,
                    "raybloom_ray_pass_s": ray_s, "handwritten_ddp_pass_s": hand_s, "pass_ratio_of_medians": pass_ratio,
                    "handwritten_rank1_epoch_s": summary([t for r in hand_runs for t in r["rank1_epoch_seconds"][warmup:]]),
                    "target": TARGET_EPOCH_RATIO, "verdict": verdict_a,
                    "ray_runs": ray_runs, "handwritten_runs": hand_runs},
        "b_startup": {**startup, "inprocess_runs": inproc_runs},
        "c_ingest": {"consumption_samples_per_s": consumption, "target": TARGET_INGEST_RATIO, "verdict": verdict_c,
                     "faster": faster, "faster_by": speedup, **ingest},
    }

    # ---------------------------------------------------------------------------------- markdown
    m = mach

    def rng(s: dict, f=lambda v: f"{v:.2f}") -> str:
        return f"{f(s['min'])}..{f(s['max'])}"

    def iqr(s: dict, f=ms) -> str:
        return f"{f(s['q1'])}..{f(s['q3'])}"

    arr, rd = ingest["arrays"], ingest["ray_data"]
    rr = (min(per_round), max(per_round))
    cpu_total: dict[str, float] = {}
    cpu_nice: dict[str, object] = {}
    for ph in phases:
        for k, v in cpu["ray"][ph].items():
            cpu_total[k] = cpu_total.get(k, 0.0) + v["cpu_s"]
            cpu_nice.setdefault(k, v["nice"])
    cpu_top = [k for k, v in sorted(cpu_total.items(), key=lambda kv: -kv[1]) if v >= 0.1][:14]
    cpu_sum = {ph: sum(v["cpu_s"] for v in cpu["ray"][ph].values()) for ph in phases}
    su = startup
    md = [
        "# Ray Train benchmark" + (" (quick smoke run)" if args.quick else ""),
        "",
        f"`{result['spec']}` (cnn, adam lr={spec.optim.lr}, batch {bs} per worker, dropout "
        f"{spec.regularization.dropout}, augmentation off, `tracking.log_model=false`), {WORLD} workers x 1 torch "
        f"thread, {len(dataset.train)} training samples ({per_worker_samples} per worker per epoch). "
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, ray {m['ray']}, Python {m['python']}. "
        f"{rounds} alternating round(s) of {epochs} epochs per side, the first {warmup} of each run left out. "
        f"Ray Train controller poll interval: {ray_poll} s; Ray worker niceness {ray_nice}; hand-written "
        f"processes at nice {args.hand_nice}.",
        "",
        "| item | target | measured (median) | spread | verdict |",
        "|---|---|---:|---|---|",
        f"| (a) whole epoch, raybloom on Ray / hand-written gloo DDP doing the same per-epoch work | "
        f"<= {TARGET_EPOCH_RATIO:.2f} | **{ratio:.3f}** | per-round ratios {rr[0]:.3f}..{rr[1]:.3f} | **{verdict_a}** |",
        f"| (a) the training pass alone, raybloom / hand-written | — | {pass_ratio:.3f} | medians {ms(ray_s['median'])} / "
        f"{ms(hand_s['median'])} ms | info |",
        f"| (b) `import ray` + `init_ray` (Ray started in process) | — | {import_ray_s + init_ray_s:.2f} s | "
        f"one sample | info |",
        f"| (b) Ray `fit()` call -> first epoch begins | — | {su['ray_fit_startup_s']['median']:.2f} s | "
        f"{rng(su['ray_fit_startup_s'])} s | info |",
        f"| (b) in-process `runner.train_in_process` call -> first epoch begins | — | {su['inprocess_startup_s']['median']:.2f} s | "
        f"{rng(su['inprocess_startup_s'])} s | info |",
        f"| (c) `arrays` ingest / consumption | >= {TARGET_INGEST_RATIO:g}x | **{arr['ratio_to_consumption']:.0f}x** | "
        f"{arr['ratio_min_max'][0]:.0f}..{arr['ratio_min_max'][1]:.0f}x | **{verdict_c}** |",
        f"| (c) `ray_data` ingest / consumption | — | {rd['ratio_to_consumption']:.1f}x | "
        f"{rd['ratio_min_max'][0]:.1f}..{rd['ratio_min_max'][1]:.1f}x | info |",
        "",
        "## (a) Whole epochs on rank 0, steady state",
        "",
        "One epoch's start to the next one's: the training pass, the validation loss and accuracy, a checkpoint "
        "(raybloom: `torch.save` of the training state and `ray.train.report` with it, uploaded by Ray in the "
        "background; hand-written: `torch.save` of model and optimizer) and one MLflow write of the epoch's "
        "metrics on rank 0 (raybloom: in a thread, once the checkpoint is persisted; hand-written: in line).",
        "",
        "| side | median (ms) | IQR (ms) | min..max (ms) | epochs |",
        "|---|---:|---:|---:|---:|",
        f"| raybloom `ray_train.fit` (`raybloom.timeline` marks) | {ms(ray_whole['median'])} | {iqr(ray_whole)} | "
        f"{rng(ray_whole, ms)} | {ray_whole['n']} |",
        f"| hand-written gloo DDP (`mp.spawn`) | {ms(hand_whole['median'])} | {iqr(hand_whole)} | "
        f"{rng(hand_whole, ms)} | {hand_whole['n']} |",
        "",
        "Per round (raybloom / hand-written, medians in ms): "
        + "; ".join(f"{ms(statistics.median(a['whole_epoch_seconds'][max(warmup - 1, 0):]))} / "
                    f"{ms(statistics.median(b['whole_epoch_seconds'][warmup:]))} = {q:.3f}"
                    for a, b, q in zip(ray_runs, hand_runs, per_round)) + ".",
        "",
        "The training pass alone:",
        "",
        "| side | median (ms) | IQR (ms) | min..max (ms) | epochs |",
        "|---|---:|---:|---:|---:|",
        f"| raybloom `ray_train.fit`, `epoch_seconds` from MLflow | {ms(ray_s['median'])} | {iqr(ray_s)} | "
        f"{rng(ray_s, ms)} | {ray_s['n']} |",
        f"| hand-written `torch.distributed` gloo DDP (`mp.spawn`) | {ms(hand_s['median'])} | {iqr(hand_s)} | "
        f"{rng(hand_s, ms)} | {hand_s['n']} |",
        "",
        "## (b) Fixed costs (s; median and min..max over runs)",
        "",
        "| | Ray (2 workers) | in process |",
        "|---|---:|---:|",
        f"| once per process: `import ray` / `import ray.train.torch` / `init_ray` | {import_ray_s:.2f} / "
        f"{import_train_s:.2f} / {init_ray_s:.2f} | — |",
        f"| call -> epoch 0's training pass begins (at most: t(epoch 0 in MLflow) - its `epoch_seconds`) | "
        f"{su['ray_fit_startup_s']['median']:.2f} ({rng(su['ray_fit_startup_s'])}) | "
        f"{su['inprocess_startup_s']['median']:.2f} ({rng(su['inprocess_startup_s'])}) |",
        f"| call -> epoch 0 in MLflow | {su['ray_fit_call_to_first_metric_s']['median']:.2f} | "
        f"{su['inprocess_call_to_first_metric_s']['median']:.2f} |",
        f"| per epoch, outside the training pass (validation, checkpoint, `ray.train.report`, MLflow write) | "
        f"{su['ray_non_training_per_epoch_s']['median']:.3f} | {su['inprocess_non_training_per_epoch_s']['median']:.3f} |",
        f"| last epoch in MLflow -> call returns (worker group ends, final test, plots) | "
        f"{su['ray_tail_s']['median']:.2f} | {su['inprocess_tail_s']['median']:.2f} |",
        f"| whole call ({epochs} epochs on Ray, {inproc_spec.train.epochs} in process) | "
        f"{su['ray_fit_wall_s']['median']:.2f} | — |",
        "",
        "Where the CPU goes in the Ray runs of (a): CPU seconds by process (all rounds; /proc sampled every second, so "
        "windows are +-1 s), in three windows: `fit()` call -> epoch 0 begins; epoch 0 begins -> last epoch in MLflow "
        "(training passes, validation, checkpoints, reports, waits); -> `fit()` returns.",
        "",
        f"| process | nice | start-up ({windows['startup']:.0f} s) | training ({windows['training']:.0f} s) | "
        f"tail ({windows['tail']:.0f} s) |",
        "|---|---:|---:|---:|---:|",
        *[f"| {k} | {cpu_nice.get(k, '')} | {cpu['ray']['startup'].get(k, {}).get('cpu_s', 0):.1f} | "
          f"{cpu['ray']['training'].get(k, {}).get('cpu_s', 0):.1f} | {cpu['ray']['tail'].get(k, {}).get('cpu_s', 0):.1f} |"
          for k in cpu_top],
        f"| **all** | | {cpu_sum['startup']:.1f} | {cpu_sum['training']:.1f} | {cpu_sum['tail']:.1f} |",
        f"| (hand-written runs, all processes: {sum(r['wall_s'] for r in hand_runs):.0f} s wall incl. spawn) | "
        f"{', '.join(sorted({str(v['nice']) for v in cpu['hand'].values()}))} | | "
        f"{sum(v['cpu_s'] for v in cpu['hand'].values()):.1f} | |",
        "",
        f"## (c) Ingest to one worker (rank 0 of {WORLD}), batch {bs}",
        "",
        f"cnn_digits consumes {per_worker_samples} samples per worker per epoch / {ms(ray_s['median'])} ms = "
        f"**{consumption:,.0f} samples/s**.",
        "",
        "| option | median samples/s | min..max | x consumption | one-time setup (s) |",
        "|---|---:|---:|---:|---:|",
        f"| `arrays` (default: `data.Batches`, in-memory shard) | {arr['rate']['median']:,.0f} | "
        f"{arr['rate']['min']:,.0f}..{arr['rate']['max']:,.0f} | {arr['ratio_to_consumption']:.0f}x | "
        f"{arr['setup_s']:.2f} (`data.load`: read 3 splits) |",
        f"| `ray_data` (`streaming_split` + `iter_torch_batches`, local shuffle 128) | {rd['rate']['median']:,.0f} | "
        f"{rd['rate']['min']:,.0f}..{rd['rate']['max']:,.0f} | {rd['ratio_to_consumption']:.1f}x | "
        f"{rd['setup_s']:.2f} (read + materialize + split) |",
        "",
        f"`{faster}` is faster, by {speedup:.0f}x.",
        "",
        f"Load: 1/5/15-min load average {load_start} at start, {load_end} at end"
        + (f" (waited {quiet['waited_s']} s for < 1.0: {'reached' if quiet['quiet'] else 'NOT reached'})" if quiet else "")
        + f"; processes outside the benchmark used {others_a['others_cores'] if others_a else '?'} core(s) on average "
        f"during (a) ({others_side['ray']} during the Ray runs, {others_side['hand']} during the hand-written ones) "
        f"and {others_c['others_cores'] if others_c else '?'} during (c). Whole run: {bench_wall:.0f} s.",
        "",
    ]
    if noisy:
        md[-1:-1] = [f"**Noisy run**: other processes competed for the {cores} cores (more than {NOISE_CORES} core on "
                     "average, or a high load average at start); rerun on a quiet machine before trusting the verdicts.", ""]
    benchlib.write_results(args.out, "ray-quick" if args.quick else "ray", result, "\n".join(md))
    os.chdir(ROOT)
    tmp.cleanup()
    missed = verdict_a == "MISS" or verdict_c == "MISS"
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
