"""`raybloom report EXPERIMENT`: one self-contained HTML page comparing the runs of an experiment.

Sections: the runs (kind, name, status, test metrics, epochs or rounds); centralized vs federated vs the
best search trial (a table and validation accuracy against epochs of training data, the federated run
counted as rounds × local epochs); regularization and early stopping (train/validation gap at the best
epoch, best vs stopped epoch, L1/L2, dropout); and the runs' own plots. Every image is embedded
(base64 PNG), so the file opens anywhere. It is also logged as `report.html` on the experiment's
latest parent run (a search study or a cross-validation parent; else its latest run).
"""

from __future__ import annotations

import base64
import html
import io
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from raybloom import plots, tracking
from raybloom.errors import UserError

PLOTS = ("plots/loss_curves.png", "plots/confusion_matrix.png", "plots/reconstructions.png",
         "plots/partition_heatmap.png", "plots/federated_vs_centralized.png",
         "plots/search_optimization_history.png", "plots/search_param_importances.png")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plots.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _img(data: str, alt: str) -> str:
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape("—" if v is None or v == "" else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kind(run) -> str:
    return run.data.tags.get("raybloom.kind", "?")


def _curve(c, run, key: str, scale: int = 1, offset: int = 0) -> tuple[list, list]:
    pts = sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))
    return [s * scale + offset for s, _ in pts], [v for _, v in pts]


def build(experiment: str) -> tuple[str, dict]:
    """The HTML page and the sections' row counts (for the CLI and tests)."""
    c = tracking.client()
    runs = tracking.runs(experiment)
    if not runs:
        raise UserError(f"report: experiment {experiment!r} has no runs in {tracking.tracking_uri()}")
    top = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    trials = [r for r in runs if _kind(r) == "trial"]
    train = [r for r in top if _kind(r) == "train"]
    fed = [r for r in top if _kind(r) == "federated"]

    # 1. the runs
    run_rows = []
    for r in top:
        m, p = r.data.metrics, r.data.params
        span = (f"{int(m['rounds_run'])} rounds" if "rounds_run" in m else
                f"{int(m['stopped_epoch']) + 1} epochs" if "stopped_epoch" in m else
                f"{sum(1 for t in trials if t.data.tags.get('mlflow.parentRunId') == r.info.run_id)} trials" if _kind(r) == "search" else "")
        run_rows.append([_kind(r), r.info.run_name, r.info.status, m.get("test_accuracy", m.get("retrained_test_accuracy")),
                         m.get("test_loss"), m.get("best_value"), span, p.get("model.name")])
    sections = {"runs": len(run_rows)}
    parts = ["<h2>Runs</h2>", _table(["kind", "run", "status", "test accuracy", "test loss", "best value (search)",
                                        "length", "model"], run_rows)]

    # 2. centralized vs federated vs the best search trial
    cmp_rows, curves = [], {}
    for r in train:
        cmp_rows.append(["centralized", r.info.run_name, r.data.metrics.get("test_accuracy"), r.data.metrics.get("val_accuracy")])
        curves[f"centralized: {r.info.run_name}"] = _curve(c, r, "val_accuracy", offset=1)
    for r in fed:
        local = int(r.data.params.get("federated.local_epochs", 1))
        cmp_rows.append(["federated", r.info.run_name, r.data.metrics.get("test_accuracy"),
                         r.data.metrics.get("final_server_val_accuracy")])
        curves[f"federated: {r.info.run_name}"] = _curve(c, r, "server_val_accuracy", scale=local)
    finished = [t for t in trials if t.data.tags.get("trial_state") == "COMPLETE" and "val_accuracy" in t.data.metrics]
    if finished:
        trial_curves = {t.info.run_id: _curve(c, t, "val_accuracy", offset=1) for t in finished}  # one read each
        best = max(finished, key=lambda t: max(trial_curves[t.info.run_id][1] or [0.0]))
        best_curve = trial_curves[best.info.run_id]
        cmp_rows.append(["best search trial", best.info.run_name, best.data.metrics.get("test_accuracy"), max(best_curve[1])])
        curves[f"best trial: {best.info.run_name}"] = best_curve
    sections["comparison"] = len(cmp_rows)
    parts += ["<h2>Centralized vs federated vs the best search trial</h2>",
              _table(["what", "run", "test accuracy", "validation accuracy (final model)"], cmp_rows)]
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
        parts.append(_img(_png(plots.accuracy_vs_rounds(curves, "epochs of training data")),
                          "validation accuracy against epochs of training data (federated: rounds × local epochs)"))

    # 3. regularization and early stopping
    reg_rows = []
    for r in train + finished:
        m, p = r.data.metrics, r.data.params
        hist = {k: dict(zip(*_curve(c, r, k))) for k in ("train_loss", "val_loss")}
        best_epoch = int(m["best_epoch"]) if "best_epoch" in m else None
        gap = None
        if best_epoch is not None and best_epoch in hist["train_loss"] and best_epoch in hist["val_loss"]:
            gap = hist["val_loss"][best_epoch] - hist["train_loss"][best_epoch]
        reg_rows.append([r.info.run_name, gap, best_epoch, int(m["stopped_epoch"]) if "stopped_epoch" in m else None,
                         r.data.tags.get("raybloom.early_stopped"), p.get("regularization.l1"), p.get("regularization.l2"),
                         p.get("regularization.dropout")])
    sections["regularization"] = len(reg_rows)
    parts += ["<h2>Regularization and early stopping</h2>",
              _table(["run", "val − train loss at best epoch", "best epoch", "stopped epoch", "early stopped", "L1", "L2",
                      "dropout"], reg_rows)]

    # 4. the runs' own plots
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in top + ([best] if finished else []):
            listed = {a.path for a in c.list_artifacts(r.info.run_id, "plots")}
            for path in PLOTS:
                if path in listed:
                    local = c.download_artifacts(r.info.run_id, path, tmp)
                    images.append(_img(base64.b64encode(Path(local).read_bytes()).decode(), f"{r.info.run_name}: {path}"))
    sections["plots"] = len(images)
    parts += ["<h2>Plots</h2>", *images]

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>raybloom report: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} th{{background:#f3f3f3}} figure{{display:inline-block;margin:8px}}
img{{max-width:560px;border:1px solid #ddd}} figcaption{{font-size:12px;color:#555}}</style></head><body>
<h1>raybloom report: {html.escape(experiment)}</h1>
<p>{len(runs)} runs ({len(top)} top-level, {len(trials)} search trials) in {html.escape(tracking.tracking_uri())}; generated {when}.</p>
{''.join(parts)}
</body></html>"""
    return page, sections


def run(experiment: str, out: Path) -> tuple[Path, dict, str]:
    """Write the report; log it on the experiment's latest parent run. Returns (file, sections, run id)."""
    page, sections = build(experiment)
    out.write_text(page)
    runs = tracking.runs(experiment)
    parents = {r.data.tags.get("mlflow.parentRunId") for r in runs} - {None}
    target = next((r for r in runs if r.info.run_id in parents), runs[0])  # newest first
    tracking.RunRecorder(target.info.run_id).log_text(page, "report.html")
    return out, sections, target.info.run_id
