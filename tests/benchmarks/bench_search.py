"""Benchmark: Optuna search on Ray: what pruning saves, and what running two trials at once gains.

Two acceptance items of the search issue.

(1) Pruning: "with a pruner on, >= 30% of trials are pruned and the total epochs run are <= 60% of the same
    study without pruning, with the best value within 0.5 points."
    The study of jobs/search_cnn_lr_filters.yaml (cnn on digits, 5-D space: lr, filters, kernel size, dropout,
    L2; metric val_accuracy, maximized; 12 trials of 8 epochs; 2 trials at a time) is run once per pruner
    (median, successive_halving, hyperband) and once with `search.pruner=none`, with the same sampler, the
    same `search.seed`, the same space and n_trials. Each study has its own study name and its own journal
    file (`search.storage=<tmp>/optuna-<name>.journal`); all write to one fresh temp SQLite MLflow store.
    Measured per study, from the Optuna storage: the share of trials PRUNED, the total epochs run (sum of the
    trials' user_attrs["epochs"], checked against the run summary's epochs_total) and the best value
    (best COMPLETE trial). "Within 0.5 points" = |best_pruned - best_unpruned| <= 0.005 in accuracy.
    Samplers: tpe (the job's) and random. With TPE the proposals after the first random start-up trials
    depend on the results seen so far (and, with 2 trials at a time, on which trials had finished when the
    next one was asked for), so the pruned and unpruned studies do not try the same configurations. With
    the random sampler and a fixed seed both studies try exactly the same configurations in the same order
    (checked, and so are the values of the trials that complete in both), so the comparison isolates the
    pruner. Pruning decisions themselves still depend on timing when two trials run at once (the median rule
    compares with whatever other trials have reported at that epoch so far). Repeated for a few sampler
    seeds; reported per seed and as median and range.

(2) Parallelism: "concurrency: 2 on 2 cores -> wall time of 8 equal trials <= 0.6 x running them one after
    another", with the same total threads on both sides: concurrency 2 runs each trial on 1 thread,
    concurrency 1 on 2 (`search.threads_per_trial` = cores / concurrency), so the sequential baseline uses
    the machine as a user running one trial at a time would (before, it ran 1 thread a trial on 2 cores,
    and a ratio near 0.5 was built in).
    8 equal trials: grid sampler over optim.lr with 8 categorical values (all the same cost: same cnn
    [32, 64] k3, same data, same epochs), pruner none. `run_study` timed with
    search.concurrency=2 and with search.concurrency=1, alternated (1, 2, 2, 1, ...). Ray is started once in
    this process (`raybloom.ray_session.init_ray`) before everything, and one untimed warm-up search lets the
    Ray worker processes import torch and raybloom, so Ray's start-up is excluded from both sides alike.
    The timed wall includes what run_study does around the trials in both modes (data check, study and
    MLflow parent run, per-trial MLflow child runs, Optuna journal writes, the final plots). Also reported
    from the MLflow child runs: the trials' span (first trial start -> last trial end), each trial's
    median per-epoch training time (metric epoch_seconds) and its time outside training epochs
    (validation, study load, data load, MLflow writes), per mode: a per-epoch slowdown with 2 at once means
    the two trials compete for the cores / memory bandwidth; anything else is scheduling and fixed cost.

Noise: the 1-minute load average before and after, and how many cores processes *outside* this process
tree (which includes Ray's daemons and workers) used during each part; > 0.25 core on average flags the
part as noisy. `--wait-quiet S` first waits (up to S seconds, polling every 15 s) for a 1-minute load average
below --quiet-below (default 1.2).

    .venv/bin/python tests/benchmarks/bench_search.py [--quick] [--seeds 0,1] [--samplers tpe,random]
                                                      [--rounds 2] [--wait-quiet 480] [--strict]

Writes tests/benchmarks/results/search.json and search.md (--quick: search-quick.json / search-quick.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import raybloom  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(ROOT / "platform"))

import optuna
import torch

from raybloom.search.driver import run_study
from raybloom.search.study import open_storage, storage_url
from raybloom import spec as spec_mod

import benchlib  # noqa: E402 - beside this script
from benchlib import SampledOthersMeter, loadavg, quartiles, wait_quiet  # noqa: E402 - sampled: Ray workers that exit count as ours

TARGET_PRUNED_SHARE = 0.30  # (1) at least this share of trials pruned
TARGET_EPOCH_RATIO = 0.60  # (1) epochs with pruning / epochs without, at most
TARGET_BEST_DELTA = 0.005  # (1) |best pruned - best unpruned|, at most (0.5 accuracy points)
TARGET_PAR_RATIO = 0.60  # (2) wall(concurrency 2) / wall(concurrency 1), at most
NOISE_CORES = 0.25
PRUNE_SPEC = ROOT / "jobs" / "search_cnn_lr_filters.yaml"
PAR_LRS = [0.001, 0.0015, 0.002, 0.0025, 0.003, 0.0035, 0.004, 0.005]
RESULTS = Path(__file__).resolve().parent / "results"
STATE = optuna.trial.TrialState


# ------------------------------------------------------------------------------------------ machine / noise
def machine() -> dict:
    import ray

    return benchlib.machine(torch=torch.__version__, optuna=optuna.__version__, ray=ray.__version__)


# ------------------------------------------------------------------------------------------ stats
def med(v: list[float]) -> float | None:
    return statistics.median(v) if v else None


def stats(v: list[float]) -> dict:
    q1, q3 = quartiles(v)
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "q1": q1, "q3": q3, "n": len(v)}


@contextlib.contextmanager
def quiet_stderr(log: list[str]):
    """run_study prints one progress line per trial on stderr: keep them for the JSON, not the terminal."""
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        yield
    log.extend(buf.getvalue().splitlines())


# ------------------------------------------------------------------------------------------ (1) pruning
def study_trials(spec) -> list[dict]:
    s = spec.search
    study = optuna.load_study(study_name=s.study_name, storage=open_storage(storage_url(spec)))
    return [{"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
             "last_reported": (t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None),
             "epochs": int(t.user_attrs.get("epochs", 0)), "reason": t.user_attrs.get("reason")}
            for t in study.get_trials(deepcopy=False)]


def prune_study(work: Path, sampler: str, pruner: str, seed: int, n_trials: int, epochs: int, concurrency: int) -> dict:
    name = f"bench-{sampler}-s{seed}-{pruner}"
    spec = spec_mod.load(PRUNE_SPEC, {
        "search.sampler": sampler, "search.pruner": pruner, "search.seed": seed, "search.n_trials": n_trials,
        "search.concurrency": concurrency, "train.epochs": epochs, "search.study_name": name,
        "search.storage": str(work / f"optuna-{name}.journal"), "experiment": "bench-search-pruning",
        "train.progress": False, "tracking.log_model": False})
    log: list[str] = []
    t0 = time.perf_counter()
    with quiet_stderr(log):
        summary = run_study(spec)
    wall = time.perf_counter() - t0
    trials = study_trials(spec)
    finished = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED")]
    complete = [t for t in trials if t["state"] == "COMPLETE"]
    epochs_total = sum(t["epochs"] for t in trials)
    best = max((t["value"] for t in complete), default=None)  # val_accuracy: maximized
    out = {"study": name, "sampler": sampler, "pruner": pruner, "seed": seed, "wall_s": round(wall, 2),
           "trials": len(trials), "finished": len(finished), "complete": len(complete),
           "pruned": sum(t["state"] == "PRUNED" for t in trials), "failed": sum(t["state"] == "FAIL" for t in trials),
           "epochs_total": epochs_total, "summary_epochs_total": summary.metrics.get("epochs_total"),
           "best_value": best, "summary_best_value": summary.metrics.get("best_value"),
           "trial_list": trials, "progress_log": log}
    print(f"  {sampler:6s} seed {seed} {pruner:18s}: {out['pruned']:2d}/{out['finished']} pruned, "
          f"{epochs_total:3d} epochs, best {best if best is None else f'{best:.4f}'}, {wall:5.1f} s", flush=True)
    return out


def compare(pruned: dict, base: dict, epochs: int) -> dict:
    share = pruned["pruned"] / max(pruned["finished"], 1)
    ratio = pruned["epochs_total"] / max(base["epochs_total"], 1)
    delta = (None if pruned["best_value"] is None or base["best_value"] is None
             else pruned["best_value"] - base["best_value"])
    ok = {"pruned_share": share >= TARGET_PRUNED_SHARE, "epoch_ratio": ratio <= TARGET_EPOCH_RATIO,
          "best_delta": delta is not None and abs(delta) <= TARGET_BEST_DELTA}
    out = {"pruned_share": share, "epoch_ratio": ratio, "best_delta": delta, "wall_ratio": pruned["wall_s"] / base["wall_s"],
           "checks": ok, "verdict": "PASS" if all(ok.values()) else "MISS"}
    # Same proposals? (random sampler: expected; TPE: only the start-up trials)
    pa = [json.dumps(t["params"], sort_keys=True) for t in sorted(pruned["trial_list"], key=lambda t: t["number"])]
    pb = [json.dumps(t["params"], sort_keys=True) for t in sorted(base["trial_list"], key=lambda t: t["number"])]
    n = min(len(pa), len(pb))
    out["same_params_prefix"] = next((i for i in range(n) if pa[i] != pb[i]), n)
    out["same_params_all"] = pa == pb
    # Trials that completed in both with the same params: the same value? (determinism of the training)
    bvals = {json.dumps(t["params"], sort_keys=True): t["value"] for t in base["trial_list"] if t["state"] == "COMPLETE"}
    diffs = [abs(t["value"] - bvals[k]) for t in pruned["trial_list"] if t["state"] == "COMPLETE"
             and (k := json.dumps(t["params"], sort_keys=True)) in bvals]
    out["common_complete"] = len(diffs)
    out["common_complete_max_value_diff"] = max(diffs) if diffs else None
    # Was the unpruned study's best configuration pruned in the pruned study? (random: same params)
    if base["best_value"] is not None:
        best_t = max((t for t in base["trial_list"] if t["state"] == "COMPLETE"), key=lambda t: t["value"])
        key = json.dumps(best_t["params"], sort_keys=True)
        twin = [t for t in pruned["trial_list"] if json.dumps(t["params"], sort_keys=True) == key]
        out["unpruned_best_trial"] = best_t["number"]
        out["unpruned_best_in_pruned_study"] = twin[0]["state"] if twin else "not proposed"
        if twin and twin[0]["state"] == "PRUNED":
            out["unpruned_best_pruned_after_epochs"] = twin[0]["epochs"]
    return out


def aggregate(rows: list[dict]) -> dict:
    def agg(key):
        v = [r[key] for r in rows if r[key] is not None]
        return {"median": med(v), "min": min(v) if v else None, "max": max(v) if v else None, "values": v}

    out = {k: agg(k) for k in ("pruned_share", "epoch_ratio", "best_delta", "wall_ratio")}
    absd = [abs(r["best_delta"]) for r in rows if r["best_delta"] is not None]
    out["abs_best_delta"] = {"median": med(absd), "max": max(absd) if absd else None}
    out["seeds_pass"] = sum(r["verdict"] == "PASS" for r in rows)
    out["seeds"] = len(rows)
    m = out
    ok = (m["pruned_share"]["median"] is not None and m["pruned_share"]["median"] >= TARGET_PRUNED_SHARE
          and m["epoch_ratio"]["median"] <= TARGET_EPOCH_RATIO
          and m["abs_best_delta"]["median"] is not None and m["abs_best_delta"]["median"] <= TARGET_BEST_DELTA)
    out["verdict_on_medians"] = "PASS" if ok else "MISS"
    return out


# ------------------------------------------------------------------------------------------ (2) parallelism
def threads_for(concurrency: int) -> int:
    """The same total threads on both sides: every core busy, one trial or several at once."""
    return max(1, (os.cpu_count() or 1) // concurrency)


def par_spec(work: Path, tag: str, concurrency: int, n: int, epochs: int):
    space = {"optim.lr": {"type": "categorical", "choices": PAR_LRS[:n]}}
    name = f"bench-par-{tag}"
    return spec_mod.load(PRUNE_SPEC, {
        "search.space": space, "search.sampler": "grid", "search.pruner": "none", "search.n_trials": n,
        "search.concurrency": concurrency, "search.threads_per_trial": threads_for(concurrency), "search.metric": "val_accuracy",
        "model.filters": [32, 64], "model.kernel_size": 3, "regularization.dropout": 0.0,
        "train.epochs": epochs, "search.study_name": name, "search.storage": str(work / f"optuna-{name}.journal"),
        "experiment": "bench-search-parallel", "train.progress": False, "tracking.log_model": False})


def par_run(work: Path, tag: str, concurrency: int, n: int, epochs: int) -> dict:
    from mlflow.tracking import MlflowClient

    from raybloom import tracking

    spec = par_spec(work, tag, concurrency, n, epochs)
    log: list[str] = []
    others = SampledOthersMeter().start()
    t_call = time.time()
    t0 = time.perf_counter()
    with quiet_stderr(log):
        summary = run_study(spec)
    wall = time.perf_counter() - t0
    t_return = time.time()
    noise = others.stop()
    client = MlflowClient(tracking.tracking_uri(spec))
    children = client.search_runs([summary.experiment_id], f"tags.mlflow.parentRunId = '{summary.run_id}'",
                                  max_results=1000)
    trials = []
    for c in children:
        es = [m.value for m in sorted(client.get_metric_history(c.info.run_id, "epoch_seconds"), key=lambda m: m.step)]
        dur = (c.info.end_time - c.info.start_time) / 1000.0 if c.info.end_time else None
        trials.append({"trial": int(c.data.tags.get("raybloom.trial", -1)), "state": c.data.tags.get("trial_state"),
                       "start": c.info.start_time / 1000.0, "end": (c.info.end_time or 0) / 1000.0,
                       "duration_s": dur, "epoch_seconds": es, "epochs": len(es),
                       "outside_epochs_s": None if dur is None else dur - sum(es)})
    trials.sort(key=lambda t: t["trial"])
    starts, ends = [t["start"] for t in trials], [t["end"] for t in trials]
    all_epochs = [e for t in trials for e in t["epoch_seconds"]]
    out = {"tag": tag, "concurrency": concurrency, "threads_per_trial": threads_for(concurrency), "wall_s": wall, "trials": len(trials),
           "states": sorted({t["state"] for t in trials}), "epochs_total": summary.metrics.get("epochs_total"),
           "head_s": min(starts) - t_call, "span_s": max(ends) - min(starts), "tail_s": t_return - max(ends),
           "trial_duration_median_s": med([t["duration_s"] for t in trials if t["duration_s"] is not None]),
           "trial_outside_epochs_median_s": med([t["outside_epochs_s"] for t in trials if t["outside_epochs_s"] is not None]),
           "epoch_seconds": stats(all_epochs) if all_epochs else None,
           "others": noise, "trial_list": trials, "progress_log": log}
    print(f"  concurrency {concurrency}: wall {wall:5.1f} s (trials span {out['span_s']:5.1f} s, head "
          f"{out['head_s']:4.1f} s, tail {out['tail_s']:4.1f} s), median epoch "
          f"{1e3 * out['epoch_seconds']['median']:.0f} ms, median trial {out['trial_duration_median_s']:.2f} s, "
          f"others {noise and noise['others_cores']} cores", flush=True)
    return out


# ------------------------------------------------------------------------------------------ main
def fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 seed, random sampler, median vs none, 6 trials of 4 epochs; 4 parallel trials (~2 min)")
    p.add_argument("--seeds", default=None, help="sampler seeds, comma-separated (default 0,1,2, as the time budget allows; quick 0)")
    p.add_argument("--samplers", default=None, help="samplers (default tpe,random; quick random)")
    p.add_argument("--pruners", default=None,
                   help="pruners compared with none (default median,successive_halving,hyperband; quick median)")
    p.add_argument("--n-trials", type=int, default=None, help="trials per pruning study (default 12; quick 6)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per pruning trial (default 8; quick 4)")
    p.add_argument("--concurrency", type=int, default=None,
                   help="trials at once in the pruning studies (default: the job's, 2)")
    p.add_argument("--prune-budget-s", type=float, default=330.0,
                   help="start another seed of (1) only if, at the pace of the seeds so far, it ends within this many "
                        "seconds of the start of (1) (at least one seed runs; default 330)")
    p.add_argument("--par-trials", type=int, default=None, help="equal trials of (2) (default 8; quick 4)")
    p.add_argument("--par-epochs", type=int, default=None, help="epochs per trial of (2) (default 8; quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="timed searches of (2) per concurrency, alternated 1 2 2 1 ... (default 4; quick 1)")
    p.add_argument("--skip-pruning", action="store_true")
    p.add_argument("--skip-parallel", action="store_true")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="first wait up to S seconds for a quiet machine (polled every 15 s)")
    p.add_argument("--quiet-below", type=float, default=1.2, help="1-minute load average counted as quiet (default 1.2)")
    p.add_argument("--out", default=str(RESULTS), help="folder for search.json / search.md")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    q = args.quick
    seeds = [int(v) for v in (args.seeds or ("0" if q else "0,1,2")).split(",")]
    samplers = (args.samplers or ("random" if q else "tpe,random")).split(",")
    pruners = (args.pruners or ("median" if q else "median,successive_halving,hyperband")).split(",")
    n_trials = args.n_trials or (6 if q else 12)
    epochs = args.epochs or (4 if q else 8)
    job = spec_mod.load(PRUNE_SPEC)
    concurrency = args.concurrency or job.search.concurrency
    par_n = args.par_trials or (4 if q else 8)
    par_epochs = args.par_epochs or (2 if q else 8)
    rounds = args.rounds or (1 if q else 4)
    if par_n > len(PAR_LRS):
        raise SystemExit(f"bench_search: --par-trials at most {len(PAR_LRS)}")

    quiet = wait_quiet(args.wait_quiet, args.quiet_below) if args.wait_quiet > 0 else None
    load_start = loadavg()
    t_bench = time.perf_counter()

    tmp = benchlib.scratch("raybloom-bench-search-")
    work = Path(tmp.name)
    cwd = os.getcwd()
    os.chdir(work)  # MLflow artifacts (the search plots) land in the temp folder

    import ray

    from raybloom import ray_session

    t0 = time.perf_counter()
    ray_session.init_ray(job)
    ray_start_s = time.perf_counter() - t0
    mach = machine()
    print(f"Ray started in this process in {ray_start_s:.1f} s ({ray.cluster_resources().get('CPU', 0):g} CPUs); "
          f"load average {load_start}", flush=True)

    # One untimed search first: it prepares the data set and lets two Ray workers import torch and raybloom.
    print("warm-up search (untimed):", flush=True)
    warm = par_run(work, "warmup", 2, 2, 1)

    # ---------------------------------------------------------------- (2) first: it is the shorter one
    par = None
    if not args.skip_parallel:
        print(f"(2) parallelism: {par_n} equal trials of {par_epochs} epochs, 1 thread each; "
              f"{rounds} round(s) of concurrency 1 / 2 alternated", flush=True)
        order = [c for r in range(rounds) for c in ((1, 2) if r % 2 == 0 else (2, 1))]
        meter = SampledOthersMeter().start()
        load_par = loadavg()
        runs = [par_run(work, f"c{c}-r{i}", c, par_n, par_epochs) for i, c in enumerate(order)]
        par_noise = meter.stop()
        by = {c: [r for r in runs if r["concurrency"] == c] for c in (1, 2)}
        walls = {c: [r["wall_s"] for r in by[c]] for c in (1, 2)}
        ratio = med(walls[2]) / med(walls[1])
        pairs = [b["wall_s"] / a["wall_s"] for a, b in zip(by[1], by[2])]
        span_ratio = med([r["span_s"] for r in by[2]]) / med([r["span_s"] for r in by[1]])
        ep = {c: [e for r in by[c] for t in r["trial_list"] for e in t["epoch_seconds"]] for c in (1, 2)}
        outside = {c: [t["outside_epochs_s"] for r in by[c] for t in r["trial_list"]] for c in (1, 2)}
        fixed = {c: [r["head_s"] + r["tail_s"] for r in by[c]] for c in (1, 2)}
        # What 2 at once would give with no scheduling cost and no slowdown: the fixed part + half the trials' span
        ideal = (med(fixed[2]) + med([r["span_s"] for r in by[1]]) / 2) / med(walls[1])
        par = {"trials": par_n, "epochs": par_epochs, "threads_per_trial": {c: threads_for(c) for c in (1, 2)}, "lrs": PAR_LRS[:par_n],
               "rounds": rounds, "order": order, "runs": runs,
               "wall_s": {str(c): stats(walls[c]) for c in (1, 2)},
               "ratio_of_medians": ratio, "paired_ratios": pairs, "span_ratio": span_ratio,
               "ideal_ratio_if_trials_halved": ideal,
               "epoch_seconds": {str(c): stats(ep[c]) for c in (1, 2)},
               "epoch_slowdown": med(ep[2]) / med(ep[1]),
               "trial_outside_epochs_s": {str(c): stats(outside[c]) for c in (1, 2)},
               "fixed_s": {str(c): stats(fixed[c]) for c in (1, 2)},
               "loadavg_start": load_par, "others": par_noise,
               "noisy": bool(par_noise and par_noise["others_cores"] > NOISE_CORES),
               "target": TARGET_PAR_RATIO, "verdict": "PASS" if ratio <= TARGET_PAR_RATIO else "MISS"}
        print(f"  wall(2) / wall(1) = {ratio:.3f} (target <= {TARGET_PAR_RATIO}): {par['verdict']}; per-epoch "
              f"slowdown with 2 at once {par['epoch_slowdown']:.2f}x", flush=True)

    # ---------------------------------------------------------------- (1) pruning
    prune = None
    if not args.skip_pruning:
        print(f"(1) pruning: {PRUNE_SPEC.relative_to(ROOT)}, {n_trials} trials of {epochs} epochs, "
              f"{concurrency} at once; samplers {samplers}, pruners {pruners} vs none, seeds {seeds}", flush=True)
        meter = SampledOthersMeter().start()
        load_prune = loadavg()
        t_prune = time.perf_counter()
        studies, comparisons, seeds_done = [], [], []
        for seed in seeds:
            spent = time.perf_counter() - t_prune
            if seeds_done and spent + spent / len(seeds_done) > args.prune_budget_s:
                print(f"  another seed would overrun the time budget of {args.prune_budget_s:.0f} s "
                      f"({spent:.0f} s spent): seeds {seeds_done} only", flush=True)
                break
            for sampler in samplers:
                base = prune_study(work, sampler, "none", seed, n_trials, epochs, concurrency)
                studies.append(base)
                for pruner in pruners:
                    st = prune_study(work, sampler, pruner, seed, n_trials, epochs, concurrency)
                    studies.append(st)
                    c = compare(st, base, epochs)
                    comparisons.append({"sampler": sampler, "pruner": pruner, "seed": seed, **c})
            seeds_done.append(seed)
        prune_noise = meter.stop()
        groups = {}
        for sampler in samplers:
            for pruner in pruners:
                rows = [c for c in comparisons if c["sampler"] == sampler and c["pruner"] == pruner]
                if rows:
                    groups[f"{sampler}/{pruner}"] = {"sampler": sampler, "pruner": pruner, **aggregate(rows)}
        job_key = f"{job.search.sampler}/{job.search.pruner}"
        acceptance = groups.get(job_key)
        prune = {"spec": str(PRUNE_SPEC.relative_to(ROOT)), "n_trials": n_trials, "epochs": epochs,
                 "concurrency": concurrency, "samplers": samplers, "pruners": pruners, "seeds": seeds_done,
                 "metric": job.search.metric, "pruner_settings": {
                     "median": "MedianPruner(n_startup_trials=3, n_warmup_steps=2)",
                     "successive_halving": "SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)",
                     "hyperband": f"HyperbandPruner(min_resource=1, max_resource={epochs}, reduction_factor=3)"},
                 "studies": studies, "comparisons": comparisons, "groups": groups,
                 "job_default": job_key, "acceptance_group": job_key,
                 "verdict": acceptance["verdict_on_medians"] if acceptance else None,
                 "wall_s": time.perf_counter() - t_prune, "loadavg_start": load_prune, "others": prune_noise,
                 "noisy": bool(prune_noise and prune_noise["others_cores"] > NOISE_CORES)}

    load_end = loadavg()
    total = time.perf_counter() - t_bench
    ray.shutdown()
    os.chdir(cwd)

    result = {"benchmark": "Optuna search on Ray: pruning savings and trial parallelism",
              "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "quick": q,
              "machine": mach, "wait_quiet": quiet, "loadavg_start": load_start, "loadavg_end": load_end,
              "ray_start_s": ray_start_s, "warmup": {k: warm[k] for k in ("wall_s", "head_s", "span_s", "tail_s")},
              "total_s": total,
              "targets": {"pruned_share_min": TARGET_PRUNED_SHARE, "epoch_ratio_max": TARGET_EPOCH_RATIO,
                          "best_delta_max": TARGET_BEST_DELTA, "parallel_ratio_max": TARGET_PAR_RATIO},
              "pruning": prune, "parallelism": par}
    benchlib.write_results(args.out, "search-quick" if q else "search", result, markdown(result))
    tmp.cleanup()
    missed = (prune and prune["verdict"] == "MISS") or (par and par["verdict"] == "MISS")
    return 1 if args.strict and missed else 0


def markdown(r: dict) -> str:
    m = r["machine"]
    quiet = r["wait_quiet"]
    waited = ""
    if quiet:
        waited = (f" Waited {quiet['waited_s']} s for a 1-min load average < {quiet['threshold']} "
                  f"({'reached' if quiet['quiet'] else 'NOT reached'}; readings {quiet['loadavg_1min']}).")
    md = ["# Search benchmark" + (" (quick smoke run)" if r["quick"] else ""), "",
          f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, Optuna {m['optuna']}, Ray {m['ray']}. "
          f"Ray started once in this process before everything ({r['ray_start_s']:.1f} s), then one untimed warm-up "
          f"search of 2 one-epoch trials (data preparation, Ray workers importing torch: {r['warmup']['wall_s']:.1f} s); "
          "neither is in any timing. "
          f"Load average at start / end: {r['loadavg_start']} / {r['loadavg_end']}.{waited} "
          f"Whole benchmark: {r['total_s']:.0f} s.", ""]
    p = r["pruning"]
    if p:
        md += [f"## 1. Pruning (target: >= {TARGET_PRUNED_SHARE:.0%} of trials pruned, epochs <= "
               f"{TARGET_EPOCH_RATIO:.0%} of the unpruned study, |best pruned - best unpruned| <= {TARGET_BEST_DELTA})", "",
               f"`{p['spec']}`: {p['n_trials']} trials of {p['epochs']} epochs, {p['concurrency']} at once, metric "
               f"{p['metric']} (maximized; the validation split has ~270 samples, so one sample = ~0.37 points). "
               f"Each pruner's study vs the same study with `search.pruner=none` (same sampler, same seed); "
               f"sampler seeds {p['seeds']}. Values: median over seeds (min..max).", "",
               "| sampler | pruner | trials pruned | epochs vs unpruned | best pruned - unpruned | wall vs unpruned | seeds PASS | verdict (medians) |",
               "|---|---|---:|---:|---:|---:|---:|---|"]
        for g in p["groups"].values():
            def cell(k, f):
                a = g[k]
                return f"{f(a['median'])} ({f(a['min'])}..{f(a['max'])})" if len(a["values"]) > 1 else f(a["median"])
            pct = lambda v: fmt(v, ".0%")  # noqa: E731
            md.append(f"| {g['sampler']} | {g['pruner']} | {cell('pruned_share', pct)} | {cell('epoch_ratio', pct)} | "
                      f"{cell('best_delta', lambda v: fmt(v, '+.4f'))} | {cell('wall_ratio', lambda v: fmt(v, '.2f'))} | "
                      f"{g['seeds_pass']}/{g['seeds']} | {g['verdict_on_medians']} |")
        ag = p["groups"].get(p["acceptance_group"])
        if ag:
            md += ["", f"**Acceptance (the job's own sampler / pruner when this ran, {p['acceptance_group']}): "
                   f"{ag['verdict_on_medians']}** "
                   f"(pruned {fmt(ag['pruned_share']['median'], '.0%')}, epochs {fmt(ag['epoch_ratio']['median'], '.0%')}, "
                   f"best {fmt(ag['best_delta']['median'], '+.4f')})."]
        md += ["", "Per study:", "",
               "| sampler | seed | pruner | complete / pruned / failed | epochs | pruned after (epochs) | best | wall (s) | same params as unpruned | unpruned best trial here |",
               "|---|---:|---|---:|---:|---|---:|---:|---|---|"]
        comps = {(c["sampler"], c["seed"], c["pruner"]): c for c in p["comparisons"]}
        for s in p["studies"]:
            c = comps.get((s["sampler"], s["seed"], s["pruner"]))
            same = "-" if c is None else ("all" if c["same_params_all"] else f"first {c['same_params_prefix']}")
            twin = "-" if c is None else str(c.get("unpruned_best_in_pruned_study", "-")).replace("PRUNED", "pruned") + (
                f" after {c['unpruned_best_pruned_after_epochs']} ep." if c and "unpruned_best_pruned_after_epochs" in c else "")
            at = sorted(t["epochs"] for t in s["trial_list"] if t["state"] == "PRUNED")
            md.append(f"| {s['sampler']} | {s['seed']} | {s['pruner']} | {s['complete']} / {s['pruned']} / {s['failed']} | "
                      f"{s['epochs_total']} | {', '.join(map(str, at)) or '-'} | {fmt(s['best_value'], '.4f')} | "
                      f"{s['wall_s']:.1f} | {same} | {twin} |")
        diffs = [c["common_complete_max_value_diff"] for c in p["comparisons"] if c["sampler"] == "random"
                 and c["common_complete_max_value_diff"] is not None]
        if diffs:
            md += ["", f"Random sampler: trials with the same parameters that completed in both studies have values "
                   f"differing by at most {max(diffs):.2g} (training is deterministic for a given configuration)."]
        md += ["", f"Part 1 took {p['wall_s']:.0f} s; load average at its start {p['loadavg_start']}; processes outside "
               f"this benchmark used {p['others'] and p['others']['others_cores']} cores on average."]
        if p["noisy"]:
            md += ["", "**Noisy** (other processes competed for the cores): pruning decisions with 2 trials at once "
                   "depend on timing; rerun on a quiet machine before trusting the figures."]
        md.append("")
    a = r["parallelism"]
    if a:
        e1, e2 = a["epoch_seconds"]["1"], a["epoch_seconds"]["2"]
        w1, w2 = a["wall_s"]["1"], a["wall_s"]["2"]
        o1, o2 = a["trial_outside_epochs_s"]["1"], a["trial_outside_epochs_s"]["2"]
        sp = {c: med([x["span_s"] for x in a["runs"] if x["concurrency"] == c]) for c in (1, 2)}

        s = a["epoch_slowdown"]
        slow = ("do not slow each other down" if s < 1.05 else "slow each other down slightly" if s < 1.2
                else "slow each other down")

        def cores(c, k):
            v = [x["others"][k] for x in a["runs"] if x["concurrency"] == c and x["others"]]
            return fmt(med(v), ".2f")

        fx = {c: a["fixed_s"][str(c)]["median"] for c in (1, 2)}
        md += [f"## 2. Parallelism (target: wall(concurrency 2) <= {TARGET_PAR_RATIO} x wall(concurrency 1))", "",
               f"{a['trials']} equal trials (grid over optim.lr = {a['lrs']}; cnn [32, 64] k3, {a['epochs']} epochs, "
               f"pruner none; the same total threads: concurrency 1 runs a trial on {a['threads_per_trial'][1]} "
               f"threads, concurrency 2 each on {a['threads_per_trial'][2]}), `run_study` timed {a['rounds']}x per mode, order {a['order']}, "
               f"after an untimed warm-up search. Medians (min..max).", "",
               "| | wall of run_study (s) | trials span (s) | head + tail (s) | epoch (ms) | per trial outside epochs (s) | cores used: this benchmark / others |",
               "|---|---:|---:|---:|---:|---:|---:|"]
        for c, w, e, o in ((1, w1, e1, o1), (2, w2, e2, o2)):
            md.append(f"| concurrency {c} | {w['median']:.1f} ({w['min']:.1f}..{w['max']:.1f}) | {sp[c]:.1f} | "
                      f"{fx[c]:.1f} | {1e3 * e['median']:.0f} (IQR {1e3 * e['q1']:.0f}..{1e3 * e['q3']:.0f}) | "
                      f"{o['median']:.2f} | {cores(c, 'ours_cores')} / {cores(c, 'others_cores')} |")
        md += ["", f"**wall(2) / wall(1) = {a['ratio_of_medians']:.3f}** (ratio of medians; target <= {TARGET_PAR_RATIO}): "
               f"**{a['verdict']}**. Paired ratios {', '.join(f'{v:.3f}' for v in a['paired_ratios'])}; "
               f"trials' span only: {a['span_ratio']:.3f}.", "",
               f"Per-epoch training time with two trials at once is {a['epoch_slowdown']:.2f}x that of one trial alone "
               f"(one trial on all the threads vs two trials on half each {slow}). "
               f"Head + tail = what run_study does before the first trial starts and after the last one ends (data "
               f"check, study, MLflow parent run, plots): the same in both modes. With no slowdown and no scheduling "
               f"cost the ratio would be {a['ideal_ratio_if_trials_halved']:.3f} (head + tail + half the "
               f"one-at-a-time span).", "",
               f"Load average at the start of part 2: {a['loadavg_start']}; processes outside this benchmark used "
               f"{a['others'] and a['others']['others_cores']} cores on average."]
        if a["noisy"]:
            md += ["", "**Noisy run**: other processes competed for the cores; rerun on a quiet machine before "
                   "trusting the verdict."]
        md.append("")
    return "\n".join(md)


if __name__ == "__main__":
    sys.exit(main())
