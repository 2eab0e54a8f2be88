"""`raybloom report EXPERIMENT`: one self-contained HTML page comparing the runs of an experiment.

Sections: the runs (kind, name, status, test metrics, epochs or rounds); centralized vs federated vs the
best search trial (a table and validation accuracy against epochs of training data, the federated run
counted as rounds × local epochs); each federated run's accuracy on every client's held-out share (the
worst client named); regularization and early stopping (train/validation gap at the best
epoch, best vs stopped epoch, L1/L2, dropout); and the runs' own plots. Every image is embedded
(base64 PNG), so the file opens anywhere. It is also logged as `report.html` on the experiment's
latest parent run (a search study or a cross-validation parent; else its latest run).
"""

from __future__ import annotations

import base64
import html
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from raybloom import plots, tracking
from raybloom.errors import UserError
from raybloom.tracking import RunRecord

PLOTS = ("plots/loss_curves.png", "plots/confusion_matrix.png", "plots/saliency.png", "plots/reconstructions.png",
         "plots/partition_heatmap.png", "plots/federated_vs_centralized.png",
         "plots/search_optimization_history.png", "plots/search_param_importances.png")


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.4f}"
        return html.escape("—" if v is None or v == "" else str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _curve(run: RunRecord, key: str, scale: int = 1, offset: int = 0) -> tuple[list, list]:
    pts = tracking.history(run.run_id, key)
    return [s * scale + offset for s, _ in pts], [v for _, v in pts]


class Experiment:
    """An experiment's runs, sorted the way the report reads them."""

    def __init__(self, name: str):
        self.name = name
        self.runs = tracking.list_runs(name)
        if not self.runs:
            raise UserError(f"report: experiment {name!r} has no runs in {tracking.tracking_uri()}")
        self.top = [r for r in self.runs if r.parent_id is None]
        self.trials = [r for r in self.runs if r.kind == "trial"]
        self.train = [r for r in self.top if r.kind == "train"]
        self.fed = [r for r in self.top if r.kind == "federated"]
        self.finished = [t for t in self.trials if t.tags.get("trial_state") == "COMPLETE" and "val_accuracy" in t.metrics]
        self.trial_curves = {t.run_id: _curve(t, "val_accuracy", offset=1) for t in self.finished}  # one read each
        self.best = (max(self.finished, key=lambda t: max(self.trial_curves[t.run_id][1] or [0.0]))
                     if self.finished else None)


def _runs_section(e: Experiment) -> tuple[list[str], int]:
    rows = []
    for r in e.top:
        m, p = r.metrics, r.params
        span = (f"{int(m['rounds_run'])} rounds" if "rounds_run" in m else
                f"{int(m['stopped_epoch']) + 1} epochs" if "stopped_epoch" in m else
                f"{sum(1 for t in e.trials if t.parent_id == r.run_id)} trials" if r.kind == "search" else "")
        rows.append([r.kind, r.name, r.status, m.get("test_accuracy", m.get("retrained_test_accuracy")),
                     m.get("test_loss"), m.get("best_value"), span, p.get("model.name")])
    return ["<h2>Runs</h2>", _table(["kind", "run", "status", "test accuracy", "test loss", "best value (search)",
                                     "length", "model"], rows)], len(rows)


def _comparison_section(e: Experiment) -> tuple[list[str], int]:
    """Centralized vs federated vs the best search trial: a table and validation accuracy against epochs of
    training data (a federated run counted as rounds × local epochs)."""
    rows, curves = [], {}
    for r in e.train:
        rows.append(["centralized", r.name, r.metrics.get("test_accuracy"), r.metrics.get("val_accuracy")])
        curves[f"centralized: {r.name}"] = _curve(r, "val_accuracy", offset=1)
    for r in e.fed:
        local = int(r.params.get("federated.local_epochs", 1))
        rows.append(["federated", r.name, r.metrics.get("test_accuracy"), r.metrics.get("final_server_val_accuracy")])
        curves[f"federated: {r.name}"] = _curve(r, "server_val_accuracy", scale=local)
    if e.best is not None:
        best_curve = e.trial_curves[e.best.run_id]
        rows.append(["best search trial", e.best.name, e.best.metrics.get("test_accuracy"), max(best_curve[1])])
        curves[f"best trial: {e.best.name}"] = best_curve
    parts = ["<h2>Centralized vs federated vs the best search trial</h2>",
             _table(["what", "run", "test accuracy", "validation accuracy (final model)"], rows)]
    curves = {k: v for k, v in curves.items() if v[0]}
    if curves:
        parts.append(_img(plots.png(plots.accuracy_vs_rounds(curves, "epochs of training data"), dpi=90),
                          "validation accuracy against epochs of training data (federated: rounds × local epochs)"))
    return parts, len(rows)


def _clients_section(e: Experiment) -> tuple[list[str], int]:
    """Federated runs: the global model on each client's held-out share at the last evaluated round (under
    label skew the worst client is the number that matters)."""
    rows = []
    for r in e.fed:
        per_client = sorted((int(k.rsplit("_p", 1)[1]), v) for k, v in r.metrics.items()
                            if k.startswith("client_val_accuracy_p"))
        if not per_client:
            continue
        worst = min(per_client, key=lambda c: c[1])
        rows.append([r.name, r.metrics.get("clients_val_accuracy_mean"), f"{worst[1]:.4f} (client {worst[0]})",
                     r.metrics.get("clients_val_accuracy_std"), ", ".join(f"{pid}: {v:.3f}" for pid, v in per_client)])
    return ["<h2>Federated: accuracy on each client</h2>",
            _table(["run", "mean", "worst client", "std", "per client (held-out share)"], rows)], len(rows)


def _regularization_section(e: Experiment) -> tuple[list[str], int]:
    """The train/validation gap at the best epoch, best vs stopped epoch, and the regularization settings."""
    rows = []
    for r in e.train + e.finished:
        m, p = r.metrics, r.params
        hist = {k: dict(zip(*_curve(r, k))) for k in ("train_loss", "val_loss")}
        best_epoch = int(m["best_epoch"]) if "best_epoch" in m else None
        gap = None
        if best_epoch is not None and best_epoch in hist["train_loss"] and best_epoch in hist["val_loss"]:
            gap = hist["val_loss"][best_epoch] - hist["train_loss"][best_epoch]
        rows.append([r.name, gap, best_epoch, int(m["stopped_epoch"]) if "stopped_epoch" in m else None,
                     r.tags.get("raybloom.early_stopped"), p.get("regularization.l1"), p.get("regularization.l2"),
                     p.get("regularization.dropout")])
    return ["<h2>Regularization and early stopping</h2>",
            _table(["run", "val − train loss at best epoch", "best epoch", "stopped epoch", "early stopped", "L1", "L2",
                    "dropout"], rows)], len(rows)


def _plots_section(e: Experiment) -> tuple[list[str], int]:
    """The runs' own plots, downloaded from their artifacts and embedded."""
    images = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in e.top + ([e.best] if e.best is not None else []):
            listed = tracking.artifact_paths(r.run_id, "plots")
            for path in PLOTS:
                if path in listed:
                    local = tracking.download_artifact(r.run_id, path, Path(tmp))
                    images.append(_img(local.read_bytes(), f"{r.name}: {path}"))
    return ["<h2>Plots</h2>", *images], len(images)


def build(experiment: str) -> tuple[str, dict]:
    """The HTML page and the sections' row counts (for the CLI and tests)."""
    e = Experiment(experiment)
    parts, sections = [], {}
    for name, section in (("runs", _runs_section), ("comparison", _comparison_section), ("clients", _clients_section),
                          ("regularization", _regularization_section), ("plots", _plots_section)):
        html_parts, sections[name] = section(e)
        parts += html_parts
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>raybloom report: {html.escape(experiment)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}} th{{background:#f3f3f3}} figure{{display:inline-block;margin:8px}}
img{{max-width:560px;border:1px solid #ddd}} figcaption{{font-size:12px;color:#555}}</style></head><body>
<h1>raybloom report: {html.escape(experiment)}</h1>
<p>{len(e.runs)} runs ({len(e.top)} top-level, {len(e.trials)} search trials) in {html.escape(tracking.tracking_uri())}; generated {when}.</p>
{''.join(parts)}
</body></html>"""
    return page, sections


def write_report(experiment: str, out: Path) -> tuple[Path, dict, str]:
    """Write the report; log it on the experiment's latest parent run. Returns (file, sections, run id)."""
    page, sections = build(experiment)
    out.write_text(page)
    runs = tracking.list_runs(experiment)
    parents = {r.parent_id for r in runs} - {None}
    target = next((r for r in runs if r.run_id in parents), runs[0])  # newest first
    tracking.RunRecorder(target.run_id).log_text(page, "report.html")
    return out, sections, target.run_id
