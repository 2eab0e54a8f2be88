"""`model.init_from` resolved on the driver, before anything is recorded: an MLflow run id (`runs:/<id>/...`,
`models:/<name>/<version>`, `models:/<name>@<alias>`) becomes a local copy of the weights file that run
logged (`weights/state_dict.pt`: the trainable form; MLflow's logged model is a pt2 export that cannot be
trained further). The job's spec is then pinned to that file, so Ray workers, trials and simulated clients
read it from disk (`models.init_encoder`) and never talk to MLflow for it. A local file is used as it is
(and `tracking`, MLflow with it, is only imported to fetch: a Ray worker's preparation never does).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from raybloom.errors import UserError
from raybloom.models import WEIGHTS_ARTIFACT
from raybloom.spec import JobSpec

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def cache_dir() -> Path:
    """Where fetched weights are kept: $RAYBLOOM_DATA_DIR (or .raybloom/data) / pretrained / <run id>."""
    return Path(os.environ.get("RAYBLOOM_DATA_DIR", ".raybloom/data")).resolve() / "pretrained"


def pin(spec: JobSpec) -> JobSpec:
    """The spec with `model.init_from` as the absolute path of a local weights file (fetched when needed)."""
    source = spec.model.init_from
    if source is None:
        return spec
    local = Path(source.removeprefix("file://"))
    if local.is_file():
        return spec.with_overrides({"model.init_from": str(local.resolve())})
    return spec.with_overrides({"model.init_from": str(fetch(run_of(source, spec), spec))})


def run_of(source: str, spec: JobSpec) -> str:
    """The MLflow run id `source` names; a UserError naming the accepted forms when it names none."""
    from raybloom import tracking

    if source.startswith("runs:/"):
        run_id = source.removeprefix("runs:/").split("/", 1)[0]
    elif source.startswith("models:/"):
        run_id = tracking.model_version_run(source, spec)
    elif RUN_ID.match(source):
        run_id = source
    else:
        raise UserError(f"model.init_from: {source!r} is neither a file nor an MLflow run; give a run id (32 hex "
                        "digits), runs:/<id>, models:/<name>/<version> or the path of a weights/state_dict.pt")
    if tracking.get_run(run_id, spec) is None:
        raise UserError(f"model.init_from: no MLflow run {run_id} in {tracking.tracking_uri(spec)}: "
                        "give the run id of the pretraining job (raybloom run prints it)")
    return run_id


def fetch(run_id: str, spec: JobSpec) -> Path:
    """The run's weights file, downloaded once (atomically) into `cache_dir()`."""
    from raybloom import tracking

    path = cache_dir() / run_id / Path(WEIGHTS_ARTIFACT).name
    if path.is_file():
        return path
    if WEIGHTS_ARTIFACT not in tracking.artifact_paths(run_id, str(Path(WEIGHTS_ARTIFACT).parent), spec):
        raise UserError(f"model.init_from: run {run_id} logged no {WEIGHTS_ARTIFACT} (raybloom logs it for runs "
                        "with tracking.log_model: true); rerun the pretraining job with it on")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        got = tracking.download_artifact(run_id, WEIGHTS_ARTIFACT, Path(tmp), spec)
        os.replace(got, path)
    return path
