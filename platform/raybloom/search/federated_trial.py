"""A trial of a search whose base job is federated: one federated run (`federated.driver.run_federated`,
a simulation through `flwr run`) in the trial's child MLflow run. Its ServerApp reports the server's
validation metric every round to the Optuna trial (`TrialReporter`, the engine's hook contract with the
round for the epoch), so the pruner stops a bad trial after a few rounds.

The trials run from threads of the study driver (daemon threads: an interrupted search does not wait
for them; each run's SuperLink dies with the driver process), `search.concurrency` at a time.
"""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import asdict
from typing import Any

from raybloom import tracking
from raybloom.federated.driver import in_thread, run_federated
from raybloom.flwr_config import TRIAL_KEY
from raybloom.search.trial import TrialOutcome, TrialRef, trial_spec
from raybloom.spec import JobSpec


def run_federated_trial(spec_json: dict, params: dict[str, Any], ref: TrialRef) -> TrialOutcome:
    """One federated run of the base job with `params`; its value is its best round's server metric."""
    spec = JobSpec.model_validate(spec_json)
    search = spec.search
    tspec = trial_spec(spec, params)
    trial = {"ref": asdict(ref), "search": search.model_dump(mode="json")}
    run_federated(tspec, run_id=ref.run_id, run_config={TRIAL_KEY: json.dumps(trial)})
    recorder = tracking.RunRecorder(ref.run_id, ref.tracking_uri)
    values = [v for step, v in recorder.history(f"server_{search.metric}") if step >= 1]  # step 0: the initial model
    best = (min if search.goal == "minimize" else max)(values) if values else None
    halted = recorder.record().tags.get("raybloom.halted")
    return TrialOutcome("PRUNED" if halted else "COMPLETE", best, len(values), halted)


class FederatedTrials:
    """`remote(...)` like a Ray task's: starts a federated trial in a daemon thread, returns its Future."""

    def remote(self, spec_json: dict, params: dict[str, Any], ref: TrialRef, ray_storage: str | None = None) -> Future:
        return in_thread(f"federated-trial-{ref.number}", run_federated_trial, spec_json, params, ref)
