"""Acceptance: bad input, table-driven.

Each case runs the real `raybloom run SPEC k=v ...` against one SQLite tracking store that already holds a
FINISHED run. A bad spec or bad data exits 2 with one line naming the field or file, creates no run and
leaves no traceback; a learning rate that makes the loss blow up exits 2 and leaves a FAILED run with the
reason and the metrics of the epochs before it. An MLflow server or Ray cluster that does not answer exits 2
at once, naming the address, and creates no run. After every case nothing already recorded is lost and no
run is left RUNNING. `raybloom validate` refuses the spec cases with the same message.
"""

from __future__ import annotations

import io
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

RAYBLOOM = str(Path(sys.executable).with_name("raybloom"))

GOOD_SPEC = """\
kind: train
experiment: bad-input
seed: 0
data: {source: linear}
model: {name: linear}
optim: {name: gd, lr: 0.3}
train: {epochs: 5}
tracking: {log_model: false}
"""


@dataclass
class Store:
    root: Path
    env: dict[str, str]
    client: MlflowClient
    good_run_id: str
    good_metrics: dict[str, float]
    messages: dict[str, str]  # case id -> the error line `raybloom run` printed
    dead_port: int = 0  # nothing listens there

    def raybloom(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([RAYBLOOM, *args], capture_output=True, text=True, cwd=self.root,
                              env={**self.env, **(env or {})}, timeout=300)

    def fill(self, text: str) -> str:
        return text.format(root=self.root, dead_port=self.dead_port)

    def snapshot(self) -> dict[str, tuple[str, dict[str, float], dict[str, str]]]:
        """Every run of every experiment: run id -> (status, metrics, tags)."""
        exps = [e.experiment_id for e in self.client.search_experiments(view_type=ViewType.ALL)]
        runs = self.client.search_runs(exps, run_view_type=ViewType.ALL, max_results=5000) if exps else []
        return {r.info.run_id: (r.info.status, dict(r.data.metrics), dict(r.data.tags)) for r in runs}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    root = tmp_path_factory.mktemp("bad-input")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "RAYBLOOM_DATA_DIR": str(root / "data"), "COLUMNS": "200"}
    env.pop("RAY_ADDRESS", None)
    (root / "good.yaml").write_text(GOOD_SPEC)
    (root / "not_yaml.yaml").write_text("kind: train\nmodel: {name: linear\n  optim: [lr: 0.1\n")
    (root / "unknown_section.yaml").write_text(GOOD_SPEC + "optimizer: {lr: 0.1}\n")

    # prepared folders with a broken split, made with pyarrow alone (the earlier one-file-per-split layout, which still reads)
    x = np.random.default_rng(0).uniform(0, 2, size=(40, 1)).astype(np.float32)
    y = (3 * x[:, 0] + 2).astype(np.float32)
    xcol = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 1)
    good_table = pa.table({"x": xcol, "y": pa.array(y)})
    for name in ("truncated", "wrong_column"):
        for split in ("train", "val", "test"):
            (root / name).mkdir(exist_ok=True)
            pq.write_table(good_table, root / name / f"{split}.parquet")
    train = root / "truncated" / "train.parquet"
    train.write_bytes(train.read_bytes()[: train.stat().st_size // 2])
    pq.write_table(pa.table({"features": xcol, "y": pa.array(y)}), root / "wrong_column" / "train.parquet")
    # data of one's own: a table with a pixels list column and a target, and an empty CSV
    pq.write_table(pa.table({"pixels": pa.array([[0.5, 1.0]] * 20, pa.list_(pa.float32())),
                             "target": pa.array(np.arange(20, dtype=np.float32))}), root / "own.parquet")
    (root / "empty.csv").write_text("a,label\n")
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8), mode="L").save(png, format="PNG")
    pq.write_table(pa.table({"image": pa.array([png.getvalue(), b"not a png"] * 3, pa.binary()),
                             "label": pa.array([0, 1] * 3)}), root / "images.parquet")
    for cls, size in (("a", (8, 8)), ("b", (8, 8)), ("b", (9, 8))):
        (root / "mixed" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(size, np.uint8), mode="L").save(root / "mixed" / cls / f"{len(list((root / 'mixed' / cls).iterdir()))}.png")

    _bad_data_files(root)

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    s = Store(root, env, client, "", {}, {}, dead_port)
    proc = s.raybloom("run", "good.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = s.snapshot()
    assert len(runs) == 1
    (run_id, (status, metrics, _)), = runs.items()
    assert run_id in proc.stdout and status == "FINISHED"
    assert {"val_loss", "test_loss", "train_loss"} <= set(metrics)
    s.good_run_id, s.good_metrics = run_id, metrics
    return s


def _bad_data_files(root: Path) -> None:
    """Sources whose values cannot train: NaN and inf features, labels out of range (a negative one in a source; a
    class beyond a hand-made prepared folder's count), an empty own test split, a training split of one class."""
    rng = np.random.default_rng(1)
    rows = [f"{a:.3f},{b:.3f},{i % 2}" for i, (a, b) in enumerate(rng.uniform(0, 1, (20, 2)))]
    rows[3] = "0.5,nan,1"
    (root / "nan.csv").write_text("a,b,label\n" + "\n".join(rows) + "\n")
    x = rng.uniform(0, 1, (20, 2)).astype(np.float32)
    x[7, 1] = np.inf
    np.savez(root / "inf.npz", x=x, y=np.arange(20) % 2)
    np.savez(root / "negative_label.npz", x=np.abs(x).clip(0, 1), y=np.array([0, 1, 2, -1] * 5))
    np.savez(root / "empty_test.npz", x_train=x[:10].clip(0, 1), y_train=np.arange(10) % 2,
             x_test=np.zeros((0, 2), np.float32), y_test=np.zeros(0, np.int64))
    (root / "one_class.csv").write_text("a,b,label\n" + "\n".join(f"{a:.3f},{b:.3f},4" for a, b in x.clip(0, 1)) + "\n")
    meta = {b"raybloom": b'{"shape": [2], "task": "classify", "num_classes": 3}'}
    (root / "label_beyond").mkdir()
    for split, labels in (("train", [0, 1, 2, 1] * 5), ("val", [0, 1, 2, 0] * 5), ("test", [0, 1, 7, 2] * 5)):
        xcol = pa.FixedSizeListArray.from_arrays(pa.array(x.clip(0, 1).ravel()), 2)
        pq.write_table(pa.table({"x": xcol, "y": pa.array(labels, pa.int64())}).replace_schema_metadata(meta),
                       root / "label_beyond" / f"{split}.parquet")


@dataclass
class Case:
    args: list[str]
    needles: list[str]  # each must appear in the error line
    kind: str = "spec"  # spec | data | unreachable: refused before a run opens; diverged: a FAILED run
    env: dict[str, str] = field(default_factory=dict)


CASES = {
    "negative-lr": Case(["good.yaml", "optim.lr=-0.1"], ["optim.lr", "-0.1"]),
    "even-kernel": Case(["good.yaml", "model.kernel_size=4"], ["model.kernel_size", "odd", "4"]),
    "unknown-key-did-you-mean": Case(["good.yaml", "model.kernal_size=3"],
                                     ["model.kernal_size", "unknown key", "did you mean model.kernel_size"]),
    "wrong-type": Case(["good.yaml", "train.epochs=abc"], ["train.epochs", "abc"]),
    "unknown-enum": Case(["good.yaml", "model.name=resnet"], ["model.name", "resnet", "cnn"]),
    "fraction-out-of-range": Case(["good.yaml", "data.val_fraction=1.5"], ["data.val_fraction", "1.5"]),
    "fractions-leave-no-training-data": Case(["good.yaml", "data.val_fraction=0.5", "data.test_fraction=0.45"],
                                             ["val_fraction + test_fraction"]),
    "missing-spec-file": Case(["no_such_job.yaml"], ["no_such_job.yaml", "no such spec file"]),
    "not-yaml": Case(["not_yaml.yaml"], ["not_yaml.yaml", "not valid YAML"]),
    "unknown-section": Case(["unknown_section.yaml"], ["unknown_section.yaml", "optimizer", "unknown key", "optim"]),
    "ambiguous-key": Case(["good.yaml", "patience=3"],
                          ["patience", "ambiguous", "schedule.patience", "regularization.early_stopping.patience"]),
    "override-without-value": Case(["good.yaml", "optim.lr"], ["optim.lr", "key=value"]),
    "truncated-parquet": Case(["good.yaml", "data.path={root}/truncated"],
                              ["{root}/truncated/train.parquet", "not a readable Parquet file"], "data"),
    "wrong-column": Case(["good.yaml", "data.path={root}/wrong_column"],
                         ["{root}/wrong_column/train.parquet", "column 'x'", "features"], "data"),
    "missing-npz": Case(["good.yaml", "data.source={root}/missing.npz"],
                        ["{root}/missing.npz", "no such file or folder"], "data"),
    "cnn-on-non-image-data": Case(["good.yaml", "model.name=cnn"], ["model.name", "cnn", "image"], "data"),
    "table-wrong-column": Case(["good.yaml", "data.source={root}/own.parquet", "data.columns.features=pix",
                                "data.columns.label=target"],
                               ["data.columns.features", "'pix'", "{root}/own.parquet", "pixels", "target"], "data"),
    "table-missing-label": Case(["good.yaml", "data.source={root}/own.parquet", "data.columns.features=pixels"],
                                ["data.columns.label", "'label'", "{root}/own.parquet", "pixels", "target"], "data"),
    "empty-csv": Case(["good.yaml", "data.source={root}/empty.csv", "data.columns.features=[a]"],
                      ["{root}/empty.csv", "no rows"], "data"),
    "undecodable-image-bytes": Case(["good.yaml", "data.source={root}/images.parquet"],
                                    ["{root}/images.parquet", "column 'image'", "row 1", "not a readable image"], "data"),
    "mixed-image-sizes": Case(["good.yaml", "data.source={root}/mixed"],
                              ["{root}/mixed/b/1.png", "differs", "data.image_size"], "data"),
    # values that cannot train: refused while preparing (source rows) or when the job opens its data (splits)
    "nan-in-features": Case(["good.yaml", "data.source={root}/nan.csv", "data.columns.features=[a,b]", "model.name=mlp"],
                            ["{root}/nan.csv", "row 3", "NaN", "finite"], "data"),
    "inf-in-features": Case(["good.yaml", "data.source={root}/inf.npz", "model.name=mlp"],
                            ["{root}/inf.npz", "row 7", "inf", "finite"], "data"),
    "negative-label": Case(["good.yaml", "data.source={root}/negative_label.npz", "model.name=mlp"],
                           ["{root}/negative_label.npz", "label -1 at row 3", "out of range"], "data"),
    "label-beyond-the-classes": Case(["good.yaml", "data.path={root}/label_beyond", "model.name=mlp"],
                                     ["{root}/label_beyond (test split)", "label 7 at row 2", "out of range",
                                      "0..2"], "data"),
    "empty-split": Case(["good.yaml", "data.source={root}/empty_test.npz", "model.name=mlp"],
                        ["{root}/empty_test.npz", "the test split has no rows", "own test part is empty",
                         "data.test_fraction: 0"], "data"),
    "single-class": Case(["good.yaml", "data.source={root}/one_class.csv", "data.columns.features=[a,b]",
                          "model.name=mlp"], ["{root}/one_class.csv", "single class (4,", "at least two classes"], "data"),
    # a split that would not fit in this process's memory is refused before training, with the way out
    "split-does-not-fit": Case(["good.yaml"], ["GB in memory", "data.stream: true", "scaling.ingest: ray_data"], "data",
                               {"RAYBLOOM_MEMORY_BYTES": "2000"}),
    # MLflow's client would retry for minutes, and ray.init too, without a word: both are refused in seconds
    "mlflow-server-down": Case(["good.yaml"], ["MLflow tracking server http://127.0.0.1:{dead_port}", "does not answer"],
                               "unreachable", {"MLFLOW_TRACKING_URI": "http://127.0.0.1:{dead_port}"}),
    "ray-cluster-down": Case(["good.yaml", "scaling.workers=1", "--address", "127.0.0.1:{dead_port}"],
                             ["scaling.address", "no Ray cluster answers at 127.0.0.1:{dead_port}"], "unreachable"),
    # the growth guard switched off, so the loss really reaches inf/NaN
    "loss-goes-nan": Case(["good.yaml", "optim.name=gd", "optim.lr=1000", "train.epochs=20",
                           "train.divergence_factor=1e300"], ["optim.lr", "FAILED"], "diverged"),
    # the default guard stops the run as soon as the loss explodes, before it is inf
    "loss-explodes": Case(["good.yaml", "optim.name=gd", "optim.lr=1000", "train.epochs=20"],
                          ["optim.lr", "FAILED", "grew to"], "diverged"),
}

NAN_OR_INF = re.compile(r"\b(nan|inf)\b", re.IGNORECASE)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one `error: ...` line on stderr (joined, in case the terminal width wrapped it)."""
    text = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr, proc.stderr
    assert text.startswith("error: "), proc.stderr
    return text


@pytest.mark.parametrize("case_id", list(CASES), ids=list(CASES))
def test_bad_input_exits_2_and_loses_nothing(store: Store, case_id: str):
    case = CASES[case_id]
    before = store.snapshot()
    t0 = time.monotonic()
    proc = store.raybloom("run", *map(store.fill, case.args), env={k: store.fill(v) for k, v in case.env.items()})
    elapsed = time.monotonic() - t0
    after = store.snapshot()

    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    message = _error_line(proc)
    for needle in case.needles:
        assert store.fill(needle) in message, message
    store.messages[case_id] = message

    # nothing already recorded is lost or changed, and nothing is left RUNNING
    assert store.good_run_id in after
    assert after[store.good_run_id][:2] == ("FINISHED", store.good_metrics)
    for run_id, (status, metrics, tags) in before.items():
        assert run_id in after, f"run {run_id} disappeared"
        assert after[run_id][:2] == (status, metrics), f"run {run_id} changed"
    assert not [r for r, (status, _, _) in after.items() if status == "RUNNING"]

    new = set(after) - set(before)
    if case.kind in ("spec", "data", "unreachable"):
        assert not new, "a refused job must not open a run"
        assert case.kind != "unreachable" or elapsed < 60, f"took {elapsed:.0f} s to give up"
        return

    # diverged: one new run, FAILED, with the reason, and the metrics of the epochs before it
    explodes = "grew to" in case.needles
    assert explodes or NAN_OR_INF.search(message), message
    assert len(new) == 1
    run_id = new.pop()
    status, metrics, tags = after[run_id]
    assert status == "FAILED"
    reason = tags.get("raybloom.failure_reason", "")
    assert (explodes or NAN_OR_INF.search(reason)) and "train_loss" in reason, reason
    failed_epoch = int(re.search(r"at epoch (\d+)", reason).group(1))
    assert 1 <= failed_epoch < 20, reason
    history = store.client.get_metric_history(run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(failed_epoch))
    assert all(math.isfinite(m.value) for m in history)
    assert len(store.client.get_metric_history(run_id, "val_loss")) == failed_epoch
    params = store.client.get_run(run_id).data.params
    assert params["optim.lr"] == "1000.0" and params["optim.name"] == "gd"


VALIDATE_CASES = ["negative-lr", "even-kernel", "unknown-key-did-you-mean", "wrong-type", "not-yaml", "ambiguous-key"]


@pytest.mark.parametrize("case_id", VALIDATE_CASES, ids=VALIDATE_CASES)
def test_validate_refuses_the_spec_cases_with_the_same_message(store: Store, case_id: str):
    case = CASES[case_id]
    assert case.kind == "spec"
    before = store.snapshot()
    proc = store.raybloom("validate", *case.args)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    message = _error_line(proc)
    for needle in case.needles:
        assert needle in message, message
    if case_id not in store.messages:  # run alone: `raybloom run` of this case has not run in this session yet
        ran = store.raybloom("run", *map(store.fill, case.args), env={k: store.fill(v) for k, v in case.env.items()})
        assert ran.returncode == 2, ran.stderr
        store.messages[case_id] = _error_line(ran)
    assert message == store.messages[case_id]
    assert store.snapshot() == before


def test_validate_accepts_the_good_spec(store: Store):
    proc = store.raybloom("validate", "good.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "valid" in proc.stdout
