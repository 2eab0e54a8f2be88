"""The training engine in plain PyTorch: one epoch (`train_epoch`), evaluation, and the one epoch loop.

No Ray, Flower or MLflow here. `Training` holds one job's state and `Training.run_epochs(hooks)` is the only
epoch loop: the in-process path (`fit`), Ray Train workers (a DDP-wrapped model and a sharded
`Batches`), search trials and federated clients (their `local_epochs`, FedProx's term through
`extra_loss`) all drive it, and all listen the same way: an `EpochHook(epoch, metrics, last)` called
after every epoch, which may stop the training by returning True. Tracking, checkpoints and pruners are
hooks.
"""

from __future__ import annotations

import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from raybloom import data as data_mod
from raybloom import models, regularization, schedules
from raybloom.objective import Objective, make_objective
from raybloom.errors import TrainingDiverged, UserError
from raybloom.regularization import Regularizer
from raybloom.spec import JobSpec, OptimSpec

EpochHook = Callable[[int, dict[str, float], bool], Optional[bool]]
"""Called after each epoch with (epoch, its metrics, whether it is the last); True stops the training after
this epoch, and the hooks after it in the list are then told it is the last."""


def autocast_for(device: torch.device, precision: str):
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def train_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], optimizer: torch.optim.Optimizer,
                objective: Objective, *, reg: Optional[Regularizer] = None, grad_clip: Optional[float] = None,
                extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None, device: torch.device = torch.device("cpu"),
                precision: str = "fp32", scaler: Optional[torch.amp.GradScaler] = None) -> dict[str, float]:
    """One pass over `batches`. Returns the sample-weighted mean data loss as `train_loss` and the mean global
    gradient norm of its steps (before clipping) as `grad_norm`.

    `extra_loss(model)` is added to every batch's loss (FedProx's proximal term goes here).
    """
    model.train()
    reg = reg or Regularizer()
    total = torch.zeros((), dtype=torch.float64, device=device)
    norms = torch.zeros((), dtype=torch.float64, device=device)
    count = steps = 0
    params = list(model.parameters())
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
        norms.add_(grad_norm(params, grad_clip))
        steps += 1
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        total.add_(loss.detach(), alpha=len(xb))
        count += len(xb)
    metrics = {"train_loss": float(total) / max(count, 1), "grad_norm": float(norms) / max(steps, 1)}
    metrics.update(reg.logged(model))
    return metrics


def grad_norm(params: list[nn.Parameter], clip: Optional[float] = None) -> torch.Tensor:
    """The global L2 norm of the gradients of `params` (of the unscaled loss), clipped to `clip` afterwards when
    given. On the CPU the norm of the tensors' norms, one call each: `get_total_norm`'s grouping costs more than
    that on a step of a few milliseconds (50 vs 100 us of a 2.9 ms cnn_digits step)."""
    if clip:
        return nn.utils.clip_grad_norm_(params, clip).detach()
    grads = [p.grad for p in params if p.grad is not None]
    if grads and all(g.device.type == "cpu" for g in grads):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).detach()
    return nn.utils.get_total_norm(grads).detach()


@torch.no_grad()
def predict(model: nn.Module, split: data_mod.Split, batch_size: int = 1024,
            device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """The model's outputs for every row of a split (in memory or streamed), in order."""
    model.eval()
    outs = [model(x.to(device)).float().cpu() for x, _ in split.batches(batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@torch.no_grad()
def evaluate(model: nn.Module, split: data_mod.Split, objective: Objective, batch_size: int = 1024,
             device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Mean loss (and accuracy for classifiers) over a split, in eval mode, a batch at a time (a streamed
    split is never held whole): the loss is each batch's mean weighted by its rows."""
    if len(split) == 0:
        return {}
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in split.batches(batch_size):
        x, y = x.to(device), y.to(device)
        out = model(x).float()
        loss_sum += float(objective(out, x, y)) * len(x)
        if objective.classify:
            correct += int((objective.predict(out) == y).sum())
        n += len(x)
    metrics = {"loss": loss_sum / n}
    if objective.classify:
        metrics["accuracy"] = correct / n
    return metrics


def make_optimizer(params, spec: OptimSpec) -> torch.optim.Optimizer:
    if spec.name == "gd":
        return torch.optim.SGD(params, lr=spec.lr)
    if spec.name == "sgd":
        return torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum)
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr)
    return torch.optim.Adagrad(params, lr=spec.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's and torch's global RNG states, as data `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from CUDA's generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and torch.cuda.device_count() == len(state["cuda"]):
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def default_batches(spec: JobSpec, train: data_mod.Split) -> Iterable:
    """One process's training batches: shuffled mini-batches of the split in memory, or streamed from its
    shards (`data.stream`); full-batch gradient descent (`optim.name: gd`) needs the split in memory."""
    full_batch = spec.optim.name == "gd"
    if isinstance(train, data_mod.Arrays):
        return data_mod.Batches(train, len(train) if full_batch else spec.train.batch_size, shuffle=not full_batch,
                                seed=spec.seed)
    if full_batch:
        raise UserError("optim.name: gd takes the whole training split as one batch; streamed data "
                        "(data.stream) needs sgd, adam or adagrad")
    return data_mod.StreamedBatches(train, spec.train.batch_size, seed=spec.seed, buffer_rows=spec.data.shuffle_buffer)


def build(spec: JobSpec, dataset: data_mod.Dataset) -> nn.Module:
    """The spec's model for this dataset; with `model.init_from` (a local weights file: the job's preparation
    fetches a run's), its conv blocks start from that encoder."""
    num_classes = dataset.num_classes if dataset.is_classification else 0
    model = models.build_model(spec.model, dataset.shape, num_classes, spec.regularization.dropout)
    if spec.model.init_from is not None:
        if not Path(spec.model.init_from).is_file():
            raise UserError(f"model.init_from: {spec.model.init_from!r} is not a weights file on this machine; "
                            "raybloom.job.prepare_job fetches a run's weights and pins the spec to their file")
        models.init_encoder(model, spec.model, spec.model.init_from)
    return model


LINE_FEATURES = 32  # a linear regression on at most this many features logs each weight


def _line(model: nn.Module) -> Optional[nn.Linear]:
    """The `nn.Linear` of a linear regression model (one output, few features), else None."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if len(layers) != 1 or layers[0].out_features != 1 or layers[0].in_features > LINE_FEATURES:
        return None
    if any(not isinstance(m, (nn.Sequential, nn.Flatten, nn.Linear)) for m in model.modules()):
        return None
    return layers[0]


def _weight_names(n: int) -> list[str]:
    return ["w"] if n == 1 else [f"w_{i}" for i in range(n)]


def line_params(model: nn.Module) -> dict[str, float]:
    """`w` (or `w_0`, `w_1`, ...) and `b` of a linear regression model: what gradient descent has fitted so far."""
    lin = _line(model)
    if lin is None:
        return {}
    w = lin.weight.detach().double().cpu().reshape(-1).tolist()
    return {**dict(zip(_weight_names(len(w)), w)), "b": float(lin.bias.detach().double().cpu())}


def least_squares(fitted: dict[str, float], train: data_mod.Split) -> dict[str, float]:
    """For a linear regression's `line_params` and its training split in memory: the closed-form least-squares
    solution of that split (`w_star`, `b_star`, or `w_star_i`) and the distance of (w, b) to it (`ls_distance`)."""
    if not fitted or not isinstance(train, data_mod.Arrays) or not len(train):
        return {}
    x = train.x.double().reshape(len(train), -1).cpu().numpy()
    design = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, train.y.double().reshape(-1).cpu().numpy(), rcond=None)
    names = [n.replace("w", "w_star", 1) for n in _weight_names(x.shape[1])] + ["b_star"]
    star = dict(zip(names, map(float, solution)))
    distance = float(np.linalg.norm(np.asarray(list(fitted.values())) - solution))
    return {**star, "ls_distance": distance}


@torch.no_grad()
def against_mean_image(model: nn.Module, train: data_mod.Split, test: data_mod.Split, batch_size: int = 1024,
                       device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """A reconstruction model's test MSE (`test_mse`) against the mean-image baseline's (`baseline_mse`:
    predicting the training split's mean image for every test image) and their ratio (`baseline_ratio`,
    above 1 when the model beats the baseline). Both splits are read a batch at a time."""
    if not len(train) or not len(test):
        return {}
    total, n = None, 0
    for x, _ in train.batches(batch_size):
        s = x.double().sum(0)
        total, n = (s if total is None else total + s), n + len(x)
    mean = (total / n).float()
    model.eval()
    model_se = base_se = 0.0
    count = 0
    for x, _ in test.batches(batch_size):
        x = x.to(device)
        model_se += float(((model(x).float() - x) ** 2).double().sum())
        base_se += float(((mean.to(device) - x) ** 2).double().sum())
        count += x.numel()
    out = {"test_mse": model_se / count, "baseline_mse": base_se / count}
    return {**out, "baseline_ratio": out["baseline_mse"] / out["test_mse"] if out["test_mse"] else math.inf}


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
    fitted: dict[str, float] = field(default_factory=dict)  # a linear regression's w, b, w*, b*; a deconv's MSE vs the mean image

    @property
    def final(self) -> dict[str, float]:
        out = {f"test_{k}": v for k, v in self.test.items()}
        out.update(self.fitted)
        out.update(best_epoch=self.best_epoch, stopped_epoch=self.stopped_epoch)
        return out


class Training:
    """The state of one training job, driven by `run_epochs` (the epoch loop) or one epoch at a time.

    `model` may be passed already wrapped (DDP); `batches` may be a worker's shard; `extra_loss(model)`
    is added to every batch's loss (a federated client's FedProx term).
    """

    def __init__(self, spec: JobSpec, dataset: data_mod.Dataset, *, model: Optional[nn.Module] = None,
                 batches: Optional[Iterable] = None, device: torch.device = torch.device("cpu"),
                 extra_loss: Optional[Callable[[nn.Module], torch.Tensor]] = None):
        if spec.train.threads:
            torch.set_num_threads(spec.train.threads)
        seed_everything(spec.seed)
        self.spec, self.dataset, self.device, self.extra_loss = spec, dataset, device, extra_loss
        self.objective = make_objective(spec, dataset)
        self.regression = not self.objective.classify and not self.objective.reconstruct
        self.model = model if model is not None else build(spec, dataset).to(device)
        self.core = getattr(self.model, "module", self.model)  # the bare model under a DDP wrapper
        self.optimizer = make_optimizer(self.model.parameters(), spec.optim)
        self._batches = batches  # built on first use: finishing a run from a checkpoint needs none
        self.reg = Regularizer.from_spec(spec.regularization, spec.seed + 1)
        es = spec.regularization.early_stopping
        self.early = regularization.EarlyStopping(es.patience, es.min_delta, es.restore_best) if es.enabled else None
        use_scaler = device.type == "cuda" and spec.train.precision == "fp16"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.history: list[dict[str, float]] = []
        self.stopped = False  # by early stopping
        self.halted = False  # by a hook

    @property
    def next_epoch(self) -> int:
        return len(self.history)

    @property
    def batches(self) -> Iterable:
        if self._batches is None:
            self._batches = default_batches(self.spec, self.dataset.train)
        return self._batches

    @batches.setter
    def batches(self, batches: Iterable) -> None:
        self._batches = batches

    def lr_for(self, t: int) -> float:
        vals = [h["val_loss"] for h in self.history if "val_loss" in h]
        grads = [h["grad_norm"] for h in self.history if "grad_norm" in h]
        return schedules.lr_at(t, self.spec.optim.lr, self.spec.schedule, self.spec.train.epochs, vals, grads)

    def run_epochs(self, hooks: Sequence[EpochHook] = ()) -> None:
        """The epoch loop: train until `train.epochs` are done, early stopping stops, or a hook says stop."""
        epochs = self.spec.train.epochs
        while self.next_epoch < epochs and not self.stopped and not self.halted:
            metrics = self.run_epoch()
            t = self.next_epoch - 1
            last = self.stopped or self.next_epoch >= epochs
            for hook in hooks:
                if hook(t, metrics, last):
                    self.halted = last = True

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
        self._check_divergence(t, metrics["train_loss"])
        metrics["lr"] = lr
        val = evaluate(self.model, self.dataset.val, self.objective, device=self.device)
        metrics.update({f"val_{k}": v for k, v in val.items()})
        if self.regression:
            metrics.update(line_params(self.core))
        self.history.append(metrics)
        if self.early is not None and "val_loss" in metrics:
            self.stopped = self.early.step(t, metrics["val_loss"], self.core)
        return metrics

    def _check_divergence(self, t: int, loss: float) -> None:
        first = self.history[0]["train_loss"] if self.history else loss
        limit = self.spec.train.divergence_factor
        if not math.isfinite(loss) or loss > limit * first:
            what = f"became {loss}" if not math.isfinite(loss) else f"grew to {loss:.4g}, over {limit:g}x epoch 0's {first:.4g}"
            raise TrainingDiverged(f"train_loss {what} at epoch {t} (optim.lr={self.spec.optim.lr}): "
                                   "lower optim.lr, set optim.grad_clip, or normalize the data", epoch=t)

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
                         bool(self.stopped), test, val, self._fitted())

    def _fitted(self) -> dict[str, float]:
        """A linear regression's line against least squares; a reconstruction model against the mean image."""
        if self.regression:
            line = line_params(self.core)
            return {**line, **least_squares(line, self.dataset.train)}
        if self.objective.reconstruct:
            return against_mean_image(self.core, self.dataset.train, self.dataset.test, device=self.device)
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume as if never stopped: portable between a DDP-wrapped and a bare model.
        The RNGs too (dropout draws from torch's, augmentation from the regularizer's generator); the batch
        order needs none (each epoch's permutation is seeded by seed and epoch)."""
        return {"model": self.core.state_dict(), "optimizer": self.optimizer.state_dict(),
                "history": self.history, "early": self.early.state_dict() if self.early else None,
                "stopped": self.stopped, **self.rng_states()}

    def rng_states(self) -> dict[str, Any]:
        """This process's RNG states (each DDP rank has its own: its batches differ in size, so do its draws)."""
        gen = self.reg.generator
        return {"rng": rng_state(), "reg_rng": gen.get_state() if gen is not None else None}

    def set_rng_states(self, states: dict[str, Any]) -> None:
        if states.get("rng"):
            set_rng_state(states["rng"])
        if states.get("reg_rng") is not None and self.reg.generator is not None:
            self.reg.generator.set_state(states["reg_rng"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.core.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = list(state["history"])
        if self.early is not None and state.get("early"):
            self.early.load_state_dict(state["early"])
        self.stopped = state.get("stopped", False)
        self.set_rng_states(state)


class ProgressBar:
    """An epoch hook drawing a progress bar on the terminal (`train.progress`; default: when stderr is one)."""

    def __init__(self, spec: JobSpec):
        from tqdm import tqdm

        self.bar = tqdm(total=spec.train.epochs, desc=spec.model.name, unit="epoch", leave=False, file=sys.stderr)

    @staticmethod
    def wanted(spec: JobSpec) -> bool:
        return spec.train.progress if spec.train.progress is not None else sys.stderr.isatty()

    def __call__(self, epoch: int, metrics: dict[str, float], last: bool) -> None:
        self.bar.update(1)
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if k in ("train_loss", "val_loss", "val_accuracy")})

    def close(self) -> None:
        self.bar.close()


def fit(spec: JobSpec, dataset: Optional[data_mod.Dataset] = None, hooks: Sequence[EpochHook] = (),
        training: Optional[Training] = None) -> FitResult:
    """Train a spec in this process: the epoch loop with `hooks` (and a progress bar), then the final test.
    `training`: one made (or restored) by the caller, which goes on from its next epoch."""
    dataset = dataset if dataset is not None else data_mod.load(spec.data)
    training = training if training is not None else Training(spec, dataset)
    bar = ProgressBar(spec) if ProgressBar.wanted(spec) else None
    try:
        training.run_epochs([*hooks, bar] if bar is not None else hooks)
    finally:
        if bar is not None:
            bar.close()
    return training.finish()


def cross_validate(dataset: data_mod.Dataset, k: int, seed: int,
                   train_fold: Callable[[int, data_mod.Dataset], dict[str, float]]) -> dict[str, float]:
    """k-fold cross-validation over train+val (`Dataset.folds`): `train_fold(i, fold)` trains fold i and returns
    its metrics; returns `cv_<metric>_mean` and `cv_<metric>_std` (ddof 1) of every metric each fold reported."""
    per_fold = [train_fold(i, fold) for i, fold in enumerate(dataset.folds(k, seed))]
    summary: dict[str, float] = {}
    for key in per_fold[0]:
        values = np.asarray([m[key] for m in per_fold if key in m], dtype=np.float64)
        if len(values) == len(per_fold):
            summary[f"cv_{key}_mean"] = float(values.mean())
            summary[f"cv_{key}_std"] = float(values.std(ddof=1) if len(values) > 1 else 0.0)
    return summary
