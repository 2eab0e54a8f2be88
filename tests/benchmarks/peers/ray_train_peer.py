"""The peer a user would write instead of raybloom: a plain Ray Train script, no raybloom inside.

It trains what `raybloom run jobs/cnn_digits.yaml scaling.workers=2 regularization.augment.shift=0
schedule.name=constant` trains: scikit-learn's 1,797 digits split 1257 / 270 / 270 (a seeded permutation,
the first 15% test, the next 15% validation, as raybloom prepares them), scaled to [0, 1]; the same CNN
(two 3x3 conv blocks of 32 and 64 filters with ReLU and 2x2 max-pooling, a 128-unit head, dropout 0.3);
Adam at lr 0.002, batch 32 per worker, on `TorchTrainer` with 2 CPU workers (gloo DDP). Every epoch: the
training pass (DistributedSampler), the validation loss and accuracy, `ray.train.report` with a
checkpoint (a `torch.save` of model and optimizer), and rank 0 logs the epoch's metrics to MLflow. The
driver opens the MLflow run, logs the parameters, and after `fit()` tests the last checkpoint and logs
the test metrics. Ray's own defaults throughout: `fit()` starts Ray (with its dashboard), and the Train
controller polls the workers every 2 s. `--tuned` sets what raybloom sets instead (Ray started without the
dashboard, sized to the machine; a 0.1 s controller poll): the peer of raybloom's own overhead.

    python tests/benchmarks/peers/ray_train_peer.py --epochs 5 [--tuned]

With $PEER_TIMELINE naming a file it appends `<unix time> <pid> <step>` lines (the format of
raybloom.timeline) at the same steps, for the benchmark's account; otherwise the script is what a user
would write.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

STARTED = time.time()

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import ray.train.torch  # noqa: E402
import torch  # noqa: E402
from ray.train import Checkpoint, CheckpointConfig, RunConfig, ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402


def mark(step: str) -> None:
    path = os.environ.get("PEER_TIMELINE")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.4f} {os.getpid()} {step}\n")


def splits(seed: int = 0):
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y, dtype=torch.long)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = n_val = int(round(len(x) * 0.15))
    idx = {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
           "train": np.sort(perm[n_test + n_val:])}
    return {k: (x[v], y[v]) for k, v in idx.items()}


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(), nn.Dropout(0.3), nn.Linear(128, 10))


@torch.no_grad()
def evaluate(model, x, y) -> dict[str, float]:
    model.eval()
    out = model(x)
    return {"loss": float(F.cross_entropy(out, y)), "accuracy": float((out.argmax(1) == y).float().mean())}


def train_func(config: dict) -> None:
    mark("worker_entry")
    torch.manual_seed(0)
    data = splits()
    train_set = torch.utils.data.TensorDataset(*data["train"])
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=32, sampler=sampler)
    model = ray.train.torch.prepare_model(make_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    rank = ray.train.get_context().get_world_rank()
    if rank == 0:
        mlflow.set_tracking_uri(config["tracking_uri"])
    mark(f"worker_ready rank{rank}")
    for epoch in range(config["epochs"]):
        sampler.set_epoch(epoch)
        model.train()
        started, total, count = time.perf_counter(), 0.0, 0
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(xb), count + len(xb)
        metrics = {"train_loss": total / count, "epoch_seconds": time.perf_counter() - started,
                   **{f"val_{k}": v for k, v in evaluate(model.module, *data["val"]).items()}}
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
                           os.path.join(d, "checkpoint.pt"))
                checkpoint = Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=checkpoint)
        if rank == 0:
            mlflow.log_metrics(metrics, step=epoch, run_id=config["run_id"])
        mark(f"epoch_end {epoch} rank{rank}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--tuned", action="store_true", help="Ray without the dashboard, a 0.1 s controller poll")
    args = parser.parse_args()
    mark("script_start")
    if args.tuned:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False)
    uri = f"sqlite:///{os.path.abspath('mlflow.db')}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("digits-peer")
    with mlflow.start_run() as run:
        mlflow.log_params({"model": "cnn", "filters": "32,64", "lr": 0.002, "batch_size": 32, "epochs": args.epochs,
                           "workers": 2})
        mark("run_opened")
        trainer = TorchTrainer(
            train_func, train_loop_config={"epochs": args.epochs, "run_id": run.info.run_id, "tracking_uri": uri},
            scaling_config=ScalingConfig(num_workers=2),
            run_config=RunConfig(storage_path=os.path.abspath("ray_results"), checkpoint_config=CheckpointConfig(num_to_keep=2),
                                 worker_runtime_env={"env_vars": {"PEER_TIMELINE": os.environ.get("PEER_TIMELINE", "")}}))
        mark("trainer_fit")
        result = trainer.fit()
        mark("trainer_returned")
        model = make_model()
        with result.checkpoint.as_directory() as d:
            model.load_state_dict(torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True)["model"])
        test = evaluate(model, *splits()["test"])
        mlflow.log_metrics({f"test_{k}": v for k, v in test.items()})
        mark("tested")
    print(f"test accuracy {test['accuracy']:.3f}; {time.time() - STARTED:.1f} s after the imports began")


if __name__ == "__main__":
    main()
