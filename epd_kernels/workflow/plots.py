"""Figures of a solver comparison (PNG files): a grid of samples and an error-vs-NFE plot.

matplotlib (a dependency; Agg backend) is imported lazily. Where it is missing all the
same, the grid is written without labels and the plot is skipped: both return False.
"""
from __future__ import annotations

import io
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..fileio import write_atomic
from .outputs import image_layout, png_bytes, to_uint8_image

__all__ = ["sample_grid_png", "error_plot_png"]


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path, dpi: int) -> bool:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
    return True


def cell_image(samples: np.ndarray, shape: Sequence[int], scale: int, gap: int = 2) -> np.ndarray:
    """Samples ``[n, *shape]`` side by side as one uint8 image (grey gaps between)."""
    tiles = [to_uint8_image(s, shape, scale) for s in samples]
    sep = np.full((tiles[0].shape[0], gap) + tiles[0].shape[2:], 150, np.uint8)
    return np.concatenate([part for t in tiles for part in (sep, t)][1:], axis=1)


def sample_grid_png(path, cells: Mapping[Tuple[str, int], np.ndarray], rows: Sequence[str],
                    nfes: Sequence[int], shape: Sequence[int],
                    reference: Optional[np.ndarray] = None, title: str = "",
                    scale: Optional[int] = None) -> bool:
    """Writes the grid: rows = solvers, columns = NFE, ``cells[(solver, nfe)]`` ``[n, *shape]``
    arrays in [-1, 1] upscaled by pixel repetition ("n/a" where missing). ValueError when the
    samples are not image-shaped (see `outputs.image_layout`)."""
    layout = image_layout(shape)
    if layout is None:
        raise ValueError(f"samples of shape {list(shape)} cannot be drawn as images")
    scale = max(1, 48 // max(layout[:2])) if scale is None else int(scale)
    names = (["reference"] if reference is not None else []) + list(rows)
    imgs: Dict[Tuple[str, int], np.ndarray] = {}
    for r in names:
        for n in nfes:
            arr = reference if r == "reference" else cells.get((r, n))
            if arr is not None and len(arr):
                imgs[(r, n)] = cell_image(np.asarray(arr), shape, scale)
    if not imgs:
        raise ValueError("nothing to draw")
    some = next(iter(imgs.values()))
    ch, cw = some.shape[:2]
    rgb = some.ndim == 3
    # the whole grid as one pixel-exact canvas: no resampling of the upscaled samples
    col_gap, row_gap = 16, 6
    H = len(names) * ch + (len(names) - 1) * row_gap
    W = len(nfes) * cw + (len(nfes) - 1) * col_gap
    canvas = np.full((H, W, 3) if rgb else (H, W), 255, np.uint8)
    missing = []
    for i, r in enumerate(names):
        for j, n in enumerate(nfes):
            y, x = i * (ch + row_gap), j * (cw + col_gap)
            img = imgs.get((r, n))
            canvas[y:y + ch, x:x + cw] = 235 if img is None else img
            if img is None:
                missing.append((y, x))

    plt = _pyplot()
    if plt is None:
        write_atomic(path, png_bytes(canvas))
        return False
    dpi = 100
    left, top, right, bottom = 100, 48 if title else 28, 8, 8
    fw, fh = left + W + right, top + H + bottom
    fig = plt.figure(figsize=(fw / dpi, fh / dpi), dpi=dpi)
    fig.figimage(canvas, xo=left, yo=bottom, cmap=None if rgb else "gray", vmin=0, vmax=255,
                 origin="upper")

    def at(px, py):  # canvas pixel (x right, y down) -> figure fraction
        return (left + px) / fw, 1.0 - (top + py) / fh

    for i, r in enumerate(names):
        fig.text(*at(-8, i * (ch + row_gap) + ch / 2), r, ha="right", va="center", fontsize=9)
    for j, n in enumerate(nfes):
        fig.text(*at(j * (cw + col_gap) + cw / 2, -6), f"NFE {n}", ha="center", va="bottom",
                 fontsize=10)
    for y, x in missing:
        fig.text(*at(x + cw / 2, y + ch / 2), "n/a", ha="center", va="center", fontsize=9,
                 color="0.45")
    if title:
        fig.text(0.5, 1.0 - 6 / fh, title, ha="center", va="top", fontsize=10)
    return _save(plt, fig, path, dpi)


def error_plot_png(path, series: Mapping[str, Sequence[Tuple[int, float]]],
                   distilled: Sequence[str] = (), title: str = "",
                   ylabel: str = "global RMSE to reference") -> bool:
    """Writes the RMSE-vs-NFE plot (distilled solvers dashed);
    ``series[solver] = [(nfe, rmse), ...]``."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    markers = "osD^v<>pPhX*"
    base_colors = plt.get_cmap("tab10").colors
    strong = ["black", "crimson", "darkgreen", "darkviolet", "saddlebrown", "navy"]
    nb = nd = 0
    ticks = set()
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted((int(n), float(e)) for n, e in pts if e is not None and e > 0)
        if not pts:
            continue
        xs, ys = zip(*pts)
        ticks.update(xs)
        if name in distilled:   # dashed, in a strong colour
            color, nd, style = strong[nd % len(strong)], nd + 1, ("--", 1.8)
        else:
            color, nb, style = base_colors[nb % len(base_colors)], nb + 1, ("-", 1.2)
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=color, linestyle=style[0],
                linewidth=style[1], label=name)
    ax.set_yscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks))
    ax.set_xlabel("latency NFE (sequential denoiser calls)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path, 100)
