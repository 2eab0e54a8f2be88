"""`JobSpec`: every section of a job put together, its cross-field checks, its dotted keys and overrides.

The same dotted keys are CLI overrides, MLflow parameter names and search-space keys; an override key
may be a full path (`optim.lr`) or a unique leaf (`lr`), and an unknown one is refused with the keys it
might have meant.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from raybloom.errors import SpecError
from raybloom.spec.federated import FederatedSpec
from raybloom.spec.search import SearchSpec
from raybloom.spec.sections import (DataSpec, ModelSpec, OptimSpec, RegularizationSpec, ScalingSpec, ScheduleSpec,
                                    Section, TrackingSpec, TrainSpec)


class JobSpec(Section):
    kind: Literal["train", "search", "federated"] = Field("train", description="What to run: train (in process or on Ray), search (Optuna), federated (Flower)")
    experiment: str = Field("raybloom", min_length=1, description="MLflow experiment name")
    seed: int = Field(0, description="Seed of weights, batch order, dropout and augmentation")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model")
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="Learning-rate schedule")
    regularization: RegularizationSpec = Field(default_factory=RegularizationSpec, description="Penalties, dropout, augmentation, early stopping")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Epochs, batches, checkpoints, cross-validation")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Where the training runs")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow")
    search: Optional[SearchSpec] = Field(None, description="kind: search: the Optuna search over this spec (see the search keys)")
    federated: Optional[FederatedSpec] = Field(None, description="kind: federated (or a search over a federated job): the Flower setup (see the federated keys)")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        if self.kind == "search" and self.search is None:
            raise ValueError("search: kind: search needs a search section with a space")
        for key in self.search.space if self.search else ():
            if self.federated_search and key in FEDERATED_KEYS and not key.startswith(FED_UNSEARCHABLE):
                continue
            if key not in ALL_KEYS or key.startswith(UNSEARCHABLE):
                raise ValueError(f"search.space: {key!r} is not a searchable spec key{_did_you_mean(key)}")
        if self.federated_search:
            search = self.search
            if self.federated.mode != "simulation":
                raise ValueError("federated.mode: a federated search runs its trials as simulations (each its own "
                                 "SuperLink, the ServerApp reporting to the local Optuna storage); set it to simulation")
            if search.cv_folds or search.workers_per_trial > 1 or search.retrain_best:
                raise ValueError("search: a federated search's trials are federated runs: search.cv_folds, "
                                 "search.workers_per_trial > 1 and search.retrain_best do not apply; leave them unset")
        if self.kind == "federated" or self.federated_search:
            if self.federated is None:
                raise ValueError("federated: kind: federated needs a federated section (clients, rounds, strategy, ...)")
            if self.data.val_fraction == 0:
                raise ValueError("data.val_fraction: the server evaluates the global model on the validation split; set it > 0")
            if self.scaling.workers:
                raise ValueError("scaling.workers: federated clients train in process (simulation actors or SuperNodes); set it to 0")
        if self.regularization.early_stopping.enabled and self.data.val_fraction == 0:
            raise ValueError("regularization.early_stopping.enabled needs a validation set: set data.val_fraction > 0")
        if self.train.precision != "fp32" and not self.scaling.use_gpu:
            raise ValueError(f"train.precision: {self.train.precision} autocast runs on GPU only; set scaling.use_gpu=true "
                             "(with scaling.workers >= 1) or train.precision=fp32")
        if self.scaling.ingest == "ray_data" and self.scaling.workers:
            if self.optim.name == "gd":
                raise ValueError("optim.name: gd takes the whole training split as one batch; scaling.ingest: ray_data "
                                 "streams it: use sgd, adam or adagrad, or scaling.ingest: arrays")
            if self.data.train_limit:
                raise ValueError("data.train_limit: the first N rows of a split streamed by scaling.ingest: ray_data "
                                 "would change every epoch; prepare a smaller dataset or use scaling.ingest: arrays")
        if self.scaling.use_gpu and self.scaling.workers == 0:
            raise ValueError("scaling.use_gpu: GPU training runs on Ray workers; set scaling.workers >= 1")
        if self.schedule.name == "plateau" and self.data.val_fraction == 0:
            raise ValueError("schedule.name: plateau needs a validation set: set data.val_fraction > 0")
        if self.schedule.name == "gradient" and self.schedule.min_lr >= self.optim.lr:
            raise ValueError(f"schedule.min_lr: the gradient rule keeps the lr within [min_lr, optim.lr]; min_lr "
                             f"{self.schedule.min_lr:g} must be below optim.lr {self.optim.lr:g}")
        return self

    # -- derived views -------------------------------------------------------------------------
    @property
    def federated_search(self) -> bool:
        """A `kind: search` over a federated job (it has a `federated:` section): each trial is a federated run."""
        return self.kind == "search" and self.federated is not None


    def flat(self) -> dict[str, Any]:
        """The spec as dotted keys (MLflow params, search keys); lists stay lists."""
        return flatten(self.model_dump(mode="json"))

    def with_overrides(self, overrides: dict[str, Any] | list[str]) -> "JobSpec":
        """A new spec with dotted overrides applied (a {key: value} dict or ["key=value", ...])."""
        return from_dict(self.model_dump(mode="json"), overrides)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------------------------------------
def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _field_paths(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    paths = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            paths += _field_paths(sub, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _optional_sections(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """Dotted paths of the sections that may be absent (`search`, `federated`, `data.columns`): keys below them
    are checked by the section itself once it is set."""
    out = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            out += _optional_sections(sub, f"{prefix}{name}.")
        elif any(isinstance(a, type) and issubclass(a, BaseModel) for a in typing.get_args(sub)):
            out.append(f"{prefix}{name}")
    return out


ALL_KEYS: list[str] = _field_paths()
OPTIONAL_SECTIONS: list[str] = _optional_sections()
UNSEARCHABLE = ("search.", "federated.", "kind", "scaling.", "tracking.")  # where a run goes, not how it trains
# a federated search may search federated.* (mu, local_epochs, strategy, server_lr, ...), but not these
FEDERATED_KEYS: list[str] = _field_paths(FederatedSpec, "federated.")
FED_UNSEARCHABLE = ("federated.mode", "federated.superlink", "federated.faults", "federated.round_timeout")


def resolve_key(key: str) -> str:
    """Map an override key to its dotted path: full paths pass; a unique leaf name (`lr`, `workers`) is expanded."""
    if key in ALL_KEYS or any(key.startswith(f"{s}.") for s in OPTIONAL_SECTIONS):
        return key
    leaf_matches = [p for p in ALL_KEYS if p.rsplit(".", 1)[-1] == key or p.endswith("." + key)]
    if len(leaf_matches) == 1:
        return leaf_matches[0]
    if len(leaf_matches) > 1:
        raise SpecError(f"{key}: ambiguous override key; say which one: {', '.join(leaf_matches)}")
    raise SpecError(f"{key}: unknown key{_did_you_mean(key)}")


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, ALL_KEYS, n=2, cutoff=0.85) or difflib.get_close_matches(key, ALL_KEYS, n=3, cutoff=0.6)
    if not close:
        leaves = {p.rsplit(".", 1)[-1]: p for p in ALL_KEYS}
        close = [leaves[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=3, cutoff=0.7)]
    return f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(ALL_KEYS)}"


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise SpecError(f"override {item!r}: expected key=value, e.g. optim.lr=0.01")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = d
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise SpecError(f"{key}: {p} is a value, not a section")
        node = node[p]
    node[parts[-1]] = value


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key{_did_you_mean(loc)}")
        elif e["type"] == "value_error":
            lines.append(f"{loc}: {msg}" if loc else msg)
        else:
            lines.append(f"{loc}: {msg}, got {e.get('input')!r}")
    return "\n".join(lines)


def from_dict(raw: dict[str, Any], overrides: dict[str, Any] | list[str] | None = None) -> JobSpec:
    data = dict(raw or {})
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        _set_dotted(data, resolve_key(key), value)
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_errors(err)) from None
