"""Streaming ingest on Ray (`scaling.ingest: ray_data`): the training split is read from its shards by Ray
Data's streaming executor into each worker's `get_dataset_shard`, never materialized.

Two real Ray Train workers build their training exactly as `raybloom run` does (`ray_train._worker_training`:
the model in DDP, validation streamed, `RayDataBatches` over the shard) and train two epochs with the
engine's loop; the only addition is a wrapper on the batches that writes down which rows (the label is
the row's id) each worker trained on. Then: each worker saw its share of every epoch exactly once, the
shares are disjoint and cover the split (Ray's equal split leaves out fewer rows than there are
workers), the order changes between epochs, and no worker's memory grew by as much as the split.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raybloom import data, ray_session, ray_train, spec
from raybloom.job import prepare_job
from raybloom.spec.sections import DataSpec

pytestmark = pytest.mark.slow

ROWS, WIDTH, WORLD, EPOCHS = 40_000, 784, 2, 2
WARM_BATCHES = 10  # memory is measured from here on: what grows after it grows with the data read


def _memory_mb() -> tuple[float, float]:
    """(RSS, USS) of this process in MB, from /proc (USS: pages no other process shares, e.g. not the object store's)."""
    rss = uss = 0
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        kb = int(rest.split()[0]) if rest.split() and rest.split()[0].isdigit() else 0
        if key == "Rss":
            rss = kb
        elif key in ("Private_Clean", "Private_Dirty"):
            uss += kb
    return rss / 1024, uss / 1024


class _Recording:
    """The worker's own batches, passed through unchanged; the ids of the rows are written down per epoch."""

    def __init__(self, batches, log: dict):
        self.batches, self.log = batches, log
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __iter__(self):
        ids = self.log.setdefault(self.epoch, [])
        for i, (x, y) in enumerate(self.batches):
            ids.append(y.flatten().to(dtype=torch.int64).numpy())
            if self.epoch == 0 and i == WARM_BATCHES:  # the process is warm: imports, DDP buffers, the first blocks
                self.log["warm"] = _memory_mb()
            elif "warm" in self.log:
                self.log["peak"] = max(self.log.get("peak", (0, 0)), _memory_mb())
            yield x, y


def _loop(config: dict) -> None:
    import ray.train

    job = spec.JobSpec.model_validate(config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    training = ray_train._worker_training(job, config, rank, world, torch.device("cpu"))
    log: dict = {}
    training.batches = _Recording(training.batches, log)
    training.run_epochs()
    record = {"warm": log["warm"], "peak": log["peak"], "epochs": {e: np.concatenate(log[e]).tolist() for e in range(EPOCHS)},
              "val_loss": [h["val_loss"] for h in training.history]}
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def ray_local():
    import ray
    import ray.cloudpickle

    ray_session.init_ray(spec.JobSpec())
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    yield ray
    ray.shutdown()


def test_ray_data_streams_each_worker_its_share_of_every_epoch_once(ray_local, tmp_path):
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "ids.npz", x=rng.random((ROWS, WIDTH), dtype=np.float32), y=np.arange(ROWS, dtype=np.float32))
    folder = data.prepare_source(DataSpec(source=str(tmp_path / "ids.npz"), shard_mb=8, val_fraction=0.05,
                                          test_fraction=0.05), tmp_path / "ids")
    job = prepare_job(spec.from_dict({
        "data": {"path": str(folder), "shuffle_buffer": 1024}, "model": {"name": "mlp", "hidden": [16]},
        "optim": {"name": "adam", "lr": 1e-4}, "train": {"epochs": EPOCHS, "batch_size": 256},
        "scaling": {"workers": WORLD, "ingest": "ray_data"}}), stream=data.SPLITS)
    train_ids = set(data.load(job.spec.data, splits=("train",), stream=("train",)).train.labels().astype(np.int64).tolist())
    assert len(job.dataset.train.files) >= 10  # a split made of many shards
    assert ray_train.ingest_prefetch() == 0  # one node: the blocks are in its store, nothing to fetch ahead
    split_mb = len(train_ids) * WIDTH * 4 / 2**20
    config = {"spec": job.spec.model_dump(mode="json"), "meta": job.dataset.meta, "train_rows": len(job.dataset.train),
              "prefetch": ray_train.ingest_prefetch(), "out": str(tmp_path)}
    TorchTrainer(_loop, train_loop_config=config, datasets={"train": ray_train.streamed_train_split(job.spec)},
                 dataset_config=DataConfig(execution_options=ray_train.ingest_options(job.spec.scaling)),  # the product's
                 scaling_config=ScalingConfig(num_workers=WORLD),
                 run_config=RunConfig(storage_path=str(tmp_path / "ray"))).fit()

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    share = len(train_ids) // WORLD
    for epoch in map(str, range(EPOCHS)):
        seen = [r["epochs"][epoch] for r in ranks]
        for ids in seen:
            assert len(ids) == share and len(set(ids)) == share  # its share, each row once
        union = set().union(*map(set, seen))
        assert sum(map(len, seen)) == len(union)  # disjoint
        assert union <= train_ids and len(train_ids) - len(union) < WORLD
    for r in ranks:
        assert r["epochs"]["0"] != r["epochs"]["1"]  # reshuffled between epochs
        assert len(r["val_loss"]) == EPOCHS and all(np.isfinite(r["val_loss"]))
        grew_rss, grew_uss = r["peak"][0] - r["warm"][0], r["peak"][1] - r["warm"][1]
        assert grew_rss < split_mb, (grew_rss, grew_uss, split_mb)
