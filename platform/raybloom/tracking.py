"""The only module that talks to MLflow: it speaks MLflow and hands back plain data.

Every run: tag `raybloom.kind`, params = the flattened spec, the spec YAML as an artifact; metrics one
batched write a step (step = epoch or round); images and text as artifacts; the model with its
signature. A run that raises ends FAILED with the reason in tag `raybloom.failure_reason`; Ctrl-C (or
SIGTERM) ends it KILLED. Queries return `RunRecord`s, `(step, value)` pairs and paths, never MLflow's
own objects; what a finished training records (plots, the model) is decided in `results`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from raybloom.errors import TrackingLost, UserError, uninterrupted
from raybloom.spec import JobSpec
from raybloom.tracking_uri import absolute_uri, check_answers, tracking_uri  # noqa: F401 - re-exported: tracking.tracking_uri(...)

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


_CHECKED: set[str] = set()


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Refuse at once a tracking server that does not answer (`tracking_uri.check_answers`), then check the
    credentials (`_check_credentials`); once per URI."""
    if not uri.startswith(("http://", "https://")) or uri in _CHECKED:
        return
    check_answers(uri, timeout)
    _check_credentials(uri, timeout)
    _CHECKED.add(uri)


def _check_credentials(uri: str, timeout: float) -> None:
    """A server with authentication (MLflow's basic-auth app) answers 401 to a read without valid
    credentials: refuse the job now, before data, Ray or a run, rather than fail at its first write. The
    read goes through MLflow's own client (its credentials: MLFLOW_TRACKING_USERNAME/PASSWORD, a token).
    Other answers (200, 403 for a user without access, 404 from a proxy) are left to the calls to come."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    creds = get_default_host_creds(uri)
    try:
        reply = http_request(creds, "/api/2.0/mlflow/experiments/search", "GET", max_retries=0, timeout=timeout,
                             raise_on_status=False, params={"max_results": 1})
    except MlflowException:  # /health answered: a failure here is the first real call's to report
        return
    if reply.status_code == 401:
        given = "were refused" if creds.username or creds.token else "are not set"
        raise UserError(f"MLflow tracking server {uri} answered 401 Unauthorized: the credentials {given}; set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to a user of that server "
                        "(`raybloom cluster up --secure` writes them to .raybloom/cluster.env)")


def _client(spec: Optional[JobSpec] = None) -> MlflowClient:
    uri = tracking_uri(spec)
    check_reachable(uri)
    return MlflowClient(uri)


def _param_value(v: Any) -> str:
    return "null" if v is None else str(v)


def default_run_name(spec: JobSpec) -> str:
    """What ran, in a few words: `cnn f32-64 k3 adam lr0.002`, `fedavg 10c dirichlet0.1 cnn f32-64 k3`."""
    from raybloom import models  # the model names itself; torch is only loaded by callers that name a run

    arch = models.describe(spec.model)
    fed = spec.federated
    if spec.kind == "federated" and fed is not None:
        part = {"iid": "iid", "dirichlet": f"dirichlet{fed.alpha:g}", "shards": f"shards{fed.shards_per_client}"}[fed.partition]
        dp = " dp" if fed.dp.enabled else ""
        return f"{fed.strategy} {fed.clients}c {part}{dp} {arch}"
    return f"{arch} {spec.optim.name} lr{spec.optim.lr:g}"


@dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain data: its latest metric values, params and tags."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]

    @property
    def kind(self) -> str:
        return self.tags.get("raybloom.kind", "?")

    @property
    def parent_id(self) -> Optional[str]:
        return self.tags.get("mlflow.parentRunId")


def _record(run) -> RunRecord:
    info, d = run.info, run.data
    return RunRecord(info.run_id, info.experiment_id, info.run_name, info.status, info.start_time,
                     dict(d.metrics), dict(d.params), dict(d.tags))


def _lost(e: BaseException) -> bool:
    """An MLflow client error that is the server not answering (after the client's own retries: refused
    connections, time-outs, 5xx), not a refusal of the request itself."""
    import requests

    return isinstance(e, MlflowException) and isinstance(e.__cause__ or e.__context__, requests.exceptions.RequestException)


def _retries() -> str:
    """What MLflow's client tried before it gave up (its settings as this process has them)."""
    env = os.environ.get
    return (f"after MLflow's client retried {env('MLFLOW_HTTP_REQUEST_MAX_RETRIES', '7')} times with backoff factor "
            f"{env('MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR', '2')}: MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")


class RunRecorder:
    """Writes to an existing run by id (no start, no end): what a Ray rank-0 worker, a search trial's task
    and a federated driver use. A server that stops answering (past MLflow's own retries) raises
    `TrackingLost`, for the caller to keep what it has not written."""

    def __init__(self, run_id: Optional[str], uri: Optional[str] = None, experiment_id: Optional[str] = None):
        self.run_id, self.experiment_id = run_id, experiment_id
        self.uri = uri = uri or tracking_uri()
        try:
            check_reachable(uri)
        except UserError as e:  # a run already under way (a worker joining it) has lost its server
            if run_id is None:
                raise
            raise TrackingLost(f"{e} (run {run_id} was under way)", run_id) from None
        self._mlflow = MlflowClient(uri)

    def _call(self, what: str, fn, *args, **kwargs):
        """One MLflow call, which Ctrl-C does not cut in half; a server that stopped answering becomes TrackingLost."""
        try:
            with uninterrupted():
                return fn(*args, **kwargs)
        except MlflowException as e:
            if not _lost(e):
                raise
            raise TrackingLost(f"MLflow tracking server {self.uri} stopped answering ({what} of run {self.run_id}, "
                               f"{_retries()})", self.run_id) from None

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, _param_value(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), PARAM_BATCH):
            self._log_batch(params=items[i:i + PARAM_BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._log_batch(tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        """The metrics of one step (an epoch, a round, or the final ones), in one batched write."""
        self.log_steps([(step, metrics)])

    def log_steps(self, steps: list[tuple[int, dict[str, float]]]) -> None:
        """The metrics of several steps, (step, metrics) each, in as few batched writes as METRIC_BATCH
        allows; a step's metrics never straddle two writes (a write that fails leaves whole steps)."""
        ts = int(time.time() * 1000)
        batch: list[Metric] = []
        for step, metrics in steps:
            items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
            if batch and len(batch) + len(items) > METRIC_BATCH:
                self._log_batch(metrics=batch)
                batch = []
            batch += items
            while len(batch) > METRIC_BATCH:  # one step with more metrics than a write takes
                self._log_batch(metrics=batch[:METRIC_BATCH])
                batch = batch[METRIC_BATCH:]
        if batch:
            self._log_batch(metrics=batch)

    def _log_batch(self, attempts: int = 6, **batch) -> None:
        """One `log_batch` (a single transaction), retried while a SQLite store is locked by another
        process (SQLite has one writer at a time; a reader polling the store can hold it for a moment)."""
        for attempt in range(attempts):
            try:
                self._call("a write", self._mlflow.log_batch, self.run_id, **batch)
                return
            except MlflowException as e:
                if "database is locked" not in str(e) or attempt == attempts - 1:
                    raise
                time.sleep(0.2 * 2 ** attempt)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every recorded value of metric `key`, by step."""
        return sorted((m.step, m.value) for m in self._call("a read", self._mlflow.get_metric_history, self.run_id, key))

    def log_image(self, png: bytes, path: str) -> None:
        """A PNG (e.g. `plots.png(fig)`) as the artifact `path` (`plots/loss_curves.png`)."""
        self.log_bytes(png, path)

    def log_bytes(self, content: bytes, path: str) -> None:
        """`content` as the artifact `path`, replacing what was there."""
        folder, _, name = path.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(content)
            self._call(f"the artifact {path}", self._mlflow.log_artifact, self.run_id, str(Path(tmp) / name), folder or None)

    def read_bytes(self, path: str) -> Optional[bytes]:
        """The artifact `path` of this run, or None when it has none."""
        folder = path.rpartition("/")[0]
        if path not in {a.path for a in self._call("a read", self._mlflow.list_artifacts, self.run_id, folder or None)}:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            return Path(self._call("a read", self._mlflow.download_artifacts, self.run_id, path, tmp)).read_bytes()

    def reopen(self) -> None:
        """Set a run that ended (or whose process died) RUNNING again, to go on in it."""
        self._call("reopening", self._mlflow.update_run, self.run_id, status="RUNNING")

    def log_text(self, text: str, path: str) -> None:
        self._call(f"the artifact {path}", self._mlflow.log_text, self.run_id, text, path)

    def record(self) -> RunRecord:
        return _record(self._call("a read", self._mlflow.get_run, self.run_id))

    def end(self, status: str, reason: Optional[str] = None) -> None:
        """Terminate a run this process created with `create_run` (FINISHED, FAILED or KILLED)."""
        with uninterrupted():  # the reason and the status, not one without the other
            if reason:
                self.set_tags({"raybloom.failure_reason": reason[:4000]})
            self._call("ending", self._mlflow.set_terminated, self.run_id, status)


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


def experiment_for(spec: JobSpec, c: MlflowClient) -> str:
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


def create_run(spec: JobSpec, kind: str, run_name: Optional[str] = None, tags: Optional[dict[str, str]] = None,
               experiment_id: Optional[str] = None) -> RunRecorder:
    """A RUNNING run with the spec's params and YAML, created without making it this thread's active run:
    another thread or process writes to it (and ends it); the creator makes sure it never stays RUNNING."""
    c = _client(spec)
    if experiment_id is None:
        experiment_id = experiment_for(spec, c)
    run = c.create_run(experiment_id, run_name=run_name or spec.tracking.run_name or default_run_name(spec),
                       tags={"raybloom.kind": kind, **(tags or {})})
    rec = RunRecorder(run.info.run_id, tracking_uri(spec), experiment_id)
    rec.log_params(spec.flat())
    rec.log_text(spec.to_yaml(), "spec.yaml")
    return rec


def create_child(spec: JobSpec, parent: RunRecorder, run_name: str, kind: str,
                 tags: Optional[dict[str, str]] = None) -> RunRecorder:
    """A nested run under `parent`, created by the driver (which ends it); another process may log to it."""
    return create_run(spec, kind, run_name, {"mlflow.parentRunId": parent.run_id, **(tags or {})}, parent.experiment_id)


# ------------------------------------------------------------------------------------------ queries
def _experiment_id(c: MlflowClient, name: str) -> Optional[str]:
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp is not None else None


def end_stale_runs(spec: JobSpec, filter_string: str, status: str = "KILLED",
                   reason: str = "its driver died") -> list[str]:
    """End runs matching `filter_string` that a killed process left RUNNING; returns their ids."""
    c = _client(spec)
    exp = _experiment_id(c, spec.experiment)
    if exp is None:
        return []
    stale = c.search_runs([exp], f"{filter_string} and attributes.status = 'RUNNING'")
    for r in stale:
        c.set_tag(r.info.run_id, "raybloom.failure_reason", reason)
        c.set_terminated(r.info.run_id, status)
    return [r.info.run_id for r in stale]


def find_run(spec: JobSpec, filter_string: str) -> Optional[RunRecord]:
    """The oldest run of the spec's experiment that matches `filter_string`, if any."""
    c = _client(spec)
    exp = _experiment_id(c, spec.experiment)
    if exp is None:
        return None
    found = c.search_runs([exp], filter_string, max_results=1, order_by=["attributes.start_time ASC"])
    return _record(found[0]) if found else None


def list_runs(experiment: str, spec: Optional[JobSpec] = None, filter_string: str = "") -> list[RunRecord]:
    """All runs of an experiment (newest first)."""
    c = _client(spec)
    exp = _experiment_id(c, experiment)
    if exp is None:
        return []
    return [_record(r) for r in c.search_runs([exp], filter_string, max_results=5000)]


def get_run(run_id: str, spec: Optional[JobSpec] = None) -> Optional[RunRecord]:
    """The run with this id, or None when the store has none."""
    try:
        return _record(_client(spec).get_run(run_id))
    except MlflowException:
        return None


def history(run_id: str, key: str, spec: Optional[JobSpec] = None) -> list[tuple[int, float]]:
    """(step, value) of every recorded value of metric `key` of a run, by step."""
    return sorted((m.step, m.value) for m in _client(spec).get_metric_history(run_id, key))


def model_version_run(uri: str, spec: Optional[JobSpec] = None) -> str:
    """The run that logged a registered model version: `models:/<name>/<version>` or `models:/<name>@<alias>`."""
    ref = uri.removeprefix("models:/")
    name, sep, alias = ref.partition("@")
    c = _client(spec)
    try:
        if sep:
            version = c.get_model_version_by_alias(name, alias)
        else:
            name, _, number = ref.rpartition("/")
            version = c.get_model_version(name, number)
    except MlflowException as e:
        raise UserError(f"model.init_from: no registered model version {uri} in {tracking_uri(spec)} "
                        f"({e.message.splitlines()[0][:200]}); give models:/<name>/<version> or a run id") from None
    if not version.run_id:
        raise UserError(f"model.init_from: {uri} was not logged by a run; give the run id of the pretraining job")
    return version.run_id


def artifact_paths(run_id: str, folder: str, spec: Optional[JobSpec] = None) -> set[str]:
    """The artifact paths directly under `folder` of a run (`plots` -> {"plots/loss_curves.png", ...})."""
    return {a.path for a in _client(spec).list_artifacts(run_id, folder)}


def download_artifact(run_id: str, path: str, dst: Path, spec: Optional[JobSpec] = None) -> Path:
    return Path(_client(spec).download_artifacts(run_id, path, str(dst)))


# -------------------------------------------------------------------------------- the driver's run
def _leave_unreachable_run(run: "RunRecorder", reason: str) -> None:
    """Take this process's active run off MLflow's stack without waiting on a server that does not answer:
    one attempt each, no retries (MLflow's exit handler would otherwise retry for minutes). If the server
    answers by then, the run ends FAILED with the reason; if not, it stays as the server last had it
    (RUNNING). `--resume` goes on in it either way."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"})
    with uninterrupted():  # the steps below all run (a Ctrl-C is raised after them)
        try:
            run.set_tags({"raybloom.failure_reason": reason[:4000]})
        except (MlflowException, TrackingLost):
            pass
        try:
            mlflow.end_run("FAILED")
        except MlflowException:
            pass
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class TrackedRun(RunRecorder):
    """An MLflow run as a context manager that never leaves the run RUNNING."""

    def __init__(self, spec: JobSpec, kind: str, *, run_name: Optional[str] = None, nested: bool = False,
                 tags: Optional[dict[str, str]] = None, resume_run_id: Optional[str] = None):
        self.spec, self.kind, self.nested, self.resume_run_id = spec, kind, nested, resume_run_id
        self.run_name = run_name or spec.tracking.run_name or default_run_name(spec)
        self.tags = {"raybloom.kind": kind, **(tags or {})}
        super().__init__(None, tracking_uri(spec))

    def __enter__(self) -> "TrackedRun":
        mlflow.set_tracking_uri(tracking_uri(self.spec))
        exp = mlflow.set_experiment(experiment_id=experiment_for(self.spec, self._mlflow))
        if self.resume_run_id:  # a resumed job goes on in its own run (the reason it stopped is no longer true)
            with uninterrupted():
                run = mlflow.start_run(run_id=self.resume_run_id)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
            if "raybloom.failure_reason" in run.data.tags:
                self._call("a tag", self._mlflow.delete_tag, self.run_id, "raybloom.failure_reason")
            return self
        with uninterrupted():
            run = mlflow.start_run(experiment_id=exp.experiment_id, run_name=self.run_name, nested=self.nested, tags=self.tags)
        self.run_id = run.info.run_id
        self.experiment_id = exp.experiment_id
        self.log_params(self.spec.flat())
        self.log_text(self.spec.to_yaml(), "spec.yaml")
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and (issubclass(exc_type, TrackingLost) or _lost(exc)):
            _leave_unreachable_run(self, f"{exc_type.__name__}: {exc}")
            return False
        with uninterrupted():  # the reason and the status, not one without the other
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

    def log_model(self, model, input_example: np.ndarray, output_example: np.ndarray,
                  register_as: Optional[str] = None) -> None:
        """The PyTorch model, with the signature of (input_example -> output_example)."""
        import mlflow.pytorch
        import torch
        from mlflow.models import infer_signature

        self._call("the model", mlflow.pytorch.log_model,
                   model, name="model", signature=infer_signature(input_example, output_example), input_example=input_example,
                   pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"], registered_model_name=register_as)
