"""Run the federated jobs in full and record what they reach (the accuracies README lists as measured).

Not a ratio benchmark: one run per line, seed 0, each job as shipped in jobs/ (the model is not logged):
the IID FedAvg job with its centralized counterpart (`raybloom compare`), Dirichlet(0.1) with FedProx and
with FedAvg, the byzantine client (weights × 100) against FedMedian and against FedAvg, a NaN-sending
client against FedAvg, and central DP. A run that fails (FedAvg under attack can) is listed with its reason.
Then the federated search jobs/search_fed_dirichlet.yaml, against the two Dirichlet lines.

    .venv/bin/python tests/benchmarks/run_federated_jobs.py

Writes tests/benchmarks/results/federated_jobs.md and .json, and the tables between the
`<!-- federated-results -->` and `<!-- fed-search-results -->` markers of README.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
try:
    import raybloom  # noqa: F401
except ImportError:
    sys.path.insert(0, str(ROOT / "platform"))

from mlflow.tracking import MlflowClient  # noqa: E402

from raybloom import spec as spec_mod, tracking  # noqa: E402
from raybloom.errors import UserError  # noqa: E402
from raybloom.federated.compare import run_comparison  # noqa: E402
from raybloom.federated.driver import run_federated  # noqa: E402

import benchlib  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = [
    ("IID, FedAvg (and centralized, same 30 epochs)", "fedavg_cnn_digits_iid.yaml", [], True),
    ("Dirichlet(0.1), FedProx mu=0.1", "fedprox_cnn_digits_dirichlet.yaml", [], False),
    ("Dirichlet(0.1), FedAvg", "fedprox_cnn_digits_dirichlet.yaml", ["federated.strategy=fedavg"], False),
    ("IID, client 0 sends weights x100, FedMedian", "fedmedian_cnn_digits_attack.yaml", [], False),
    ("IID, client 0 sends weights x100, FedAvg", "fedmedian_cnn_digits_attack.yaml", ["federated.strategy=fedavg"], False),
    ("IID, client 0 sends NaN, FedAvg", "fedmedian_cnn_digits_attack.yaml",
     ["federated.strategy=fedavg", "federated.faults.byzantine=nan"], False),
    ("IID, FedAvg, central DP (server clipping 1.0, noise 0.3)", "fed_dp_cnn_digits.yaml", [], False),
]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="fed-jobs-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("RAYBLOOM_DATA_DIR", str(work / "data"))
    rows = []
    for i, (what, job, overrides, with_central) in enumerate(RUNS):
        s = spec_mod.load(ROOT / "jobs" / job, ["tracking.log_model=false", f"experiment=fed-jobs-{i}", *overrides])
        t0 = time.perf_counter()
        row = {"what": what, "job": job, "overrides": overrides}
        try:
            summary = run_comparison(s) if with_central else run_federated(s)
            m = summary.metrics
            row.update(test_accuracy=m.get("federated_test_accuracy", m.get("test_accuracy")),
                       centralized=m.get("centralized_test_accuracy"))
            c = MlflowClient(tracking.tracking_uri(s))
            row["clients_failed_total"] = c.get_run(summary.run_id).data.metrics.get("clients_failed_total")
            row["worst_client"] = c.get_run(summary.run_id).data.metrics.get("clients_val_accuracy_min")
            row["dp_epsilon"] = c.get_run(summary.run_id).data.metrics.get("dp_epsilon")  # after the last round
            row["rounds_run"] = c.get_run(summary.run_id).data.metrics.get("rounds_run")
        except UserError as e:
            row["failed"] = re.sub(r"\s+", " ", str(e))[:300]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = ["| setting (10 clients, 15 rounds × 2 local epochs, digits CNN) | test accuracy | worst client, last round | note |",
             "|---|---:|---:|---|"]
    for r in rows:
        if "failed" in r:
            reason = re.sub(r" \(node .*", "", r["failed"].split(": ", 1)[-1])
            lines.append(f"| {r['what']} | — | — | run FAILED: {reason} |")
            continue
        note = f"centralized {r['centralized']:.4f} (gap {r['test_accuracy'] - r['centralized']:+.4f})" if r.get("centralized") else ""
        if r.get("dp_epsilon") is not None:
            note += f"{'; ' if note else ''}ε = {r['dp_epsilon']:.1f} at δ = 1e-5 after {int(r['rounds_run'])} rounds"
        if r.get("clients_failed_total"):
            note += f"{'; ' if note else ''}{int(r['clients_failed_total'])} client replies left out"
        worst = f"{r['worst_client']:.4f}" if r.get("worst_client") is not None else "—"
        lines.append(f"| {r['what']} | {r['test_accuracy']:.4f} | {worst} | {note} |")
    when = _dt.datetime.now().isoformat(timespec="seconds")
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated_jobs.json").write_text(json.dumps({"when": when, "machine": benchlib.machine(), "runs": rows}, indent=1))
    (RESULTS / "federated_jobs.md").write_text(f"# Federated jobs, run in full ({when})\n\n{table}\n")
    search = fed_search(rows)
    (RESULTS / "federated_jobs.json").write_text(json.dumps({"when": when, "machine": benchlib.machine(), "runs": rows,
                                                             "search": search}, indent=1))
    (RESULTS / "federated_jobs.md").write_text(f"# Federated jobs, run in full ({when})\n\n{table}\n\n{search['table']}\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    for marker, block in (("federated-results", table), ("fed-search-results", search["table"])):
        text = re.sub(rf"(<!-- {marker} -->\n).*?(\n<!-- /{marker} -->)", lambda m: m.group(1) + block + m.group(2),
                      text, flags=re.S)
    readme.write_text(text)
    print(table, search["table"], sep="\n\n")
    return 0


def _short(param: str) -> str:
    try:
        return f"{float(param):.3g}" if "." in param else param
    except ValueError:
        return param


def fed_search(rows: list[dict]) -> dict:
    """jobs/search_fed_dirichlet.yaml as shipped: what it found, against the shipped Dirichlet jobs' rows."""
    from raybloom.search.driver import run_study

    s = spec_mod.load(ROOT / "jobs" / "search_fed_dirichlet.yaml")
    t0 = time.perf_counter()
    summary = run_study(s)
    c = MlflowClient(tracking.tracking_uri(s))
    exp = c.get_experiment_by_name(s.experiment).experiment_id
    trials = [r for r in c.search_runs([exp]) if r.data.tags.get("raybloom.kind") == "trial"]
    best = next(r for r in trials if r.data.tags["raybloom.trial"] == c.get_run(summary.run_id).data.tags["raybloom.best_trial"])
    keys = list(s.search.space)
    found = ", ".join(f"{k.removeprefix('federated.')}={_short(best.data.params[k])}" for k in keys)
    rounds = sum(int(r.data.metrics.get("rounds_run", 0)) for r in trials)
    pruned = sum(r.data.tags.get("trial_state") == "PRUNED" for r in trials)
    out = {"seconds": round(time.perf_counter() - t0, 1), "trials": len(trials), "pruned": pruned, "rounds": rounds,
           "best": {k: best.data.params[k] for k in keys}, "best_val_accuracy": summary.metrics.get("best_value"),
           "best_test_accuracy": best.data.metrics.get("test_accuracy"),
           "best_worst_client": best.data.metrics.get("clients_val_accuracy_min")}
    shipped = {r["what"]: r for r in rows if r["job"] == "fedprox_cnn_digits_dirichlet.yaml" and "failed" not in r}
    lines = ["| Dirichlet(0.1), 10 clients, 15 rounds | test accuracy | worst client, last round |", "|---|---:|---:|"]
    lines += [f"| shipped: {what.split(', ', 1)[1]} | {r['test_accuracy']:.4f} | {r.get('worst_client') or 0:.4f} |"
              for what, r in shipped.items()]
    lines.append(f"| search's best trial ({found}) | {out['best_test_accuracy']:.4f} | {out['best_worst_client'] or 0:.4f} |")
    out["table"] = "\n".join(lines) + (f"\n\n{len(trials)} trials, {pruned} pruned; {rounds} of {len(trials) * s.federated.rounds} "
                                       f"rounds run; {out['seconds']:.0f} s; best server validation accuracy "
                                       f"{out['best_val_accuracy']:.4f} (`tests/benchmarks/results/federated_jobs.md`).")
    print(json.dumps({k: v for k, v in out.items() if k != "table"}), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
