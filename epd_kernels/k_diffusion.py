"""k-diffusion-style sampler functions for every solver of the package.

    import epd_kernels.k_diffusion as kd
    x0 = kd.sample_heun(model, noise * sigmas[0], sigmas, extra_args={"cond": c}, callback=cb)
    x0 = kd.sample_epd(model, x, sigmas, params=EPDParams.load("p.safetensors"))

k-diffusion's conventions: ``model(x, sigma [B], **extra_args) -> denoised``; ``x`` already
scaled; ``callback`` once per step with ``{"x", "i", "sigma", "sigma_hat", "denoised"}`` (no
churn: ``sigma_hat == sigma``); ``disable`` (None: off unless stderr is a terminal);
``**opts`` are the solver's options (churn options accepted with ``s_churn=0``). A grid
ending in 0 takes the last step as an Euler step to 0, which lands on ``D(x, sigmas[-2])``:
one more call. AFS is off (k-diffusion has none) except from EPD, AMED and D-ODE params."""
from __future__ import annotations

import importlib
import inspect
import math
import sys
from typing import Callable, Dict, Optional

import torch

from .models.conditioning import match_rows
from .solvers.common import denoise

__all__ = ["solver_functions", "check_grid", "BoundModel"]

#: Keywords the wrapper sets itself; never options.
_RESERVED = ("callback", "progress", "return_trajectory", "runner", "params", "plugin",
             "solver")
#: k-diffusion's churn options, accepted for call compatibility when they leave the
#: sampler deterministic.
_CHURN = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}


def check_grid(sigmas) -> torch.Tensor:
    """The grid as a float64 CPU tensor: >= 2 values, strictly decreasing, all > 0 except
    possibly the last, which may be 0. ValueError naming ``sigmas`` otherwise."""
    try:
        s = torch.as_tensor(sigmas.detach() if isinstance(sigmas, torch.Tensor) else sigmas,
                            dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"sigmas must be a 1-D list or tensor of numbers: {e}") from None
    if s.dim() != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {list(s.shape)}")
    if not torch.isfinite(s).all():
        raise ValueError(f"sigmas must be finite, got {s.tolist()}")
    if not (s[:-1] > 0).all() or s[-1] < 0:
        raise ValueError(f"sigmas must be > 0 (the last one may be 0), got {s.tolist()}")
    if not (s[1:] < s[:-1]).all():
        raise ValueError(f"sigmas must be strictly decreasing, got {s.tolist()}")
    return s


class BoundModel:
    """``model(x, sigma, **extra_args)`` as a denoiser ``D(x, sigma)``: the solvers see no
    conditioning keywords (so none can collide with a solver option), and a call on
    ``m * B`` rows gets every ``[B, ...]`` tensor of ``extra_args`` tiled m times."""

    def __init__(self, model: Callable, extra_args: Optional[dict], batch: int):
        if not callable(model):
            raise ValueError("model must be callable: model(x, sigma, **extra_args) -> denoised")
        if extra_args is not None and not isinstance(extra_args, dict):
            raise ValueError(f"extra_args must be a dict or None, got {type(extra_args).__name__}")
        self.model = model
        self.extra_args = dict(extra_args or {})
        self.batch = int(batch)
        self.calls = 0

    def _rows(self, n: int) -> dict:
        if n == self.batch:
            return self.extra_args
        return {k: match_rows(v, n, f"extra_args[{k!r}]")
                if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch
                else v for k, v in self.extra_args.items()}

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model(x, sigma, **self._rows(x.shape[0]))

    def __getattr__(self, name):  # model attributes (shape, num_classes, ...)
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)


def _progress(disable: Optional[bool]) -> bool:
    if disable is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return not disable


def _check_opts(name: str, fn: Callable, opts: dict) -> dict:
    """The options for ``fn``; ValueError for unknown ones and for churn (these are ODE
    solvers)."""
    valid = sorted(p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED)
    out = {}
    for k, v in opts.items():
        if k in _CHURN:
            if k == "s_churn" and float(v) != 0.0:
                raise ValueError(f"sample_{name}: s_churn={v} asks for stochastic churn, which "
                                 f"these ODE solvers do not add; use s_churn=0")
            continue
        if k not in valid:
            raise ValueError(f"sample_{name}: unknown option {k!r}; valid options: "
                             f"{', '.join(valid + sorted(_CHURN))} (conditioning goes in "
                             f"extra_args)")
        out[k] = v
    return out


def _kd_callback(callback: Optional[Callable], sigmas) -> Optional[Callable]:
    """The solvers' callback info in k-diffusion's form."""
    if callback is None:
        return None
    return lambda info: callback({"x": info["x"], "i": info["i"], "sigma": sigmas[info["i"]],
                                  "sigma_hat": sigmas[info["i"]], "denoised": info["denoised"]})


def _run(name: str, fn: Callable, model: Callable, x: torch.Tensor, sigmas,
         extra_args: Optional[dict], callback: Optional[Callable], disable: Optional[bool],
         fixed: dict, opts: dict) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating tensor [B, ...] (noise * sigmas[0])")
    opts = _check_opts(name, fn, opts)
    grid = check_grid(sigmas)
    user_sigmas = sigmas if isinstance(sigmas, torch.Tensor) else grid
    to_zero = float(grid[-1]) == 0.0
    positive = grid[:-1] if to_zero else grid
    denoiser = BoundModel(model, extra_args, x.shape[0])
    progress = _progress(disable)
    report = _kd_callback(callback, user_sigmas)
    with torch.no_grad():
        if positive.numel() >= 2:
            x = fn(denoiser, x, positive, callback=report, progress=progress, **fixed, **opts)
        if to_zero:
            # Euler step to sigma = 0: x + (0 - s) (x - D) / s = D, exactly.
            denoised = denoise(denoiser, x, float(positive[-1]), {})
            if report is not None:
                report({"x": x, "i": grid.numel() - 2, "denoised": denoised})
            x = denoised
    return x


def _make(name: str, module: str, attr: str, fixed: dict, with_params: bool,
          what: str) -> Callable:
    """``sample_<name>``; the solver is imported on first call (the EPD, AMED, D-ODE and
    ParaDiGMS samplers pull in more of the package)."""
    def solver() -> Callable:
        return getattr(importlib.import_module(module, __package__), attr)

    if with_params:
        def sampler(model, x, sigmas=None, extra_args=None, callback=None, disable=None, *,
                    params, **opts):
            if params is None:
                raise ValueError(f"sample_{name} needs params= (distilled or fitted "
                                 f"parameters for this grid)")
            sigmas = params.sigmas if sigmas is None else sigmas
            return _run(name, solver(), model, x, sigmas, extra_args, callback, disable,
                        dict(fixed, params=params), opts)
    else:
        def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
            return _run(name, solver(), model, x, sigmas, extra_args, callback, disable,
                        dict(fixed), opts)

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__module__ = __name__
    needs = ("; needs ``params=`` (``sigmas=None`` uses ``params.sigmas``)" if with_params
             else "")
    sampler.__doc__ = f"{what}, k-diffusion style (module docstring){needs}."
    return sampler


# solver -> (module, function, fixed keywords, takes params, what it is)
_EPD, _AMED = ".solvers.epd", ".solvers.amed"
_SOLVERS = {
    "euler": (".solvers.euler", "sample_euler", {}, False, "Euler (= DDIM), 1 call per step"),
    "ddim": (".solvers.euler", "sample_euler", {}, False, "DDIM, the same as Euler in sigma"),
    "heun": (".solvers.heun", "sample_heun", {}, False, "EDM's Heun, 2 calls per step"),
    "dpm2": (".solvers.dpm2", "sample_dpm2", {}, False, "DPM-Solver-2, 2 calls per step"),
    "dpmpp3m": (".solvers.dpmpp3m", "sample_dpmpp3m", {}, False, "DPM-Solver++(3M)"),
    "unipc": (".solvers.unipc", "sample_unipc", {}, False, "UniPC (bh2, order 3)"),
    "ipndm": (".solvers.ipndm", "sample_ipndm", {}, False, "iPNDM (Adams-Bashforth, order 4)"),
    "deis": (".solvers.deis", "sample_deis", {}, False, "DEIS (tAB, order 3)"),
    "paradigms": (".solvers.paradigms", "paradigms_sampler", {}, False,
                  "ParaDiGMS (Picard iterations on a finer grid)"),
    "epd": (_EPD, "epd_sampler", {"plugin": False}, True, "EPD-Solver with `EPDParams`"),
    "epd-ipndm": (_EPD, "epd_sampler", {"plugin": True}, True, "EPD-Plugin with `EPDParams`"),
    "amed": (_AMED, "amed_sampler", {"plugin": False}, True, "AMED-Solver with `AMEDParams`"),
    "amed-ipndm": (_AMED, "amed_sampler", {"plugin": True}, True, "AMED-Plugin with `AMEDParams`"),
}
_SOLVERS.update({name: (".solvers.dode", "dode_sampler", {"solver": solver}, True,
                        f"D-ODE {base} with fitted `DODEParams`")
                 for name, solver, base in (("d-euler", "d-euler", "Euler"),
                                            ("d-ddim", "d-euler", "DDIM (= Euler)"),
                                            ("d-heun", "d-heun", "Heun"),
                                            ("d-ipndm", "d-ipndm", "iPNDM"))})
_FUNCTIONS: Dict[str, Callable] = {solver: _make(solver.replace("-", "_"), *row)
                                   for solver, row in _SOLVERS.items()}
# sample_euler, sample_heun, ..., sample_d_ipndm: one module-level function per solver
globals().update({fn.__name__: fn for fn in _FUNCTIONS.values()})
__all__ += [fn.__name__ for fn in _FUNCTIONS.values()]


def solver_functions() -> Dict[str, Callable]:
    """``{solver name: sample_<name>}`` for every solver (``-`` is ``_`` in function names)."""
    return dict(_FUNCTIONS)


#: k-diffusion's name for DPM-Solver-2 (the same method, with an Euler step to a final 0).
sample_dpm_2 = _FUNCTIONS["dpm2"]
__all__.append("sample_dpm_2")
