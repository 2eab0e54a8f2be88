"""raybloom.data: prepared Parquet folders, built-in and local sources, errors that name the file or column.

Everything is written under tmp_path (RAYBLOOM_DATA_DIR points there too); the CLI is the real command.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raybloom import data
from raybloom.errors import DataError
from raybloom.spec.sections import DataSpec

from conftest import RAYBLOOM


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "data-root"
    monkeypatch.setenv("RAYBLOOM_DATA_DIR", str(folder))
    return folder


# ---------------------------------------------------------------------------- the CLI on digits
@pytest.fixture(scope="module")
def digits_prepared(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`raybloom data prepare digits --out DIR`, the real command, once for the module."""
    root = tmp_path_factory.mktemp("digits")
    env = {**os.environ, "RAYBLOOM_DATA_DIR": str(root / "data-root"), "COLUMNS": "200"}
    proc = subprocess.run([RAYBLOOM, "data", "prepare", "digits", "--out", str(root / "out")],
                          capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert not (root / "data-root").exists(), "prepare --out wrote under the data root too"
    return proc, root / "out"


def test_cli_prepare_digits_writes_three_sharded_splits(digits_prepared):
    proc, folder = digits_prepared
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "test", "train", "val"]
    manifest = json.loads((folder / "dataset.json").read_text())
    assert manifest["meta"]["shape"] == [1, 8, 8] and manifest["meta"]["num_classes"] == 10
    total = 0
    for split in data.SPLITS:
        files = data.split_files(folder, split)
        assert [f.relative_to(folder).as_posix() for f in files] == manifest["splits"][split]["files"]
        assert all(f.parent == folder / split and f.suffix == ".parquet" for f in files)
        table = pq.read_table(files[0])
        assert table.column_names == ["x", "y"]
        xt = table.schema.field("x").type
        assert pa.types.is_fixed_size_list(xt) and xt.list_size == 64 and xt.value_type == pa.float32()
        assert table.schema.field("y").type == pa.int64()
        meta = json.loads(table.schema.metadata[b"raybloom"])
        assert meta["shape"] == [1, 8, 8]
        assert meta["task"] == "classify" and meta["num_classes"] == 10
        rows = sum(pq.read_table(f).num_rows for f in files)
        assert rows == manifest["splits"][split]["rows"]
        total += rows
    assert total == 1797
    assert "digits" in proc.stdout and str(folder) in proc.stdout.replace("\n", "")


def _ys(folder: Path) -> dict[str, list[int]]:
    return {s: [v for f in data.split_files(folder, s) for v in pq.read_table(f).column("y").to_pylist()]
            for s in data.SPLITS}


def test_split_is_deterministic_by_seed(digits_prepared, tmp_path):
    """The CLI's default seed 0 and the API with seed 0 give identical splits; seed 1 gives another."""
    proc, folder = digits_prepared
    assert proc.returncode == 0, proc.stderr
    same = data.prepare_source("digits", tmp_path / "s0", seed=0)
    other = data.prepare_source("digits", tmp_path / "s1", seed=1)
    a, b, c = _ys(folder), _ys(same), _ys(other)
    assert a == b
    for s in data.SPLITS:
        for f, g in zip(data.split_files(folder, s), data.split_files(same, s), strict=True):
            assert pq.read_table(f).equals(pq.read_table(g))
    assert a != c
    assert {s: len(v) for s, v in a.items()} == {s: len(v) for s, v in c.items()}  # same sizes, other samples


def test_read_split_gives_image_tensors(digits_prepared):
    arrays, meta = data.read_split(digits_prepared[1], "train")
    assert tuple(arrays.x.shape[1:]) == (1, 8, 8)
    assert str(arrays.x.dtype) == "torch.float32" and str(arrays.y.dtype) == "torch.int64"
    assert 0.0 <= float(arrays.x.min()) and float(arrays.x.max()) <= 1.0
    assert set(arrays.y.tolist()) == set(range(10))


def test_cli_prepare_missing_source_exits_2_naming_it(tmp_path):
    missing = tmp_path / "nowhere.npz"
    proc = subprocess.run([RAYBLOOM, "data", "prepare", str(missing), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert str(missing) in proc.stderr.replace("\n", "")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- synthetic sources
def test_linear_source_is_y_equals_3x_plus_2(tmp_path):
    folder = data.prepare_source("linear", tmp_path / "lin")
    xs, ys = [], []
    for split in data.SPLITS:
        arrays, meta = data.read_split(folder, split)
        assert meta["task"] == "regress" and meta["shape"] == [1]
        assert tuple(arrays.y.shape[1:]) == (1,) and str(arrays.y.dtype) == "torch.float32"
        xs.append(arrays.x.numpy()[:, 0])
        ys.append(arrays.y.numpy()[:, 0])
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert len(x) == 200
    (w, b), *_ = np.linalg.lstsq(np.stack([x, np.ones_like(x)], axis=1), y, rcond=None)
    assert abs(w - 3.0) < 0.1 and abs(b - 2.0) < 0.1


def test_shapes_source_is_three_classes_of_32x32(tmp_path):
    folder = data.prepare_source("shapes", tmp_path / "shapes", samples=300)
    arrays, meta = data.read_split(folder, "train")
    assert tuple(arrays.x.shape[1:]) == (1, 32, 32)
    assert meta["num_classes"] == 3 and meta["classes"] == ["circle", "square", "triangle"]
    assert set(arrays.y.tolist()) == {0, 1, 2}
    assert 0.0 <= float(arrays.x.min()) and float(arrays.x.max()) <= 1.0
    assert sum(data.read_split(folder, s)[0].x.shape[0] for s in data.SPLITS) == 300


def test_default_folder_is_under_the_data_dir(data_dir):
    folder = data.resolve(DataSpec(source="linear", samples=50))
    assert folder.parent == data_dir and data.is_prepared(folder)


# ---------------------------------------------------------------------------- local sources
def _images(n: int = 40, h: int = 8, w: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
    x[0, 0, 0], x[1, 0, 0] = 0, 255  # the full range of uint8
    y = (np.arange(n) % 4).astype(np.uint8)
    return x, y


def _read_all(folder: Path):
    parts = [data.read_split(folder, s) for s in data.SPLITS]
    return parts


def _load(source: Path, out: Path) -> data.Dataset:
    return data.load(DataSpec(source=str(source), path=str(out), val_fraction=0.2, test_fraction=0.2))


def test_npz_source(tmp_path):
    x, y = _images()
    np.savez(tmp_path / "small.npz", x=x, y=y.astype(np.int64))
    ds = _load(tmp_path / "small.npz", tmp_path / "prep")
    assert ds.shape == (1, 8, 8) and ds.num_classes == 4 and ds.is_classification
    assert len(ds.train) + len(ds.val) + len(ds.test) == 40
    for part in (ds.train, ds.val, ds.test):
        assert tuple(part.x.shape[1:]) == (1, 8, 8)
        assert 0.0 <= float(part.x.min()) and float(part.x.max()) <= 1.0
        assert str(part.y.dtype) == "torch.int64"
    # the values survive the round trip: sample i of the source is x[i] / 255 with label y[i]
    xs = np.concatenate([p.x.numpy() for p in (ds.train, ds.val, ds.test)])
    all_x = x.astype(np.float32)[:, None] / 255.0
    for row, label in zip(xs[:5], np.concatenate([p.y.numpy() for p in (ds.train, ds.val, ds.test)])[:5]):
        i = int(np.argmin(np.abs(all_x - row).reshape(len(all_x), -1).sum(1)))
        assert np.allclose(all_x[i], row, atol=1e-6) and y[i] == label


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None, gz: bool = False) -> Path:
    code = {1: 0x00000801, 3: 0x00000803}[array.ndim] if magic is None else magic
    raw = struct.pack(">I", code) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gzip"])
def test_idx_folder_source(tmp_path, gz):
    x, y = _images(n=30, h=6, w=5)
    src = tmp_path / "mnist"
    src.mkdir()
    _write_idx(src / "train-images-idx3-ubyte", x, gz=gz)
    _write_idx(src / "train-labels-idx1-ubyte", y, gz=gz)
    folder = data.prepare_source(str(src), tmp_path / "prep", seed=3)
    parts = _read_all(folder)
    assert sum(len(a) for a, _ in parts) == 30
    arrays, meta = parts[0]
    assert tuple(arrays.x.shape[1:]) == (1, 6, 5) and meta["num_classes"] == 4
    both = np.concatenate([a.x.numpy() for a, _ in parts])
    assert both.min() == 0.0 and both.max() == 1.0  # uint8 0..255 -> 0..1
    labels = np.concatenate([a.y.numpy() for a, _ in parts])
    assert sorted(labels.tolist()) == sorted(y.astype(int).tolist())
    # each image keeps its own label
    flat_src = x.reshape(30, -1).astype(np.float32) / 255.0
    for row, label in zip(both.reshape(30, -1), labels):
        i = int(np.argmin(np.abs(flat_src - row).sum(1)))
        assert np.allclose(flat_src[i], row, atol=1e-6) and y[i] == label


def _image_folder(root: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for cls, dims in sizes.items():
        (root / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(dims):
            Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8), mode="L").save(root / cls / f"img{i}.png")
    return root


def test_image_folder_source(tmp_path):
    src = _image_folder(tmp_path / "pics", {"cats": [(10, 12)] * 6, "dogs": [(10, 12)] * 4})
    ds = _load(src, tmp_path / "prep")
    assert ds.shape == (1, 12, 10)  # (channels, height, width)
    assert ds.num_classes == 2 and ds.meta["classes"] == ["cats", "dogs"]
    ys = np.concatenate([p.y.numpy() for p in (ds.train, ds.val, ds.test)])
    assert sorted(ys.tolist()) == [0] * 6 + [1] * 4
    for part in (ds.train, ds.val, ds.test):
        assert 0.0 <= float(part.x.min()) and float(part.x.max()) <= 1.0


# ---------------------------------------------------------------------------- errors name the file or column
def _valid_split(folder: Path) -> Path:
    data.prepare_source("linear", folder, samples=40)
    return data.split_files(folder, "train")[0]


def test_missing_file(tmp_path):
    missing = tmp_path / "empty" / "train.parquet"
    with pytest.raises(DataError, match="no such data file") as e:
        data.read_table(missing)
    assert str(missing) in str(e.value)


def test_missing_split_in_prepared_folder(tmp_path):
    folder = _valid_split(tmp_path / "prep").parent.parent
    (folder / "val" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match="missing val/part-00000.parquet"):
        data.load(DataSpec(source="linear", path=str(folder)))


def test_missing_split_in_a_folder_of_the_earlier_form(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    for name in ("train", "test"):
        pq.write_table(data.to_table(np.zeros((3, 2), np.float32), np.zeros(3), {"task": "regress"}), folder / f"{name}.parquet")
    with pytest.raises(DataError, match="val.parquet"):
        data.load(DataSpec(source="linear", path=str(folder)))


def test_truncated_parquet(tmp_path):
    path = _valid_split(tmp_path / "prep")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable Parquet file") as e:
        data.read_split(path.parent.parent, "train")
    assert str(path) in str(e.value)


def test_wrong_column_name(tmp_path):
    path = tmp_path / "train.parquet"
    flat = np.zeros((5, 4), dtype=np.float32)
    pq.write_table(pa.table({"features": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), 4),
                             "y": pa.array(np.arange(5), pa.int64())}), path)
    with pytest.raises(DataError, match=r"missing column 'x'") as e:
        data.read_table(path)
    assert str(path) in str(e.value) and "features" in str(e.value)


def test_wrong_type_of_x(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"x": pa.array(["a", "b", "c"]), "y": pa.array([0, 1, 0], pa.int64())}), path)
    with pytest.raises(DataError, match=r"column 'x' must be a list of float32 \(or uint8 images\)") as e:
        data.read_table(path)
    assert str(path) in str(e.value) and "string" in str(e.value)


def test_wrong_type_of_y(tmp_path):
    path = tmp_path / "train.parquet"
    flat = np.zeros((2, 3), dtype=np.float32)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), 3),
                             "y": pa.array(["cat", "dog"])}), path)
    with pytest.raises(DataError, match=r"column 'y'"):
        data.read_table(path)


def test_ragged_x_rows(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"x": pa.array([[0.1, 0.2], [0.3]], pa.list_(pa.float32())),
                             "y": pa.array([0, 1], pa.int64())}), path)
    table, meta = data.read_table(path)
    with pytest.raises(DataError, match="column 'x'") as e:
        data.table_to_arrays(table, meta, path)
    assert str(path) in str(e.value)


def test_plain_parquet_without_metadata_is_read(tmp_path):
    """A table written by another tool (x a variable-size list, no raybloom metadata) still reads."""
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"x": pa.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], pa.list_(pa.float64())),
                             "y": pa.array([0, 1, 1], pa.int64())}), path)
    arrays, meta = data.read_split(tmp_path, "train")
    assert tuple(arrays.x.shape) == (3, 2) and arrays.y.tolist() == [0, 1, 1]
    assert str(arrays.x.dtype) == "torch.float32"


def test_missing_npz(tmp_path):
    missing = tmp_path / "gone.npz"
    with pytest.raises(DataError, match="no such file or folder") as e:
        data.prepare_source(str(missing), tmp_path / "prep")
    assert str(missing) in str(e.value)


def test_npz_without_x(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, features=np.zeros((3, 2)), y=np.zeros(3))
    with pytest.raises(DataError, match="'x' and 'y'") as e:
        data.prepare_source(str(path), tmp_path / "prep")
    assert str(path) in str(e.value)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(DataError, match="cannot read .npz") as e:
        data.prepare_source(str(path), tmp_path / "prep")
    assert str(path) in str(e.value)


@pytest.fixture
def idx_folder(tmp_path) -> Path:
    x, y = _images(n=10, h=4, w=4)
    src = tmp_path / "mnist"
    src.mkdir()
    _write_idx(src / "train-images-idx3-ubyte", x)
    _write_idx(src / "train-labels-idx1-ubyte", y)
    return src


def test_idx_bad_magic(idx_folder, tmp_path):
    x, _ = _images(n=10, h=4, w=4)
    bad = _write_idx(idx_folder / "train-images-idx3-ubyte", x, magic=0x00000D03)  # 0x0D = float, not bytes
    with pytest.raises(DataError, match="bad magic number") as e:
        data.prepare_source(str(idx_folder), tmp_path / "prep")
    assert str(bad) in str(e.value)


def test_idx_truncated_body(idx_folder, tmp_path):
    path = idx_folder / "train-images-idx3-ubyte"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 7])
    with pytest.raises(DataError, match="truncated") as e:
        data.prepare_source(str(idx_folder), tmp_path / "prep")
    assert str(path) in str(e.value)


def test_idx_truncated_header(idx_folder, tmp_path):
    path = idx_folder / "train-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:6])  # the magic number and half of the first dimension
    with pytest.raises(DataError) as e:
        data.prepare_source(str(idx_folder), tmp_path / "prep")
    assert str(path) in str(e.value)


def test_idx_truncated_gzip(tmp_path):
    x, y = _images(n=10, h=4, w=4)
    src = tmp_path / "mnist"
    src.mkdir()
    path = _write_idx(src / "train-images-idx3-ubyte", x, gz=True)
    _write_idx(src / "train-labels-idx1-ubyte", y, gz=True)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError) as e:
        data.prepare_source(str(src), tmp_path / "prep")
    assert str(path) in str(e.value)


def test_idx_missing_labels(idx_folder, tmp_path):
    (idx_folder / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        data.prepare_source(str(idx_folder), tmp_path / "prep")


def test_image_of_another_size(tmp_path):
    src = _image_folder(tmp_path / "pics", {"a": [(8, 8), (8, 8)], "b": [(8, 8), (9, 8)]})
    odd = src / "b" / "img1.png"
    with pytest.raises(DataError, match="size") as e:
        data.prepare_source(str(src), tmp_path / "prep")
    assert str(odd) in str(e.value)


def test_non_image_file_in_image_folder(tmp_path):
    src = _image_folder(tmp_path / "pics", {"a": [(8, 8), (8, 8)], "b": [(8, 8)]})
    stray = src / "a" / "README.txt"  # sorts before the images
    stray.write_text("not an image")
    with pytest.raises(DataError, match="not a readable image") as e:
        data.prepare_source(str(src), tmp_path / "prep")
    assert str(stray) in str(e.value)


# ---------------------------------------------------------------------------- whole columns, no per-row loop
@pytest.mark.serial
def test_table_to_arrays_is_vectorized():
    n, width = 50_000, 64
    flat = np.random.default_rng(0).random((n, width), dtype=np.float32)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), width),
                      "y": pa.array(np.arange(n) % 10, pa.int64())})
    meta = {"shape": [1, 8, 8], "task": "classify"}
    data.table_to_arrays(table.slice(0, 10), meta)  # warm-up (first-call imports)
    start = time.perf_counter()
    arrays = data.table_to_arrays(table, meta)
    elapsed = time.perf_counter() - start
    assert tuple(arrays.x.shape) == (n, 1, 8, 8) and len(arrays.y) == n
    assert np.array_equal(arrays.x.numpy().reshape(n, -1), flat)
    assert elapsed < 1.0, f"table_to_arrays took {elapsed:.2f} s for {n} rows"
