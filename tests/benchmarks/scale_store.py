"""Diagnosis for bench_scale's memory row: what a `ray_data` worker's object-store pages are, at each prefetch.

One synthetic set (2 M rows by default, bench_scale's), one epoch of bench_scale's job per setting of
RAYBLOOM_INGEST_PREFETCH (1, Ray Data's default, and 0, raybloom's on one node), side by side in one run:
the object store's use, sampled with `ray memory --stats-only` every 5 s during the epoch, and once, 15 s
into it, the blocks each Train worker holds pinned (`ray memory`, PINNED_IN_MEMORY: a deserialized block
its process still references), beside each worker's peak RSS / USS / shared pages. The `ray memory` calls
are processes of their own (about a second of CPU each): the speed here is not bench_scale's. Once (of
two runs here) a worker that `ray memory` asked as it exited aborted ("Mutex corrupt"), between the two
settings; the product's runs never call it.

    .venv/bin/python tests/benchmarks/scale_store.py            # 2 M rows, about 5 minutes here
    .venv/bin/python tests/benchmarks/scale_store.py --rows 200000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_scale  # noqa: E402
from benchlib import loadavg, machine, scratch, write_results  # noqa: E402

from raybloom import data, ray_session, ray_train  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
SAMPLE_S, SNAPSHOT_AFTER_S = 5.0, 15.0


def _ray_memory(address: str, *args: str) -> str:
    return subprocess.run([RAY, "memory", "--address", address, "--units", "MB", *args], capture_output=True,
                          text=True, timeout=60).stdout


class StoreSampler(threading.Thread):
    """The store's use every SAMPLE_S seconds while the epoch runs, and one snapshot of pinned blocks."""

    def __init__(self, address: str, workers: bench_scale.WorkerSampler):
        super().__init__(daemon=True)
        self.address, self.workers, self.running = address, workers, True
        self.used: list[tuple[float, int]] = []
        self.pinned: dict[int, list[float]] | None = None

    def run(self) -> None:
        first = None
        while self.running:
            m = re.search(r"Plasma memory usage (\d+) MiB", _ray_memory(self.address, "--stats-only"))
            if m and self.workers.peaks:  # the epoch has begun once Train workers exist
                now = time.perf_counter()
                first = first or now
                self.used.append((now - first, int(m.group(1))))
                if self.pinned is None and now - first >= SNAPSHOT_AFTER_S:
                    self.pinned = self._pinned()
            time.sleep(SAMPLE_S)

    def _pinned(self) -> dict[int, list[float]]:
        """Sizes (MB) of the objects each Train worker pins, from `ray memory`'s table."""
        out: dict[int, list[float]] = {pid: [] for pid in self.workers.peaks}
        for line in _ray_memory(self.address, "--sort-by", "PID", "--n", "2000").splitlines():
            cells = [c.strip() for c in line.split("|")]
            if len(cells) > 5 and cells[-2] == "PINNED_IN_MEMORY" and cells[1].isdigit() and int(cells[1]) in out:
                size = re.match(r"([\d.]+) MB", cells[-3])
                out[int(cells[1])].append(float(size.group(1)) if size else 0.0)
        return out

    def stop(self) -> None:
        self.running = False
        self.join()


def one_setting(job, prefetch: int, address: str) -> dict:
    os.environ[ray_train.PREFETCH_ENV] = str(prefetch)
    workers = bench_scale.WorkerSampler()
    store = StoreSampler(address, workers)
    workers.start()
    store.start()
    t0 = time.perf_counter()
    ray_train.fit(job)
    wall = time.perf_counter() - t0
    store.stop()
    peaks = workers.stop()
    used = [u for _, u in store.used]
    pinned = store.pinned or {}
    out = {"prefetch": prefetch, "wall_s": wall, "store_samples": store.used,
           "store_median_mb": statistics.median(used) if used else None, "store_max_mb": max(used) if used else None,
           "pinned": [{"pid": pid, "blocks": len(sizes), "mb": sum(sizes)} for pid, sizes in sorted(pinned.items())],
           "workers": peaks, "peak_rss_mb": max(w["rss_mb"] for w in peaks), "peak_uss_mb": max(w["uss_mb"] for w in peaks),
           "peak_shmem_mb": max(w["shmem_mb"] for w in peaks)}
    print(f"prefetch {prefetch}: store median {out['store_median_mb']} MB (max {out['store_max_mb']}), pinned "
          f"{[(p['blocks'], round(p['mb'])) for p in out['pinned']]}, worker peak RSS {out['peak_rss_mb']:.0f} MB "
          f"(USS {out['peak_uss_mb']:.0f}, shared {out['peak_shmem_mb']:.0f}), {wall:.0f} s", flush=True)
    return out


def markdown(r: dict) -> str:
    lines = [f"# Object-store pages of a ray_data worker, by prefetch ({r['date'][:16]} UTC)", "",
             f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores; {r['rows']:,} rows (bench_scale's set and "
             f"job: MLP, 2 Ray Train workers, one epoch); load before {r['load_before']}, after {r['load_after']}. The "
             f"store sampled every {SAMPLE_S:.0f} s with `ray memory --stats-only`; pinned blocks from one `ray memory` "
             f"{SNAPSHOT_AFTER_S:.0f} s into the epoch. `ray memory` runs are processes of their own: speed here is not "
             "bench_scale's.", "",
             "| RAYBLOOM_INGEST_PREFETCH | store used, median (max) | blocks pinned per worker (MB) | worker peak RSS | USS | shared |",
             "|---:|---:|---|---:|---:|---:|"]
    for s in r["settings"]:
        pinned = ", ".join(f"{p['blocks']} ({p['mb']:.0f} MB)" for p in s["pinned"]) or "—"
        lines.append(f"| {s['prefetch']} | {s['store_median_mb']} MB ({s['store_max_mb']} MB) | {pinned} | "
                     f"{s['peak_rss_mb']:.0f} MB | {s['peak_uss_mb']:.0f} MB | {s['peak_shmem_mb']:.0f} MB |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    import ray
    import torch

    tmp = scratch("scale-store-")
    folder = bench_scale.make_dataset(Path(tmp.name) / f"rows-{a.rows}", a.rows)
    job = bench_scale.job_spec(folder)
    result = {"benchmark": "scale: object-store pages by prefetch", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(torch=torch.__version__), "rows": a.rows, "train_rows": data.split_rows(folder, "train"),
              "load_before": loadavg(), "settings": []}
    ray_session.init_ray(job)
    address = ray.get_runtime_context().gcs_address
    for prefetch in (1, 0):
        result["settings"].append(one_setting(job, prefetch, address))
    result["load_after"] = loadavg()
    write_results(Path(a.out), "scale-store", result, markdown(result))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
