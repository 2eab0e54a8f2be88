"""Flower adapter: `kind: federated` specs trained by the engine across clients (Flower 1.42 Message API).

`run(spec)` is the driver: it checks the spec and data, partitions the training split (deterministic by
seed) and records the per-client class histogram, creates the MLflow run, then hands the run to the
ServerApp, in Flower's simulation engine on Ray (`mode: simulation`) or on a running SuperLink with
SuperNodes (`mode: deployment`). The ServerApp writes the rounds and the final model (see `server.py`);
the ClientApp runs `engine.train_epoch` through `engine.Training` (see `client.py`). The driver waits for
the real outcome and never leaves the run RUNNING.
"""

from __future__ import annotations

import logging
from pathlib import Path

from raybloom.errors import UserError
from raybloom.spec import JobSpec

# Nothing heavy at import time: the client actors import `raybloom.federated.client` (and so this
# package), and MLflow or matplotlib here would add seconds to every client's first round.


def prepare(spec: JobSpec):
    """Spec and data checks before any run is opened; returns (spec with an absolute data.path, dataset, histogram)."""
    from raybloom import data, runner
    from raybloom.federated import client

    if spec.kind != "federated" or spec.federated is None:
        raise UserError("kind: federated with a federated section is what federated.run expects")
    dataset = runner.prepare(spec)
    if not dataset.is_classification and spec.federated.partition != "iid":
        raise UserError(f"federated.partition: {spec.federated.partition} splits by class; this dataset is a regression: use iid")
    spec = spec.with_overrides({"data.path": str(Path(dataset.meta["folder"]).resolve())})
    parts = client.partitions(spec, dataset)
    hist = data.class_histogram(dataset.train.y.numpy(), parts, dataset.num_classes) if dataset.is_classification else None
    return spec, dataset, hist


def run(spec: JobSpec):
    """Run a federated spec; returns a runner.RunSummary of the server's run."""
    from raybloom import plots, runner, tracking

    original = spec
    spec, dataset, hist = prepare(spec)
    f = spec.federated
    rec = tracking.create_run(spec, "federated", tags={"raybloom.mode": f.mode, "raybloom.strategy": f.strategy})
    try:
        if hist is not None:
            title = f"Samples per client and class ({f.partition}{f' alpha={f.alpha:g}' if f.partition == 'dirichlet' else ''})"
            rec.log_figure(plots.partition_heatmap(hist, title, dataset.meta.get("classes")), "plots/partition_heatmap.png")
            rec.log_text("\n".join(",".join(map(str, row)) for row in hist.tolist()), "partition_histogram.csv")
        flower_status = ""
        if f.mode == "simulation":
            simulate(spec, rec.run_id)
        else:
            from raybloom.federated import deploy

            # the SuperLink and SuperNodes may be other machines: they resolve the data themselves (same split seed)
            flower_status = deploy.run(original if original.data.path is None else spec, rec.run_id)
    except BaseException as e:
        if tracking.run_status(rec.run_id, spec) == "RUNNING":
            killed = isinstance(e, KeyboardInterrupt)
            rec.end("KILLED" if killed else "FAILED", "interrupted (Ctrl-C or SIGTERM)" if killed else f"{type(e).__name__}: {e}")
        raise
    status = tracking.run_status(rec.run_id, spec)
    if status == "RUNNING":  # the ServerApp died without ending it
        rec.end("FAILED", "the ServerApp ended without finishing the run"
                + (f" (Flower run {flower_status}; `flwr log` shows its log)" if flower_status else ""))
        status = "FAILED"
    if status != "FINISHED":
        reason = tracking.client(spec).get_run(rec.run_id).data.tags.get("raybloom.failure_reason", status)
        raise UserError(f"federated run {rec.run_id} {status}: {reason}")
    metrics = tracking.client(spec).get_run(rec.run_id).data.metrics
    keys = ("test_loss", "test_accuracy", "server_val_loss", "server_val_accuracy", "rounds_run", "clients_failed_total")
    return runner.RunSummary(rec.run_id, rec.experiment_id, {k: metrics[k] for k in keys if k in metrics})


def backend_config(spec: JobSpec) -> dict:
    f = spec.federated
    return {"client_resources": {"num_cpus": f.client_cpus, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": True}}


def simulate(spec: JobSpec, run_id: str):
    """Flower's simulation engine (Ray backend): clients as Ray actors side by side, the server in a thread."""
    from flwr.simulation import run_simulation

    from raybloom import ray_train
    from raybloom.federated import client, server

    ray_train.init_ray(spec)  # in process (or $RAY_ADDRESS), quiet, SIGTERM kept; Flower reuses it
    sink: dict = {}
    logging.getLogger("flwr").setLevel(logging.ERROR)  # its deprecation notice and per-round INFO lines
    run_simulation(server_app=server.make_app(spec, run_id, sink), client_app=client.app,
                   num_supernodes=spec.federated.clients, backend_config=backend_config(spec))
    if "outcome" not in sink:
        raise UserError("the federated simulation ended without a result (see the log above)")
    return sink["outcome"]
