"""Figures a person reads: axes, class names, counts, captions (matplotlib, no display needed).

Used by the Dashboard (``<run dir>/plots``, and the images W&B and TensorBoard get) and by the run
report (``callbacks.run_report``). Every function returns a matplotlib ``Figure`` built without
pyplot (no global state, no GUI backend); :func:`save` writes it as a PNG, :func:`to_rgb` gives
the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

# above this many classes a confusion matrix has no room for names and counts in its cells: the
# report lists the most confused pairs instead (a heatmap of 30 classes is ~13 px per cell at 8 in)
MAX_LABELLED_CLASSES = 30
VERDICT_COLOURS = {"fine": "tab:green", "underfitting": "tab:orange", "overfitting": "tab:red"}


def _figure(width: float, height: float, layout: Optional[str] = "constrained"):
    """A figure; ``layout=None`` for grids of many small axes, where the constrained layout's
    search costs more than the drawing."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def save(fig, path: str | Path) -> Path:
    fig.savefig(path, format="png")
    return Path(path)


def to_rgb(fig) -> np.ndarray:
    """The figure's pixels, HxWx3 uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _short(name: str, n: int = 14) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


# ---------------------------------------------------------------------- confusion
def confusion_figure(counts: np.ndarray, classes: Sequence[str], title: str = ""):
    """Rows true class, columns predicted; colour: the share of the row (recall on the diagonal);
    up to MAX_LABELLED_CLASSES classes each cell shows its count and the axes the class names."""
    counts = np.asarray(counts, dtype=np.int64)
    n = counts.shape[0]
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    labelled = n <= MAX_LABELLED_CLASSES
    side = min(12.0, max(4.5, 0.45 * n + 2.5)) if labelled else 8.0
    fig = _figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="share of the true class's images")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total, right = int(counts.sum()), int(np.trace(counts))
    ax.set_title((f"{title}: " if title else "") + f"{right}/{total} right ({right / max(total, 1):.1%})", fontsize=10)
    if labelled:
        names = [_short(str(c)) for c in classes]
        ax.set_xticks(range(n), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        small = 7 if n > 15 else 9
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=small,
                            color="white" if share[i, j] > 0.5 else "black")
    else:
        ax.set_xlabel("predicted class (index)")
        ax.set_ylabel("true class (index)")
    return fig


def most_confused(counts: np.ndarray, classes: Sequence[str], k: int = 20) -> list[tuple[str, str, int, float]]:
    """The k largest off-diagonal cells: (true, predicted, count, share of the true class)."""
    counts = np.asarray(counts, dtype=np.int64)
    off = counts.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(off, axis=None)[::-1][:k]
    rows = counts.sum(1)
    out = []
    for idx in flat:
        i, j = divmod(int(idx), counts.shape[1])
        if off[i, j] == 0:
            break
        out.append((str(classes[i]), str(classes[j]), int(off[i, j]), float(off[i, j] / max(rows[i], 1))))
    return out


# ---------------------------------------------------------------------- images
def image_grid_figure(images: np.ndarray, captions: Sequence[str], title: str = "", ncols: int = 8):
    """uint8 images (N, H, W, 3) or (N, 3, H, W), each with its caption above it."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    lines = max((str(c).count("\n") + 1 for c in captions), default=1)
    # one mosaic drawn once (an axes per image costs ~50 ms each to lay out and draw): cells of
    # the image plus a white band above it for the caption, the captions as text on top
    h, w = images.shape[1], images.shape[2]
    inch = 1.5  # shown size of one image
    band = int(round(h * (0.13 * lines + 0.06) / inch))  # caption height in image pixels
    pad = max(1, w // 24)
    ch, cw = h + band, w + pad
    mosaic = np.full((nrows * ch, ncols * cw, 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, ncols)
        img = images[k] if images.shape[-1] == 3 else np.repeat(images[k][..., :1], 3, axis=-1)
        mosaic[r * ch + band: (r + 1) * ch, c * cw: c * cw + w] = img
    head = 0.35 if title else 0.0
    width, height = ncols * cw * inch / w, nrows * ch * inch / h + head
    fig = _figure(width, height, layout=None)
    ax = fig.add_axes([0, 0, 1, 1 - head / height])
    ax.imshow(mosaic, interpolation="nearest", aspect="auto")
    ax.axis("off")
    for k in range(n):
        r, c = divmod(k, ncols)
        ax.text(c * cw + w / 2, r * ch + band - 1, str(captions[k]) if k < len(captions) else "",
                ha="center", va="bottom", fontsize=7, linespacing=1.1)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.06 / height, va="top")
    return fig


# ---------------------------------------------------------------------- curves
def _series(rows: Sequence[dict], key: str, x: str) -> tuple[list, list]:
    pts = [(r[x], r[key]) for r in rows if key in r and x in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _first(rows: Sequence[dict], *keys: str) -> Optional[str]:
    return next((k for k in keys if any(k in r for r in rows)), None)


def diagnosis_changes(epochs: Sequence[dict]) -> list[tuple[int, str, str]]:
    """(epoch, verdict, reason) at the first judged epoch and wherever the verdict changed."""
    out, prev = [], None
    for r in epochs:
        v = r.get("diagnosis")
        if v and v != prev:
            out.append((int(r["epoch"]), str(v), str(r.get("diagnosis_reason", ""))))
        prev = v or prev
    return out


def curves_figure(epochs: Sequence[dict]):
    """Loss and top-1 per epoch, train and val on two panels; the fit diagnosis marked where it
    changed (a vertical line and its verdict)."""
    fig = _figure(10.0, 4.0)
    axes = fig.subplots(1, 2)
    panels = (
        ("loss", ("train", _first(epochs, "train/loss_epoch", "train/loss")), ("val", "val/loss")),
        ("top-1 accuracy", ("train", _first(epochs, "train/acc1_epoch", "train/acc1")), ("val", "val/acc1")),
    )
    for ax, (what, *lines) in zip(axes, panels):
        for (label, key), style in zip(lines, ("o-", "s-")):
            if key is None:
                continue
            xs, ys = _series(epochs, key, "epoch")
            if xs:
                ax.plot(xs, ys, style, label=f"{label} ({key})", markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if epochs:
            ax.xaxis.get_major_locator().set_params(integer=True)
    for epoch, verdict, _reason in diagnosis_changes(epochs):
        colour = VERDICT_COLOURS.get(verdict, "tab:gray")
        for ax in axes:
            ax.axvline(epoch, color=colour, linestyle="--", alpha=0.7)
        axes[0].annotate(verdict, xy=(epoch, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -10),
                         textcoords="offset points", color=colour, fontsize=8, va="top",
                         bbox=dict(facecolor="white", edgecolor="none", alpha=0.8, pad=1))
    fig.suptitle("per epoch (dashed: the fit diagnosis from that epoch on)", fontsize=10)
    return fig


def steps_figure(steps: Sequence[dict]):
    """Learning rate (each distinct parameter group), throughput and train loss per optimizer step."""
    fig = _figure(12.0, 3.4)
    ax_lr, ax_tp, ax_loss = fig.subplots(1, 3)
    groups = sorted({k for r in steps for k in r if k.startswith("lr/")})
    seen: list[list] = []
    for key in groups:
        xs, ys = _series(steps, key, "step")
        if ys in seen:
            continue  # groups with the same schedule (no weight decay on norms and biases): one line
        seen.append(ys)
        ax_lr.plot(xs, ys, label=key[3:])
    ax_lr.set_title("learning rate", fontsize=10)
    if len(seen) > 1:
        ax_lr.legend(fontsize=8)
    xs, ys = _series(steps, "throughput/img_per_s", "step")
    ax_tp.plot(xs, ys, color="tab:purple")
    ax_tp.set_title("throughput (images/s, all ranks, loading included)", fontsize=10)
    xs, ys = _series(steps, "train/loss", "step")
    ax_loss.plot(xs, ys, color="tab:blue", alpha=0.8)
    ax_loss.set_title("train loss (one batch)", fontsize=10)
    for ax in (ax_lr, ax_tp, ax_loss):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    ax_tp.set_ylim(bottom=0)
    return fig
