"""One table of every benchmark figure: ratio, target, measured median and spread, PASS / MISS, machine.

Reads the JSON each script under tests/benchmarks/ writes into results/ (engine, ray, search,
federated, scale), writes results/SUMMARY.md, and replaces README's table between the
`<!-- bench-summary -->` markers. `make bench` runs every script and then this one; run it alone to
rebuild the table from the latest results.

    .venv/bin/python tests/benchmarks/summary.py
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parents[1] / "README.md"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(what, target, ok, median, spread, machine, when, script, fmt="{:.3f}", noisy=False):
    verdict = "NOISY" if noisy else ("info" if ok is None else ("PASS" if ok else "MISS"))  # a busy machine never PASSes
    value = fmt.format(median) if isinstance(median, (int, float)) else str(median)
    return {"what": what, "target": target, "median": value, "spread": spread, "verdict": verdict,
            "machine": machine, "when": when, "script": script}


def _machine(d: dict) -> str:
    m = d.get("machine", {})
    return f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores"


def rows() -> list[dict]:
    out = []
    if (d := _load("engine")):
        out.append(_row("engine train_epoch ÷ bare PyTorch loop (cnn_digits)", f"≤ {d['target']}", d["ratio_of_medians"] <= d["target"],
                        d["ratio_of_medians"], f"paired IQR {d['paired_ratio_q1']:.3f}..{d['paired_ratio_q3']:.3f}",
                        _machine(d), d.get("date", ""), "bench_engine.py", noisy=d.get("noisy", False)))
    if (d := _load("ray")):
        a, c, noisy = d["a_epoch"], d["c_ingest"], d.get("noisy", False)
        out.append(_row("Ray 2 workers ÷ hand-written gloo DDP, whole epochs (checkpoint, report, MLflow write included; "
                        "the DDP script does the same per-epoch work)", f"≤ {a['target']}", a["ratio_of_medians"] <= a["target"],
                        a["ratio_of_medians"], "per round " + ", ".join(f"{r:.2f}" for r in a["per_round_ratios"]),
                        _machine(d), d.get("date", ""), "bench_ray.py", noisy=noisy))
        ing = c["arrays"]
        out.append(_row("ingest (arrays) ÷ what a worker consumes", f"≥ {c['target']:g}×", ing["ratio_to_consumption"] >= c["target"],
                        ing["ratio_to_consumption"], "{:.0f}..{:.0f}".format(*ing["ratio_min_max"]), _machine(d), d.get("date", ""),
                        "bench_ray.py", "{:.0f}×", noisy=noisy))
    if (d := _load("ray_e2e")):
        s = d["summary"]
        for e in d["epoch_list"]:
            r = s[str(e)]
            out.append(_row(f"`raybloom run` ÷ plain Ray Train script (Ray's defaults: a 2 s controller poll), end to end, "
                            f"{e} epochs ({r['raybloom_wall_s']:.0f} s vs "
                            f"{r['peer_wall_s']:.0f} s)", "≤ 0.9", r["pass"], r["ratio"],
                            "per round " + ", ".join(f"{v:.2f}" for v in r["ratio_per_round"])
                            + (f"; ÷ the script on raybloom's Ray settings {r['ratio_to_tuned']:.2f}" if r.get("ratio_to_tuned") else ""),
                            _machine(d), d.get("when", ""), "bench_ray_e2e.py", "{:.2f}", r["noisy"]))
        f = s["fixed"]
        out.append(_row("`raybloom run` fixed cost, 2 workers (end to end − epochs × whole epoch)", "≤ 40 s", f["pass"], f["median_s"],
                        f"{f['min_s']:.1f}..{f['max_s']:.1f} s", _machine(d), d.get("when", ""), "bench_ray_e2e.py", "{:.1f} s",
                        f["noisy"]))
    if (d := _load("search")):
        t = d["targets"]
        g = d["pruning"]["groups"].get("tpe/successive_halving")
        if g:
            out.append(_row("search: share of trials pruned (TPE + successive halving)", f"≥ {t['pruned_share_min']:.0%}",
                            g["pruned_share"]["median"] >= t["pruned_share_min"], g["pruned_share"]["median"],
                            f"{g['pruned_share']['min']:.0%}..{g['pruned_share']['max']:.0%}", _machine(d), d.get("date", ""),
                            "bench_search.py", "{:.0%}", d["pruning"].get("noisy", False)))
            out.append(_row("search: epochs run ÷ unpruned study", f"≤ {t['epoch_ratio_max']:.0%}",
                            g["epoch_ratio"]["median"] <= t["epoch_ratio_max"], g["epoch_ratio"]["median"],
                            f"{g['epoch_ratio']['min']:.0%}..{g['epoch_ratio']['max']:.0%}", _machine(d), d.get("date", ""),
                            "bench_search.py", "{:.0%}", d["pruning"].get("noisy", False)))
            out.append(_row("search: best value, pruned − unpruned (points)", f"within {t['best_delta_max'] * 100:g}",
                            g["abs_best_delta"]["max"] <= t["best_delta_max"], g["best_delta"]["median"] * 100,
                            f"{g['best_delta']['min'] * 100:+.2f}..{g['best_delta']['max'] * 100:+.2f}", _machine(d),
                            d.get("date", ""), "bench_search.py", "{:+.2f}", d["pruning"].get("noisy", False)))
        p = d["parallelism"]
        out.append(_row("search: 8 trials, concurrency 2 (1 thread each) ÷ concurrency 1 (2 threads), wall", f"≤ {t['parallel_ratio_max']}",
                        p["ratio_of_medians"] <= t["parallel_ratio_max"], p["ratio_of_medians"],
                        f"spans {p['span_ratio']:.3f}", _machine(d), d.get("date", ""), "bench_search.py", noisy=p.get("noisy", False)))
    fed = {name: _load(name) for name in ("federated", "federated-local20")}
    for name, workload in (("federated", "the job's {} local epochs a round"), ("federated-local20", "{} local epochs a round")):
        if not (d := fed[name]):
            continue
        t = d["targets"]
        out.append(_row(f"federated simulation ÷ in-process FedAvg loop{' at full threads' if d.get('loop_threads') else ''}, "
                        f"end to end (10 clients, 5 rounds, "
                        f"{workload.format(d['local_epochs'])}: loop {statistics.median(x['wall_s'] for x in d['loop']):.0f} s)",
                        f"≤ {t['ratio']}", d["ratio_end_to_end"] <= t["ratio"], d["ratio_end_to_end"],
                        f"rounds only {d['ratio_rounds']:.2f}, rounds 2..N {d['ratio_rounds_after_first']:.2f}",
                        _machine(d), d.get("when", ""), "bench_federated.py" + (" --local-epochs 20" if name != "federated" else ""),
                        "{:.2f}", d.get("noisy", False)))
    if (d := _load("federated_peer")):
        s = d["summary"]
        out.append(_row(f"federated: `raybloom run` ÷ a plain Flower app on the same runtime, end to end (10 clients, "
                        f"{d['rounds']} rounds: {s['raybloom_wall_s']:.0f} s vs {s['peer_wall_s']:.0f} s)", f"≤ {d['target']}",
                        s["pass"], s["ratio"], "per pair " + ", ".join(f"{v:.2f}" for v in s["per_pair"])
                        + f"; rounds 2..N {s['rounds_ratio']:.2f}"
                        + (f"; without explanations and the logged model {s['lean_ratio']:.2f}" if "lean_ratio" in s else ""),
                        _machine(d), d.get("when", ""), "bench_federated_peer.py",
                        "{:.2f}", s["noisy"]))
    if (d := fed["federated"]):
        t = d["targets"]
        out.append(_row("federated: peak RSS growth, round 2 → last", f"≤ {t['rss_growth']:.0%}",
                        d["rss_growth_round2_to_last"] <= t["rss_growth"], d["rss_growth_round2_to_last"],
                        f"{len(d['simulation'])} run(s)", _machine(d), d.get("when", ""), "bench_federated.py", "{:+.1%}",
                        d.get("noisy", False)))
    if (d := _load("scale")):
        t, small, large = d["targets"], d["smallest"], d["largest"]
        when, m, noisy = d.get("date", ""), _machine(d), d.get("busy", False)
        out.append(_row(f"scale: ray_data throughput, {large:,} ÷ {small:,} rows (MLP, 2 workers)", f"≥ {t['throughput_ratio_min']}",
                        d["throughput_ratio"] >= t["throughput_ratio_min"], d["throughput_ratio"],
                        ", ".join(f"{s['rows']:,}: {s['samples_per_s']:,.0f}/s" for s in d["sizes"]), m, when, "bench_scale.py",
                        "{:.2f}", noisy))
        out.append(_row(f"scale: peak worker RSS, {large:,} ÷ {small:,} rows", f"≤ {t['rss_ratio_max']}",
                        d["rss_ratio"] <= t["rss_ratio_max"], d["rss_ratio"],
                        ", ".join(f"{s['peak_rss_mb']:.0f} MB (USS {s['peak_uss_mb']:.0f}"
                                  + (f", object store {s['peak_shmem_mb']:.0f}" if "peak_shmem_mb" in s else "") + ")"
                                  for s in d["sizes"]), m, when,
                        "bench_scale.py", "{:.2f}", noisy))
        out.append(_row(f"scale: ingest alone ÷ what the model consumes, {large:,} rows", f"≥ {t['ingest_ratio_min']:g}×",
                        d["ingest_ratio"] >= t["ingest_ratio_min"], d["ingest_ratio"],
                        ", ".join(f"{s['ingest_ratio']:.1f}×" for s in d["sizes"]), m, when, "bench_scale.py", "{:.1f}×", noisy))
    return out


def table(rs: list[dict]) -> str:
    lines = ["| figure | target | measured (median) | spread | verdict | machine | when | script |",
             "|---|---|---:|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['target']} | {r['median']} | {r['spread']} | {r['verdict']} | {r['machine']} | "
              f"{r['when'][:16]} | `{r['script']}` |" for r in rs]
    return "\n".join(lines)


def main() -> int:
    rs = rows()
    text = table(rs)
    (RESULTS / "SUMMARY.md").write_text("# Benchmarks: every figure, latest results\n\n" + text + "\n\n"
                                        "Misses are explained in README.md (Benchmarks).\n")
    readme = README.read_text()
    if "<!-- bench-summary -->" in readme:
        README.write_text(re.sub(r"(<!-- bench-summary -->\n).*?(<!-- /bench-summary -->)",
                                 lambda m: m.group(1) + text + "\n" + m.group(2), readme, flags=re.S))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
