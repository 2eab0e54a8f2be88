"""Bring your own data: every source kind prepares into sharded splits of the right sizes, keeps its own
test split, keeps uint8 images as uint8 on disk, and refuses what it cannot read by file and column.

Every file is written by the test itself (no download): IDX files as MNIST ships them, a Keras-layout
.npz, Parquet and CSV tables of one's own, a Hugging Face-style Parquet export with encoded PNG bytes,
image folders with train/ and test/ sub-folders.
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from raybloom import data
from raybloom.errors import DataError
from raybloom.spec import from_dict
from raybloom.spec.sections import DataSpec

from conftest import RAYBLOOM


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data-root"
    monkeypatch.setenv("RAYBLOOM_DATA_DIR", str(folder))
    return folder


def _spec(**fields) -> DataSpec:
    return from_dict({"data": fields}).data


def _rows(folder: Path) -> dict[str, int]:
    return {s: data.split_rows(folder, s) for s in data.SPLITS}


def _images(n: int, h: int = 6, w: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    return x, (np.arange(n) % 4).astype(np.uint8)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    code = {1: 0x00000801, 3: 0x00000803}[array.ndim]
    raw = struct.pack(">I", code) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    (path.with_name(path.name + ".gz") if gz else path).write_bytes(gzip.compress(raw) if gz else raw)


# ------------------------------------------------------------------------------------ each kind of source
def test_idx_folder_keeps_t10k_as_the_test_split(tmp_path):
    src = tmp_path / "mnist"
    src.mkdir()
    (xtr, ytr), (xte, yte) = _images(50), _images(13, seed=1)
    _write_idx(src / "train-images-idx3-ubyte", xtr)
    _write_idx(src / "train-labels-idx1-ubyte", ytr)
    _write_idx(src / "t10k-images-idx3-ubyte", xte)
    _write_idx(src / "t10k-labels-idx1-ubyte", yte)
    folder = data.prepare_source(_spec(source=str(src), val_fraction=0.2, test_fraction=0.3), tmp_path / "prep")
    assert _rows(folder) == {"train": 40, "val": 10, "test": 13}  # test is exactly t10k; val is 20% of train
    test, meta = data.read_split(folder, "test")
    assert np.allclose(test.x.numpy()[:, 0], xte / 255.0) and test.y.tolist() == yte.tolist()  # t10k, in order
    table = pq.read_table(data.split_files(folder, "train")[0])
    assert table.schema.field("x").type.value_type == pa.uint8()  # images stay uint8 on disk
    assert meta["dtype"] == "uint8" and meta["scale"] == pytest.approx(1 / 255)


def test_keras_npz_keeps_x_test_as_the_test_split(tmp_path):
    (xtr, ytr), (xte, yte) = _images(60), _images(17, seed=1)
    np.savez(tmp_path / "mnist.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = data.load(_spec(source=str(tmp_path / "mnist.npz"), val_fraction=0.25))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45, 15, 17)
    assert ds.shape == (1, 6, 5) and ds.num_classes == 4
    assert torch.allclose(ds.test.x[:, 0], torch.from_numpy(xte / 255.0).float())


def test_a_parquet_file_of_ones_own_with_a_columns_mapping(tmp_path):
    """A table with a list column `pixels` and an integer `target` (the case README's example shows)."""
    x, y = _images(40)
    pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(40, -1).ravel().astype(np.float32)), 30)
    path = tmp_path / "own.parquet"
    pq.write_table(pa.table({"pixels": pixels, "target": pa.array(y.astype(np.int64)), "note": ["x"] * 40}), path)
    spec = _spec(source=str(path), columns={"features": "pixels", "label": "target"}, shape=[1, 6, 5],
                 val_fraction=0.25, test_fraction=0.25)
    ds = data.load(spec)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (20, 10, 10)
    assert ds.shape == (1, 6, 5) and ds.num_classes == 4
    got = torch.cat([ds.train.x, ds.val.x, ds.test.x]).reshape(40, -1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, x.reshape(40, -1).astype(np.float32).tolist()))


def test_csv_with_numeric_columns_and_string_labels(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(30, 3)).astype(np.float32)
    labels = np.array(["cat", "dog", "emu"])[np.arange(30) % 3]
    path = tmp_path / "pets.csv"
    pacsv.write_csv(pa.table({"a": feats[:, 0], "b": feats[:, 1], "c": feats[:, 2], "kind": labels}), path)
    ds = data.load(_spec(source=str(path), columns={"features": ["a", "b", "c"], "label": "kind"},
                         val_fraction=0.2, test_fraction=0.2))
    assert ds.meta["classes"] == ["cat", "dog", "emu"] and ds.shape == (3,)
    assert len(ds.train) + len(ds.val) + len(ds.test) == 30 and len(ds.test) == 6
    x = torch.cat([ds.train.x, ds.val.x, ds.test.x])
    y = torch.cat([ds.train.y, ds.val.y, ds.test.y])
    for row, label in zip(x.tolist(), y.tolist()):
        i = int(np.argmin(np.abs(feats - np.array(row)).sum(1)))
        assert labels[i] == ds.meta["classes"][label]


def _hf_export(root: Path, n_train: int, n_test: int) -> Path:
    """A Hugging Face `datasets` Parquet export: data/train-*.parquet and data/test-*.parquet, an image
    struct column {bytes, path} and a label column."""
    (root / "data").mkdir(parents=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = _images(n, 8, 8, seed)
        image = pa.array([{"bytes": _png(a), "path": f"{i}.png"} for i, a in enumerate(x)],
                         pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        pq.write_table(pa.table({"image": image, "label": pa.array(y.astype(np.int64))}),
                       root / "data" / f"{split}-00000-of-00001.parquet")
    return root


def test_a_hugging_face_parquet_export_keeps_its_splits(tmp_path):
    src = _hf_export(tmp_path / "hf", 40, 9)
    folder = data.prepare_source(_spec(source=str(src), val_fraction=0.25), tmp_path / "prep")
    assert _rows(folder) == {"train": 30, "val": 10, "test": 9}
    test, meta = data.read_split(folder, "test")
    x, _ = _images(9, 8, 8, 1)
    assert meta["shape"] == [1, 8, 8] and np.allclose(test.x.numpy()[:, 0], x / 255.0)


def test_a_table_through_a_file_uri(tmp_path):
    src = _hf_export(tmp_path / "hf", 20, 5)
    ds = data.load(_spec(source=(src / "data").as_uri(), val_fraction=0.25))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (15, 5, 5)


def _image_tree(root: Path, layout: dict[str, dict[str, list[tuple[int, int]]]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, classes in layout.items():
        for cls, sizes in classes.items():
            (root / split / cls).mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), mode="L").save(root / split / cls / f"{i}.png")
    return root


def test_image_folders_with_train_and_test_and_mixed_sizes_resized(tmp_path):
    src = _image_tree(tmp_path / "pics", {"train": {"cats": [(10, 12)] * 8, "dogs": [(9, 7)] * 4},
                                          "test": {"cats": [(20, 20)] * 2, "dogs": [(5, 5)] * 3}})
    ds = data.load(_spec(source=str(src), image_size=[6, 6], val_fraction=0.25))
    assert ds.shape == (1, 6, 6) and ds.meta["classes"] == ["cats", "dogs"]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (9, 3, 5)
    assert sorted(ds.test.y.tolist()) == [0, 0, 1, 1, 1]


def test_mixed_image_sizes_without_image_size_name_the_file_and_the_setting(tmp_path):
    src = _image_tree(tmp_path / "pics", {"train": {"a": [(8, 8)] * 2, "b": [(8, 8), (9, 8)]}, "test": {"a": [(8, 8)]}})
    with pytest.raises(DataError, match="data.image_size") as e:
        data.prepare_source(_spec(source=str(src)), tmp_path / "prep")
    assert str(src / "train" / "b" / "1.png") in str(e.value)
    assert not (tmp_path / "prep").exists() and not list(tmp_path.glob(".prep.prepare-*"))  # nothing half-written


# ------------------------------------------------------------------------------------ sharded, atomic
def test_splits_are_sharded_by_size(tmp_path):
    """40 KB shards of 784-float rows (3,138 bytes each): 13 rows a shard, every row once."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "wide.npz", x=rng.random((300, 784)).astype(np.float32), y=np.arange(300) % 10)
    folder = data.prepare_source(_spec(source=str(tmp_path / "wide.npz"), shard_mb=40 / 1024), tmp_path / "prep")
    files = data.split_files(folder, "train")
    rows = [pq.ParquetFile(f).metadata.num_rows for f in files]
    assert len(files) == -(-210 // 13) and max(rows) == 13 and sum(rows) == 210
    assert all(f.stat().st_size < 64 * 1024 for f in files)
    full = data.load(_spec(path=str(folder)))
    assert len(full.train) == 210 and len(full.val) == 45 and len(full.test) == 45


def test_a_killed_prepare_leaves_no_half_dataset(tmp_path):
    """SIGKILL `raybloom data prepare` in the middle of an image folder: no dataset at --out; the next prepare
    cleans the dead one's temporary folder and writes the whole dataset."""
    from PIL import Image

    src = tmp_path / "many"
    rng = np.random.default_rng(0)
    for c in range(2):
        (src / f"c{c}").mkdir(parents=True)
        for i in range(3000):
            Image.fromarray(rng.integers(0, 256, size=(16, 16), dtype=np.uint8), mode="L").save(src / f"c{c}" / f"{i}.png")
    out = tmp_path / "prep"
    proc = subprocess.Popen([RAYBLOOM, "data", "prepare", str(src), "--out", str(out), "--shard-mb", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".prep.prepare-*/train/part-00001.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".prep.prepare-*"))  # the dead one's temporary folder, not a dataset
    r = subprocess.run([RAYBLOOM, "data", "prepare", str(src), "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert sum(_rows(out).values()) == 6000 and not list(tmp_path.glob(".prep.prepare-*"))


# ------------------------------------------------------------------------------------ errors name the file and column
@pytest.fixture
def own_table(tmp_path) -> Path:
    path = tmp_path / "own.parquet"
    pq.write_table(pa.table({"pixels": pa.array([[0.0, 1.0]] * 6, pa.list_(pa.float32())), "target": list(range(6))}), path)
    return path


@pytest.mark.parametrize("columns, needles", [
    ({"features": "pix", "label": "target"}, ["data.columns.features", "'pix'", "pixels", "target"]),
    ({"features": "pixels"}, ["data.columns.label", "'label'", "pixels", "target"]),
    (None, ["data.columns", "pixels", "target"]),
], ids=["wrong-feature-column", "missing-label-column", "no-mapping"])
def test_a_wrong_mapping_names_the_columns_that_exist(own_table, tmp_path, columns, needles):
    with pytest.raises(DataError) as e:
        data.prepare_source(_spec(source=str(own_table), columns=columns), tmp_path / "prep")
    for needle in needles + [str(own_table)]:
        assert needle in str(e.value), str(e.value)


def test_undecodable_image_bytes_name_the_file_column_and_row(tmp_path):
    good = _png(np.zeros((4, 4), np.uint8))
    path = tmp_path / "imgs.parquet"
    pq.write_table(pa.table({"image": pa.array([good, good, b"not a png", good], pa.binary()), "label": [0, 1, 0, 1]}), path)
    with pytest.raises(DataError, match="not a readable image") as e:
        data.prepare_source(_spec(source=str(path), columns={"image": "image"}), tmp_path / "prep")
    assert str(path) in str(e.value) and "column 'image'" in str(e.value) and "row 2" in str(e.value)


@pytest.mark.parametrize("kind", ["csv-header-only", "csv-zero-bytes", "parquet-no-rows"])
def test_empty_files_are_refused_by_name(tmp_path, kind):
    if kind == "parquet-no-rows":
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"a": pa.array([], pa.float32()), "label": pa.array([], pa.int64())}), path)
    else:
        path = tmp_path / "empty.csv"
        path.write_text("a,label\n" if kind == "csv-header-only" else "")
    with pytest.raises(DataError) as e:
        data.prepare_source(_spec(source=str(path), columns={"features": ["a"]}), tmp_path / "prep")
    assert str(path) in str(e.value)
    assert not (tmp_path / "prep").exists()


# ------------------------------------------------------------------------------------ memory and streaming
def test_a_split_that_does_not_fit_is_refused_with_the_way_out(tmp_path, monkeypatch):
    folder = data.prepare_source("digits", tmp_path / "dig")
    monkeypatch.setenv("RAYBLOOM_MEMORY_BYTES", str(200_000))
    with pytest.raises(DataError, match="data.stream: true") as e:
        data.load(_spec(path=str(folder)))
    assert "scaling.ingest: ray_data" in str(e.value) and "GB" in str(e.value)
    streamed = data.load(_spec(path=str(folder)), stream=data.SPLITS)  # streaming needs no room for the splits
    assert len(streamed.train) == 1257


def test_streamed_batches_give_every_row_once_an_epoch_in_a_new_order(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ids.npz", x=rng.random((500, 3)).astype(np.float32), y=np.arange(500).astype(np.float32))
    folder = data.prepare_source(_spec(source=str(tmp_path / "ids.npz"), shard_mb=2 / 1024), tmp_path / "prep")
    train = data.load(_spec(path=str(folder)), stream=data.SPLITS).train
    assert len(train.files) > 3
    batches = data.StreamedBatches(train, 32, seed=7, buffer_rows=100)
    orders = []
    for epoch in range(2):
        batches.set_epoch(epoch)
        ids = torch.cat([y for _, y in batches]).flatten().tolist()
        assert sorted(ids) == sorted(data.read_split(folder, "train")[0].y.flatten().tolist())  # each row once
        orders.append(ids)
    assert orders[0] != orders[1]
    batches.set_epoch(0)
    assert torch.cat([y for _, y in batches]).flatten().tolist() == orders[0]  # deterministic by seed and epoch


def test_the_shuffle_buffer_hands_out_every_row_once_in_full_batches_whatever_the_blocks():
    """Blocks of any size (empty ones first: they say no width), buffers smaller or larger than the data: every
    row leaves once with its label, in ceil(rows / batch) batches of which only the last is short (DDP ranks
    with equal rows take equal steps)."""
    from raybloom.data.streamed import ShuffleBuffer

    rng = np.random.default_rng(0)
    for case in range(300):
        capacity, batch = int(rng.integers(0, 40)), int(rng.integers(1, 20))
        sizes = [0] + [int(rng.integers(0, 50)) for _ in range(int(rng.integers(0, 6)))]
        buffer, out, n = ShuffleBuffer(capacity, batch, np.random.default_rng(case)), [], 0
        for size in sizes:
            ids = np.arange(n, n + size)
            out += list(buffer.push(np.stack([ids, -ids], axis=1), ids))
            n += size
        out += list(buffer.drain())
        ys = np.concatenate([y for _, y in out]) if out else np.zeros(0)
        assert sorted(ys.tolist()) == list(range(n)), (capacity, batch, sizes)
        assert all((x[:, 0] == y).all() and (x[:, 1] == -y).all() for x, y in out)  # rows stay whole, with their label
        assert len(out) == -(-n // batch) and all(len(y) == batch for _, y in out[:-1]), (capacity, batch, sizes)


@pytest.mark.slow
def test_in_process_training_streams_and_learns(tmp_path):
    """`data.stream: true` on digits in 4 KB shards: the engine trains from the shards (never loading a
    split) and reaches the accuracy the in-memory run reaches on the same data."""
    from raybloom import engine
    from raybloom.spec import load

    folder = data.prepare_source(_spec(source="digits", shard_mb=4 / 1024), tmp_path / "dig")
    base = load(Path(__file__).resolve().parents[1] / "jobs" / "mlp_digits.yaml", [f"data.path={folder}", "train.epochs=8"])
    streamed = base.with_overrides(["data.stream=true"])
    ds = data.load(streamed.data, stream=data.SPLITS)
    assert isinstance(ds.train, data.ShardedSplit) and len(ds.train.files) > 10
    result = engine.fit(streamed, ds)
    in_memory = engine.fit(base, data.load(base.data))
    assert result.test["accuracy"] > 0.9 and abs(result.test["accuracy"] - in_memory.test["accuracy"]) < 0.05


# ------------------------------------------------------------------------------------ edges the review found
def test_an_empty_split_prepares_and_reads(tmp_path):
    """val_fraction 0: the validation split is empty (one empty shard with its schema), train holds the rest."""
    x, y = _images(30)
    np.savez(tmp_path / "k.npz", x_train=x, y_train=y, x_test=x[:5], y_test=y[:5])
    folder = data.prepare_source(_spec(source=str(tmp_path / "k.npz"), val_fraction=0.0), tmp_path / "prep")
    assert _rows(folder) == {"train": 30, "val": 0, "test": 5}
    ds = data.load(_spec(path=str(folder)))
    assert len(ds.val) == 0 and tuple(ds.val.x.shape) == (0, 1, 6, 5)


def test_split_folders_are_found_whatever_their_case_and_shards_mix_the_classes(tmp_path):
    src = _image_tree(tmp_path / "pics", {"Train": {"a": [(4, 4)] * 30, "b": [(4, 4)] * 30}, "Test": {"a": [(4, 4)] * 3}})
    folder = data.prepare_source(_spec(source=str(src), val_fraction=0.2, shard_mb=1 / 1024), tmp_path / "prep")
    assert _rows(folder) == {"train": 48, "val": 12, "test": 3}
    firsts = [pq.read_table(f).column("y").to_pylist() for f in data.split_files(folder, "train")[:3]]
    assert all(len(set(ys)) == 2 for ys in firsts)  # not one class after the other


def test_two_sources_of_the_same_name_are_two_datasets(tmp_path, data_dir):
    for name, n in (("a", 20), ("b", 30)):
        (tmp_path / name).mkdir()
        np.savez(tmp_path / name / "train.npz", x=np.zeros((n, 2), np.float32), y=np.arange(n) % 2)
    a = data.resolve(_spec(source=str(tmp_path / "a" / "train.npz")))
    b = data.resolve(_spec(source=str(tmp_path / "b" / "train.npz")))
    assert a != b and sum(_rows(a).values()) == 20 and sum(_rows(b).values()) == 30


def test_a_corrupt_manifest_is_prepared_again(tmp_path):
    folder = data.prepare_source("digits", tmp_path / "dig")
    (folder / "dataset.json").write_text("{not json")
    assert not data.is_prepared(folder)
    again = data.resolve(_spec(source="digits", path=str(folder)))
    assert again == folder and sum(_rows(folder).values()) == 1797


def test_a_dataset_published_meanwhile_is_kept(tmp_path):
    """Two processes preparing the same folder at once: the later one keeps the first one's dataset."""
    first = data.prepare_source("digits", tmp_path / "dig")
    manifest = (first / "dataset.json").read_text()
    inode = (first / "dataset.json").stat().st_ino
    data.prepare_source("digits", tmp_path / "dig", replace=False)
    assert (first / "dataset.json").stat().st_ino == inode and (first / "dataset.json").read_text() == manifest
    assert not list(tmp_path.glob(".dig.*"))


def test_a_later_file_without_the_label_column_is_named(tmp_path):
    src = tmp_path / "tables"
    src.mkdir()
    pq.write_table(pa.table({"a": [0.0, 1.0, 2.0], "label": [0, 1, 0]}), src / "part-0.parquet")
    pq.write_table(pa.table({"a": [0.5, 1.5]}), src / "part-1.parquet")
    with pytest.raises(DataError, match="no column 'label'") as e:
        data.prepare_source(_spec(source=str(src), columns={"features": ["a"]}), tmp_path / "prep")
    assert str(src / "part-1.parquet") in str(e.value)


@pytest.mark.parametrize("override, needle", [
    (["optim.name=gd"], "optim.name: gd"),
    (["data.train_limit=100"], "data.train_limit"),
])
def test_what_ray_data_streaming_cannot_do_is_refused_at_validation(override, needle):
    from raybloom.errors import SpecError
    from raybloom.spec import JobSpec

    with pytest.raises(SpecError, match=needle):
        JobSpec().with_overrides(["scaling.workers=2", "scaling.ingest=ray_data", *override])


def test_cross_validation_refuses_streamed_data_before_any_run(tmp_path):
    from raybloom.errors import UserError
    from raybloom.job import prepare_job
    from raybloom.spec import JobSpec

    with pytest.raises(UserError, match="train.cv_folds"):
        prepare_job(JobSpec().with_overrides(["data.stream=true", "train.cv_folds=3"]))


def test_a_federated_client_reads_only_its_partition(tmp_path):
    """A federated client's data is its partition's rows alone (its training and held-out shares), read from
    a split of many shards, never the whole split: each row's id (its first feature) is checked."""
    from raybloom.federated.client import read_partition
    from raybloom.federated.partition import client_partitions

    n, clients, me = 6000, 5, 2
    x = np.random.default_rng(0).random((n, 64), dtype=np.float32)
    x[:, 0] = np.arange(n)
    np.savez(tmp_path / "ids.npz", x=x, y=np.arange(n) % 10)
    folder = data.prepare_source(DataSpec(source=str(tmp_path / "ids.npz"), shard_mb=0.1), tmp_path / "ids")
    job = from_dict({"kind": "federated", "data": {"path": str(folder)}, "model": {"name": "mlp", "hidden": [8]},
                          "federated": {"clients": clients, "partition": "iid"}})
    full = data.load(job.data, splits=("train",), stream=("train",)).train
    assert len(full.files) >= 5  # a split of many shards
    ids = full.load().x[:, 0].numpy()
    mine = ids[client_partitions(job, full.labels())[me]]
    got = read_partition(job.model_dump_json(), me)
    held = torch.cat([got.train.x[:, 0], got.val.x[:, 0]]).numpy()
    assert sorted(held.tolist()) == sorted(mine.tolist())
    assert len(held) < len(ids) / 2
