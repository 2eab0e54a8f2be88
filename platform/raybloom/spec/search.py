"""The `search:` section: the Optuna search over a job (its space is keyed by the job's dotted keys)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from raybloom.spec.sections import Section, _check_folds


class ParamRange(Section):
    """One search dimension: a float range, an int range, or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(..., description="float (low/high, log), int (low/high, step) or categorical (choices)")
    low: Optional[float] = Field(None, description="Lower bound (float, int)")
    high: Optional[float] = Field(None, description="Upper bound, inclusive (float, int)")
    log: bool = Field(False, description="Sample on a log scale (float, int)")
    step: Optional[float] = Field(None, gt=0, description="Grid step (int: default 1; float: needed for grid search)")
    choices: Optional[list[Any]] = Field(None, description="The values to choose from (categorical)")

    @model_validator(mode="after")
    def _sampleable(self) -> "ParamRange":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("categorical needs a non-empty choices list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"{self.type} needs low and high")
        if self.low >= self.high:
            raise ValueError(f"low must be < high, got low={self.low}, high={self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self

    def grid(self) -> list[Any]:
        """The values a grid search enumerates."""
        if self.type == "categorical":
            return list(self.choices)
        step = self.step if self.step is not None else (1 if self.type == "int" else None)
        if step is None:
            raise ValueError("a float range needs step (or use type: categorical) for grid search")
        n = int(round((self.high - self.low) / step)) + 1
        values = [self.low + i * step for i in range(n)]
        return [int(round(v)) for v in values] if self.type == "int" else values


class SearchSpec(Section):
    space: dict[str, ParamRange] = Field(..., description="Search space keyed by dotted spec keys (optim.lr, model.filters, ...)")
    sampler: Literal["grid", "random", "tpe"] = Field("tpe", description="grid enumerates the space; random and tpe sample it")
    seed: int = Field(0, description="Sampler seed")
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = Field("none", description="Stop bad trials early on their per-epoch validation metric")
    n_trials: Optional[int] = Field(None, ge=1, description="Trials that must finish (COMPLETE or PRUNED); grid: default the grid size")
    timeout: Optional[float] = Field(None, gt=0, description="Stop starting new trials after this many seconds")
    concurrency: int = Field(1, ge=1, description="Trials running at once on Ray")
    threads_per_trial: int = Field(1, ge=1, description="CPUs (and torch threads) per trial, per worker when workers_per_trial > 1")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train DDP workers per trial (1: the trial trains inside its Ray task)")
    metric: Literal["val_loss", "val_accuracy"] = Field("val_loss", description="What the search optimizes (per epoch; the trial's value is its best epoch)")
    direction: Optional[Literal["minimize", "maximize"]] = Field(None, description="Default: minimize for val_loss, maximize for val_accuracy")
    storage: Optional[str] = Field(None, description="Optuna storage URL, or a journal file path; default: optuna.journal beside the SQLite tracking store")
    study_name: Optional[str] = Field(None, description="Study name (rerun with the same one to resume); default: '<experiment>-search'")
    cv_folds: int = Field(0, ge=0, description="Objective = mean metric over k folds of train+val (0 = the validation split)")
    retrain_best: bool = Field(False, description="Train the best configuration on train+val, test it, register it when tracking.register_as is set")

    @field_validator("space")
    @classmethod
    def _not_empty(cls, v: dict[str, ParamRange]) -> dict[str, ParamRange]:
        if not v:  # which keys are searchable is JobSpec's to say: it knows them all
            raise ValueError("must name at least one dotted key to search")
        return v

    @field_validator("cv_folds")
    @classmethod
    def _folds(cls, v: int) -> int:
        return _check_folds(v)

    @model_validator(mode="after")
    def _grid_is_finite(self) -> "SearchSpec":
        if self.sampler == "grid":
            for key, r in self.space.items():
                if r.type == "float" and r.step is None:
                    raise ValueError(f"space.{key}: grid search needs step for a float range (or type: categorical)")
        return self

    @property
    def goal(self) -> str:
        return self.direction or ("maximize" if self.metric == "val_accuracy" else "minimize")

    def grid_size(self) -> int:
        n = 1
        for r in self.space.values():
            n *= len(r.grid())
        return n
