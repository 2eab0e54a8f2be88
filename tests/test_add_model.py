"""Adding a model touches `models.py`, the spec and a job, nothing else.

A copy of the package gets a small model (`tiny`: one hidden layer of `model.tiny_width` units) exactly as
README's "How to add a model" says: a builder and its `MODELS` entry in models.py, its name and its field
in spec/sections.py, a job. The real `raybloom run` of that copy then trains it in process, on Ray Train
and federated with Flower, and MLflow records each run under the model's own name.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow.pytorch
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import all_runs

PKG = Path(__file__).resolve().parents[1] / "platform" / "raybloom"

TINY_MODEL = '''

def tiny(in_features: int, width: int, out_features: int) -> nn.Module:
    """The smallest classifier: one hidden layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, out_features))


MODELS["tiny"] = ModelKind(lambda m, shape, out, dropout: tiny(math.prod(shape), m.tiny_width, out),
                           lambda m: f"tiny w{m.tiny_width}")
'''
SPEC_NAME = 'name: Literal["linear", "mlp", "cnn", "deconv"]'
SPEC_FIELD_BEFORE = "    hidden: list[int]"
JOB = """experiment: tiny
model:
  name: tiny
  tiny_width: 24
optim:
  name: adam
  lr: 0.01
train:
  epochs: 3
"""


def _changed_files(a: Path, b: Path) -> set[str]:
    out = set()
    for path in b.rglob("*.py"):
        rel = path.relative_to(b)
        if not (a / rel).exists() or not filecmp.cmp(a / rel, path, shallow=False):
            out.add(str(rel))
    return out


@pytest.fixture
def package_with_tiny(tmp_path) -> Path:
    pkg = tmp_path / "platform" / "raybloom"
    shutil.copytree(PKG, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    models = pkg / "models.py"
    models.write_text(models.read_text() + TINY_MODEL)
    sections = pkg / "spec" / "sections.py"
    text = sections.read_text()
    assert SPEC_NAME in text and SPEC_FIELD_BEFORE in text, "ModelSpec changed shape: update this test's edit"
    text = text.replace(SPEC_NAME, SPEC_NAME.replace('"deconv"]', '"deconv", "tiny"]'))
    text = text.replace(SPEC_FIELD_BEFORE, '    tiny_width: int = Field(16, ge=1, description="tiny: width of its hidden layer")\n'
                        + SPEC_FIELD_BEFORE, 1)
    sections.write_text(text)
    assert _changed_files(PKG, pkg) == {"models.py", "spec/sections.py"}
    (tmp_path / "tiny_digits.yaml").write_text(JOB)
    return tmp_path


@pytest.mark.slow
def test_a_model_added_to_models_and_the_spec_trains_on_every_path(package_with_tiny, store):
    root = package_with_tiny
    env = {**os.environ, "PYTHONPATH": str(root / "platform"), "COLUMNS": "200"}
    where = subprocess.run([sys.executable, "-c", "import raybloom.models as m; print(m.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where) == root / "platform" / "raybloom" / "models.py"  # the copy is what runs
    paths = {"in process": [], "ray": ["scaling.workers=1", "tracking.log_model=false"],
             "federated": ["kind=federated", "federated.clients=2", "federated.rounds=1", "tracking.log_model=false"]}
    for what, overrides in paths.items():
        r = subprocess.run([sys.executable, "-m", "raybloom.cli", "run", str(root / "tiny_digits.yaml"), *overrides],
                           env=env, capture_output=True, text=True, cwd=root, timeout=600)
        assert r.returncode == 0, f"{what}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    client = MlflowClient(store)
    runs = {r.data.tags["raybloom.kind"] + ("-ray" if r.data.params.get("scaling.workers") == "1" else ""): r
            for r in all_runs(client)}
    assert set(runs) == {"train", "train-ray", "federated"}
    for kind, run in runs.items():
        assert run.info.status == "FINISHED", kind
        assert "tiny w24" in run.info.run_name and run.data.params["model.tiny_width"] == "24", kind
        assert run.data.metrics["test_accuracy"] > 0.5, (kind, run.data.metrics["test_accuracy"])
    local = runs["train"]
    assert {m.step for m in client.get_metric_history(local.info.run_id, "val_accuracy")} == {0, 1, 2}
    model = mlflow.pytorch.load_model(f"runs:/{local.info.run_id}/model")  # the logged model is the tiny one
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert [tuple(p.shape) for p in model.parameters()] == [(24, 64), (24,), (10, 24), (10,)]
    assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(local.info.run_id, "plots")}
