"""Run the federated jobs in full and record what they reach (the accuracies README lists as measured).

Not a ratio benchmark: one run per line, seed 0, each job as shipped in jobs/ (the model is not logged):
the IID FedAvg job with its centralized counterpart (`raybloom compare`), Dirichlet(0.1) with FedProx and
with FedAvg, the byzantine client (weights × 100) against FedMedian and against FedAvg, a NaN-sending
client against FedAvg, and central DP. A run that fails (FedAvg under attack can) is listed with its reason.

    .venv/bin/python tests/benchmarks/run_federated_jobs.py

Writes tests/benchmarks/results/federated_jobs.md and .json, and the table between the
`<!-- federated-results -->` markers of README.md.
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
        except UserError as e:
            row["failed"] = re.sub(r"\s+", " ", str(e))[:300]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    lines = ["| setting (10 clients, 15 rounds × 2 local epochs, digits CNN) | test accuracy | note |", "|---|---:|---|"]
    for r in rows:
        if "failed" in r:
            reason = re.sub(r" \(node .*", "", r["failed"].split(": ", 1)[-1])
            lines.append(f"| {r['what']} | — | run FAILED: {reason} |")
            continue
        note = f"centralized {r['centralized']:.4f} (gap {r['test_accuracy'] - r['centralized']:+.4f})" if r.get("centralized") else ""
        if r.get("clients_failed_total"):
            note += f"{'; ' if note else ''}{int(r['clients_failed_total'])} client replies left out"
        lines.append(f"| {r['what']} | {r['test_accuracy']:.4f} | {note} |")
    when = _dt.datetime.now().isoformat(timespec="seconds")
    table = "\n".join(lines)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federated_jobs.json").write_text(json.dumps({"when": when, "machine": benchlib.machine(), "runs": rows}, indent=1))
    (RESULTS / "federated_jobs.md").write_text(f"# Federated jobs, run in full ({when})\n\n{table}\n")
    readme = ROOT / "README.md"
    text = readme.read_text()
    readme.write_text(re.sub(r"(<!-- federated-results -->\n).*?(\n<!-- /federated-results -->)",
                             lambda m: m.group(1) + table + m.group(2), text, flags=re.S))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
