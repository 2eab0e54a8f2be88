"""The job-spec reference table in README (`make docs`), generated from the field descriptions."""

from __future__ import annotations

import typing

from pydantic import BaseModel

from raybloom.spec.job import JobSpec


def reference_markdown() -> str:
    """The job-spec reference table (README's), generated from the field descriptions."""
    rows = ["| key | default | description |", "|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = field.annotation
            inner = [a for a in typing.get_args(sub) if isinstance(a, type) and issubclass(a, BaseModel)]
            if inner and not typing.get_origin(sub) is dict:  # Optional[Section]
                walk(inner[0], f"{prefix}{name}.")
                continue
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                walk(sub, f"{prefix}{name}.")
                continue
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            rows.append(f"| `{prefix}{name}` | `{default}` | {field.description} |".replace("`None`", "—"))

    walk(JobSpec, "")
    return "\n".join(rows)
