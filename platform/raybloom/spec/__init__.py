"""The typed job spec: one YAML file says what to train; `key=value` overrides edit it.

Every section is a pydantic model with `extra="forbid"` and a description on each field, so an unknown
key, a wrong type or an out-of-range value is refused with a message that names the dotted field, the
bad value and what is accepted. The same dotted keys are CLI overrides, MLflow parameter names and
search-space keys.

The sections: `sections` (data, model, optim, schedule, regularization, train, scaling, tracking),
`search` and `federated`; `job` puts them together as `JobSpec` (with its dotted keys and overrides),
`loading` reads a YAML file, `reference` documents every field.
"""

from raybloom.spec.federated import FederatedSpec
from raybloom.spec.job import ALL_KEYS, JobSpec, flatten, from_dict, parse_override, resolve_key
from raybloom.spec.loading import load
from raybloom.spec.reference import reference_markdown
from raybloom.spec.search import ParamRange, SearchSpec
from raybloom.spec.sections import (AugmentSpec, DataSpec, EarlyStoppingSpec, ModelSpec, OptimSpec, RegularizationSpec,
                                    ScalingSpec, ScheduleSpec, TrackingSpec, TrainSpec)

__all__ = ["ALL_KEYS", "AugmentSpec", "DataSpec", "EarlyStoppingSpec", "FederatedSpec", "JobSpec", "ModelSpec",
           "OptimSpec", "ParamRange", "RegularizationSpec", "ScalingSpec", "ScheduleSpec", "SearchSpec", "TrackingSpec",
           "TrainSpec", "flatten", "from_dict", "load", "parse_override", "reference_markdown", "resolve_key"]
