"""Shared plotting helpers for the benchmark sections (matplotlib, headless).

Every helper returns the written path, or None when matplotlib is not installed (the
sections still write their JSON; the PNG is optional).
"""
from __future__ import annotations

import pathlib
from typing import Dict, List, Optional, Sequence

__all__ = ["have_matplotlib", "pyplot", "size_label", "line_panels", "error_panels"]


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def size_label(n: int) -> str:
    """4194304 -> '4M', 65536 -> '64K', 1000 -> '1000'."""
    for div, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


# One colour per implementation, one line style per series variant (e.g. K).
_COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "x"]


def line_panels(path: pathlib.Path, panels: Sequence[dict], *, title: str = "",
                xlog2: bool = True, ncols: Optional[int] = None) -> Optional[pathlib.Path]:
    """A grid of line plots.

    Each panel: {"title", "xlabel", "ylabel", "series": [{"label", "x", "y", "group",
    "variant"}], "hlines": [{"y", "label"}]}. `group` picks the colour (e.g. the
    implementation), `variant` the line style and marker (e.g. K).
    """
    if not have_matplotlib():
        return None
    plt = pyplot()
    n = len(panels)
    ncols = ncols or min(n, 2)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), squeeze=False)
    groups: Dict[str, int] = {}
    variants: Dict[str, int] = {}
    for p in panels:
        for s in p["series"]:
            groups.setdefault(str(s.get("group", s["label"])), len(groups))
            variants.setdefault(str(s.get("variant", "")), len(variants))
    for i, p in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        xs_all: List[int] = []
        for s in p["series"]:
            gi = groups[str(s.get("group", s["label"]))]
            vi = variants[str(s.get("variant", ""))]
            ax.plot(s["x"], s["y"], label=s["label"], color=_COLORS[gi % len(_COLORS)],
                    linestyle=_STYLES[vi % len(_STYLES)], marker=_MARKERS[vi % len(_MARKERS)],
                    markersize=4, linewidth=1.4)
            xs_all.extend(s["x"])
        for j, hl in enumerate(p.get("hlines", [])):
            ax.axhline(hl["y"], color="black", linestyle=_STYLES[j % len(_STYLES)],
                       linewidth=1.0, alpha=0.7, label=hl["label"])
        if xlog2 and xs_all:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(xs_all))
            ax.set_xticks(ticks)
            ax.set_xticklabels([size_label(int(t)) for t in ticks])
            ax.minorticks_off()
        elif xs_all and all(float(v).is_integer() for v in xs_all):
            ax.set_xticks(sorted(set(int(v) for v in xs_all)))  # counts (e.g. K): no 2.5
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save_grid(plt, fig, axes, n, title, path)


def error_panels(path: pathlib.Path, panels: Sequence[dict], *, title: str = "",
                 ncols: Optional[int] = None) -> Optional[pathlib.Path]:
    """A grid of error-vs-NFE plots on a log error axis.

    Each panel: {"title", "xlabel", "ylabel", "series": [{"label", "x", "y"}] (lines, one
    colour each), "points": [{"label", "x", "y"}] (large black markers, e.g. the distilled
    solver), optional "ylim": (bottom, top)}. Non-positive or non-finite errors are left
    out (they have no log).
    """
    if not have_matplotlib():
        return None
    import math

    plt = pyplot()
    n = len(panels)
    ncols = ncols or min(n, 3)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
    colors = _COLORS + ["tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
    ok = lambda x, y: [(a, b) for a, b in zip(x, y)  # noqa: E731
                       if b is not None and math.isfinite(b) and b > 0]
    for i, p in enumerate(panels):
        ax = axes[i // ncols][i % ncols]
        for j, s in enumerate(p["series"]):
            pts = ok(s["x"], s["y"])
            ax.plot([a for a, _ in pts], [b for _, b in pts], label=s["label"],
                    color=colors[j % len(colors)], marker=_MARKERS[j % len(_MARKERS)],
                    markersize=2.5, linewidth=1.2)
        for j, s in enumerate(p.get("points", [])):
            pts = ok(s["x"], s["y"])
            ax.plot([a for a, _ in pts], [b for _, b in pts], linestyle="none",
                    marker=("*", "X", "d", "P")[j % 4], markersize=11, color="black", label=s["label"])
        ax.set_yscale("log")
        if p.get("ylim"):
            ax.set_ylim(*p["ylim"])
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return _save_grid(plt, fig, axes, n, title, path)


def _save_grid(plt, fig, axes, n: int, title: str, path) -> pathlib.Path:
    """Blanks the unused cells of a panel grid, titles and writes the figure."""
    nrows, ncols = len(axes), len(axes[0])
    for j in range(n, nrows * ncols):
        axes[j // ncols][j % ncols].axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
