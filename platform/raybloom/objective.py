"""What a model is asked to do: its loss, and whether the target is the label or the input itself."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from raybloom import models
from raybloom.data import Dataset
from raybloom.spec import JobSpec


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


def make_objective(spec: JobSpec, dataset: Dataset) -> Objective:
    reconstruct = models.kind(spec.model).reconstructs
    num_classes = 0 if reconstruct or not dataset.is_classification else dataset.num_classes
    return Objective(models.default_loss(spec.model, num_classes), reconstruct, num_classes)
