"""The only module that talks to MLflow.

Every run: tag `raybloom.kind`, params = the flattened spec, the spec YAML as an artifact; per-epoch
metrics in batches (step = epoch); final metrics and plots; the model with its signature. A run that
raises ends FAILED with the reason in tag `raybloom.failure_reason`; Ctrl-C (or SIGTERM) ends it KILLED.
"""

from __future__ import annotations

import logging
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Optional

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raybloom import plots
from raybloom.errors import UserError

DEFAULT_URI = "sqlite:///mlflow.db"
PARAM_BATCH = 100
METRIC_BATCH = 1000

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # reports download plots: no bars

# it logs every database error with a traceback before raising it as MlflowException; raybloom retries a
# locked SQLite store (RunRecorder._log_batch) and reports the others itself
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
# Ctrl-C or SIGTERM landing inside a SQLite fetch: SQLAlchemy drops the connection, then logs "Error closing
# cursor" with a traceback; the run is still ended KILLED (TrackedRun), so that traceback is only noise
logging.getLogger("sqlalchemy.pool").setLevel(logging.CRITICAL)

for _name in ("mlflow", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)


def tracking_uri(spec=None) -> str:
    """$MLFLOW_TRACKING_URI, else the spec's tracking.uri, else sqlite:///mlflow.db in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (spec.tracking.uri if spec is not None else None)
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


_ANSWERED: set[str] = set()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Refuse at once a tracking server that does not answer: MLflow's client would retry, silently, for
    minutes. Any HTTP reply counts (a proxy or auth may answer /health with an error status); once per URI."""
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"MLflow tracking server {uri} does not answer ({getattr(reason, 'strerror', None) or reason}); "
                        "start it (`raybloom cluster up`, `mlflow server`), or unset MLFLOW_TRACKING_URI and "
                        "tracking.uri to record to sqlite:///mlflow.db here") from None
    _ANSWERED.add(uri)


def client(spec=None) -> MlflowClient:
    uri = tracking_uri(spec)
    check_reachable(uri)
    return MlflowClient(uri)


def _param_value(v: Any) -> str:
    return "null" if v is None else str(v)


def default_run_name(spec) -> str:
    """What ran, in a few words: `cnn f32-64 k3 adam lr0.002`, `fedavg 10c dirichlet0.1 cnn f32-64 k3`."""
    m, o = spec.model, spec.optim
    if spec.kind == "federated" and spec.federated is not None:
        f = spec.federated
        part = {"iid": "iid", "dirichlet": f"dirichlet{f.alpha:g}", "shards": f"shards{f.shards_per_client}"}[f.partition]
        dp = " dp" if f.dp.enabled else ""
        return f"{f.strategy} {f.clients}c {part}{dp} {_arch(m)}"
    return f"{_arch(m)} {o.name} lr{o.lr:g}"


def _arch(m) -> str:
    if m.name in ("cnn", "deconv"):
        arch = f"{m.name} f{'-'.join(map(str, m.filters))} k{m.kernel_size}"
    elif m.name == "mlp":
        arch = f"mlp h{'-'.join(map(str, m.hidden))} {m.activation}"
    else:
        arch = "linear"
    return arch


class RunRecorder:
    """Writes to an existing run by id (no start, no end): what a Ray rank-0 worker uses."""

    def __init__(self, run_id: Optional[str], uri: Optional[str] = None):
        self.run_id = run_id
        uri = uri or tracking_uri()
        check_reachable(uri)
        self.client = MlflowClient(uri)

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self._log_batch(params=items[i:i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._log_batch(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        self.log_epochs([(step, metrics)])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """One epoch's metrics, one batched call, step = epoch."""
        self.log_epochs([(epoch, metrics)])

    def log_epochs(self, epochs: list[tuple[int, dict[str, float]]]) -> None:
        """Several epochs in one batched call."""
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for step, m in epochs for k, v in m.items()]
        for i in range(0, len(items), METRIC_BATCH):
            self._log_batch(metrics=items[i:i + METRIC_BATCH])

    def _log_batch(self, attempts: int = 6, **batch) -> None:
        """One `log_batch` (a single transaction), retried while a SQLite store is locked by another
        process (SQLite has one writer at a time; a reader polling the store can hold it for a moment)."""
        for attempt in range(attempts):
            try:
                self.client.log_batch(self.run_id, **batch)
                return
            except MlflowException as e:
                if "database is locked" not in str(e) or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2 ** attempt)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every recorded value of metric `key`, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))

    def log_figure(self, fig, path: str) -> None:
        self.client.log_figure(self.run_id, fig, path)
        plots.close(fig)

    def log_text(self, text: str, path: str) -> None:
        self.client.log_text(self.run_id, text, path)

    def end(self, status: str, reason: Optional[str] = None) -> None:
        """Terminate a run this process created with `create_child` (FINISHED, FAILED or KILLED)."""
        if reason:
            self.set_tags({"raybloom.failure_reason": reason[:4000]})
        self.client.set_terminated(self.run_id, status)


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens on runs, not GenAI views
VIEW_KEY = "raybloom"  # `?viewStateShareKey=raybloom` opens the runs table with the metrics that matter first
KEY_METRICS = ("test_accuracy", "test_loss", "val_accuracy", "val_loss", "best_value", "server_val_accuracy",
               "clients_failed_total")
VIEW_STATE = {"selectedColumns": [f"metrics.`{m}`" for m in KEY_METRICS],
              "orderByKey": "attributes.start_time", "orderByAsc": False}


# every experiment raybloom creates carries both; the UI reads the view for ?viewStateShareKey=
EXPERIMENT_TAGS = {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(VIEW_STATE)}


def dashboard_path(experiment_id: str) -> str:
    """The MLflow UI route of an experiment's runs table with raybloom's view (key metrics as the first columns)."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"


def experiment_for(spec, c: MlflowClient) -> str:
    """The id of the spec's experiment, created if needed, tagged as model training for MLflow's UI."""
    exp = c.get_experiment_by_name(spec.experiment)
    if exp is None:
        try:
            return c.create_experiment(spec.experiment, tags=EXPERIMENT_TAGS)
        except MlflowException:  # created meanwhile by another process
            exp = c.get_experiment_by_name(spec.experiment)
    for key, value in EXPERIMENT_TAGS.items():  # an experiment made elsewhere (or by an older raybloom)
        if exp.tags.get(key) is None:
            c.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def create_run(spec, kind: str, run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None,
               experiment_id: Optional[str] = None) -> RunRecorder:
    """A RUNNING run with the spec's params and YAML, created without making it this thread's active run:
    another thread or process writes to it (and ends it); the creator makes sure it never stays RUNNING."""
    c = client(spec)
    if experiment_id is None:
        experiment_id = experiment_for(spec, c)
    run = c.create_run(experiment_id, run_name=run_name or spec.tracking.run_name or default_run_name(spec),
                       tags={"raybloom.kind": kind, **(tags or {})})
    rec = RunRecorder(run.info.run_id, tracking_uri(spec))
    rec.experiment_id = experiment_id
    rec.log_params(spec.flat())
    rec.log_text(spec.to_yaml(), "spec.yaml")
    return rec


def run_status(run_id: str, spec=None) -> str:
    return client(spec).get_run(run_id).info.status


def create_child(spec, parent: "TrackedRun", run_name: str, kind: str, tags: Optional[dict[str, str]] = None) -> RunRecorder:
    """A nested run under `parent`, created by the driver (which ends it); another process may log to it."""
    return create_run(spec, kind, run_name, {"mlflow.parentRunId": parent.run_id, **(tags or {})}, parent.experiment_id)


def end_stale_runs(spec, filter_string: str, status: str = "KILLED", reason: str = "its driver died") -> list[str]:
    """End runs matching `filter_string` that a killed process left RUNNING; returns their ids."""
    c = client(spec)
    exp = c.get_experiment_by_name(spec.experiment)
    if exp is None:
        return []
    stale = c.search_runs([exp.experiment_id], f"{filter_string} and attributes.status = 'RUNNING'")
    for r in stale:
        c.set_tag(r.info.run_id, "raybloom.failure_reason", reason)
        c.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in stale]


def find_run(spec, filter_string: str):
    c = client(spec)
    exp = c.get_experiment_by_name(spec.experiment)
    if exp is None:
        return None
    found = c.search_runs([exp.experiment_id], filter_string, max_results=1, order_by=["attributes.start_time ASC"])
    return found[0] if found else None


class TrackedRun(RunRecorder):
    """An MLflow run as a context manager that never leaves the run RUNNING."""

    def __init__(self, spec, kind: str, *, run_name: Optional[str] = None, nested: bool = False,
                 tags: Optional[dict[str, str]] = None, resume_run_id: Optional[str] = None):
        self.spec, self.kind, self.nested, self.resume_run_id = spec, kind, nested, resume_run_id
        self.run_name = run_name or spec.tracking.run_name or default_run_name(spec)
        self.tags = {"raybloom.kind": kind, **(tags or {})}
        super().__init__(None, tracking_uri(spec))

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "TrackedRun":
        mlflow.set_tracking_uri(tracking_uri(self.spec))
        exp = mlflow.set_experiment(experiment_id=experiment_for(self.spec, self.client))
        if self.resume_run_id:  # a resumed job goes on in its own run
            run = mlflow.start_run(run_id=self.resume_run_id)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            return self
        run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=self.run_name, nested=self.nested, tags=self.tags)
        self.run_id = run.info.run_id
        self.experiment_id = exp.experiment_id
        self.log_params(self.spec.flat())
        self.client.log_text(self.run_id, self.spec.to_yaml(), "spec.yaml")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, KeyboardInterrupt):
            status = "KILLED"
            self.set_tags({"raybloom.failure_reason": "interrupted (Ctrl-C or SIGTERM)"})
        else:
            status = "FAILED"
            self.set_tags({"raybloom.failure_reason": f"{exc_type.__name__}: {exc}"[:4000]})
        mlflow.end_run(status)
        return False

    # -- records (the rest is RunRecorder's) --------------------------------------------------
    def log_model(self, model, input_example: np.ndarray, register_as: Optional[str] = None) -> None:
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        model = getattr(model, "module", model)  # DDP-wrapped
        was_training = model.training
        model.eval()
        with torch.no_grad():
            output = model(torch.from_numpy(input_example)).numpy()
        model.train(was_training)
        mlflow.pytorch.log_model(
            model, name="model", signature=infer_signature(input_example, output), input_example=input_example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], registered_model_name=register_as)

    # -- a finished training -------------------------------------------------------------------
    def log_result(self, result, *, log_model: bool = True) -> None:
        """Final metrics, the early-stopping tag, the plots, and the model of an engine FitResult."""
        self.log_metrics(result.final, step=max(result.stopped_epoch, 0))
        self.set_tags({"raybloom.early_stopped": str(result.early_stopped).lower()})
        self.log_plots(result)
        if log_model and self.spec.tracking.log_model:
            example = result.dataset.test.x[:4].numpy() if len(result.dataset.test) else result.dataset.train.x[:4].numpy()
            self.log_model(result.model, example, self.spec.tracking.register_as)

    def log_plots(self, result) -> None:
        from raybloom import engine

        if result.history:
            self.log_figure(plots.loss_curves(result.history, result.best_epoch, result.stopped_epoch), "plots/loss_curves.png")
            self.log_figure(plots.lr_curve(result.history), "plots/learning_rate.png")
        test = result.dataset.test
        if not len(test):
            return
        out = engine.predict(result.model, test)
        if result.objective.classify:
            pred = result.objective.predict(out).numpy()
            fig, _ = plots.confusion_matrix(test.y.numpy(), pred, result.objective.num_classes, result.dataset.meta.get("classes"))
            self.log_figure(fig, "plots/confusion_matrix.png")
        elif result.objective.reconstruct:
            self.log_figure(plots.reconstructions(test.x[:8].numpy(), out[:8].numpy()), "plots/reconstructions.png")


def runs(experiment: str, spec=None, filter_string: str = "") -> list:
    """All runs of an experiment (newest first), for the CLI and tests."""
    c = client(spec)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], filter_string, max_results=5000)


def metric_history(run_id: str, key: str, spec=None) -> list:
    return client(spec).get_metric_history(run_id, key)


def summarize(values: Iterable[float]) -> tuple[float, float]:
    arr = np.asarray(list(values), dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1) if len(arr) > 1 else 0.0)
