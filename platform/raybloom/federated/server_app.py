"""The Flower ServerApp (`raybloom.federated.server_app:app` for `flwr run`): `server.serve_and_record`
with the spec and MLflow run id of its run config.

`raybloom run SPEC` puts the spec (as JSON) and the run id there, or, in simulation, the path of a file
the driver writes them to once its data is checked and its run open (the app is submitted before that: the
ServerApp waits for the file). A Flower user can also run the app by
hand, `flwr run . --run-config 'raybloom-spec-file="/abs/path/job.yaml"'`: the ServerApp then loads the
spec file itself and opens the MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from raybloom import timeline, tracking
from raybloom.errors import UserError
from raybloom.flwr_config import (DRIVER_FILE, HANDOFF_KEY, RECORDED_FILE, RUN_ID_KEY, SPEC_FILE_KEY, SPEC_KEY, TRIAL_KEY,
                                  URI_KEY)
from raybloom.pids import alive
from raybloom.federated.server import serve_and_record
from raybloom.spec import JobSpec


HANDOFF_POLL_S = 0.05
HANDOFF_SAY_EVERY_S = 30.0


def handed_off(path: Path) -> dict[str, str]:
    """The run config the driver writes to `path` (`SimulationLink.hand_off`) once its data is checked and its
    run open: waited for as long as the driver takes (a large dataset's prepare may take minutes), saying
    so every 30 s, while the driver that wrote `driver` beside it still runs (a driver that fails stops this
    process's SuperLink, and this process with it; this is for one that vanished without)."""
    timeline.mark("handoff_wait")
    said = time.monotonic()
    driver = _driver(path.with_name(DRIVER_FILE))
    while not path.is_file():
        if not path.parent.is_dir():
            raise UserError(f"the driver's hand-off folder {path.parent} is gone: the driver has stopped")
        if driver is not None and not alive(*driver):
            raise UserError(f"the driver (pid {driver[0]}) exited without handing off the run at {path}")
        if time.monotonic() - said > HANDOFF_SAY_EVERY_S:
            print(f"waiting for the driver (data check, MLflow run) to hand off the run at {path}", file=sys.stderr, flush=True)
            said = time.monotonic()
        time.sleep(HANDOFF_POLL_S)
    return json.loads(path.read_text())


def _driver(path: Path) -> Optional[tuple[int, int]]:
    """The driver's (pid, start time) as `SimulationLink.start` wrote them, or None."""
    try:
        pid, start = path.read_text().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def job_from_run_config(cfg) -> tuple[JobSpec, str]:
    """The spec and MLflow run id a run config carries, or the hand-off file it names (a run is created when
    there is none)."""
    if cfg.get(HANDOFF_KEY):
        cfg = {**cfg, **handed_off(Path(str(cfg[HANDOFF_KEY])))}
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
        try:
            serve_and_record(spec, run_id, grid, trial_hooks(context.run_config, spec))
        finally:  # the run is ended (FINISHED, or FAILED with its reason): a simulation's driver may go now
            if context.run_config.get(HANDOFF_KEY):
                try:
                    Path(str(context.run_config[HANDOFF_KEY])).with_name(RECORDED_FILE).touch()
                except OSError:  # the driver's folder is gone: nobody is waiting
                    pass

    return app


app = make_app()
