"""k-diffusion-style sampler functions for every solver of the package.

    import epd_kernels.k_diffusion as kd
    x = noise * sigmas[0]
    x0 = kd.sample_heun(model, x, sigmas, extra_args={"cond": c}, callback=cb, disable=True)
    x0 = kd.sample_epd(model, x, sigmas, params=EPDParams.load("p.safetensors"))

The conventions are k-diffusion's (the signature that ComfyUI-like tools call):

* ``model(x, sigma [B], **extra_args) -> denoised`` in EDM's ``x = x0 + sigma n``;
* ``x`` is the starting state, already scaled (``noise * sigmas[0]``);
* ``sigmas`` is a decreasing grid that may end in 0 (k-diffusion's ``get_sigmas_karras``
  appends one); every other value must be > 0;
* ``callback`` is called once per step with ``{"x", "i", "sigma", "sigma_hat",
  "denoised"}``: the state at the start of step ``i``, ``sigmas[i]``, ``sigma_hat`` (equal
  to ``sigma``: these solvers add no churn) and the denoised estimate at that state. (It is
  called when the step is done, with the step's starting values.)
* ``disable`` turns the progress bar off (None: off unless stderr is a terminal, as tqdm
  does); ``**opts`` are the solver's options (``afs``, ``max_order``, ``variant``, ...), a
  ValueError lists the valid ones. k-diffusion's churn options ``s_churn``, ``s_tmin``,
  ``s_tmax``, ``s_noise`` are accepted with ``s_churn=0`` (the deterministic sampler).

A grid ending in 0 is handled the way k-diffusion does: the solver runs on the positive
part ``sigmas[:-1]``, and the last step, from ``sigmas[-2]`` to 0, is an Euler step, which
to sigma = 0 lands exactly on the denoised estimate ``D(x, sigmas[-2])``: one denoiser
call, counted in the NFE. So a grid of N steps ending in 0 costs the solver's NFE for
N - 1 steps plus 1: Euler N, Heun and DPM-Solver-2 2N - 1 (as in k-diffusion, whose
``sample_heun`` / ``sample_dpm_2`` also take a plain Euler step to 0), EPD with AFS
2(N - 1) - 1 + 1. A grid ending above 0 runs the solver on all of it (no extra call).

The analytic first step is off by default here (``afs=False``, as k-diffusion has none);
EPD, AMED and D-ODE take it from their params. The solvers are the package's own functions
(`epd_kernels.solvers`), run under ``torch.no_grad()``.

Conditioning: ``extra_args`` is bound to the model and passed on every call. In EPD's
branch call (``K*B`` rows) each tensor in ``extra_args`` whose leading dimension is the
batch ``B`` is tiled K times, branch after branch (as `epd_kernels.branches.repeat_cond`
does for `sample`); other values are passed unchanged.
"""
from __future__ import annotations

import inspect
import math
import sys
from typing import Callable, Dict, Optional

import torch

from .solvers.deis import sample_deis as _deis
from .solvers.dpm2 import sample_dpm2 as _dpm2
from .solvers.dpmpp3m import sample_dpmpp3m as _dpmpp3m
from .solvers.euler import sample_euler as _euler
from .solvers.heun import sample_heun as _heun
from .solvers.ipndm import sample_ipndm as _ipndm
from .solvers.unipc import sample_unipc as _unipc

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
        m, rem = divmod(n, self.batch)
        out = {}
        for k, v in self.extra_args.items():
            if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == self.batch:
                if rem:
                    raise ValueError(f"extra_args[{k!r}] has {self.batch} rows, which cannot "
                                     f"follow a call of {n} rows")
                v = torch.cat([v] * m, 0)
            out[k] = v
        return out

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


def _option_names(fn: Callable) -> list:
    sig = inspect.signature(fn)
    return sorted(p.name for p in sig.parameters.values()
                  if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED)


def _check_opts(name: str, fn: Callable, opts: dict) -> dict:
    """The options for ``fn``; ValueError for unknown ones (listing the valid ones) and
    for churn (stochastic sampling is not what these solvers do)."""
    valid = _option_names(fn)
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
    if callback is None:
        return None

    def cb(info):
        sigma = sigmas[info["i"]]
        callback({"x": info["x"], "i": info["i"], "sigma": sigma, "sigma_hat": sigma,
                  "denoised": info["denoised"]})

    return cb


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
    with torch.no_grad():
        if positive.numel() >= 2:
            x = fn(denoiser, x, positive, callback=_kd_callback(callback, user_sigmas),
                   progress=progress, **fixed, **opts)
        if to_zero:
            # Euler step to sigma = 0: x + (0 - s) (x - D) / s = D, exactly.
            s = float(positive[-1])
            sig = torch.full((x.shape[0],), s, dtype=torch.float64 if x.dtype == torch.float64
                             else torch.float32, device=x.device)
            denoised = denoiser(x, sig).to(x.dtype)
            if callback is not None:
                i = grid.numel() - 2
                callback({"x": x, "i": i, "sigma": user_sigmas[i], "sigma_hat": user_sigmas[i],
                          "denoised": denoised})
            x = denoised
    return x


def _lazy(module: str, attr: str) -> Callable:
    """A loader importing ``module.attr`` on first use (the EPD, AMED, D-ODE and ParaDiGMS
    samplers pull in more of the package)."""
    def load():
        import importlib

        return getattr(importlib.import_module(module, __package__), attr)

    return load


def _now(fn: Callable) -> Callable:
    return lambda: fn


def _make(name: str, loader: Callable, fixed: dict, with_params: bool, what: str) -> Callable:
    if with_params:
        def sampler(model, x, sigmas=None, extra_args=None, callback=None, disable=None, *,
                    params, **opts):
            if params is None:
                raise ValueError(f"sample_{name} needs params= (distilled or fitted "
                                 f"parameters for this grid)")
            fn = loader()
            if sigmas is None:
                sigmas = params.sigmas
            return _run(name, fn, model, x, sigmas, extra_args, callback, disable,
                        dict(fixed, params=params), opts)
    else:
        def sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, **opts):
            return _run(name, loader(), model, x, sigmas, extra_args, callback, disable,
                        dict(fixed), opts)

    sampler.__name__ = sampler.__qualname__ = f"sample_{name}"
    sampler.__module__ = __name__
    sampler.__doc__ = (
        f"{what}, k-diffusion style (module docstring).\n\n"
        f"``sample_{name}(model, x, sigmas, extra_args=None, callback=None, disable=None"
        f"{', *, params' if with_params else ''}, **opts)``; ``sigmas`` may end in 0 (the "
        f"last step is then a plain denoise, one call)."
        + (" ``sigmas=None`` uses ``params.sigmas``; otherwise its positive part must be "
           "the params' grid." if with_params else ""))
    return sampler


def solver_functions() -> Dict[str, Callable]:
    """``{solver name: sample_<name>}`` for every solver (the names of `epd_kernels.sample`;
    in the function names ``-`` is written ``_``)."""
    return dict(_FUNCTIONS)


_FUNCTIONS: Dict[str, Callable] = {}


def _register(solver: str, loader: Callable, what: str, fixed: Optional[dict] = None,
              with_params: bool = False) -> Callable:
    fn = _make(solver.replace("-", "_"), loader, fixed or {}, with_params, what)
    _FUNCTIONS[solver] = fn
    __all__.append(fn.__name__)
    return fn


sample_euler = _register("euler", _now(_euler), "Euler (= DDIM), first order, 1 call per step")
sample_ddim = _register("ddim", _now(_euler), "DDIM, the same as Euler in sigma")
sample_heun = _register("heun", _now(_heun), "EDM's Heun, second order, 2 calls per step")
sample_dpm2 = _register("dpm2", _now(_dpm2),
                        "DPM-Solver-2 (midpoint in log sigma), 2 calls per step")
sample_dpmpp3m = _register("dpmpp3m", _now(_dpmpp3m),
                           "DPM-Solver++(3M), multistep, 1 call per step")
sample_unipc = _register("unipc", _now(_unipc), "UniPC (bh2, order 3), 1 call per step")
sample_ipndm = _register("ipndm", _now(_ipndm),
                         "iPNDM (Adams-Bashforth up to order 4), 1 call per step")
sample_deis = _register("deis", _now(_deis), "DEIS (tAB, order 3), 1 call per step")
sample_paradigms = _register("paradigms", _lazy(".solvers.paradigms", "paradigms_sampler"),
                             "ParaDiGMS (Picard iterations on a finer grid), 1 batched round "
                             "per step")
sample_epd = _register("epd", _lazy(".solvers.epd", "epd_sampler"),
                       "EPD-Solver with distilled `EPDParams`, 2 calls per step (the K branches "
                       "in one)", {"plugin": False}, True)
sample_epd_ipndm = _register("epd-ipndm", _lazy(".solvers.epd", "epd_sampler"),
                             "EPD-Plugin on iPNDM with distilled `EPDParams`", {"plugin": True},
                             True)
sample_amed = _register("amed", _lazy(".solvers.amed", "amed_sampler"),
                        "AMED-Solver with `AMEDParams`, 2 calls per step", {"plugin": False},
                        True)
sample_amed_ipndm = _register("amed-ipndm", _lazy(".solvers.amed", "amed_sampler"),
                              "AMED-Plugin on iPNDM with `AMEDParams`", {"plugin": True}, True)
sample_d_euler = _register("d-euler", _lazy(".solvers.dode", "dode_sampler"),
                           "D-ODE Euler with fitted `DODEParams`", {"solver": "d-euler"}, True)
sample_d_ddim = _register("d-ddim", _lazy(".solvers.dode", "dode_sampler"),
                          "D-ODE DDIM (= D-ODE Euler) with fitted `DODEParams`",
                          {"solver": "d-euler"}, True)
sample_d_heun = _register("d-heun", _lazy(".solvers.dode", "dode_sampler"),
                          "D-ODE Heun with fitted `DODEParams`", {"solver": "d-heun"}, True)
sample_d_ipndm = _register("d-ipndm", _lazy(".solvers.dode", "dode_sampler"),
                           "D-ODE iPNDM with fitted `DODEParams`", {"solver": "d-ipndm"}, True)

#: k-diffusion's name for DPM-Solver-2 (the same method: midpoint in log sigma, and an
#: Euler step to a final 0).
sample_dpm_2 = sample_dpm2
__all__.append("sample_dpm_2")
