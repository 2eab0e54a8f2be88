"""The steps of one federated simulation driver (2 clients, 1 round), timed in turn; README quotes them:
imports, data and the MLflow run, Ray started, the SuperLink up, the app submitted, the run finished.

    .venv/bin/python tests/benchmarks/federated_startup.py
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[2]


def mark(what: str) -> None:
    print(f"{time.time() - T0:6.2f} s  {what}", flush=True)


def main() -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tempfile.mkdtemp()}/mlflow.db"
    from raybloom import ray_session, spec, tracking
    from raybloom.federated import driver, flower_run
    from raybloom.federated.simulation import SimulationLink

    mark("imports")
    job, hist = driver.prepare_federated(spec.load(ROOT / "jobs" / "fedavg_cnn_digits_iid.yaml", [
        "federated.clients=2", "federated.rounds=1", "tracking.log_model=false"]))
    rec = tracking.create_run(job.spec, "federated")
    driver._log_partition(rec, job, hist)
    mark("data and the MLflow run")
    ray_session.init_ray(job.spec)
    mark("Ray started")
    with SimulationLink(job.spec, ray_address=ray_session.gcs_address()) as link:
        mark("SuperLink up")
        target = flower_run.Target(link.address, link.home, link.connection, link.gone)
        run = flower_run.submit(job.spec, rec.run_id, target)
        mark("submitted")
        while not flower_run.flower_status(target, run).startswith("finished"):
            time.sleep(0.5)
        mark("run finished")


if __name__ == "__main__":
    main()
