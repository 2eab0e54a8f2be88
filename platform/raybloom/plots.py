"""Figures for a finished run (matplotlib, no tracking here): loss curves, lr, confusion, reconstructions,
attribution maps; `png(fig)` renders one (and closes it) for `tracking` to store or a report to embed."""

from __future__ import annotations

import functools
import io

import numpy as np


@functools.cache
def pyplot():
    """matplotlib's pyplot on the Agg backend, imported at the first figure (0.3 s a process here: not on the
    way to a ServerApp's first round; `results.warm_up` imports it meanwhile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curves(history: list[dict], best_epoch: int, stopped_epoch: int):
    fig, ax = pyplot().subplots(figsize=(6, 4))
    epochs = np.arange(len(history))
    ax.plot(epochs, [h["train_loss"] for h in history], label="train")
    if history and "val_loss" in history[0]:
        ax.plot(epochs, [h["val_loss"] for h in history], label="validation")
    if best_epoch >= 0:
        ax.axvline(best_epoch, color="green", ls="--", label=f"best epoch {best_epoch}")
    if stopped_epoch >= 0 and stopped_epoch != best_epoch:
        ax.axvline(stopped_epoch, color="red", ls=":", label=f"stopped epoch {stopped_epoch}")
    ax.set(xlabel="epoch", ylabel="loss", title="Loss", yscale="log" if _positive(history) else "linear")
    ax.legend()
    fig.tight_layout()
    return fig


def _positive(history: list[dict]) -> bool:
    return all(h["train_loss"] > 0 and h.get("val_loss", 1) > 0 for h in history)


def lr_curve(history: list[dict]):
    fig, ax = pyplot().subplots(figsize=(6, 3))
    ax.plot(range(len(history)), [h["lr"] for h in history], marker=".")
    ax.set(xlabel="epoch", ylabel="learning rate", title="Learning rate")
    fig.tight_layout()
    return fig


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, class_names=None):
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    fig, ax = pyplot().subplots(figsize=(5.5, 5))
    ax.imshow(cm, cmap="Blues")
    names = class_names or [str(i) for i in range(num_classes)]
    ax.set(xticks=range(num_classes), yticks=range(num_classes), xticklabels=names, yticklabels=names,
           xlabel="predicted", ylabel="true", title=f"Confusion matrix (test, accuracy {np.trace(cm) / max(cm.sum(), 1):.3f})")
    for i in range(num_classes):
        for j in range(num_classes):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.tight_layout()
    return fig, cm


def reconstructions(originals: np.ndarray, rebuilt: np.ndarray, n: int = 8):
    """Top row: originals; bottom row: what the decoder rebuilt."""
    n = min(n, len(originals))
    fig, axes = pyplot().subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for i in range(n):
        for row, img in ((0, originals[i]), (1, rebuilt[i])):
            ax = axes[row][i]
            ax.imshow(np.moveaxis(img, 0, -1).squeeze(), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
    axes[0][0].set_title("original", fontsize=8, loc="left")
    axes[1][0].set_title("rebuilt", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def png(fig, dpi: float | None = None) -> bytes:
    """The figure as PNG bytes; the figure is closed (matplotlib keeps every open figure alive)."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", **({"dpi": dpi} if dpi else {}))
    finally:
        pyplot().close(fig)
    return buf.getvalue()


def partition_heatmap(hist: np.ndarray, title: str, class_names=None):
    """Samples per client (rows) and class (columns)."""
    clients, classes = hist.shape
    fig, ax = pyplot().subplots(figsize=(max(5, 0.5 * classes + 2), max(3, 0.35 * clients + 1.5)))
    im = ax.imshow(hist, cmap="viridis", aspect="auto")
    names = class_names or [str(i) for i in range(classes)]
    ax.set(xticks=range(classes), xticklabels=names, yticks=range(clients), xlabel="class", ylabel="client",
           title=title)
    for i in range(clients):
        for j in range(classes):
            ax.text(j, i, int(hist[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if hist[i, j] < hist.max() / 2 else "black")
    fig.colorbar(im, ax=ax, label="samples")
    fig.tight_layout()
    return fig


def accuracy_vs_rounds(curves: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str = "validation accuracy"):
    """One line per run: (x, y) pairs, e.g. federated rounds vs centralized epochs (as total epochs)."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker=".", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} against {xlabel}")
    ax.legend()
    fig.tight_layout()
    return fig


def saliency_maps(x: np.ndarray, saliency: np.ndarray, integrated: np.ndarray, labels: np.ndarray,
                  predicted: np.ndarray, class_names=None, per_row: int = 10):
    """For each explained test input (columns, `per_row` to a block): the input, its saliency map
    (|gradient|, the largest over an image's channels) and its integrated gradients (summed over channels,
    red for evidence for the predicted class, blue against); titled true / predicted class, red when wrong.
    Images are (channels, height, width) or (height, width); anything else is drawn as a filled step per feature."""
    n = len(x)
    blocks = -(-n // per_row)
    cols = min(n, per_row)
    names = class_names or [str(i) for i in range(int(max(labels.max(), predicted.max())) + 1)]
    titles = [(f"true {names[labels[i]]}\npred {names[predicted[i]]}", labels[i] != predicted[i]) for i in range(n)]
    if x.ndim in (3, 4):
        return _attribution_mosaics(x, saliency, integrated, titles, blocks, cols)
    fig, axes = pyplot().subplots(3 * blocks, cols, figsize=(1.25 * cols + 1.2, 3.9 * blocks), squeeze=False)
    for i in range(blocks * cols):
        col, rows = i % cols, axes[3 * (i // cols):3 * (i // cols) + 3, i % cols]
        if i >= n:
            for ax in rows:
                ax.axis("off")
            continue
        rows[0].set_title(titles[i][0], fontsize=7, color="red" if titles[i][1] else "black")
        _attribution_panels(rows, x[i], saliency[i], integrated[i])
        if col == 0:
            for ax, what in zip(rows, ("input", "saliency", "integrated\ngradients")):
                ax.set_ylabel(what, fontsize=7)
    fig.suptitle("Attributions of the predicted class (test inputs)", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.90, wspace=0.15, hspace=0.45)  # tight_layout: 0.4 s more
    return fig


def _attribution_mosaics(x: np.ndarray, saliency: np.ndarray, integrated: np.ndarray, titles: list[tuple[str, bool]],
                         blocks: int, cols: int):
    """`saliency_maps` of images: each block's inputs, saliency maps and integrated gradients as three
    mosaics (one axes each, a gap between inputs; each input scaled on its own, as one `imshow` an input
    would: gray by its range, saliency 0..its largest, integrated gradients ±its largest). Three axes a
    block instead of three an input: 60 axes cost 0.4 s of a run's recording here."""
    panels = [_image_panels(x[i], saliency[i], integrated[i]) for i in range(len(x))]
    h, w = panels[0][1].shape
    gap = max(1, w // 7)
    fig, axes = pyplot().subplots(3 * blocks, 1, figsize=(1.25 * cols + 1.2, 3.9 * blocks), squeeze=False)
    for b in range(blocks):
        for r, (what, cmap, lim) in enumerate((("input", "gray", (0, 1)), ("saliency", "hot", (0, 1)),
                                              ("integrated\ngradients", "bwr", (-1, 1)))):
            rgb = r == 0 and panels[0][0].ndim == 3
            mosaic = np.full((h, cols * (w + gap) - gap, 3) if rgb else (h, cols * (w + gap) - gap), 1.0 if rgb else np.nan)
            for j, i in enumerate(range(b * cols, min((b + 1) * cols, len(x)))):
                mosaic[:, j * (w + gap):j * (w + gap) + w] = panels[i][r]
            ax = axes[3 * b + r, 0]
            colors = pyplot().get_cmap(cmap).with_extremes(bad="white")
            ax.imshow(mosaic, cmap=None if rgb else colors, vmin=lim[0], vmax=lim[1], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(what, fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if r == 0:
                for j, i in enumerate(range(b * cols, min((b + 1) * cols, len(x)))):
                    ax.text(j * (w + gap) + (w - 1) / 2, -1, titles[i][0], ha="center", va="bottom", fontsize=7,
                            color="red" if titles[i][1] else "black", clip_on=False)
    fig.suptitle("Attributions of the predicted class (test inputs)", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.01, top=0.90, hspace=0.45)
    return fig


def _image_panels(x: np.ndarray, saliency: np.ndarray, integrated: np.ndarray) -> tuple[np.ndarray, ...]:
    """One input's three panels, scaled as `_attribution_panels` draws them: the input (gray: 0..1 over its
    own range; RGB: clipped to 0..1), the saliency 0..1 over its own range, the integrated gradients -1..1."""
    image = x if x.ndim == 2 else x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)
    sal = saliency if saliency.ndim == 2 else saliency.max(axis=0)
    ig = integrated if integrated.ndim == 2 else integrated.sum(axis=0)
    return (np.clip(image, 0, 1) if image.ndim == 3 else _unit(image), _unit(sal),
            ig / (float(np.abs(ig).max()) or 1.0))


def _unit(a: np.ndarray) -> np.ndarray:
    """`a` scaled to 0..1 over its own range (all zeros when it is constant), as `imshow` scales it."""
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a, dtype=float)


def _attribution_panels(axes, x: np.ndarray, saliency: np.ndarray, integrated: np.ndarray) -> None:
    """The input, the saliency and the integrated gradients of one test input, on three axes."""
    if x.ndim in (2, 3):
        image = x if x.ndim == 2 else x[0] if x.shape[0] == 1 else np.moveaxis(x, 0, -1)  # gray, or RGB last
        sal = saliency if saliency.ndim == 2 else saliency.max(axis=0)
        ig = integrated if integrated.ndim == 2 else integrated.sum(axis=0)
        lim = float(np.abs(ig).max()) or 1.0
        axes[0].imshow(np.clip(image, 0, 1) if image.ndim == 3 else image, cmap="gray")
        axes[1].imshow(sal, cmap="hot")
        axes[2].imshow(ig, cmap="bwr", vmin=-lim, vmax=lim)
    else:
        # one filled step outline per panel (bars were one artist per feature: 47,000 of them, 45 s, for
        # 20 inputs of 784 features)
        edges = np.arange(x.size + 1) - 0.5
        axes[0].stairs(x.reshape(-1), edges, fill=True, color="gray")
        axes[1].stairs(saliency.reshape(-1), edges, fill=True, color="darkorange")
        ig = integrated.reshape(-1)
        axes[2].stairs(np.clip(ig, 0, None), edges, fill=True, color="red")
        axes[2].stairs(np.clip(ig, None, 0), edges, fill=True, color="blue")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
