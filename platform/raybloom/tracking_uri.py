"""Where MLflow records, and whether a tracking server answers there, without importing MLflow (about 1 s
here): the processes a run starts first (the simulation's SuperLink) are spawned before `tracking` is
imported. `tracking` re-exports these."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from raybloom.errors import UserError

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


_ANSWERED: set[str] = set()


def check_answers(uri: str, timeout: float = 5.0) -> None:
    """Refuse at once a tracking server that does not answer: MLflow's client would retry, silently, for
    minutes. Any HTTP reply counts (a proxy or auth may answer /health with an error status); asked once
    per URI. Other URIs (SQLite, a folder) pass."""
    if not uri.startswith(("http://", "https://")) or uri in _ANSWERED:
        return
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        pass
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"MLflow tracking server {uri} does not answer ({getattr(reason, 'strerror', None) or reason}); "
                        "start it (`raybloom cluster up`, `mlflow server`), or unset MLFLOW_TRACKING_URI and "
                        "tracking.uri to record to sqlite:///mlflow.db here") from None
    _ANSWERED.add(uri)
