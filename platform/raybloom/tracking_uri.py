"""Where MLflow records, without importing MLflow (about 1 s here): the processes a run starts first (the
simulation's SuperLink) are spawned before `tracking` is imported. `tracking` re-exports both."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from raybloom.spec import JobSpec


def tracking_uri(spec: Optional["JobSpec"] = None) -> str:
    """$MLFLOW_TRACKING_URI, else the spec's tracking.uri, else sqlite:///mlflow.db in the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (spec.tracking.uri if spec is not None else None)
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def absolute_uri(uri: str) -> str:
    """`uri` with a relative SQLite or file path made absolute (for processes that work elsewhere)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri
