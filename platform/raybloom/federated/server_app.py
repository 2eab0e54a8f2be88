"""The Flower ServerApp (`raybloom.federated.server_app:app` for `flwr run`): `server.serve_and_record`
with the spec and MLflow run id of its run config.

`raybloom run SPEC` puts the spec (as JSON) and the run id there. A Flower user can also run the app by
hand, `flwr run . --run-config 'raybloom-spec-file="/abs/path/job.yaml"'`: the ServerApp then loads the
spec file itself and opens the MLflow run.
"""

from __future__ import annotations

import json
import os

from raybloom import tracking
from raybloom.errors import UserError
from raybloom.federated.client import SPEC_KEY
from raybloom.federated.flower_run import RUN_ID_KEY, SPEC_FILE_KEY, TRIAL_KEY, URI_KEY
from raybloom.federated.server import serve_and_record
from raybloom.spec import JobSpec


def job_from_run_config(cfg) -> tuple[JobSpec, str]:
    """The spec and MLflow run id a run config carries (a run is created when there is none)."""
    if cfg.get(SPEC_KEY):
        spec = JobSpec.model_validate_json(str(cfg[SPEC_KEY]))
    elif cfg.get(SPEC_FILE_KEY):
        from raybloom.spec import load

        spec = load(str(cfg[SPEC_FILE_KEY]), [])
    else:
        raise UserError(f"the ServerApp needs the run config {SPEC_KEY} (the job spec as JSON) or {SPEC_FILE_KEY} "
                        "(a spec file's path): start federated runs with `raybloom run SPEC`, or "
                        f"`flwr run . --run-config '{SPEC_FILE_KEY}=\"/path/to/job.yaml\"'`")
    if cfg.get(URI_KEY) and not os.environ.get("MLFLOW_TRACKING_URI"):  # where the driver created the run,
        os.environ["MLFLOW_TRACKING_URI"] = str(cfg[URI_KEY])                # unless this node knows its own
    run_id = str(cfg.get(RUN_ID_KEY) or "") or None
    if run_id is None:
        run_id = tracking.create_run(spec, "federated").run_id
    return spec, run_id


def trial_hooks(cfg, spec: JobSpec) -> tuple:
    """A search trial's round hook (`raybloom-trial` in the run config: the trial's reference and search
    section): each round's server validation metric goes to the Optuna trial, whose pruner may stop it."""
    if not cfg.get(TRIAL_KEY):
        return ()
    from raybloom.search.trial import TrialRef, TrialReporter
    from raybloom.spec import SearchSpec

    trial = json.loads(str(cfg[TRIAL_KEY]))
    return (TrialReporter(TrialRef(**trial["ref"]), SearchSpec.model_validate(trial["search"]), spec.federated.rounds,
                          unit="round"),)


def make_app():
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def _main(grid, context) -> None:
        spec, run_id = job_from_run_config(context.run_config)
        serve_and_record(spec, run_id, grid, trial_hooks(context.run_config, spec))

    return app


app = make_app()
