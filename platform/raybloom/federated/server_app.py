"""The Flower ServerApp (`raybloom.federated.server_app:app` for `flwr run`): `server.serve_and_record`
with the spec and run id it is handed."""

from __future__ import annotations

import os

from raybloom import tracking
from raybloom.data import Dataset
from raybloom.errors import UserError
from raybloom.federated.client import SPEC_KEY
from raybloom.federated.server import serve_and_record
from raybloom.spec import JobSpec

RUN_ID_KEY = "raybloom-run-id"
URI_KEY = "raybloom-tracking-uri"


def job_from_run_config(cfg) -> tuple[JobSpec, str]:
    """The spec and MLflow run id a deployment's run config carries (a run is created when there is none)."""
    if not cfg.get(SPEC_KEY):
        raise UserError("the ServerApp needs the run config raybloom-spec (the job spec as JSON): "
                        "start federated runs with `raybloom run SPEC`")
    spec = JobSpec.model_validate_json(str(cfg[SPEC_KEY]))
    if cfg.get(URI_KEY) and not os.environ.get("MLFLOW_TRACKING_URI"):  # where the driver created the run,
        os.environ["MLFLOW_TRACKING_URI"] = str(cfg[URI_KEY])                # unless this node knows its own
    run_id = str(cfg.get(RUN_ID_KEY) or "") or None
    if run_id is None:
        run_id = tracking.create_run(spec, "federated").run_id
    return spec, run_id


def make_app(spec: JobSpec | None = None, run_id: str | None = None, sink: dict | None = None,
             dataset: Dataset | None = None):
    """The ServerApp. In simulation the spec, run id and the driver's dataset come from the caller (Flower
    hands simulated apps an empty run config); in deployment from the run config `raybloom-spec` /
    `raybloom-run-id`, and the server reads the data itself."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        job_spec, job_run = (spec, run_id) if spec is not None else job_from_run_config(context.run_config)
        out = serve_and_record(job_spec, job_run, grid, dataset)
        if sink is not None:
            sink["outcome"] = out

    return app


app = make_app()
