"""Never silently worse: the distilled solver against the baselines on held-out noise.

After training, `compare` samples ``draws`` held-out noises (seeds ``HELD_OUT_SEED_BASE +
i``) with a reference (UniPC, `budget.REFERENCE_STEPS` steps, no AFS, polynomial rho = 7
grid with the distilled grid's ends), every baseline of `BASELINES` that can spend exactly
the same latency NFE on that grid, the distilled params and their start (``init=`` or the
neutral one), scored by the global RMSE `RMSE_DEFINITION`, into ``params.meta["comparison"]``.
A `UserWarning` names the best baseline when the distilled solver lost to it; for EPD, a
start better on these draws is returned instead (``meta["comparison"]["kept"] = "init"``).

The record also says how much of the error a few draws carry (`outlier_draws`, for the
result and the best baseline): on data with well separated modes a draw near a boundary
can end in another mode, and a handful of such draws can carry all of a solver's squared
error (the 768-dim mixture of benchmarks/bench_distill.py at NFE 9: 8 of 1024 draws, 100 %).
The warning then says so, since the loss is then a matter of those draws, not of the rest.
"""
from __future__ import annotations

import math
import warnings

import torch

from ..noise import make_noise
from ..solvers.registry import nfe_to_steps
from ..sampling import sample
from .budget import REFERENCE_STEPS, _cycle

__all__ = ["compare", "BASELINES", "HELD_OUT_SEED_BASE", "RMSE_DEFINITION", "OUTLIER_FACTOR",
           "draw_errors", "outlier_draws"]

#: Baseline solvers the result is compared with (those that can meet the NFE).
BASELINES = ("euler", "ipndm", "dpmpp3m", "unipc", "deis", "heun", "dpm2")
#: Per-sample seeds of the held-out noise: far from users' small seeds, from the grid
#: search's validation seeds (3 * 2^40 + ...) and from D-ODE's fitting seeds (2^40 + ...).
HELD_OUT_SEED_BASE = 5 * 2 ** 40
RMSE_DEFINITION = "global RMS over all elements of the batch: sqrt(mean((x - ref)^2))"
_CHUNK = 256
#: A draw whose RMSE exceeds this multiple of the median draw's is an outlier.
OUTLIER_FACTOR = 10.0
#: Share of the squared error above which the warning blames the outlier draws.
_OUTLIER_SHARE = 0.5


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return _rmse_of((x.to(torch.float64) - ref.to(torch.float64)).pow(2))


def draw_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-draw mean squared error ``[N]`` (float64; inf where not finite). Every draw has
    as many elements, so the global RMSE is ``sqrt(mean(draw_errors))``."""
    sq = (x.to(torch.float64) - ref.to(torch.float64)).pow(2).flatten(1).mean(1)
    return torch.where(torch.isfinite(sq), sq, torch.full_like(sq, math.inf))


def outlier_draws(sq: torch.Tensor) -> dict:
    """How much of the error a few draws carry, from `draw_errors` ``sq``: ``outliers``
    (draws whose RMSE exceeds `OUTLIER_FACTOR` times the median draw's), ``draws``,
    ``share`` (their part of the summed squared error) and ``rmse_without`` (the global
    RMSE of the other draws; None if there are none)."""
    out = sq > OUTLIER_FACTOR ** 2 * sq.median()
    total = float(sq.sum())
    share = float(sq[out].sum()) / total if 0 < total < math.inf else float(out.any())
    rest = sq[~out]
    return dict(outliers=int(out.sum()), draws=int(sq.numel()), share=share,
                rmse_without=_json(float(rest.mean().sqrt())) if rest.numel() else None)


def _rmse_of(sq: torch.Tensor) -> float:
    """sqrt(mean(sq)) of squared errors (per element or per draw), inf if not finite."""
    v = float(sq.mean().sqrt())
    return v if math.isfinite(v) else math.inf


@torch.no_grad()
def _run(denoiser, noise, cond, **kw) -> torch.Tensor:
    n = noise.shape[0]
    return torch.cat([sample(denoiser, noise[a:a + _CHUNK], **kw,
                             **_cycle(cond, min(n, a + _CHUNK) - a))
                      for a in range(0, n, _CHUNK)])


def _neutral_start(params, s):
    """The params the run started from: ``s.init`` or the neutral start on the grid."""
    if s.init is not None:
        return s.init.detach()
    from ..params import EPDParams

    return EPDParams.init(params.sigmas, params.num_points, afs=params.afs,
                          plugin=params.plugin, max_order=params.max_order,
                          schedule=params.schedule)


def _baselines(nfe: int) -> list:
    ok = []
    for name in BASELINES:
        try:
            nfe_to_steps(name, nfe)
        except ValueError:
            continue
        ok.append(name)
    return ok


def compare(denoiser, params, s, cond: dict, draws: int, device):
    """``(params, record)``: the params to return (the trained ones or, for EPD, their
    start when that is better on the held-out draws) with ``meta["comparison"]``."""
    noise = make_noise(range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + draws), s.shape,
                       device=device, dtype=s.dtype)
    lo, hi = float(params.sigmas[-1]), float(params.sigmas[0])
    grid = {"kind": "polynomial", "rho": 7.0, "sigma_min": lo, "sigma_max": hi}
    names = _baselines(s.nfe)
    bar = progress_bar(s.progress, len(names) + 3, "held-out comparison", "solver")
    try:
        ref = _run(denoiser, noise, cond, solver="unipc", nfe=REFERENCE_STEPS, afs=False,
                   schedule=grid)
        _tick(bar)
        errors = {}   # per-draw squared errors by solver name, "trained" and "init"
        for name in names:
            errors[name] = draw_errors(_run(denoiser, noise, cond, solver=name, nfe=s.nfe,
                                            schedule=grid), ref)
            _tick(bar)
        errors["trained"] = draw_errors(_run(denoiser, noise, cond, solver=params.solver,
                                             nfe=None, params=params), ref)
        _tick(bar)
        start = None
        if s.method == "epd":
            start = _neutral_start(params, s)
            errors["init"] = draw_errors(_run(denoiser, noise, cond, solver=start.solver,
                                              nfe=None, params=start), ref)
        _tick(bar)
    finally:
        if bar is not None:
            bar.close()
    return _verdict(params, start, s, errors, names, draws, f"[{hi:g}, {lo:g}]")


def _verdict(params, start, s, errors: dict, names: list, draws: int, span: str):
    """`compare`'s decision, record and warnings from the per-draw errors."""
    scores = {name: _rmse_of(errors[name]) for name in names}
    trained = _rmse_of(errors["trained"])
    start_rmse = _rmse_of(errors["init"]) if "init" in errors else None
    kept = "init" if start_rmse is not None and start_rmse < trained else "trained"
    result = params
    if kept == "init":
        result = start.detach()
        result.meta = dict(params.meta)
    best = min(scores, key=scores.get) if scores else None
    final = start_rmse if kept == "init" else trained
    tails = {"result": outlier_draws(errors["init" if kept == "init" else "trained"])}
    if best is not None:
        tails["best_baseline"] = outlier_draws(errors[best])
    record = {"rmse": _json(final), "trained_rmse": _json(trained),
              "init_rmse": _json(start_rmse), "kept": kept,
              "baselines": {k: _json(v) for k, v in scores.items()}, "best_baseline": best,
              "ratio": _json(final / scores[best]) if best and scores[best] > 0 else None,
              "draws": draws, "seeds": [HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + draws - 1],
              "reference": f"unipc, no AFS, {REFERENCE_STEPS} steps, polynomial rho 7 {span}",
              "rmse_definition": RMSE_DEFINITION, "outlier_draws": tails,
              "outlier_definition": f"draws whose RMSE exceeds {OUTLIER_FACTOR:g}x the "
                                    f"median draw's"}
    result.meta["comparison"] = record
    if kept == "init":
        warnings.warn(f"distill: the trained params were worse on {draws} held-out draws than "
                      f"the params they started from (RMSE {trained:.4g} vs "
                      f"{start_rmse:.4g}); returning the start", UserWarning, stacklevel=5)
    if best is not None and final >= scores[best]:
        warnings.warn(f"distill: the distilled {result.solver} at NFE {s.nfe} lost to the "
                      f"baseline {best!r} on {draws} held-out draws (RMSE {final:.4g} vs "
                      f"{scores[best]:.4g}){_outlier_text(tails['result'])}; sample with "
                      f"solver={best!r} or distil longer (time_budget_s, schedule='auto')",
                      UserWarning, stacklevel=5)
    return result, record


def _outlier_text(t: dict) -> str:
    """The warning's clause on outlier draws, when they carry most of the error."""
    if not t["outliers"] or t["share"] <= _OUTLIER_SHARE:
        return ""
    without = "" if t["rmse_without"] is None else f", {t['rmse_without']:.4g} without them"
    return (f"; {t['outliers']} of {t['draws']} draws carry {t['share']:.0%} of its squared "
            f"error{without} (on data with separated modes, draws that end in another mode; "
            f"a larger NFE makes them rarer)")


def _json(v):
    return None if v is None or not math.isfinite(v) else float(v)


def progress_bar(progress: bool, total: int, desc: str, unit: str):
    """A tqdm bar, or None without ``progress``."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def _tick(bar):
    if bar is not None:
        bar.update(1)
