"""Explanations of a finished classifier, in plain PyTorch and Captum: which input pixels (or features) its
prediction rests on, and a check that those maps mean something.

- `explain_examples`: a fixed set of test rows (the first `per_class` of each class, in test order), their
  Captum `Saliency` (|d score / d input|) and `IntegratedGradients` (from an all-zero baseline) maps for the
  predicted class;
- `deletion_check`: on the first `DELETION_ROWS` test rows, the accuracy drop when the `TOP_FRACTION` of
  pixels with the largest |integrated gradient| are set to the baseline (0), minus the drop when as many
  pixels chosen at random (fixed seed) are set to it. A map that finds what the model uses gives a clearly
  positive gap; one no better than chance gives about 0.

Captum is imported inside the functions: only the process that records a finished run (the driver, the
federated server) ever loads it, never a Ray worker or a Flower client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

TOP_FRACTION = 0.15  # k: the share of pixels (features) masked; 10 of the 64 pixels of an 8x8 digit
BASELINE = 0.0  # what a masked pixel is set to, and Integrated Gradients' baseline (black for images in [0, 1])
IG_STEPS = 16  # Integrated Gradients' integration steps (Gauss-Legendre): the deletion gap is the same at 8 or 24 here
DELETION_ROWS = 256  # test rows of the deletion check
MAX_EXAMPLES = 20  # images in the figure
ROWS_PER_PASS = 4096  # inputs per forward/backward pass inside Integrated Gradients (of rows x steps)


@dataclass
class Examples:
    """The explained test rows: inputs (n, *shape), true and predicted classes, and their two maps."""

    x: np.ndarray
    labels: np.ndarray
    predicted: np.ndarray
    saliency: np.ndarray
    integrated: np.ndarray


def class_scores(model: nn.Module, binary_logit: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as a function of its input giving one score per class; a single-logit (bce) model's logit l
    becomes the two scores (-l, l), so that either predicted class has a score to attribute."""
    if not binary_logit:
        return model
    return lambda x: torch.cat([-model(x), model(x)], dim=-1)


def attributions(scores: Callable, x: torch.Tensor, target: torch.Tensor, method: str) -> torch.Tensor:
    """Captum's `Saliency` (absolute gradients) or `IntegratedGradients` (zero baseline) of each row's
    `target` class score, shaped like `x`."""
    from captum.attr import IntegratedGradients, Saliency

    x = x.detach().clone().requires_grad_(True)  # Captum's inputs are leaves that need gradients
    with torch.enable_grad():
        if method == "saliency":
            out = Saliency(scores).attribute(x, target=target, abs=True)
        elif method == "integrated_gradients":
            out = IntegratedGradients(scores).attribute(
                x, baselines=BASELINE, target=target, n_steps=IG_STEPS,
                internal_batch_size=max(ROWS_PER_PASS, len(x)))
        else:
            raise ValueError(f"method: saliency or integrated_gradients, got {method!r}")
    return out.detach()


def pixel_scores(attr: torch.Tensor) -> torch.Tensor:
    """(n, pixels) importance: |attribution| summed over the channels of (n, channels, height, width) images
    (a pixel is masked in every channel); of each value for other shapes (flat features, one-channel grids)."""
    a = attr.abs()
    if a.dim() == 4:
        a = a.sum(dim=1)
    return a.reshape(len(a), -1)


def top_k_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """(n, pixels) bool: True on each row's `round(fraction * pixels)` (at least 1) highest scores."""
    k = masked_count(scores.shape[1], fraction)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(k, dim=1).indices, True)


def random_mask(n: int, pixels: int, fraction: float, seed: int = 0) -> torch.Tensor:
    """(n, pixels) bool: as many pixels per row as `top_k_mask` masks, drawn uniformly (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.rand((n, pixels), generator=gen).argsort(dim=1)
    mask = torch.zeros((n, pixels), dtype=torch.bool)
    return mask.scatter_(1, order[:, :masked_count(pixels, fraction)], True)


def masked_count(pixels: int, fraction: float) -> int:
    return min(max(int(round(fraction * pixels)), 1), pixels)


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` with the masked pixels (in every channel of an image) set to `BASELINE`."""
    if x.dim() == 4:
        full = mask.reshape(len(x), 1, *x.shape[2:]).expand_as(x)
    else:
        full = mask.reshape(x.shape)
    return x.masked_fill(full.to(x.device), BASELINE)


def _predicted(model: nn.Module, x: torch.Tensor, binary_logit: bool) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """(the class scores of the model in eval mode, `x` on its device, the class it predicts for each row)."""
    model.eval()
    scores = class_scores(model, binary_logit)
    x = x.to(next(model.parameters()).device)
    with torch.no_grad():
        return scores, x, scores(x).argmax(-1)


@torch.no_grad()
def _accuracy(scores: Callable, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((scores(x).argmax(-1) == y).float().mean())


def deletion_check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, binary_logit: bool = False,
                   fraction: float = TOP_FRACTION, seed: int = 0) -> dict[str, float]:
    """`explain_deletion_gap` = (accuracy drop with the top-`fraction` |integrated gradient| pixels masked) -
    (drop with as many random pixels masked), and both drops; the maps explain the predicted class."""
    scores, x, predicted = _predicted(model, x, binary_logit)
    y = y.to(x.device)
    attr = attributions(scores, x, predicted, "integrated_gradients")
    top = top_k_mask(pixel_scores(attr), fraction)
    rand = random_mask(len(x), top.shape[1], fraction, seed)
    clean = _accuracy(scores, x, y)
    top_drop = clean - _accuracy(scores, apply_mask(x, top), y)
    random_drop = clean - _accuracy(scores, apply_mask(x, rand), y)
    return {"explain_deletion_gap": top_drop - random_drop, "explain_deletion_top_drop": top_drop,
            "explain_deletion_random_drop": random_drop}


def pick_examples(labels: np.ndarray, num_classes: int, limit: int = MAX_EXAMPLES) -> np.ndarray:
    """Indices of the first one or two test rows of each class, in class then test order (two per class when
    that fits in `limit` images, else one; at most `limit`)."""
    per_class = 2 if 2 * num_classes <= limit else 1
    picked = [i for c in range(num_classes) for i in np.flatnonzero(labels == c)[:per_class]]
    return np.asarray(picked[:limit], dtype=np.int64)


def explain_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, binary_logit: bool = False) -> Examples:
    """Both maps of each row of `x` for the class the model predicts."""
    scores, xd, predicted = _predicted(model, x, binary_logit)
    maps = {m: attributions(scores, xd, predicted, m).cpu().numpy() for m in ("saliency", "integrated_gradients")}
    return Examples(x.cpu().numpy(), y.cpu().numpy(), predicted.cpu().numpy(), maps["saliency"],
                    maps["integrated_gradients"])
