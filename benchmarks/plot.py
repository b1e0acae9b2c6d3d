"""Panel grids for the benchmark sections (matplotlib, headless). Each grid helper returns
the written path, or None when matplotlib is not installed (the PNG is optional)."""
from __future__ import annotations

import math
import pathlib
from typing import Dict, Optional, Sequence

__all__ = ["size_label", "line_panels", "error_panels"]

# One colour per implementation, one line style per series variant (e.g. K).
_COLORS = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "x"]


def size_label(n: int) -> str:
    """4194304 -> '4M', 65536 -> '64K', 1000 -> '1000'."""
    for div, suffix in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= div and n % div == 0:
            return f"{n // div}{suffix}"
    return str(n)


def _grid(path, panels: Sequence[dict], draw, *, title: str, ncols: int, width: float):
    """Draws ``draw(ax, panel)`` in a grid of ``ncols`` columns, labels each panel from its
    "title", "xlabel", "ylabel", blanks the unused cells and writes the figure."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)  # headless
    import matplotlib.pyplot as plt

    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, 4.4 * nrows), squeeze=False)
    cells = [ax for row in axes for ax in row]
    for ax, p in zip(cells, panels):
        draw(ax, p)
        ax.set_title(p.get("title", ""))
        ax.set_xlabel(p.get("xlabel", ""))
        ax.set_ylabel(p.get("ylabel", ""))
        ax.legend(fontsize=7, ncol=2)
    for ax in cells[len(panels):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def line_panels(path: pathlib.Path, panels: Sequence[dict], *, title: str = "",
                xlog2: bool = True, ncols: Optional[int] = None) -> Optional[pathlib.Path]:
    """A grid of line plots. Each panel: {"title", "xlabel", "ylabel", "series": [{"label",
    "x", "y", "group", "variant"}], "hlines": [{"y", "label"}]}. `group` picks the colour
    (e.g. the implementation), `variant` the line style and marker (e.g. K)."""
    groups: Dict[str, int] = {}
    variants: Dict[str, int] = {}
    for p in panels:
        for s in p["series"]:
            groups.setdefault(str(s.get("group", s["label"])), len(groups))
            variants.setdefault(str(s.get("variant", "")), len(variants))

    def draw(ax, p):
        xs = [x for s in p["series"] for x in s["x"]]
        for s in p["series"]:
            gi = groups[str(s.get("group", s["label"]))]
            vi = variants[str(s.get("variant", ""))]
            ax.plot(s["x"], s["y"], label=s["label"], color=_COLORS[gi % len(_COLORS)],
                    linestyle=_STYLES[vi % len(_STYLES)], marker=_MARKERS[vi % len(_MARKERS)],
                    markersize=4, linewidth=1.4)
        for j, hl in enumerate(p.get("hlines", [])):
            ax.axhline(hl["y"], color="black", linestyle=_STYLES[j % len(_STYLES)],
                       linewidth=1.0, alpha=0.7, label=hl["label"])
        if xlog2 and xs:
            ax.set_xscale("log", base=2)
            ticks = sorted(set(xs))
            ax.set_xticks(ticks)
            ax.set_xticklabels([size_label(int(t)) for t in ticks])
            ax.minorticks_off()
        elif xs and all(float(v).is_integer() for v in xs):
            ax.set_xticks(sorted(set(int(v) for v in xs)))  # counts (e.g. K): no 2.5
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)

    return _grid(path, panels, draw, title=title, ncols=ncols or min(len(panels), 2),
                 width=6.2)


def error_panels(path: pathlib.Path, panels: Sequence[dict], *, title: str = "",
                 ncols: Optional[int] = None) -> Optional[pathlib.Path]:
    """A grid of error-vs-NFE plots on a log error axis. Each panel: {"title", "xlabel",
    "ylabel", "series": [{"label", "x", "y", optional "linestyle"}] (lines, one colour each),
    "points": [{"label", "x", "y"}] (large black markers, e.g. the distilled solver),
    optional "ylim": (bottom, top) and "xticks"}. Errors <= 0 or not finite are left out."""
    def finite(s):
        pts = [(a, b) for a, b in zip(s["x"], s["y"])
               if b is not None and math.isfinite(b) and b > 0]
        return [a for a, _ in pts], [b for _, b in pts]

    def draw(ax, p):
        for j, s in enumerate(p["series"]):
            ax.plot(*finite(s), linestyle=s.get("linestyle", "-"), label=s["label"],
                    color=_COLORS[j % len(_COLORS)], marker=_MARKERS[j % len(_MARKERS)],
                    markersize=2.5, linewidth=1.2)
        for j, s in enumerate(p.get("points", [])):
            ax.plot(*finite(s), linestyle="none", marker=("*", "X", "d", "P")[j % 4],
                    markersize=11, color="black", label=s["label"])
        ax.set_yscale("log")
        if p.get("ylim"):
            ax.set_ylim(*p["ylim"])
        if p.get("xticks"):
            ax.set_xticks(list(p["xticks"]))
        ax.grid(True, which="both", alpha=0.3)

    return _grid(path, panels, draw, title=title, ncols=ncols or min(len(panels), 3),
                 width=5.6)
