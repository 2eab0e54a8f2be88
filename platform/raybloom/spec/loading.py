"""Reading a job spec from its YAML file, with `key=value` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raybloom.errors import SpecError
from raybloom.spec.job import JobSpec, from_dict


def load(path: str | Path, overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    """Read a YAML job spec, apply dotted overrides, validate. Raises SpecError naming the bad field."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: not valid YAML: {e}") from None
    if raw is not None and not isinstance(raw, dict):
        raise SpecError(f"{p}: a job spec is a YAML mapping (kind:, data:, model: ...), got {type(raw).__name__}")
    try:
        return from_dict(raw or {}, overrides)
    except SpecError as e:
        raise SpecError(f"{p}: {e}") from None
