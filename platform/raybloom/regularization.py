"""L1/L2 penalties, image augmentation, early stopping and k-fold splits: plain PyTorch and NumPy."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from raybloom.spec.sections import AugmentSpec, RegularizationSpec


def penalized_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights that L1/L2 act on: matrices and kernels, not biases or norm scales."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim > 1]


def l1_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    return sum(w.abs().sum() for w in weights)


def l2_penalty(weights: list[torch.Tensor]) -> torch.Tensor:
    return sum(w.pow(2).sum() for w in weights)


def augment(x: torch.Tensor, aug: AugmentSpec, generator: torch.Generator) -> torch.Tensor:
    """Random shift (zero-filled), horizontal flip and Gaussian noise, per sample, without Python loops."""
    if x.ndim == 4 and aug.shift:
        n, _, h, w = x.shape
        s = aug.shift  # pixels
        padded = nn.functional.pad(x, (s, s, s, s))
        dy = torch.randint(0, 2 * s + 1, (n, 1, 1), generator=generator)
        dx = torch.randint(0, 2 * s + 1, (n, 1, 1), generator=generator)
        rows = (torch.arange(h).view(1, h, 1) + dy).unsqueeze(1)  # (n, 1, h, 1)
        cols = (torch.arange(w).view(1, 1, w) + dx).unsqueeze(1)  # (n, 1, 1, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chan = torch.arange(x.shape[1]).view(1, -1, 1, 1)
        x = padded[batch, chan, rows, cols]
    if x.ndim == 4 and aug.hflip:
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    if aug.noise:
        x = x + aug.noise * torch.randn(x.shape, generator=generator)
    return x


@dataclass
class Regularizer:
    """What a training step adds for regularization: the L1/L2 penalty and the augmented inputs."""

    l1: float = 0.0
    l2: float = 0.0
    augment: Optional[AugmentSpec] = None
    generator: Optional[torch.Generator] = None

    @classmethod
    def from_spec(cls, spec: RegularizationSpec, seed: int) -> "Regularizer":
        return cls(spec.l1, spec.l2, spec.augment, torch.Generator().manual_seed(seed))

    def penalty(self, model: nn.Module) -> Optional[torch.Tensor]:
        if not (self.l1 or self.l2):
            return None
        w = penalized_weights(model)
        total = 0.0
        if self.l1:
            total = total + self.l1 * l1_penalty(w)
        if self.l2:
            total = total + self.l2 * l2_penalty(w)
        return total

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        aug = self.augment
        if aug is None or not (aug.shift or aug.noise or aug.hflip):
            return x
        return augment(x, aug, self.generator)

    def logged(self, model: nn.Module) -> dict[str, float]:
        """Penalty values after the epoch, for `l1_penalty` / `l2_penalty`."""
        out = {}
        with torch.no_grad():
            w = penalized_weights(model)
            if self.l1:
                out["l1_penalty"] = float(self.l1 * l1_penalty(w))
            if self.l2:
                out["l2_penalty"] = float(self.l2 * l2_penalty(w))
        return out


class EarlyStopping:
    """Stop when val_loss has not improved by `min_delta` for `patience` epochs; keep the best weights."""

    def __init__(self, patience: int, min_delta: float = 0.0, restore_best: bool = True):
        self.patience, self.min_delta, self.restore_best = patience, min_delta, restore_best
        self.best_loss = math.inf
        self.best_epoch = -1
        self.best_state: dict | None = None
        self.wait = 0
        self.stopped = False

    def step(self, epoch: int, val_loss: float, model: nn.Module) -> bool:
        """Record epoch's val_loss; True when training should stop."""
        if val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.wait = val_loss, epoch, 0
            if self.restore_best:
                self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.wait += 1
            self.stopped = self.wait >= self.patience
        return self.stopped

    def restore(self, model: nn.Module) -> None:
        if self.restore_best and self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best_loss", "best_epoch", "best_state", "wait", "stopped")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def kfold_indices(n: int, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (train, held-out) index pairs over n samples, shuffled by seed; every sample is held out once."""
    perm = np.random.default_rng(seed).permutation(n)
    folds = np.array_split(perm, k)
    return [(np.sort(np.concatenate(folds[:i] + folds[i + 1:])), np.sort(folds[i])) for i in range(k)]
