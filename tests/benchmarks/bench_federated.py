"""Benchmark: Flower's simulation engine on Ray vs a plain in-process FedAvg loop running the same client code.

Acceptance targets (issue 5): 10 clients, 5 rounds,
  (1) simulation wall time / plain loop wall time <= 1.5;
  (2) peak RSS (the whole process tree: driver, raylet, GCS, client actors) grows <= 5% from round 2 to the
      last round.

Both sides run `jobs/fedavg_cnn_digits_iid.yaml` (digits CNN, IID partitions, 2 local epochs a round) with
`federated.rounds=5`, and both train every client with `raybloom.federated.client.local_train` (the
engine). The plain loop calls it for each client in turn in this process (torch threads = cores, through
`federated.client_cpus`, which `local_train` applies on every call: so it uses the machine as fully as the
simulation's side-by-side actors do; until 2026-12-02 it ran on one thread, half of this machine), averages the weights by sample
count and evaluates the global model on the validation split, as the ServerApp does. The simulation side
is `raybloom.federated.driver.run_federated(spec)`: Flower's supported runtime, `flwr run` on a SuperLink
in simulation mode that the driver starts (the ServerApp and Ray in processes the SuperLink spawns), client
actors (1 CPU each, 2 side by side), the ServerApp recording every round in MLflow (a SQLite file), the model
not logged. (Until 2026-12-02 it was Flower's deprecated in-process `run_simulation`: README has both.)

Two figures are reported for (1), because the simulation pays a fixed start-up (the SuperLink, Ray,
actors importing torch and flwr, the MLflow run, the heatmap) that the loop does not:
  - end to end: `run_federated()` wall time / the loop's wall time (loading data included on both sides);
  - rounds: the simulation's rounds (first round's start to last round's end, from the ServerApp's
    `round_seconds`) / the loop's rounds.
Sides alternate (loop, sim, sim, loop, ...) so load from elsewhere hits both alike; medians are reported.
RSS is sampled every 0.1 s over this process and all its descendants; the peak within each round's window
(from the MLflow timestamps of the round's metrics) gives (2).

    .venv/bin/python tests/benchmarks/bench_federated.py [--repeats 2] [--rounds 5] [--local-epochs N] [--evaluate-every K]
        [--wait-quiet 600] [--quick]

Writes tests/benchmarks/results/federated.json and federated.md (--quick: federated-quick.*).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import raybloom  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "platform"))

import torch

from mlflow.tracking import MlflowClient

from raybloom import data, engine, spec as spec_mod, tracking
from raybloom.objective import make_objective

import benchlib  # noqa: E402
from benchlib import loadavg, wait_quiet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_RATIO = 1.5
TARGET_RSS_GROWTH = 0.05
NOISE_CORES = 0.25  # others using more than this many cores on average: NOISY, never PASS


class RssSampler(threading.Thread):
    """Total RSS (bytes) of this process tree, sampled every `every` seconds: [(time.time(), rss)]."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.samples, self.stop = every, [], threading.Event()
        self.page = os.sysconf("SC_PAGE_SIZE")

    def tree_rss(self) -> int:
        fields = benchlib.proc_fields()
        parent = {pid: int(f[1]) for pid, f in fields.items()}
        return sum(int(fields[p][21]) * self.page for p in benchlib.descendants(parent, os.getpid()) if p in fields)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.tree_rss()))
            time.sleep(self.every)


def plain_loop(spec) -> dict:
    """The same client code, one client after another in this process; FedAvg by sample count."""
    from raybloom.federated import client

    t0 = time.perf_counter()
    # every core for the loop: `local_train` sets torch to `federated.client_cpus` threads on each call (1 by
    # default, which would run the loop on half of this machine while the simulation runs two actors)
    spec = spec.with_overrides({"federated.client_cpus": os.cpu_count() or 1})
    f = spec.federated
    spec_json = spec.model_dump_json()
    dataset = data.load(spec.data)
    engine.seed_everything(spec.seed)
    model = engine.build(spec, dataset)
    objective = make_objective(spec, dataset)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rounds = []
    for rnd in range(1, f.rounds + 1):
        r0 = time.perf_counter()
        results = []
        for pid in range(f.clients):
            new, metrics = client.local_train(spec, pid, state, rnd, spec.optim.lr, spec_json=spec_json)
            results.append((new, metrics["num-examples"]))
        total = sum(n for _, n in results)
        state = {k: (sum(s[k].double() * n for s, n in results) / total).to(v.dtype) for k, v in state.items()}
        model.load_state_dict(state)
        val = engine.evaluate(model, dataset.val, objective)
        rounds.append(time.perf_counter() - r0)
    return {"wall_s": time.perf_counter() - t0, "rounds_s": sum(rounds), "later_rounds_s": sum(rounds[1:]),
            "round_s": rounds, "val_accuracy": val.get("accuracy")}


def simulation(spec, sampler: RssSampler) -> dict:
    from raybloom.federated.driver import run_federated

    t0 = time.perf_counter()
    summary = run_federated(spec)
    wall = time.perf_counter() - t0
    c = MlflowClient(tracking.tracking_uri(spec))
    secs = sorted(c.get_metric_history(summary.run_id, "round_seconds"), key=lambda m: m.step)
    ends = [m.timestamp / 1000 for m in secs]
    starts = [e - m.value for e, m in zip(ends, secs)]
    peaks = [max((r for t, r in sampler.samples if s <= t <= e), default=0) for s, e in zip(starts, ends)]
    return {"wall_s": wall, "rounds_s": ends[-1] - starts[0], "later_rounds_s": ends[-1] - ends[0],
            "round_s": [m.value for m in secs], "val_accuracy": summary.metrics.get("server_val_accuracy"),
            "peak_rss_mb_by_round": [round(p / 2**20, 1) for p in peaks],
            "rss_growth_round2_to_last": (peaks[-1] - peaks[1]) / peaks[1] if len(peaks) > 1 and peaks[1] else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=None, help="timed pairs (default 2; quick 1)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-epochs", type=int, default=None, help="override the job's 2 local epochs (more work per round)")
    p.add_argument("--evaluate-every", type=int, default=None,
                   help="override federated.evaluate_every (0: no per-client evaluation; the cost of that step)")
    p.add_argument("--wait-quiet", type=float, default=0, help="first wait up to S s for a 1-min load average < 1")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args(argv)
    repeats = a.repeats or (1 if a.quick else 2)
    quiet = wait_quiet(a.wait_quiet) if a.wait_quiet else None
    work = Path(tempfile.mkdtemp(prefix="bench-fed-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("RAYBLOOM_DATA_DIR", str(work / "data"))
    spec = spec_mod.load(ROOT / "jobs" / "fedavg_cnn_digits_iid.yaml",
                         [f"federated.rounds={a.rounds}", "tracking.log_model=false", "experiment=bench-federated"]
                         + ([f"federated.local_epochs={a.local_epochs}"] if a.local_epochs else [])
                         + ([f"federated.evaluate_every={a.evaluate_every}"] if a.evaluate_every is not None else []))
    from raybloom.federated.driver import prepare_federated

    spec = prepare_federated(spec)[0].spec  # data prepared once, outside the timings
    sampler = RssSampler()
    sampler.start()
    others = benchlib.SampledOthersMeter().start()
    loops, sims = [], []
    order = ["loop", "sim", "sim", "loop"] * repeats
    for side in order[:2 * repeats]:
        print(f"== {side}", flush=True)
        (loops if side == "loop" else sims).append(plain_loop(spec) if side == "loop" else simulation(spec, sampler))
        print(f"   {json.dumps((loops if side == 'loop' else sims)[-1])}", flush=True)
    sampler.stop.set()
    noise = others.stop()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    end_to_end = med([s["wall_s"] for s in sims]) / med([x["wall_s"] for x in loops])
    rounds = med([s["rounds_s"] for s in sims]) / med([x["rounds_s"] for x in loops])
    later = med([s["later_rounds_s"] for s in sims]) / med([x["later_rounds_s"] for x in loops])
    growth = max(s["rss_growth_round2_to_last"] for s in sims)
    out = {"when": _dt.datetime.now().isoformat(timespec="seconds"), "machine": benchlib.machine(torch=torch.__version__),
           "loadavg_end": loadavg(), "quiet": quiet, "clients": spec.federated.clients, "rounds": a.rounds,
           "local_epochs": spec.federated.local_epochs, "loop_threads": os.cpu_count() or 1, "repeats": repeats, "loop": loops, "simulation": sims,
           "ratio_end_to_end": end_to_end, "ratio_rounds": rounds, "ratio_rounds_after_first": later, "rss_growth_round2_to_last": growth,
           "targets": {"ratio": TARGET_RATIO, "rss_growth": TARGET_RSS_GROWTH},
           "others": noise, "noisy": noise["others_cores"] > NOISE_CORES}
    name = (("federated-quick" if a.quick else "federated") + (f"-local{a.local_epochs}" if a.local_epochs else "")
            + (f"-evaluate{a.evaluate_every}" if a.evaluate_every is not None else ""))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=1))
    verdict = lambda ok: "NOISY" if out["noisy"] else ("PASS" if ok else "MISS")  # noqa: E731
    md = [f"# Federated simulation vs a plain in-process FedAvg loop ({out['when']})", "",
          f"Machine: {out['machine']['cpu']}, {out['machine']['cores']} cores; load average at the end {out['loadavg_end']}; "
          f"processes outside the benchmark used {noise['others_cores']} core(s) on average. The loop runs torch on "
          f"{out['loop_threads']} thread(s). "
          f"{spec.federated.clients} clients, {a.rounds} rounds, {spec.federated.local_epochs} local epochs, "
          f"{repeats} run(s) per side, medians.", "",
          "| figure | simulation | plain loop | ratio | target | |", "|---|---|---|---|---|---|",
          f"| end to end (s) | {med([s['wall_s'] for s in sims]):.1f} | {med([x['wall_s'] for x in loops]):.1f} | "
          f"{end_to_end:.2f} | <= {TARGET_RATIO} | {verdict(end_to_end <= TARGET_RATIO)} |",
          f"| rounds only (s) | {med([s['rounds_s'] for s in sims]):.1f} | {med([x['rounds_s'] for x in loops]):.1f} | "
          f"{rounds:.2f} | <= {TARGET_RATIO} | {verdict(rounds <= TARGET_RATIO)} |",
          f"| rounds 2..{a.rounds} (s) | {med([s['later_rounds_s'] for s in sims]):.1f} | "
          f"{med([x['later_rounds_s'] for x in loops]):.1f} | {later:.2f} | (information) | |",
          f"| peak RSS growth, round 2 -> last | {growth * 100:+.1f}% | | | <= {TARGET_RSS_GROWTH * 100:.0f}% | "
          f"{verdict(growth <= TARGET_RSS_GROWTH)} |", "",
          "Seconds per round: simulation " + "; ".join(str([round(v, 2) for v in s["round_s"]]) for s in sims)
          + "; loop " + "; ".join(str([round(v, 2) for v in x["round_s"]]) for x in loops), "",
          "Peak RSS of the process tree per round (MB): " + "; ".join(str(s["peak_rss_mb_by_round"]) for s in sims), "",
          "Validation accuracy after the last round: simulation " + ", ".join(f"{s['val_accuracy']:.3f}" for s in sims)
          + "; loop " + ", ".join(f"{x['val_accuracy']:.3f}" for x in loops), ""]
    (RESULTS / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
