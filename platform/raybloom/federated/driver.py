"""The federated driver: `raybloom run` of a `kind: federated` spec (Flower 1.42 Message API).

`run_federated(spec)` prepares the job once (data and model checks), partitions the training split
(deterministic by seed) and records the per-client class histogram, creates the MLflow run, then hands
the run to the ServerApp, in Flower's simulation engine on Ray (`mode: simulation`) or on a running
SuperLink with SuperNodes (`mode: deployment`). The ServerApp writes the rounds and the final model
(`server`); the ClientApp trains with the engine (`client`). The driver waits for the real outcome and
never leaves the run RUNNING.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from raybloom import plots, tracking
from raybloom.errors import UserError
from raybloom.federated.partition import class_histogram, client_partitions
from raybloom.job import PreparedJob, prepare_job
from raybloom.runner import RunSummary
from raybloom.spec import JobSpec

SUMMARY_KEYS = ("test_loss", "test_accuracy", "server_val_loss", "server_val_accuracy", "rounds_run", "clients_failed_total")


def prepare_federated(spec: JobSpec) -> tuple[PreparedJob, Optional[np.ndarray]]:
    """The job preparation, the checks only a federated run has, and the partition's clients × classes
    histogram (None for a regression), all before any run is opened. In deployment the spec keeps its
    data section as given unless it names a folder: the SuperNodes may be other machines, which resolve
    the same source themselves (the split and the partition are deterministic by seed)."""
    if spec.kind != "federated" or spec.federated is None:
        raise UserError("kind: federated with a federated section is what the federated driver expects")
    # the server holds validation and test; the training split is the clients', read here for its labels only
    job = prepare_job(spec, pin_data=spec.federated.mode == "simulation" or spec.data.path is not None, stream=("train",))
    dataset = job.dataset
    if not dataset.is_classification and spec.federated.partition != "iid":
        raise UserError(f"federated.partition: {spec.federated.partition} splits by class; this dataset is a "
                        "regression: use iid")
    labels = dataset.train.labels()
    parts = client_partitions(job.spec, labels)  # refuses more clients than samples, an impossible Dirichlet draw
    hist = class_histogram(labels, parts, dataset.num_classes) if dataset.is_classification else None
    return job, hist


def _log_partition(rec: tracking.RunRecorder, job: PreparedJob, hist: np.ndarray) -> None:
    """The clients × classes histogram of the partition, as a heatmap and a CSV."""
    fed = job.spec.federated
    title = f"Samples per client and class ({fed.partition}{f' alpha={fed.alpha:g}' if fed.partition == 'dirichlet' else ''})"
    rec.log_image(plots.png(plots.partition_heatmap(hist, title, job.dataset.meta.get("classes"))),
                  "plots/partition_heatmap.png")
    rec.log_text("\n".join(",".join(map(str, row)) for row in hist.tolist()), "partition_histogram.csv")


def run_federated(spec: JobSpec) -> RunSummary:
    """Run a federated spec; returns the summary of the server's run."""
    job, hist = prepare_federated(spec)
    fed = job.spec.federated
    rec = tracking.create_run(job.spec, "federated", tags={"raybloom.mode": fed.mode, "raybloom.strategy": fed.strategy})
    flower_status = ""
    try:
        if hist is not None:
            _log_partition(rec, job, hist)
        if fed.mode == "simulation":
            simulate(job, rec.run_id)
        else:
            from raybloom.federated import deploy

            flower_status = deploy.submit_and_wait(job.spec, rec.run_id)
    except BaseException as e:
        if rec.record().status == "RUNNING":
            killed = isinstance(e, KeyboardInterrupt)
            rec.end("KILLED" if killed else "FAILED", "interrupted (Ctrl-C or SIGTERM)" if killed else f"{type(e).__name__}: {e}")
        raise
    return _outcome(rec, flower_status)


def _outcome(rec: tracking.RunRecorder, flower_status: str) -> RunSummary:
    """What the ServerApp recorded; a run it left RUNNING (it died) is ended FAILED here."""
    run = rec.record()
    if run.status == "RUNNING":
        rec.end("FAILED", "the ServerApp ended without finishing the run"
                + (f" (Flower run {flower_status}; `flwr log` shows its log)" if flower_status else ""))
        run = rec.record()
    if run.status != "FINISHED":
        raise UserError(f"federated run {rec.run_id} {run.status}: {run.tags.get('raybloom.failure_reason', run.status)}")
    return RunSummary(rec.run_id, rec.experiment_id, {k: run.metrics[k] for k in SUMMARY_KEYS if k in run.metrics})


def backend_config(spec: JobSpec) -> dict:
    fed = spec.federated
    return {"client_resources": {"num_cpus": fed.client_cpus, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}}


def simulate(job: PreparedJob, run_id: str):
    """Flower's simulation engine (Ray backend): clients as Ray actors side by side, the server in a thread
    (on the dataset this driver prepared)."""
    from flwr.simulation import run_simulation

    from raybloom import ray_session
    from raybloom.federated import client_app, server_app

    spec = job.spec
    ray_session.init_ray(spec)  # in process (or $RAY_ADDRESS), quiet, SIGTERM kept; Flower reuses it
    sink: dict = {}
    logging.getLogger("flwr").setLevel(logging.ERROR)  # its deprecation notice and per-round INFO lines
    run_simulation(server_app=server_app.make_app(spec, run_id, sink, job.dataset), client_app=client_app.app,
                   num_supernodes=spec.federated.clients, backend_config=backend_config(spec))
    if "outcome" not in sink:
        raise UserError("the federated simulation ended without a result (see the log above)")
    return sink["outcome"]
