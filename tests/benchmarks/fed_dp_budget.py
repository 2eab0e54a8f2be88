"""Accuracy and the privacy budget of the DP federated job: jobs/fed_dp_cnn_digits.yaml as shipped (noise
multiplier 0.3, clipping 1.0) and a variant with the same noise std per coordinate (3.0 × 0.1 / 10 = 0.3 ×
1.0 / 10) but a tighter clip, so a larger noise multiplier and a far smaller epsilon. Each run's logged
`dp_epsilon` is checked round by round against Opacus' RDPAccountant stepped directly; the figures go to
tests/benchmarks/results/fed_dp_budget.{json,md} (README's DP row and prose quote them).

    .venv/bin/python tests/benchmarks/fed_dp_budget.py     # about 2 minutes on 2 cores
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import machine, write_results  # noqa: E402
from raybloom import spec, tracking  # noqa: E402
from raybloom.federated import privacy  # noqa: E402
from raybloom.federated.driver import run_federated  # noqa: E402

JOB = HERE.parents[1] / "jobs" / "fed_dp_cnn_digits.yaml"
BASE = ["tracking.log_model=false"]
VARIANTS = {"shipped": [], "tight clip": ["federated.dp.noise_multiplier=3.0", "federated.dp.clipping_norm=0.1"]}


def measure(overrides: list[str]) -> dict:
    from opacus.accountants import RDPAccountant

    s = spec.load(JOB, [*BASE, *overrides])
    t0 = time.perf_counter()
    summary = run_federated(s)
    seconds = time.perf_counter() - t0
    history = tracking.history(summary.run_id, "dp_epsilon", s)  # (step, value), by step
    fed, accountant = s.federated, RDPAccountant()
    for step, value in history:  # the logged budget is the accountant's, stepped once a round
        accountant.step(noise_multiplier=fed.dp.noise_multiplier, sample_rate=privacy.sample_rate(fed))
        direct = accountant.get_epsilon(delta=fed.dp.delta)
        assert abs(value - direct) <= 1e-9 * direct, (step, value, direct)
    return {"command": " ".join(["raybloom run", str(JOB.relative_to(HERE.parents[1])), *BASE, *overrides]),
            "run_id": summary.run_id, "test_accuracy": summary.metrics["test_accuracy"],
            "rounds_run": summary.metrics["rounds_run"], "delta": fed.dp.delta,
            "noise_multiplier": fed.dp.noise_multiplier, "clipping_norm": fed.dp.clipping_norm,
            "noise_std": fed.dp.noise_multiplier * fed.dp.clipping_norm / fed.sampled,
            "sample_rate": privacy.sample_rate(fed), "seconds": round(seconds, 1),
            "dp_epsilon_by_round": [[step, value] for step, value in history]}


def table(runs: dict[str, dict]) -> str:
    lines = ["| setting | noise multiplier | clipping norm | noise std | test accuracy | dp_epsilon after 1, 5, last round |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in runs.items():
        eps = dict((int(k), v) for k, v in r["dp_epsilon_by_round"])
        last = max(eps)
        lines.append(f"| {name} | {r['noise_multiplier']:g} | {r['clipping_norm']:g} | {r['noise_std']:.3g} | "
                     f"{r['test_accuracy']:.4f} | {eps[1]:.2f}, {eps[5]:.2f}, {eps[last]:.2f} (round {last}) |")
    return "\n".join(lines)


def main() -> int:
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:  # a scratch MLflow store
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        for name, overrides in VARIANTS.items():
            runs[name] = measure(overrides)
    shipped = runs["shipped"]
    result = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(), **shipped, "variants": runs}
    text = (f"# DP federated job: accuracy and the privacy budget spent ({result['when']})\n\n"
            f"`.venv/bin/python tests/benchmarks/fed_dp_budget.py`: each row is one `raybloom run` of "
            f"`jobs/fed_dp_cnn_digits.yaml` (10 clients, all sampled each round: q = {shipped['sample_rate']:g}; "
            f"15 rounds × 2 local epochs; server-side clipping; delta {shipped['delta']:g}; seed 0) with "
            "`tracking.log_model=false` and the overrides in `fed_dp_budget.json`. `dp_epsilon` is what the run "
            "logged after each round (Opacus' RDP accountant), checked against `RDPAccountant` stepped directly.\n\n"
            f"{table(runs)}\n\nThe shipped job, round by round:\n\n| round | dp_epsilon |\n|---:|---:|\n"
            + "\n".join(f"| {int(k)} | {v:.2f} |" for k, v in shipped["dp_epsilon_by_round"]) + "\n")
    write_results(HERE / "results", "fed_dp_budget", result, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
