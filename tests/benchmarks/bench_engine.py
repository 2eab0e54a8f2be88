"""Benchmark: raybloom's engine epoch vs a bare hand-written PyTorch loop (acceptance target: ratio <= 1.05).

Both sides train the same model (built by `raybloom.engine.build` from jobs/cnn_digits.yaml, same initial
weights), on the same training split, with the same Adam optimizer and learning rate, the same batch size,
the same per-epoch shuffled order (`torch.randperm` with the generator seeded as `Batches` seeds it) and the
same torch thread count. Augmentation is switched off for the measurement (`regularization.augment.shift=0`)
so the bare loop does exactly the engine's work; dropout stays, since it lives inside the model.

What is timed is the training pass only: `raybloom.engine.train_epoch(...)` called with the `Training`
object's model / batches / optimizer / objective / regularizer, against

    for each batch: index_select x and y, forward, F.cross_entropy, zero_grad, backward, step

`Training.run_epoch` (training + validation + bookkeeping) is timed too, for information only.

After the warm-up, epochs are interleaved (engine, bare; then bare, engine; ...) so load from other
processes on the machine hits both sides alike; a timed sample of a side is the mean of --epochs-per-sample
of its epochs (run_epoch: one epoch after each sample). Reported: median and spread of each side, the ratio of the medians
engine / bare (the acceptance figure, PASS when <= 1.05) and the median of the per-sample paired ratios.
A run is flagged noisy when the load average exceeds the cores or the paired ratios scatter by > 0.10.

    .venv/bin/python tests/benchmarks/bench_engine.py [--threads 2] [--repeats 15] [--strict]

Writes tests/benchmarks/results/engine.json and engine.md.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import raybloom  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "platform"))

import torch
from torch.nn import functional as F

from raybloom import data as data_mod
from raybloom import engine
from raybloom import spec as spec_mod

import benchlib  # noqa: E402 - beside this script
from benchlib import loadavg, quartiles  # noqa: E402

TARGET = 1.05
DEFAULT_SPEC = ROOT / "jobs" / "cnn_digits.yaml"
RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------------ the bare loop
def bare_epoch(model, optimizer, x, y, batch_size: int, seed: int, epoch: int) -> None:
    """The hand-written reference: the same shuffled order as `data.Batches`, nothing else."""
    model.train()
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------------------------------ helpers
def summary(v: list[float]) -> dict:
    q1, q3 = quartiles(v)
    return {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "q1_s": q1, "q3_s": q3,
            "samples_s": v}


def machine(threads: int) -> dict:
    return benchlib.machine(threads=threads, interop_threads=torch.get_num_interop_threads(), torch=torch.__version__)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn, clock=time.perf_counter) -> float:
    t0 = clock()
    fn()
    return clock() - t0


def ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", default=str(DEFAULT_SPEC), help="job spec to benchmark (default: jobs/cnn_digits.yaml)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both sides (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed samples of each side (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up epochs of each side (default 2)")
    p.add_argument("--epochs-per-sample", type=int, default=10,
                   help="epochs averaged into one timed sample of each side; an epoch is ~0.1 s here, so 10 "
                        "damp scheduler noise (default 10)")
    p.add_argument("--budget-s", type=float, default=90.0,
                   help="stop taking samples after this many seconds (at least 5 samples; default 90)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall (default), or cpu = process CPU time, steadier on a busy machine with --threads 1")
    p.add_argument("--no-full", action="store_true", help="skip the informational Training.run_epoch timing")
    p.add_argument("--out", default=str(RESULTS), help="folder for engine.json / engine.md")
    p.add_argument("--strict", action="store_true", help=f"exit 1 when the ratio misses {TARGET}")
    p.add_argument("overrides", nargs="*", help="extra key=value spec overrides")
    args = p.parse_args(argv)

    tmp = None
    if not os.environ.get("RAYBLOOM_DATA_DIR"):
        tmp = tempfile.TemporaryDirectory(prefix="raybloom-bench-")
        os.environ["RAYBLOOM_DATA_DIR"] = tmp.name

    # Same spec; augmentation off so the bare loop does exactly the same work; thread count pinned.
    overrides = ["regularization.augment.shift=0", "regularization.augment.noise=0",
                 "regularization.augment.hflip=false", f"train.threads={args.threads}", "train.progress=false",
                 *args.overrides]
    spec = spec_mod.load(args.spec, overrides)
    r = spec.regularization
    if r.l1 or r.l2 or spec.optim.grad_clip or spec.optim.name != "adam" or spec.model.name == "deconv":
        raise SystemExit("bench_engine: the bare loop covers Adam + cross-entropy without penalties or clipping")
    torch.set_num_threads(args.threads)
    dataset = data_mod.load(spec.data)
    x, y = dataset.train.x, dataset.train.y
    bs = spec.train.batch_size

    # Engine side: a Training object (it seeds, builds the model, Adam and Batches from the spec).
    tr = engine.Training(spec, dataset)
    torch.set_num_threads(args.threads)
    # Bare side: the same model built by engine.build, given the same initial weights, and its own Adam.
    torch.manual_seed(spec.seed)
    bare_model = engine.build(spec, dataset)
    bare_model.load_state_dict(copy.deepcopy(tr.model.state_dict()))
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=spec.optim.lr)
    # Informational: a second Training whose run_epoch (train + validate) is timed as a whole.
    full = engine.Training(spec, dataset) if not args.no_full else None
    torch.set_num_threads(args.threads)

    # Equivalence check: from the same weights and the same RNG state, one epoch of each must give the
    # same weights (same batches, same dropout masks, same updates).
    torch.manual_seed(1234)
    tr.batches.set_epoch(0)
    engine.train_epoch(tr.model, tr.batches, tr.optimizer, tr.objective, reg=tr.reg)
    torch.manual_seed(1234)
    bare_epoch(bare_model, bare_opt, x, y, bs, spec.seed, 0)
    with torch.no_grad():
        max_diff = max(float((a - b).abs().max()) for a, b in zip(tr.model.parameters(), bare_model.parameters()))
    same_work = max_diff <= 1e-5
    print(f"equivalence: max |w_engine - w_bare| after one epoch = {max_diff:.2e} "
          f"({'same work' if same_work else 'DIFFERENT WORK'})", flush=True)

    k = args.epochs_per_sample
    epoch = 1  # epoch 0 was the equivalence check; both sides see epoch e's order in round e

    def run_engine(e):
        tr.batches.set_epoch(e)
        engine.train_epoch(tr.model, tr.batches, tr.optimizer, tr.objective, reg=tr.reg)

    def run_bare(e):
        bare_epoch(bare_model, bare_opt, x, y, bs, spec.seed, e)

    def run_full(e):
        full.run_epoch()

    sides = {"engine": run_engine, "bare": run_bare}
    if full is not None:
        sides["full"] = run_full

    for _ in range(args.warmup):
        for fn in sides.values():
            fn(epoch)
        epoch += 1

    # A sample of each side is the mean of k epochs; the epochs themselves alternate engine / bare (order
    # flipped every epoch), so a burst of load lands on both sides. run_epoch: one epoch after each sample.
    # A full collection walks ~170k objects (~0.1 s, as long as an epoch): do it once, then freeze what
    # exists so the collector's own passes during the timed epochs stay small and fall on both sides alike.
    gc.collect()
    gc.freeze()
    clock = CLOCKS[args.clock]
    load_before = loadavg()
    times: dict[str, list[float]] = {name: [] for name in sides}
    t_start = time.perf_counter()
    flip = 0
    for i in range(args.repeats):
        acc = {"engine": 0.0, "bare": 0.0}
        for _ in range(k):
            order = ["engine", "bare"] if flip % 2 == 0 else ["bare", "engine"]
            flip += 1
            for name in order:
                acc[name] += timed(lambda: sides[name](epoch), clock)
            epoch += 1
        for name in acc:
            times[name].append(acc[name] / k)
        if full is not None:  # informational: one epoch per sample is enough
            times["full"].append(timed(lambda: run_full(epoch), clock))
        if time.perf_counter() - t_start > args.budget_s and i + 1 >= min(5, args.repeats):
            print(f"time budget of {args.budget_s:.0f} s spent after {i + 1} of {args.repeats} samples "
                  "(the machine is busy?)", flush=True)
            break
    wall = time.perf_counter() - t_start
    load_after = loadavg()
    gc.unfreeze()

    stats = {name: summary(v) for name, v in times.items()}
    ratio = stats["engine"]["median_s"] / stats["bare"]["median_s"]
    ratio_min = stats["engine"]["min_s"] / stats["bare"]["min_s"]  # least disturbed samples, for reference
    paired = [a / b for a, b in zip(times["engine"], times["bare"])]
    paired_median = statistics.median(paired)
    pq1, pq3 = quartiles(paired)
    verdict = "PASS" if ratio <= TARGET else "MISS"
    # Noisy: the paired ratios scatter widely, or other processes kept the cores busy while it ran.
    cores = machine(args.threads)["usable_cores"] or 1
    busy = max((load_before or [0])[0], (load_after or [0])[0]) > cores + 0.5
    noisy = (pq3 - pq1) > 0.10 or busy

    n_batches = len(tr.batches)
    result = {
        "benchmark": "engine train_epoch vs bare PyTorch loop",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "spec": os.path.relpath(args.spec, ROOT) if Path(args.spec).is_absolute() else args.spec,
        "overrides": overrides,
        "model": spec.model.name, "optimizer": f"{spec.optim.name} lr={spec.optim.lr}",
        "batch_size": bs, "train_samples": len(x), "batches_per_epoch": n_batches,
        "dropout": r.dropout, "augment": "off",
        "equivalence_max_weight_diff": max_diff, "same_work": same_work,
        "warmup_epochs": args.warmup, "repeats": args.repeats, "samples": len(times["engine"]),
        "epochs_per_sample": k, "clock": args.clock,
        "machine": machine(args.threads), "loadavg_before": load_before, "loadavg_after": load_after,
        "timed_wall_s": wall,
        "engine_train_epoch": stats["engine"], "bare_loop": stats["bare"],
        "engine_run_epoch": stats.get("full"),
        "ratio_of_medians": ratio, "ratio_of_minimums": ratio_min, "paired_ratio_median": paired_median, "paired_ratio_q1": pq1,
        "paired_ratio_q3": pq3, "paired_ratios": paired,
        "target": TARGET, "verdict": verdict, "noisy": noisy,
    }

    m = result["machine"]
    rows = [("engine `train_epoch`", stats["engine"]), ("bare PyTorch loop", stats["bare"])]
    if "full" in stats:
        rows.append(("engine `Training.run_epoch` (+ validation, info)", stats["full"]))
    clock_note = "" if args.clock == "wall" else " Times are process CPU time, not wall time."
    md = [
        "# Engine overhead benchmark",
        "",
        f"`{result['spec']}` ({spec.model.name}, {spec.optim.name} lr={spec.optim.lr}, batch {bs}, "
        f"dropout {r.dropout}, augmentation off): {len(x)} training samples, {n_batches} batches per epoch. "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {args.threads} threads. "
        f"{args.warmup} warm-up epochs, then {len(times['engine'])} samples of {k} epochs each, "
        "epochs interleaved engine / bare "
        f"(load average before/after: {load_before} / {load_after}).{clock_note}",
        "",
        "| | median epoch (ms) | IQR (ms) | min..max (ms) |",
        "|---|---:|---:|---:|",
    ]
    for label, s in rows:
        md.append(f"| {label} | {ms(s['median_s'])} | {ms(s['q1_s'])}..{ms(s['q3_s'])} | "
                  f"{ms(s['min_s'])}..{ms(s['max_s'])} |")
    md += [
        "",
        f"**engine / bare = {ratio:.3f}** (ratio of medians; target <= {TARGET}): **{verdict}**. "
        f"Median of the per-sample paired ratios: {paired_median:.3f} (IQR {pq1:.3f}..{pq3:.3f}); "
        f"ratio of the fastest samples: {ratio_min:.3f}.",
        "",
        f"Same work checked: after one epoch from the same weights and RNG state the two models differ by "
        f"at most {max_diff:.1e}.",
        "",
    ]
    if noisy:
        md[-1:-1] = [f"**Noisy run** (load average {load_before} -> {load_after} on {cores} cores, paired-ratio "
                     f"IQR {pq1:.3f}..{pq3:.3f}): other processes competed for the cores; rerun on a quiet "
                     "machine before trusting the verdict.", ""]
    benchlib.write_results(args.out, "engine", result, "\n".join(md))
    if tmp is not None:
        tmp.cleanup()
    return 1 if (args.strict and verdict == "MISS") or not same_work else 0


if __name__ == "__main__":
    sys.exit(main())
