"""The federated driver: `raybloom run` of a `kind: federated` spec (Flower 1.42 Message API).

`run_federated(spec)` prepares the job once (data and model checks), partitions the training split
(deterministic by seed) and records the per-client class histogram, creates the MLflow run (or reopens
the one `--resume` names), then hands the run to the ServerApp: on a SuperLink in simulation mode that it
starts (`mode: simulation`, `simulation.SimulationLink`: clients as Ray actors), where the app was
submitted with `flwr run` while all that was done and the ServerApp waits for the hand-off file; or on a
running SuperLink with SuperNodes (`mode: deployment`), through `flwr run` with the spec and run id in its
run config (`flower_run`). The ServerApp writes the
rounds, a checkpoint each round and the final model (`server`); the ClientApp trains with the engine
(`client`). The driver waits for the real outcome and never leaves the run RUNNING.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import Future
from typing import Optional

import numpy as np

from raybloom import plots, timeline, tracking
from raybloom.errors import UserError
from raybloom.federated import flower_run, privacy
from raybloom.federated.partition import class_histogram, client_partitions
from raybloom.federated.resume import DRIVER_TAG, SPEC_TAG, driver_tag, on_driver_death, resumable, spec_sha
from raybloom.federated.simulation import SimulationLink, start_simulation
from raybloom.job import PreparedJob, prepare_job
from raybloom.runner import RunSummary
from raybloom.spec import JobSpec

SUMMARY_KEYS = ("test_loss", "test_accuracy", "server_val_loss", "server_val_accuracy", "rounds_run", "clients_failed_total",
                "dp_epsilon")  # dp_epsilon: the budget spent by the last round (DP runs)


def prepare_federated(spec: JobSpec) -> tuple[PreparedJob, Optional[np.ndarray]]:
    """The job preparation, the checks only a federated run has, and the partition's clients × classes
    histogram (None for a regression), all before any run is opened. In deployment the spec keeps its
    data section as given unless it names a folder: the SuperNodes may be other machines, which resolve
    the same source themselves (the split and the partition are deterministic by seed)."""
    if spec.kind != "federated" or spec.federated is None:
        raise UserError("kind: federated with a federated section is what the federated driver expects")
    # the server holds validation and test; the training split is the clients', read here for its labels only
    privacy.check_budget(spec.federated)  # a target not even one round fits in
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


def in_thread(name: str, fn, *args) -> Future:
    """`fn(*args)` in a daemon thread called `name`; the Future holds its result or its exception."""
    future: Future = Future()

    def work() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=work, name=name, daemon=True).start()
    return future


def _wait_heatmap(heatmap: Optional[Future]) -> None:
    """The heatmap drawn before the run is handed off (submitted, in deployment): a failure to draw it stops
    the job before training."""
    if heatmap is not None:
        heatmap.result()


def check_gpus(spec: JobSpec) -> None:
    """`federated.client_gpus` needs GPUs where the simulation runs: refused at once, with the numbers."""
    fed = spec.federated
    if fed.client_gpus <= 0:
        return
    if fed.mode != "simulation":
        raise UserError("federated.client_gpus is a simulation setting (each client actor's GPU share); "
                        "deployment clients train on CPU: set federated.client_gpus=0")
    address = spec.scaling.address or os.environ.get("RAY_ADDRESS")
    if address:
        from raybloom import ray_session

        ray_session.init_ray(spec)
        have, where = ray_session.cluster_gpus(), f"the Ray cluster at {address} has"
    else:
        import torch

        have, where = torch.cuda.device_count(), "this machine has"
    if have < fed.client_gpus or have <= 0:  # Ray would wait forever for an actor it cannot place
        raise UserError(f"federated.client_gpus: {fed.client_gpus:g} GPU per client actor, but {where} {have:g} GPUs; "
                        "set federated.client_gpus=0 (clients train on CPU), a share of the GPUs there are, "
                        "or run where GPUs are")


def _open_run(spec: JobSpec, job: PreparedJob, hist: Optional[np.ndarray], resume: Optional[str],
              run_id: Optional[str], target: Optional[flower_run.Target]) -> tracking.RunRecorder:
    """A new run (tagged with its spec's hash), the one `--resume` goes on in (in deployment only once its
    Flower run has ended on the SuperLink), or the run `run_id` a caller created (a search trial's); tagged
    with this driver, so that a second `--resume` can tell it is alive."""
    fed = job.spec.federated
    tags = {"raybloom.mode": fed.mode, "raybloom.strategy": fed.strategy, SPEC_TAG: spec_sha(spec),
            DRIVER_TAG: driver_tag()}
    if resume:
        found = resumable(spec, resume)
        if target is not None and found.tags.get("raybloom.flower_run_id"):
            flower_run.check_ended(target, found.tags["raybloom.flower_run_id"], found.run_id)
        rec = tracking.RunRecorder(found.run_id, tracking.tracking_uri(job.spec), found.experiment_id)
        rec.reopen()
        rec.set_tags({DRIVER_TAG: driver_tag(), "raybloom.resumed": int(found.tags.get("raybloom.resumed", 0)) + 1})
        print(f"resuming federated run {found.run_id} (was {found.status})", file=sys.stderr, flush=True)
        return rec
    if run_id:
        rec = tracking.RunRecorder(run_id, tracking.tracking_uri(job.spec))
        rec.experiment_id = rec.record().experiment_id
        rec.set_tags(tags)
        return rec
    return tracking.create_run(job.spec, "federated", tags=tags)


def run_federated(spec: JobSpec, resume: Optional[str] = None, *, run_id: Optional[str] = None,
                  run_config: Optional[dict[str, str]] = None, link: Optional[SimulationLink] = None) -> RunSummary:
    """Run a federated spec through `flwr run` (on a SuperLink in simulation mode that this driver starts,
    or a running one in deployment); returns the summary of the server's run. `resume`: `resume.LATEST` or
    a run id, to go on in an unfinished run of this spec. `run_id`: a run created for it (a search trial's
    child run), `run_config`: more run config for the ServerApp (the trial's reference). `link`: the
    simulation's SuperLink, already started by the caller (`simulation.start_simulation`); stopped here."""
    timeline.mark("driver_fit")
    link = link or start_simulation(spec, run_config)  # it starts while the data is prepared and the run opened
    try:
        return _run(spec, resume, run_id, run_config, link)
    finally:
        if link is not None:
            link.stop()
            timeline.mark("superlink_stopped")


def _run(spec: JobSpec, resume: Optional[str], run_id: Optional[str], run_config: Optional[dict[str, str]],
         link: Optional[SimulationLink]) -> RunSummary:
    job, hist = prepare_federated(spec)
    timeline.mark("data_prepared")
    check_gpus(job.spec)
    target = None if link is not None else flower_run.deployment_target(job.spec)
    rec = _open_run(spec, job, None, resume, run_id, target)
    timeline.mark("run_opened")
    status = ""
    recorded = lambda: rec.record().status != "RUNNING"  # noqa: E731 - the ServerApp ended the run
    # the heatmap (matplotlib's import and a render, ~1 s) is drawn while the ServerApp (and Ray) start
    heatmap = in_thread("raybloom-heatmap", _log_partition, rec, job, hist) if hist is not None and not resume else None
    try:
        if link is not None:  # the app is submitted (or on its way): its ServerApp waits for the hand-off
            link.on_driver_death(on_driver_death(rec.run_id, tracking.tracking_uri(job.spec)))
            _wait_heatmap(heatmap)
            flwr_run = link.hand_off(flower_run.run_config(job.spec, rec.run_id))
            timeline.mark("handed_off")
            target = flower_run.Target(link.address, link.home, link.connection, link.gone, status_every=60.0,
                                       signalled=link.recorded)
            flower_run.announce(job.spec, rec.run_id, target, flwr_run)
        else:
            _wait_heatmap(heatmap)
            flwr_run = flower_run.submit(job.spec, rec.run_id, target, extra=run_config)
        status = flower_run.follow(job.spec, target, flwr_run, poll=0.1 if link is not None else 0.25, recorded=recorded)
        timeline.mark("flower_run_ended")
    except BaseException as e:
        if rec.record().status == "RUNNING":
            killed = isinstance(e, KeyboardInterrupt)
            rec.end("KILLED" if killed else "FAILED", "interrupted (Ctrl-C or SIGTERM)" if killed else f"{type(e).__name__}: {e}")
        if job.spec.federated.mode == "deployment":  # the ServerApp runs on the SuperLink: stop it there too
            flower_run.stop_submitted(target, rec)
        raise
    return _outcome(rec, status)


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
