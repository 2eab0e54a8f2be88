"""The classic models, built from the spec: linear, mlp, cnn, deconv.

Each model family describes itself in `MODELS`: how it is built from its `ModelSpec`, what it needs as
input, whether it is trained to rebuild its input (no labels) and how a run of it is named. Everything
else (the engine's objective, tracking's run names, the Ray, Optuna and Flower adapters) asks `MODELS`,
never a model's name.

To add a model: write an `nn.Module` builder here and an entry in `MODELS`, add its name (and any fields
it needs) to `ModelSpec` in spec/sections.py, and a job under jobs/. Nothing else changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from raybloom.errors import SpecError
from raybloom.spec.sections import ModelSpec

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}


def linear(in_features: int, out_features: int) -> nn.Module:
    """y = w·x + b."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, out_features))


def mlp(in_features: int, hidden: list[int], out_features: int, activation: str, dropout: float) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def cnn(shape: tuple[int, ...], filters: list[int], kernel_size: int, out_features: int, activation: str,
        pool: bool, batch_norm: bool, head_hidden: int, dropout: float) -> nn.Module:
    channels, height, width = shape
    layers: list[nn.Module] = []
    for f in filters:
        layers.append(nn.Conv2d(channels, f, kernel_size, padding=kernel_size // 2))
        if batch_norm:
            layers.append(nn.BatchNorm2d(f))
        layers.append(ACTIVATIONS[activation]())
        if pool and min(height, width) >= 2:
            layers.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
        channels = f
    layers.append(nn.Flatten())
    flat = channels * height * width
    if head_hidden:
        layers += [nn.Linear(flat, head_hidden), ACTIVATIONS[activation]()]
        flat = head_hidden
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(flat, out_features))
    return nn.Sequential(*layers)


class Deconv(nn.Module):
    """A conv encoder (stride 2 per block) and a transposed-convolution decoder that rebuilds the image.

    With `noise_std > 0` (task: denoise) the input is corrupted first and the clean image is the target.
    """

    def __init__(self, shape: tuple[int, ...], filters: list[int], kernel_size: int, activation: str, noise_std: float = 0.0):
        super().__init__()
        channels = shape[0]
        pad = kernel_size // 2
        enc: list[nn.Module] = []
        c = channels
        for f in filters:
            enc += [nn.Conv2d(c, f, kernel_size, stride=2, padding=pad), ACTIVATIONS[activation]()]
            c = f
        dec: list[nn.Module] = []
        for f in list(reversed(filters))[1:] + [channels]:
            dec.append(nn.ConvTranspose2d(c, f, kernel_size, stride=2, padding=pad, output_padding=1))
            if f != channels:
                dec.append(ACTIVATIONS[activation]())
            c = f
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        self.size = tuple(shape[1:])
        self.noise_std = noise_std

    def corrupt(self, x: torch.Tensor) -> torch.Tensor:
        if not self.noise_std:
            return x
        return (x + self.noise_std * torch.randn_like(x)).clamp(0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.decoder(self.encoder(self.corrupt(x)))
        if tuple(out.shape[-2:]) != self.size:  # odd sizes: the decoder overshoots by a pixel
            out = F.interpolate(out, size=self.size, mode="bilinear", align_corners=False)
        return torch.sigmoid(out)


class IntroDeconv(nn.Module):
    """The introduction's deconvolution example, with its shapes made consistent (`model.layout: intro`):
    Conv2D(32, 3×3, same) and Conv2D(64, 3×3, same) with ReLU, then a 2×2 max-pool (the downsampling its
    code lost: without it the stride-2 transposed convolution would double the image), a stride-2
    Conv2DTranspose(32, 3×3) with ReLU back to the input size, and a final Conv2DTranspose to the input's
    channels with a sigmoid. Trained with binary cross-entropy (`model.loss: bce`)."""

    def __init__(self, shape: tuple[int, ...], filters: list[int], kernel_size: int, activation: str):
        super().__init__()
        if len(filters) != 2:
            raise SpecError(f"model.filters: the intro layout has exactly two conv layers (e.g. [32, 64]), got {filters}")
        channels, height, width = shape
        if height % 2 or width % 2:
            raise SpecError(f"model.layout: intro pools by 2 and upsamples by 2, so the image sides must be even; "
                            f"this dataset's are {height}x{width}: set data.image_size or use layout: strided")
        pad, act = kernel_size // 2, ACTIVATIONS[activation]
        self.encoder = nn.Sequential(nn.Conv2d(channels, filters[0], kernel_size, padding=pad), act(),
                                     nn.Conv2d(filters[0], filters[1], kernel_size, padding=pad), act(), nn.MaxPool2d(2))
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(filters[1], filters[0], kernel_size, stride=2, padding=pad, output_padding=1), act(),
            nn.ConvTranspose2d(filters[0], channels, kernel_size, padding=pad), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _deconv(m: ModelSpec, shape: tuple[int, ...]) -> nn.Module:
    if m.layout == "intro":
        if m.task == "denoise":
            raise SpecError("model.task: the intro layout rebuilds its input (task: reconstruct); use layout: strided to denoise")
        return IntroDeconv(shape, m.filters, m.kernel_size, m.activation)
    return Deconv(shape, m.filters, m.kernel_size, m.activation, m.denoise_std if m.task == "denoise" else 0.0)


Builder = Callable[[ModelSpec, tuple[int, ...], int, float], nn.Module]


@dataclass(frozen=True)
class ModelKind:
    """What a model family is, for everything outside this module."""

    build: Builder  # (its spec, input shape without the batch dimension, outputs, dropout) -> the module
    describe: Callable[[ModelSpec], str]  # a few words for run names: "cnn f32-64 k3"
    reconstructs: bool = False  # trained to rebuild its input: no labels, no output layer of classes
    needs_image: bool = False  # input must be (channels, height, width)


def _sizes(values: list[int]) -> str:
    return "-".join(map(str, values))


MODELS: dict[str, ModelKind] = {
    "linear": ModelKind(lambda m, shape, out, dropout: linear(math.prod(shape), out), lambda m: "linear"),
    "mlp": ModelKind(lambda m, shape, out, dropout: mlp(math.prod(shape), m.hidden, out, m.activation, dropout),
                     lambda m: f"mlp h{_sizes(m.hidden)} {m.activation}"),
    "cnn": ModelKind(lambda m, shape, out, dropout: cnn(shape, m.filters, m.kernel_size, out, m.activation, m.pool,
                                                        m.batch_norm, m.head_hidden, dropout),
                     lambda m: f"cnn f{_sizes(m.filters)} k{m.kernel_size}", needs_image=True),
    "deconv": ModelKind(lambda m, shape, out, dropout: _deconv(m, shape),
                        lambda m: f"deconv{' intro' if m.layout == 'intro' else ''} f{_sizes(m.filters)} k{m.kernel_size}",
                        reconstructs=True, needs_image=True),
}


def kind(m: ModelSpec) -> ModelKind:
    try:
        return MODELS[m.name]
    except KeyError:
        raise SpecError(f"model.name: no model {m.name!r} in raybloom.models.MODELS ({', '.join(MODELS)})") from None


def describe(m: ModelSpec) -> str:
    return kind(m).describe(m)


def output_size(m: ModelSpec, loss: str, num_classes: int) -> int:
    if kind(m).reconstructs:
        return 0
    if num_classes == 0:
        return 1
    return 1 if loss == "bce" else num_classes


def build_model(m: ModelSpec, input_shape: tuple[int, ...], num_classes: int, dropout: float = 0.0) -> nn.Module:
    """Build the model a `ModelSpec` describes for inputs of `input_shape` (no batch dimension).

    `num_classes` is 0 for regression targets. Errors name the spec field that cannot hold.
    """
    family = kind(m)
    if family.needs_image and len(input_shape) != 3:
        raise SpecError(f"model.name: {m.name} needs image data (channels, height, width); this dataset has "
                        f"shape {list(input_shape)}: use linear or mlp")
    return family.build(m, tuple(input_shape), output_size(m, default_loss(m, num_classes), num_classes), dropout)


def default_loss(model: ModelSpec, num_classes: int) -> str:
    """The spec's loss, or the natural one; refuses combinations that cannot train."""
    if kind(model).reconstructs:
        loss = model.loss or "mse"
        if loss == "cross_entropy":
            raise SpecError(f"model.loss: {model.name} rebuilds pixel values; use mse or bce, got 'cross_entropy'")
        return loss
    if num_classes == 0:
        if model.loss not in (None, "mse"):
            raise SpecError(f"model.loss: this dataset has real-valued targets; use mse, got {model.loss!r}")
        return "mse"
    loss = model.loss or "cross_entropy"
    if loss == "mse":
        raise SpecError(f"model.loss: this dataset has {num_classes} classes; use cross_entropy (or bce for 2 classes), got 'mse'")
    if loss == "bce" and num_classes != 2:
        raise SpecError(f"model.loss: bce needs 2 classes, this dataset has {num_classes}; use cross_entropy")
    return loss


# ------------------------------------------------------------------------------ pretrained encoders
WEIGHTS_ARTIFACT = "weights/state_dict.pt"  # what a run logs to be trained further (MLflow's model is a pt2 export)


def weights_record(m: ModelSpec, input_shape: tuple[int, ...], model: nn.Module, run_id: str | None = None) -> dict:
    """A model's trainable form, as `torch.save` writes it: its spec, input shape, state dict and the run that
    logged it (plain types and tensors, so `torch.load(..., weights_only=True)` reads it back)."""
    return {"model": m.model_dump(mode="json"), "shape": list(input_shape), "run_id": run_id,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _encoder_of(record: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, bias) of each conv layer of a saved model's encoder, in order: a deconv's `encoder`, a cnn's
    conv blocks."""
    state, prefix = record["state_dict"], "encoder." if record["model"]["name"] == "deconv" else ""
    convs = []
    for key, w in state.items():
        if key.startswith(prefix) and key.endswith(".weight") and w.dim() == 4:
            convs.append((w, state[key.removesuffix("weight") + "bias"]))
    return convs


def init_encoder(model: nn.Module, m: ModelSpec, path: str) -> None:
    """Copy a saved model's encoder (`init_from`: a file of `weights_record`) into this cnn's conv blocks,
    frozen with `freeze_encoder`. Filters, kernel size and input channels must match: else a SpecError
    naming both."""
    record = torch.load(path, map_location="cpu", weights_only=True)
    convs = _encoder_of(record)
    source = f"run {record['run_id']}" if record.get("run_id") else path
    mine = [c for c in model.modules() if isinstance(c, nn.Conv2d)]
    theirs = {"filters": [w.shape[0] for w, _ in convs], "kernel_size": convs[0][0].shape[-1] if convs else None,
              "channels": convs[0][0].shape[1] if convs else None}
    ours = {"filters": [c.out_channels for c in mine], "kernel_size": mine[0].kernel_size[0] if mine else None,
            "channels": mine[0].in_channels if mine else None}
    if theirs != ours:
        raise SpecError(f"model.init_from: the encoder of {source} ({record['model']['name']}) has filters "
                        f"{theirs['filters']}, kernel_size {theirs['kernel_size']} on {theirs['channels']} channel(s); "
                        f"this cnn has filters {ours['filters']}, kernel_size {ours['kernel_size']} on "
                        f"{ours['channels']} channel(s): give model.filters and model.kernel_size the encoder's")
    with torch.no_grad():
        for conv, (w, b) in zip(mine, convs):
            conv.weight.copy_(w)
            conv.bias.copy_(b)
            conv.requires_grad_(not m.freeze_encoder)
