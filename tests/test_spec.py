"""The job spec: defaults, overrides with coercion, errors that name the field, every shipped job valid."""

from __future__ import annotations

import pytest

from raybloom import spec
from raybloom.errors import SpecError

from conftest import JOBS, cli


def test_defaults_are_valid_and_flat_keys_are_dotted():
    s = spec.JobSpec()
    flat = s.flat()
    assert flat["optim.lr"] == 1e-3 and flat["model.filters"] == [32, 64]
    assert flat["regularization.early_stopping.patience"] == 5
    assert all(k in spec.ALL_KEYS for k in flat if flat[k] is not None or k in spec.ALL_KEYS)


def test_overrides_coerce_types():
    s = spec.JobSpec().with_overrides(["optim.lr=3e-3", "model.filters=[16, 32]", "train.epochs=7", "model.pool=false"])
    assert s.optim.lr == pytest.approx(3e-3) and s.model.filters == [16, 32]
    assert s.train.epochs == 7 and s.model.pool is False


def test_unique_leaf_names_are_shorthands():
    s = spec.JobSpec().with_overrides(["lr=0.5", "workers=0", "epochs=3"])
    assert (s.optim.lr, s.scaling.workers, s.train.epochs) == (0.5, 0, 3)


@pytest.mark.parametrize("override, needle", [
    ("optim.lr=-0.1", "optim.lr: Input should be greater than 0, got -0.1"),
    ("model.kernel_size=4", "model.kernel_size: must be an odd positive integer"),
    ("model.kernal_size=3", "did you mean model.kernel_size"),
    ("train.epochs=abc", "train.epochs"),
    ("model.name=resnet", "'linear', 'mlp', 'cnn' or 'deconv'"),
    ("patience=2", "schedule.patience, regularization.early_stopping.patience"),
    ("train.cv_folds=1", "train.cv_folds: must be 0 (off) or at least 2"),
    ("regularization.dropout=1.0", "regularization.dropout"),
    ("optim", "expected key=value"),
])
def test_errors_name_the_field_and_what_is_accepted(override, needle):
    with pytest.raises(SpecError) as e:
        spec.JobSpec().with_overrides([override])
    assert needle in str(e.value)


@pytest.mark.parametrize("key, needle", [
    ("optim.lrr", "search.space: 'optim.lrr' is not a searchable spec key; did you mean optim.lr?"),
    ("scaling.workers", "search.space: 'scaling.workers' is not a searchable spec key"),
    ("federated.rounds", "search.space: 'federated.rounds' is not a searchable spec key"),
])
def test_search_space_keys_must_be_spec_keys_that_shape_training(key, needle):
    space = {key: {"type": "int", "low": 1, "high": 4}}
    with pytest.raises(SpecError) as e:
        spec.from_dict({"kind": "search", "search": {"space": space}})
    assert needle in str(e.value)
    assert spec.from_dict({"kind": "search", "search": {"space": {"model.kernel_size": {
        "type": "categorical", "choices": [3, 5]}}}}).search.grid_size() == 2


def test_with_overrides_returns_a_new_spec():
    base = spec.JobSpec()
    changed = base.with_overrides({"optim.lr": 0.1})
    assert base.optim.lr == 1e-3 and changed.optim.lr == 0.1


def test_yaml_round_trip(tmp_path):
    s = spec.JobSpec().with_overrides(["model.name=mlp", "regularization.l2=0.01"])
    p = tmp_path / "s.yaml"
    p.write_text(s.to_yaml())
    assert spec.load(p) == s


def test_reference_table_lists_every_field():
    table = spec.reference_markdown()
    for key in spec.ALL_KEYS:
        assert f"`{key}`" in table or f"`{key}." in table, key  # sections such as search list their keys


def test_readme_holds_the_current_reference():
    readme = (JOBS.parent / "README.md").read_text()
    assert spec.reference_markdown() in readme, "README's job-spec reference is stale: paste spec.reference_markdown()"


@pytest.mark.parametrize("job", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_every_shipped_job_validates(job):
    s = spec.load(JOBS / job)
    assert s.experiment
    r = cli("validate", str(JOBS / job))
    assert r.returncode == 0, r.stderr
    fed = s.federated
    what = (f"{fed.clients} clients, {fed.rounds} rounds × {fed.local_epochs} local epoch(s)" if s.kind == "federated"
            else f"{s.train.epochs} epochs")
    assert f"{JOBS / job}: valid ({s.kind}, model {s.model.name}, {what})" in " ".join(r.stdout.split()), r.stdout


def test_validate_exit_code_two_names_the_field():
    r = cli("validate", str(JOBS / "cnn_digits.yaml"), "model.kernel_size=6")
    assert r.returncode == 2
    assert "model.kernel_size" in r.stderr and "Traceback" not in r.stderr
