"""`raybloom compare SPEC`: a federated run and its centralized counterpart, side by side.

The counterpart is the same spec trained in one process for `rounds_run × local_epochs` epochs (the
same number of passes over the training data) with the clients' constant learning rate. Both runs are
recorded as usual and tagged `raybloom.compare_id`; the federated run also gets the comparison table
(`comparison.md`), `plots/federated_vs_centralized.png` (validation accuracy against epochs of data),
and the metrics `centralized_test_<m>` and `gap_test_<m>` (federated − centralized).
"""

from __future__ import annotations

from raybloom import data, plots, runner, tracking
from raybloom.spec import JobSpec


def centralized(spec: JobSpec, epochs: int) -> JobSpec:
    return spec.with_overrides({"kind": "train", "federated": None, "train.epochs": epochs, "schedule.name": "constant",
                                "tracking.run_name": f"centralized {epochs} epochs ({tracking.default_run_name(spec)})"})


def run(spec: JobSpec) -> runner.RunSummary:
    from raybloom import federated

    fed = federated.run(spec)
    f = spec.federated
    rounds = int(fed.metrics.get("rounds_run", f.rounds))
    cspec = centralized(spec, rounds * f.local_epochs)
    cen = runner.train(cspec, data.load(cspec.data), tags={"raybloom.compare_id": fed.run_id})
    client = tracking.client(spec)
    client.set_tag(fed.run_id, "raybloom.compare_id", fed.run_id)
    metric = "accuracy" if "test_accuracy" in fed.metrics else "loss"
    fed_curve = sorted((m.step * f.local_epochs, m.value) for m in client.get_metric_history(fed.run_id, f"server_val_{metric}"))
    cen_curve = sorted((m.step + 1, m.value) for m in client.get_metric_history(cen.run_id, f"val_{metric}"))
    rows = [("federated", fed.run_id, fed.metrics.get(f"test_{metric}")), ("centralized", cen.run_id, cen.metrics.get(f"test_{metric}"))]
    table = "\n".join([f"| run | run id | test_{metric} |", "|---|---|---|"]
                      + [f"| {name} | {rid} | {v:.4f} |" for name, rid, v in rows])
    gap = rows[0][2] - rows[1][2]
    rec = tracking.RunRecorder(fed.run_id, tracking.tracking_uri(spec))
    rec.log_text(f"# {tracking.default_run_name(spec)} vs centralized ({rounds * f.local_epochs} epochs)\n\n{table}\n\n"
                 f"gap (federated − centralized): {gap:+.4f}\n", "comparison.md")
    fig = plots.accuracy_vs_rounds({f"federated ({f.clients} clients, {f.local_epochs} local epoch(s)/round)": tuple(zip(*fed_curve)),
                                    "centralized": tuple(zip(*cen_curve))}, "epochs of training data", f"validation {metric}")
    rec.log_figure(fig, "plots/federated_vs_centralized.png")
    rec.log_metrics({f"centralized_test_{metric}": rows[1][2], f"gap_test_{metric}": gap})
    summary = runner.RunSummary(fed.run_id, fed.experiment_id,
                                {f"federated_test_{metric}": rows[0][2], f"centralized_test_{metric}": rows[1][2],
                                 f"gap_test_{metric}": gap}, children=[cen.run_id])
    return summary
