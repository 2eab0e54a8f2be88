"""Scale: does a Ray run with `scaling.ingest: ray_data` keep its speed and its memory as the data grows?

Synthetic 784-feature classification sets of 20 k, 200 k and 2 M rows (uint8 on disk, as prepared images
are: the last is 1.5 GB, 6 GB as float32), written as prepared datasets by raybloom's own shard writer. On
each, one epoch of an MLP (784-256-128-10) on 2 Ray Train workers streaming the training split
(`ray_train.fit`, the product path; Ray started once in this process), side by side in one run:

- throughput: training rows ÷ rank 0's `epoch_seconds` (its training pass);
- each worker's peak memory, sampled from /proc every 0.2 s: RSS, and PSS and USS beside it (a Ray worker's
  RSS counts the object store's shared pages it has mapped; USS is what is its alone);
- ingest alone: the training split streamed through Ray Data's iterator with the workers' batch
  conversion and no model (one consumer), against what the model consumed (both workers).

Targets: throughput at 2 M ≥ 0.9 × at 20 k; peak worker RSS at 2 M ≤ 1.25 × at 20 k; ingest ≥ 3 × the
model's consumption. A run on a busy machine (other processes using over 0.5 core) is marked NOISY, never PASS.

    .venv/bin/python tests/benchmarks/bench_scale.py            # 20k, 200k, 2M (about 10 minutes here)
    .venv/bin/python tests/benchmarks/bench_scale.py --quick    # 20k and 200k
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import SampledOthersMeter, loadavg, machine, scratch, write_results  # noqa: E402

from raybloom import data, ray_session, ray_train, spec as spec_mod  # noqa: E402
from raybloom.data.shards import ShardWriter, write_manifest  # noqa: E402

WIDTH, CLASSES, BATCH = 784, 10, 512
TARGETS = {"throughput_ratio_min": 0.9, "rss_ratio_max": 1.25, "ingest_ratio_min": 3.0}


def make_dataset(folder: Path, rows: int, seed: int = 0) -> Path:
    """A learnable 10-class set (a template per class plus noise), uint8, 5% validation and 5% test."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(CLASSES, WIDTH)).astype(np.float32)
    meta = {"source": f"synthetic-{rows}", "shape": [WIDTH], "dtype": "uint8", "scale": 1 / 255, "task": "classify",
            "num_classes": CLASSES, "val_fraction": 0.05, "test_fraction": 0.05, "split_seed": seed}
    writers = {s: ShardWriter(folder, s, meta, 32 * 2**20) for s in data.SPLITS}
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        y = rng.integers(0, CLASSES, size=n)
        x = np.clip(0.5 * templates[y] + 0.5 * rng.integers(0, 256, size=(n, WIDTH)), 0, 255).astype(np.uint8)
        split = rng.random(n)
        for name, mask in (("test", split < 0.05), ("val", (split >= 0.05) & (split < 0.1)), ("train", split >= 0.1)):
            writers[name].write(x[mask], y[mask])
    write_manifest(folder, meta, {s: w.close() for s, w in writers.items()})
    return folder


def _memory(pid: int) -> tuple[int, int, int, int] | None:
    """(RSS, PSS, USS, shared memory) in bytes of a process, from /proc/PID/smaps_rollup and status (RssShmem:
    the object store's pages among them)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    kb = {}
    for line in text.splitlines()[1:] + status.splitlines():
        key, _, rest = line.partition(":")
        if rest.split() and rest.split()[0].isdigit():
            kb[key] = int(rest.split()[0])
    return (kb.get("Rss", 0) * 1024, kb.get("Pss", 0) * 1024, (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) * 1024,
            kb.get("RssShmem", 0) * 1024)


class WorkerSampler(threading.Thread):
    """Peak RSS / PSS / USS / shared memory of every Ray Train worker process, every 0.2 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, list[int]] = {}
        self.running = True

    def run(self) -> None:
        while self.running:
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    if b"RayTrainWorker" not in (entry / "cmdline").read_bytes():
                        continue
                except OSError:
                    continue
                m = _memory(int(entry.name))
                if m:
                    peak = self.peaks.setdefault(int(entry.name), [0, 0, 0, 0])
                    self.peaks[int(entry.name)] = [max(a, b) for a, b in zip(peak, m)]
            time.sleep(0.2)

    def stop(self) -> list[dict]:
        self.running = False
        self.join()
        return [{"pid": pid, "rss_mb": p[0] / 2**20, "pss_mb": p[1] / 2**20, "uss_mb": p[2] / 2**20, "shmem_mb": p[3] / 2**20}
                for pid, p in sorted(self.peaks.items())]


def job_spec(folder: Path):
    return spec_mod.from_dict({
        "kind": "train", "experiment": "bench-scale", "data": {"path": str(folder)},
        "model": {"name": "mlp", "hidden": [256, 128]}, "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": BATCH}, "scaling": {"workers": 2, "ingest": "ray_data"},
        "tracking": {"log_model": False}})


def ingest_alone(job) -> dict:
    """The training split streamed through the workers' own reader (`ray_train.RayDataBatches` over Ray Data's
    iterator: the same shuffle buffer and conversion to float tensors), with no model, one consumer."""
    ds = ray_train.streamed_train_split(job)
    batches = ray_train.RayDataBatches(ds.iterator(), BATCH, data.load(job.data, splits=()), job.seed,
                                       job.data.shuffle_buffer)
    rows, t0 = 0, time.perf_counter()
    for x, _ in batches:
        rows += len(x)
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds}


def one_size(work: Path, rows: int) -> dict:
    from mlflow.tracking import MlflowClient

    from raybloom import tracking

    t0 = time.perf_counter()
    folder = make_dataset(work / f"rows-{rows}", rows)
    made = time.perf_counter() - t0
    job = job_spec(folder)
    train_rows = data.split_rows(folder, "train")
    sampler, others = WorkerSampler(), SampledOthersMeter().start()
    sampler.start()
    t0 = time.perf_counter()
    summary = ray_train.fit(job)
    wall = time.perf_counter() - t0
    workers, busy = sampler.stop(), others.stop()
    epoch_s = MlflowClient(tracking.tracking_uri(job)).get_metric_history(summary.run_id, "epoch_seconds")[0].value
    ingest = ingest_alone(job)
    out = {"rows": rows, "train_rows": train_rows, "dataset_gb_on_disk": sum(f.stat().st_size for f in folder.rglob("*.parquet")) / 2**30,
           "prepare_s": made, "wall_s": wall, "epoch_s": epoch_s, "samples_per_s": train_rows / epoch_s,
           "workers": workers, "peak_rss_mb": max(w["rss_mb"] for w in workers), "peak_uss_mb": max(w["uss_mb"] for w in workers),
           "peak_pss_mb": max(w["pss_mb"] for w in workers), "peak_shmem_mb": max(w["shmem_mb"] for w in workers),
           "ingest": ingest,
           "ingest_ratio": ingest["rows_per_s"] / (train_rows / epoch_s), "test_accuracy": summary.metrics.get("test_accuracy"),
           "others": busy}
    print(f"{rows:>9,} rows: {out['samples_per_s']:,.0f} samples/s, worker peak RSS {out['peak_rss_mb']:.0f} MB "
          f"(USS {out['peak_uss_mb']:.0f}, shared {out['peak_shmem_mb']:.0f}), ingest {ingest['rows_per_s']:,.0f} rows/s ({out['ingest_ratio']:.1f}x), "
          f"test accuracy {out['test_accuracy']:.3f}", flush=True)
    for f in folder.rglob("*.parquet"):
        f.unlink()
    return out


def plot(result: dict, path: Path) -> None:
    from raybloom import plots

    sizes = [r["rows"] for r in result["sizes"]]
    fig, (a, b) = plots.pyplot().subplots(1, 2, figsize=(10, 3.8))
    a.plot(sizes, [r["epoch_s"] for r in result["sizes"]], marker="o", label="epoch (rank 0's training pass)")
    a.plot(sizes, [r["wall_s"] for r in result["sizes"]], marker="o", label="whole run (start-up included)")
    a.set(xscale="log", yscale="log", xlabel="rows", ylabel="seconds", title="Time against rows")
    a.legend(fontsize=8)
    for key, label in (("peak_rss_mb", "RSS"), ("peak_pss_mb", "PSS"), ("peak_uss_mb", "USS"), ("peak_shmem_mb", "shared (object store)")):
        b.plot(sizes, [r[key] for r in result["sizes"]], marker="o", label=f"worker peak {label}")
    b.set(xscale="log", xlabel="rows", ylabel="MB", title="Memory of a worker against rows", ylim=(0, None))
    b.legend(fontsize=8)
    fig.tight_layout()
    path.write_bytes(plots.png(fig, dpi=100))


def markdown(r: dict) -> str:
    lines = [f"# Scale: ray_data streaming, 2 workers, MLP 784-256-128-10, one epoch ({r['date'][:16]} UTC)", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; load before {r['load_before']}, after "
             f"{r['load_after']}.", "",
             "| rows | on disk (uint8) | samples/s | worker peak RSS | PSS | USS | shared (object store) | ingest alone (rows/s) | "
             "ingest ÷ model | test acc | others (cores) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in r["sizes"]:
        lines.append(f"| {s['rows']:,} | {s['dataset_gb_on_disk']:.2f} GB | {s['samples_per_s']:,.0f} | {s['peak_rss_mb']:.0f} MB | "
                     f"{s['peak_pss_mb']:.0f} MB | {s['peak_uss_mb']:.0f} MB | {s['peak_shmem_mb']:.0f} MB | {s['ingest']['rows_per_s']:,.0f} | "
                     f"{s['ingest_ratio']:.1f}× | {s['test_accuracy']:.3f} | {s['others']['others_cores']:.2f} |")
    v = r["verdicts"]
    lines += ["", f"Throughput at {r['largest']:,} ÷ at {r['smallest']:,}: **{r['throughput_ratio']:.2f}** "
              f"(target ≥ {TARGETS['throughput_ratio_min']}) {v['throughput']}; peak worker RSS ratio **{r['rss_ratio']:.2f}** "
              f"(target ≤ {TARGETS['rss_ratio_max']}) {v['rss']}; ingest ÷ model at {r['largest']:,} "
              f"**{r['ingest_ratio']:.1f}×** (target ≥ {TARGETS['ingest_ratio_min']:g}×) {v['ingest']}.", "",
             "![time and memory against rows](scale.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k and 200k rows only")
    p.add_argument("--sizes", type=str, default=None, help="comma-separated row counts")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else ([20_000, 200_000] if a.quick else [20_000, 200_000, 2_000_000])
    tmp = scratch("bench-scale-")
    work = Path(tmp.name)
    import torch

    result = {"benchmark": "scale: ray_data streaming", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(torch=torch.__version__), "targets": TARGETS, "load_before": loadavg(), "sizes": []}
    ray_session.init_ray(job_spec(work))
    for rows in sizes:
        result["sizes"].append(one_size(work, rows))
    result["load_after"] = loadavg()
    small, large = result["sizes"][0], result["sizes"][-1]
    result.update(smallest=small["rows"], largest=large["rows"],
                  throughput_ratio=large["samples_per_s"] / small["samples_per_s"],
                  rss_ratio=large["peak_rss_mb"] / small["peak_rss_mb"], uss_ratio=large["peak_uss_mb"] / small["peak_uss_mb"],
                  ingest_ratio=large["ingest_ratio"], quick=a.quick or bool(a.sizes))
    busy = max(s["others"]["others_cores"] for s in result["sizes"]) > 0.5
    result["busy"] = busy

    def verdict(ok: bool) -> str:
        return "NOISY" if busy else ("PASS" if ok else "MISS")

    result["verdicts"] = {"throughput": verdict(result["throughput_ratio"] >= TARGETS["throughput_ratio_min"]),
                          "rss": verdict(result["rss_ratio"] <= TARGETS["rss_ratio_max"]),
                          "ingest": verdict(result["ingest_ratio"] >= TARGETS["ingest_ratio_min"])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "scale-quick" if result["quick"] else "scale"
    plot(result, out / f"{stem}.png")
    write_results(out, stem, result, markdown(result).replace("(scale.png)", f"({stem}.png)"))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
