"""The training engine in plain PyTorch: `train_epoch`, `evaluate`, `fit`.

No Ray, Flower or MLflow here. Adapters drive the same pieces: Ray Train workers wrap the model in DDP and
pass a sharded `Batches`; Flower clients call `train_epoch` on their partition (FedProx adds its term
through `extra_loss`); tracking listens through the `on_epoch` callbacks of `fit`.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from raybloom import data as data_mod
from raybloom import models, regularization, schedules
from raybloom.errors import TrainingDiverged


@dataclass
class Objective:
    """What the model is asked to do: the loss, and whether the target is the label or the input itself."""

    loss: str
    reconstruct: bool
    num_classes: int  # 0 for regression and reconstruction

    @property
    def classify(self) -> bool:
        return self.num_classes > 0 and not self.reconstruct

    def __call__(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.reconstruct:
            return F.mse_loss(out, x) if self.loss == "mse" else F.binary_cross_entropy(out.float(), x)
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out.squeeze(-1), y.float())
        return F.mse_loss(out, y)

    def predict(self, out: torch.Tensor) -> torch.Tensor:
        if self.loss == "bce" and not self.reconstruct:
            return (out.squeeze(-1) > 0).long()
        return out.argmax(-1)


def make_objective(spec, dataset: data_mod.Dataset) -> Objective:
    reconstruct = spec.model.name == "deconv"
    num_classes = 0 if reconstruct or not dataset.is_classification else dataset.num_classes
    return Objective(models.default_loss(spec.model, num_classes), reconstruct, num_classes)


class Batches:
    """Mini-batches of an in-memory split, reshuffled each epoch by a seeded generator.

    With `world > 1` this is rank `rank`'s shard: each global batch of `batch_size · world` samples is cut
    into `world` equal parts, so the union of the workers' batch i is exactly the 1-process batch i.
    """

    def __init__(self, arrays: data_mod.Arrays, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world: int = 1):
        self.arrays, self.batch_size, self.shuffle, self.seed = arrays, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.arrays) / (self.batch_size * self.world))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.arrays)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            order = torch.arange(n)
        step = self.batch_size * self.world
        x, y = self.arrays.x, self.arrays.y
        for start in range(0, n, step):
            chunk = order[start:start + step]
            if self.world > 1:
                chunk = chunk.tensor_split(self.world)[self.rank]
            yield x.index_select(0, chunk), y.index_select(0, chunk)


@dataclass
class Regularizer:
    l1: float = 0.0
    l2: float = 0.0
    augment: Any = None  # an AugmentSpec, or None
    generator: Optional[torch.Generator] = None

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        if not (self.l1 or self.l2):
            return None
        w = regularization.penalized_weights(model)
        total = 0.0
        if self.l1:
            total = total + self.l1 * regularization.l1_penalty(w)
        if self.l2:
            total = total + self.l2 * regularization.l2_penalty(w)
        return total

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        a = self.augment
        if a is None or not (a.shift or a.noise or a.hflip):
            return x
        return regularization.augment(x, a, self.generator)

    def logged(self, model: nn.Module) -> dict[str, float]:
        """Penalty values after the epoch, for `l1_penalty` / `l2_penalty`."""
        out = {}
        with torch.no_grad():
            w = regularization.penalized_weights(model)
            if self.l1:
                out["l1_penalty"] = float(self.l1 * regularization.l1_penalty(w))
            if self.l2:
                out["l2_penalty"] = float(self.l2 * regularization.l2_penalty(w))
        return out


def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
                objective: Objective, *, reg: Optional[Regularizer] = None, grad_clip: Optional[float] = None,
                extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None, device: torch.device = torch.device("cpu"),
                precision: str = "fp32", scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One pass over `batches`. Returns the sample-weighted mean data loss as `train_loss`.

    `extra_loss(model)` is added to every batch's loss (FedProx's proximal term goes here).
    """
    model.train()
    reg = reg or Regularizer()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for xb, yb in batches:
        xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        inputs = reg.transform(xb)
        with autocast_for(device, precision):
            out = model(inputs)
            loss = objective(out, xb, yb)
        full = loss
        penalty = reg.penalty(model)
        if penalty is not None:
            full = full + penalty
        if extra_loss is not None:
            full = full + extra_loss(model)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(full).backward()
            scaler.unscale_(optimizer)
        else:
            full.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total.add_(loss.detach(), alpha=len(xb))
        count += len(xb)
    metrics = {"train_loss": float(total) / max(count, 1)}
    metrics.update(reg.logged(model))
    return metrics


@torch.no_grad()
def predict(model: nn.Module, arrays: data_mod.Arrays, batch_size: int = 1024,
            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    model.eval()
    outs = [model(arrays.x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(arrays), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, arrays: data_mod.Arrays, objective: Objective, batch_size: int = 1024,
             device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Mean loss (and accuracy for classifiers) over a split, in eval mode."""
    if len(arrays) == 0:
        return {}
    out = predict(model, arrays, batch_size, device)
    metrics = {"loss": float(objective(out, arrays.x, arrays.y))}
    if objective.classify:
        metrics["accuracy"] = float((objective.predict(out) == arrays.y).float().mean())
    return metrics


def make_optimizer(params, o) -> torch.optim.Optimizer:
    if o.name == "gd":
        return torch.optim.SGD(params, lr=o.lr)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr)
    return torch.optim.Adagrad(params, lr=o.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class FitResult:
    model: nn.Module
    objective: Objective
    dataset: data_mod.Dataset
    history: list[dict[str, float]]
    best_epoch: int
    stopped_epoch: int
    early_stopped: bool
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)  # of the final (restored) weights

    @property
    def final(self) -> dict[str, float]:
        out = {f"test_{k}": v for k, v in self.test.items()}
        out.update(best_epoch=self.best_epoch, stopped_epoch=self.stopped_epoch)
        return out


class Training:
    """The state of one training job, driven one epoch at a time (by `fit`, or by an adapter).

    `model` may be passed already wrapped (DDP); `batches` may be a worker's shard; `extra_loss(model)`
    is added to every batch's loss (a federated client's FedProx term).
    """

    def __init__(self, spec, dataset: data_mod.Dataset, *, model: Optional[nn.Module] = None,
                 batches: Optional[Iterable] = None, device: torch.device = torch.device("cpu"),
                 extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None):
        if spec.train.threads:
            torch.set_num_threads(spec.train.threads)
        seed_everything(spec.seed)
        self.spec, self.dataset, self.device, self.extra_loss = spec, dataset, device, extra_loss
        self.objective = make_objective(spec, dataset)
        self.model = model if model is not None else build(spec, dataset).to(device)
        self.core = getattr(self.model, "module", self.model)  # the bare model under a DDP wrapper
        self.optimizer = make_optimizer(self.model.parameters(), spec.optim)
        full_batch = spec.optim.name == "gd"
        self.batches = batches if batches is not None else Batches(
            dataset.train, len(dataset.train) if full_batch else spec.train.batch_size, shuffle=not full_batch, seed=spec.seed)
        r = spec.regularization
        self.reg = Regularizer(r.l1, r.l2, r.augment, torch.Generator().manual_seed(spec.seed + 1))
        es = r.early_stopping
        self.early = regularization.EarlyStopping(es.patience, es.min_delta, es.restore_best) if es.enabled else None
        use_scaler = device.type == "cuda" and spec.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.history: list[dict[str, float]] = []
        self.stopped = False

    @property
    def next_epoch(self) -> int:
        return len(self.history)

    def lr_for(self, t: int) -> float:
        vals = [h["val_loss"] for h in self.history if "val_loss" in h]
        return schedules.lr_at(t, self.spec.optim.lr, self.spec.schedule, self.spec.train.epochs, vals)

    def run_epoch(self) -> dict[str, float]:
        """Train and validate epoch `next_epoch`; returns its metrics. Raises TrainingDiverged on NaN/inf."""
        t = self.next_epoch
        lr = self.lr_for(t)
        set_lr(self.optimizer, lr)
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(t)
        started = time.perf_counter()
        metrics = train_epoch(self.model, self.batches, self.optimizer, self.objective, reg=self.reg,
                              grad_clip=self.spec.optim.grad_clip, extra_loss=self.extra_loss, device=self.device,
                              precision=self.spec.train.precision, scaler=self.scaler)
        metrics["epoch_seconds"] = time.perf_counter() - started
        loss = metrics["train_loss"]
        first = self.history[0]["train_loss"] if self.history else loss
        limit = self.spec.train.divergence_factor
        if not math.isfinite(loss) or loss > limit * first:
            what = f"became {loss}" if not math.isfinite(loss) else f"grew to {loss:.4g}, over {limit:g}x epoch 0's {first:.4g}"
            raise TrainingDiverged(f"train_loss {what} at epoch {t} (optim.lr={self.spec.optim.lr}): "
                                   "lower optim.lr, set optim.grad_clip, or normalize the data", epoch=t)
        metrics["lr"] = lr
        val = evaluate(self.model, self.dataset.val, self.objective, device=self.device)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        self.history.append(metrics)
        if self.early is not None and "val_loss" in metrics:
            self.stopped = self.early.step(t, metrics["val_loss"], self.core)
        return metrics

    def finish(self) -> FitResult:
        """Restore the best weights (early stopping), test, and return the result."""
        stopped_epoch = len(self.history) - 1
        if self.early is not None and self.early.best_epoch >= 0:
            best = self.early.best_epoch
            self.early.restore(self.core)
        else:
            vals = [h.get("val_loss", h["train_loss"]) for h in self.history]
            best = int(np.argmin(vals)) if vals else -1
        test = evaluate(self.model, self.dataset.test, self.objective, device=self.device)
        val = evaluate(self.model, self.dataset.val, self.objective, device=self.device)
        return FitResult(self.core, self.objective, self.dataset, self.history, best, stopped_epoch,
                         bool(self.stopped), test, val)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: portable between a DDP-wrapped and a bare model."""
        return {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "early": self.early.state_dict() if self.early else None,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        if self.early is not None and state.get("early"):
            self.early.load_state_dict(state["early"])
        self.stopped = state.get("stopped", False)


def build(spec, dataset: data_mod.Dataset) -> nn.Module:
    num_classes = dataset.num_classes if dataset.is_classification else 0
    return models.build_model(spec.model, dataset.shape, num_classes, spec.regularization.dropout)


EpochCallback = Callable[[int, dict[str, float]], None]


def _progress(spec, total: int):
    show = spec.train.progress if spec.train.progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"{spec.model.name}", unit="epoch", leave=False, file=sys.stderr)


def fit(spec, dataset: Optional[data_mod.Dataset] = None, on_epoch: Iterable[EpochCallback] = (),
        training: Optional[Training] = None) -> FitResult:
    """Train a spec in this process, epoch by epoch, calling each `on_epoch(epoch, metrics)`."""
    dataset = dataset if dataset is not None else data_mod.load(spec.data)
    tr = training or Training(spec, dataset)
    bar = _progress(spec, spec.train.epochs)
    try:
        while tr.next_epoch < spec.train.epochs and not tr.stopped:
            m = tr.run_epoch()
            for cb in on_epoch:
                cb(tr.next_epoch - 1, m)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in m.items() if k in ("train_loss", "val_loss", "val_accuracy")})
    finally:
        if bar is not None:
            bar.close()
    return tr.finish()
