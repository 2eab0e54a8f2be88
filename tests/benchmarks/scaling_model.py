"""Scaling on paper: epoch time at 4, 8 and 16 workers on 1 Gb/s and 25 Gb/s networks, from measured 1- and
2-worker epochs and the models' sizes.

Measured here, side by side (one torch thread a process, as raybloom's workers run): one epoch of the
training pass in one process, and in two processes of `torch.distributed` gloo DDP over loopback (the
engine's model, the same per-worker batch), the median of 5 epochs after a warm-up one, for

- cnn_digits (the CNN of jobs/cnn_digits.yaml on the 1,257 training digits, batch 32 per worker), and
- the MLP of bench_scale.py (784-256-128-10 on 60,000 synthetic rows, batch 512 per worker).

Model (data parallel, `train.batch_size` per worker, so a global batch of n x b and ceil(N / (n b)) steps an
epoch; one all-reduce of the gradients a step):

    t_step(n) = c + f + 2 (n - 1) / n * S / B + 2 (n - 1) * a        epoch(n) = ceil(N / (n b)) * t_step(n)

c is the compute of one step (the 1-process epoch / its steps); f the per-step cost DDP adds besides the
wire (bucketing, gloo's call, waiting for the slower worker), taken from the 2-process run: f =
epoch(2) / steps(2) - c - the ring term on loopback (taken as free); S the gradient bytes (float32
parameters); B the network's bandwidth and a its latency per message (1 Gb/s: 125 MB/s, 50 us; 25 Gb/s:
3.125 GB/s, 10 us). Assumptions: no overlap of communication with the backward pass (DDP overlaps some:
an upper bound), one worker per node, compute per step independent of n (the per-worker batch is fixed),
f independent of n, the network's full bandwidth for the ring. It leaves out data loading, checkpoints
and reports (the whole-epoch costs of bench_ray.py).

    .venv/bin/python tests/benchmarks/scaling_model.py

Writes tests/benchmarks/results/scaling_model.json, .md and .png.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "platform"))

import torch  # noqa: E402

import benchlib  # noqa: E402
from raybloom import data, engine, spec as spec_mod  # noqa: E402

NETWORKS = {"1 Gb/s": (125e6, 50e-6), "25 Gb/s": (3.125e9, 10e-6)}
WORKERS = [1, 2, 4, 8, 16]
EPOCHS, WARMUP = 6, 1


WORKLOADS = ("cnn_digits", "mlp 784-256-128-10")


def workload(name: str):
    """(spec, dataset or None, x, y) of one workload, built only when asked for (each DDP process builds its own)."""
    if name == "cnn_digits":
        cnn = spec_mod.load(HERE.parents[1] / "jobs" / "cnn_digits.yaml", ["regularization.augment.shift=0", "train.threads=1"])
        ds = data.load(cnn.data)
        return cnn, ds, ds.train.x, ds.train.y
    g = torch.Generator().manual_seed(0)
    mlp = spec_mod.from_dict({"kind": "train", "data": {"source": "digits"}, "model": {"name": "mlp", "hidden": [256, 128]},
                              "optim": {"name": "adam", "lr": 1e-3}, "train": {"batch_size": 512}})
    return mlp, None, torch.rand(60_000, 784, generator=g), torch.randint(0, 10, (60_000,), generator=g)


def _model(spec, ds, x):
    if ds is not None:
        return engine.build(spec, ds)
    from raybloom import models

    return models.mlp(x.shape[1], [256, 128], 10, "relu", 0.0)


def epochs_of(model, x, y, batch: int, rank: int, world: int) -> list[float]:
    from torch.nn import functional as F

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    times = []
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        t0 = time.perf_counter()
        for start in range(0, len(x), batch * world):
            idx = order[start:start + batch * world].tensor_split(world)[rank]
            loss = F.cross_entropy(model(x.index_select(0, idx)), y.index_select(0, idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return times[WARMUP:]


def _ddp_worker(rank: int, world: int, port: int, name: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        spec, ds, x, y = workload(name)
        torch.manual_seed(0)
        model = DistributedDataParallel(_model(spec, ds, x))
        times = epochs_of(model, x, y, spec.train.batch_size, rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def measure(name: str) -> dict:
    import torch.multiprocessing as mp

    spec, ds, x, y = workload(name)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = _model(spec, ds, x)
    one = epochs_of(model, x, y, spec.train.batch_size, 0, 1)
    with tempfile.NamedTemporaryFile(suffix=".json") as f, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        mp.spawn(_ddp_worker, args=(2, port, name, f.name), nprocs=2, join=True)
        two = json.loads(Path(f.name).read_text())
    params = sum(p.numel() for p in model.parameters())
    return {"rows": len(x), "batch_per_worker": spec.train.batch_size, "params": params, "grad_bytes": 4 * params,
            "epoch_1_s": statistics.median(one), "epoch_2_s": statistics.median(two), "epochs_1": one, "epochs_2": two}


def predict(m: dict) -> dict:
    n_rows, b, size = m["rows"], m["batch_per_worker"], m["grad_bytes"]
    steps = {n: math.ceil(n_rows / (n * b)) for n in WORKERS}
    c = m["epoch_1_s"] / steps[1]
    f = max(0.0, m["epoch_2_s"] / steps[2] - c)
    out = {"compute_per_step_s": c, "ddp_overhead_per_step_s": f, "steps": steps, "by_network": {}}
    for net, (bw, lat) in NETWORKS.items():
        out["by_network"][net] = {
            n: steps[n] * (c + (f if n > 1 else 0.0) + (2 * (n - 1) / n * size / bw + 2 * (n - 1) * lat if n > 1 else 0.0))
            for n in WORKERS}
    out["ideal"] = {n: m["epoch_1_s"] / n for n in WORKERS}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result["models"]), figsize=(11, 4))
    for ax, (name, r) in zip(axes, result["models"].items()):
        p = r["prediction"]
        ax.plot(WORKERS, [p["ideal"][n] for n in WORKERS], "k:", label="ideal (1 worker / n)")
        for net, style in zip(NETWORKS, ("o-", "s-")):
            ax.plot(WORKERS, [p["by_network"][net][n] for n in WORKERS], style, label=f"model, {net}")
        ax.plot([1, 2], [r["measured"]["epoch_1_s"], r["measured"]["epoch_2_s"]], "r*", markersize=12, label="measured here")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(WORKERS, [str(n) for n in WORKERS])
        ax.set_xlabel("workers (one per node)")
        ax.set_ylabel("training pass per epoch (s)")
        ax.set_title(f"{name}: {r['measured']['params']:,} parameters, batch {r['measured']['batch_per_worker']}/worker",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(result: dict) -> str:
    lines = ["# Scaling on paper: predicted epoch time (training pass) by workers and network", "",
             f"Measured {result['when']} on {result['machine']['cpu']}, {result['machine']['cores']} cores (load average "
             f"{result['load_start']} at start): 1 process vs 2 gloo DDP processes over loopback, one torch thread each, "
             "medians of 5 epochs. The model and its assumptions: tests/benchmarks/scaling_model.py.", ""]
    for name, r in result["models"].items():
        m, p = r["measured"], r["prediction"]
        lines += [f"## {name}", "",
                  f"{m['params']:,} parameters ({m['grad_bytes'] / 1e6:.2f} MB of gradients a step), {m['rows']:,} rows, "
                  f"batch {m['batch_per_worker']} per worker. Measured: 1 worker {m['epoch_1_s']:.3f} s, 2 workers "
                  f"{m['epoch_2_s']:.3f} s an epoch; so compute {1e3 * p['compute_per_step_s']:.2f} ms a step and DDP's "
                  f"own cost {1e3 * p['ddp_overhead_per_step_s']:.2f} ms a step.", "",
                  "| workers | steps an epoch | ideal (s) | " + " | ".join(f"{net} (s)" for net in NETWORKS) + " | "
                  + " | ".join(f"speed-up, {net}" for net in NETWORKS) + " |",
                  "|---:|---:|---:|" + "---:|" * (2 * len(NETWORKS))]
        for n in WORKERS:
            t = [p["by_network"][net][n] for net in NETWORKS]
            lines.append(f"| {n} | {p['steps'][n]} | {p['ideal'][n]:.3f} | " + " | ".join(f"{v:.3f}" for v in t) + " | "
                         + " | ".join(f"{m['epoch_1_s'] / v:.1f}×" for v in t) + " |")
        lines.append("")
    lines.append("![predicted epoch time](scaling_model.png)")
    return "\n".join(lines) + "\n"


def main() -> int:
    os.environ.setdefault("RAYBLOOM_DATA_DIR", str(Path(tempfile.mkdtemp(prefix="raybloom-scaling-")) / "data"))
    load_start = benchlib.loadavg()
    models = {}
    for name in WORKLOADS:
        m = measure(name)
        models[name] = {"measured": m, "prediction": predict(m)}
        print(f"{name}: 1 worker {m['epoch_1_s']:.3f} s, 2 workers {m['epoch_2_s']:.3f} s", flush=True)
    result = {"when": _dt.datetime.now().isoformat(timespec="minutes"), "machine": benchlib.machine(),
              "load_start": load_start, "load_end": benchlib.loadavg(), "networks": NETWORKS, "models": models}
    plot(result, HERE / "results" / "scaling_model.png")
    benchlib.write_results(HERE / "results", "scaling_model", result, report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
