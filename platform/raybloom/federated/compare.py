"""`raybloom compare SPEC`: a federated run and its centralized counterpart, side by side.

The counterpart is the same spec trained in one process for `rounds_run × local_epochs` epochs (the
same number of passes over the training data) at the constant `optim.lr` (a federated schedule counts
rounds, which it has none of), on the whole training split: the comparison is like for like when the
clients train on their whole partitions (`federated.client_val_fraction: 0`, as the shipped IID job
does; the default 0.1 holds a tenth of each partition out for the per-client evaluation). Both runs are
recorded as usual and tagged `raybloom.compare_id`; the federated run also gets the comparison table
(`comparison.md`), `plots/federated_vs_centralized.png` (validation accuracy against epochs of data),
and the metrics `centralized_test_<m>` and `gap_test_<m>` (federated − centralized).
"""

from __future__ import annotations

from raybloom import plots, tracking
from raybloom.federated.driver import run_federated
from raybloom.job import prepare_job
from raybloom.runner import RunSummary, train_recorded
from raybloom.spec import JobSpec


def centralized(spec: JobSpec, epochs: int) -> JobSpec:
    return spec.with_overrides({"kind": "train", "federated": None, "train.epochs": epochs, "schedule.name": "constant",
                                "tracking.run_name": f"centralized {epochs} epochs ({tracking.default_run_name(spec)})"})


def run_comparison(spec: JobSpec) -> RunSummary:
    """The federated run, then its centralized counterpart; both tagged, the comparison logged on the first."""
    fed_run = run_federated(spec)
    fed = spec.federated
    rounds = int(fed_run.metrics.get("rounds_run", fed.rounds))
    cen_spec = centralized(spec, rounds * fed.local_epochs)
    cen = train_recorded(cen_spec, prepare_job(cen_spec).dataset, tags={"raybloom.compare_id": fed_run.run_id})
    rec = tracking.RunRecorder(fed_run.run_id, tracking.tracking_uri(spec))
    rec.set_tags({"raybloom.compare_id": fed_run.run_id})
    metric = "accuracy" if "test_accuracy" in fed_run.metrics else "loss"
    fed_curve = [(step * fed.local_epochs, v) for step, v in tracking.history(fed_run.run_id, f"server_val_{metric}", spec)]
    cen_curve = [(step + 1, v) for step, v in tracking.history(cen.run_id, f"val_{metric}", spec)]
    rows = [("federated", fed_run.run_id, fed_run.metrics.get(f"test_{metric}")), ("centralized", cen.run_id, cen.metrics.get(f"test_{metric}"))]
    table = "\n".join([f"| run | run id | test_{metric} |", "|---|---|---|"]
                      + [f"| {name} | {rid} | {v:.4f} |" for name, rid, v in rows])
    gap = rows[0][2] - rows[1][2]
    rec.log_text(f"# {tracking.default_run_name(spec)} vs centralized ({rounds * fed.local_epochs} epochs)\n\n{table}\n\n"
                 f"gap (federated − centralized): {gap:+.4f}\n", "comparison.md")
    fig = plots.accuracy_vs_rounds({f"federated ({fed.clients} clients, {fed.local_epochs} local epoch(s)/round)": tuple(zip(*fed_curve)),
                                    "centralized": tuple(zip(*cen_curve))}, "epochs of training data", f"validation {metric}")
    rec.log_image(plots.png(fig), "plots/federated_vs_centralized.png")
    rec.log_metrics({f"centralized_test_{metric}": rows[1][2], f"gap_test_{metric}": gap})
    return RunSummary(fed_run.run_id, fed_run.experiment_id,
                      {f"federated_test_{metric}": rows[0][2], f"centralized_test_{metric}": rows[1][2],
                       f"gap_test_{metric}": gap}, children=[cen.run_id])
