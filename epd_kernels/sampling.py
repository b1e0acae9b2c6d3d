"""`sample()`: one entry point for every solver, with exact NFE accounting.

    x0 = sample(denoiser, noise, solver="ipndm", nfe=5, **cond)
    x0, stats = sample(denoiser, noise, solver="epd", nfe=5, params=p, return_stats=True)

``nfe`` is the *latency* budget: the number of sequential denoiser calls. It is mapped to
a number of steps N per solver, exactly, and a budget a solver cannot meet is refused:

    solver                                  latency NFE            valid budgets
    euler/ddim, ipndm, dpmpp3m, unipc, deis N       (afs=False)    1, 2, 3, ...
                                            N - 1   (afs=True)     1, 2, 3, ...
    heun, dpm2                              2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...
    epd, epd-ipndm                          2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...
    amed, amed-ipndm                        2N - 1  (afs=True)     1, 3, 5, 7, ...  (default)
                                            2N      (afs=False)    2, 4, 6, ...

(``afs``: analytic first step, the first gradient ``x / sqrt(1 + sigma_0^2)`` costs no
call.) EPD also evaluates K branches per step in one batched call, so its *total*
evaluations are ``(K + 1) N - afs``; AMED's two calls per step are both sequential, so
its total evaluations equal its latency NFE. `SampleStats` reports both numbers, measured
by `CountingDenoiser` around the user's denoiser, not computed from the formula.

Noise: ``noise ~ N(0, I)`` of shape ``[B, ...]`` is scaled by ``sigmas[0]``; the result is
the state at ``sigmas[-1] = sigma_min`` (no extra denoising call). Use `make_noise` for
per-seed noise that does not depend on the batch size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import numbers
import time
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .solvers import schedules as _schedules
from .solvers.deis import sample_deis
from .solvers.dpm2 import sample_dpm2
from .solvers.dpmpp3m import sample_dpmpp3m
from .solvers.euler import sample_euler
from .solvers.heun import sample_heun
from .solvers.ipndm import sample_ipndm
from .solvers.unipc import sample_unipc

__all__ = [
    "sample",
    "SampleStats",
    "CountingDenoiser",
    "parallel_calls",
    "make_noise",
    "nfe_to_steps",
    "steps_to_nfe",
    "valid_budgets",
    "solver_names",
    "register_solver",
]


# --------------------------------------------------------------------------------------
# counting


class CountingDenoiser:
    """Wraps ``denoiser(x, sigma, **cond)`` and counts its cost.

    ``calls``: sequential calls (latency NFE). ``evaluations``: samples evaluated divided by
    ``batch_size`` (a call on a ``[K * B, ...]`` batch counts 1 call and K evaluations).
    Inside ``with counter.parallel():`` all calls count as ONE sequential call (for solver
    code that evaluates independent branches in several chunks); evaluations still add up.
    """

    def __init__(self, denoiser: Callable, batch_size: int):
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.denoiser = denoiser
        self.batch_size = int(batch_size)
        self.calls = 0
        self.samples = 0
        self._parallel_depth = 0
        self._parallel_counted = False

    @property
    def evaluations(self) -> float:
        """Total evaluations: samples evaluated / batch_size (an int when divisible)."""
        q, r = divmod(self.samples, self.batch_size)
        return q if r == 0 else self.samples / self.batch_size

    def reset(self) -> None:
        self.calls = 0
        self.samples = 0

    @contextlib.contextmanager
    def parallel(self):
        """Calls inside the block are parallel: together they cost one latency NFE."""
        outer = self._parallel_depth == 0
        if outer:
            self._parallel_counted = False
        self._parallel_depth += 1
        try:
            yield self
        finally:
            self._parallel_depth -= 1

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if self._parallel_depth == 0:
            self.calls += 1
        elif not self._parallel_counted:
            self.calls += 1
            self._parallel_counted = True
        self.samples += int(x.shape[0])
        return self.denoiser(x, sigma, **cond)

    def __getattr__(self, name):  # forward model attributes (shape, dim, ...)
        if name == "denoiser":
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def parallel_calls(denoiser):
    """``with parallel_calls(denoiser):`` marks parallel calls if `denoiser` counts them
    (a `CountingDenoiser`), and does nothing otherwise."""
    if isinstance(denoiser, CountingDenoiser):
        return denoiser.parallel()
    return contextlib.nullcontext()


@dataclasses.dataclass(frozen=True)
class SampleStats:
    """Cost of one `sample` call: measured latency NFE and total evaluations, steps, time."""

    latency_nfe: int
    total_evals: float
    steps: int
    wall_time_s: float
    solver: str
    nfe: int


# --------------------------------------------------------------------------------------
# noise


def make_noise(seeds: Union[int, Sequence[int]], shape: Sequence[int], device=None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[len(seeds), *shape]`` standard normal noise, one `torch.Generator` per seed.

    Each sample depends on its own seed only, so a seed gives the same noise whatever the
    batch it is drawn in. The draw is made on the CPU (float64 if ``dtype`` is float64,
    float32 otherwise) and then moved, so it is also the same on every device.
    """
    if isinstance(seeds, numbers.Integral):
        seeds = [int(seeds)]
    seeds = [int(s) for s in seeds]
    if len(seeds) == 0:
        raise ValueError("seeds must contain at least one seed")
    shape = tuple(int(n) for n in shape)
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    out = []
    for seed in seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
        out.append(torch.randn(shape, generator=g, dtype=draw))
    return torch.stack(out).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------
# solver registry and NFE rules


@dataclasses.dataclass(frozen=True)
class _SolverSpec:
    name: str
    evals_per_step: int          # sequential denoiser calls per step
    default_afs: bool
    fn: Optional[Callable] = None
    lazy: Optional[str] = None   # "module:function" imported on first use
    needs_params: bool = False
    extra: tuple = ()            # fixed keyword arguments, as (key, value) pairs

    def load(self) -> Callable:
        if self.fn is not None:
            return self.fn
        import importlib

        module, func = self.lazy.split(":")
        try:
            return getattr(importlib.import_module(module, __package__), func)
        except ImportError as e:
            raise ImportError(f"solver {self.name!r} needs {module} ({e})") from e


_SOLVERS: Dict[str, _SolverSpec] = {}


def register_solver(name: str, fn: Optional[Callable] = None, *, evals_per_step: int = 1,
                    default_afs: bool = False, lazy: Optional[str] = None,
                    needs_params: bool = False, **extra) -> None:
    """Adds a solver to `sample` (``fn`` or ``lazy="module:function"``).

    ``fn(denoiser, x, sigmas, *, callback, progress, afs, **cond)`` for plain solvers, or
    ``fn(denoiser, x, sigmas, *, params, callback, progress, **extra, **cond)`` with
    ``needs_params``. ``evals_per_step`` (1 or 2) defines the NFE rule
    ``nfe = evals_per_step * steps - afs``.
    """
    if (fn is None) == (lazy is None):
        raise ValueError("give exactly one of fn and lazy")
    if evals_per_step not in (1, 2):
        raise ValueError("evals_per_step must be 1 or 2")
    _SOLVERS[name] = _SolverSpec(name, evals_per_step, default_afs, fn, lazy, needs_params,
                                 tuple(sorted(extra.items())))


register_solver("euler", sample_euler)
register_solver("ddim", sample_euler)
register_solver("heun", sample_heun, evals_per_step=2, default_afs=True)
register_solver("dpm2", sample_dpm2, evals_per_step=2, default_afs=True)
register_solver("dpmpp3m", sample_dpmpp3m)
register_solver("unipc", sample_unipc)
register_solver("ipndm", sample_ipndm)
register_solver("deis", sample_deis)
register_solver("epd", lazy=".solvers.epd:epd_sampler", evals_per_step=2, default_afs=True,
                needs_params=True, plugin=False)
register_solver("epd-ipndm", lazy=".solvers.epd:epd_sampler", evals_per_step=2,
                default_afs=True, needs_params=True, plugin=True)
# AMED-Solver / AMED-Plugin: a predicted intermediate time per step (solvers/amed.py);
# params are AMEDParams (table or predictor form).
register_solver("amed", lazy=".solvers.amed:amed_sampler", evals_per_step=2, default_afs=True,
                needs_params=True, plugin=False)
register_solver("amed-ipndm", lazy=".solvers.amed:amed_sampler", evals_per_step=2,
                default_afs=True, needs_params=True, plugin=True)
# ParaDiGMS: Picard iterations over a sliding window of a 4x finer Euler grid; the budget
# counts batched rounds (solvers/paradigms.py).
register_solver("paradigms", lazy=".solvers.paradigms:paradigms_sampler")
# D-ODE: the base solver with one distilled scalar per step (solvers/dode.py); the NFE
# rule is the base solver's.
register_solver("d-euler", lazy=".solvers.dode:dode_sampler", needs_params=True,
                solver="d-euler")
register_solver("d-ddim", lazy=".solvers.dode:dode_sampler", needs_params=True,
                solver="d-euler")
register_solver("d-heun", lazy=".solvers.dode:dode_sampler", evals_per_step=2,
                default_afs=True, needs_params=True, solver="d-heun")
register_solver("d-ipndm", lazy=".solvers.dode:dode_sampler", needs_params=True,
                solver="d-ipndm")


def solver_names() -> list:
    """The solver names `sample` accepts."""
    return list(_SOLVERS)


def _spec(solver: str) -> _SolverSpec:
    if not isinstance(solver, str) or solver.lower() not in _SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(_SOLVERS)}")
    return _SOLVERS[solver.lower()]


def _resolve_afs(spec: _SolverSpec, afs: Optional[bool]) -> bool:
    return spec.default_afs if afs is None else bool(afs)


def valid_budgets(solver: str, afs: Optional[bool] = None, up_to: int = 12) -> list:
    """The latency budgets <= up_to that `solver` can meet with this afs setting."""
    spec = _spec(solver)
    a = _resolve_afs(spec, afs)
    return [spec.evals_per_step * n - int(a) for n in range(1, up_to + 2)
            if 1 <= spec.evals_per_step * n - int(a) <= up_to]


def _describe_budgets(spec: _SolverSpec, afs: bool) -> str:
    k = spec.evals_per_step
    if k == 1:
        rule = "1 call per step" + (", minus 1 for the analytic first step" if afs else "")
        return f"any budget >= 1 ({rule})"
    if afs:
        return ("odd budgets 1, 3, 5, 7, 9, ... (2 calls per step, minus 1 for the analytic "
                "first step); pass afs=False for even budgets")
    return "even budgets 2, 4, 6, 8, ... (2 calls per step); pass afs=True for odd budgets"


def steps_to_nfe(solver: str, steps: int, afs: Optional[bool] = None) -> int:
    """Latency NFE of `steps` steps of `solver`."""
    spec = _spec(solver)
    return spec.evals_per_step * int(steps) - int(_resolve_afs(spec, afs))


def nfe_to_steps(solver: str, nfe: int, afs: Optional[bool] = None) -> int:
    """Number of steps that spends exactly `nfe` sequential calls; ValueError if impossible."""
    spec = _spec(solver)
    a = _resolve_afs(spec, afs)
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    steps, rem = divmod(int(nfe) + int(a), spec.evals_per_step)
    if nfe < 1 or rem != 0 or steps < 1:
        raise ValueError(f"solver {spec.name!r} with afs={a} cannot spend exactly nfe={nfe} "
                         f"sequential evaluations; it can meet {_describe_budgets(spec, a)}")
    return steps


# --------------------------------------------------------------------------------------
# schedules


def _resolve_sigmas(schedule, steps: Optional[int]) -> torch.Tensor:
    """float64 CPU grid from `schedule` (None / kind name / dict / explicit sigmas)."""
    if schedule is None:
        return _schedules.get_sigmas("polynomial", steps)
    if isinstance(schedule, str):
        return _schedules.get_sigmas(schedule, steps)
    if isinstance(schedule, dict):
        kw = dict(schedule)
        kind = kw.pop("kind", "polynomial")
        if "num_steps" in kw and kw["num_steps"] is not None and steps is not None and int(
                kw["num_steps"]) != steps:
            raise ValueError(f"schedule['num_steps']={kw['num_steps']} does not match the "
                             f"{steps} steps that the nfe budget gives")
        kw["num_steps"] = steps if kind != "explicit" else kw.get("num_steps")
        kw.pop("device", None)
        kw.pop("dtype", None)
        return _schedules.get_sigmas(kind, **kw)
    return _schedules.check_sigmas(schedule, "schedule")


def _is_explicit(schedule) -> bool:
    return schedule is not None and not isinstance(schedule, (str, dict))


# --------------------------------------------------------------------------------------
# sample


class _DefaultNFE(int):
    """`sample`'s default ``nfe`` (5), an object `sample` can tell from an explicit 5: a
    solver with params then runs at the params' own NFE instead of refusing a mismatch."""

    def __repr__(self) -> str:
        return "5"


DEFAULT_NFE = _DefaultNFE(5)


def sample(denoiser: Callable, noise: torch.Tensor, solver: str = "ipndm",
           nfe: Optional[int] = DEFAULT_NFE,
           params=None, schedule=None, afs: Optional[bool] = None, return_stats: bool = False,
           progress: bool = False, callback: Optional[Callable] = None, **cond):
    """Integrates the probability-flow ODE from ``noise * sigmas[0]`` to ``sigmas[-1]``.

    Args:
        denoiser: ``D(x [B, ...], sigma [B], **cond) -> x0_hat``.
        noise: ``[B, ...]`` standard normal noise (see `make_noise`).
        solver: one of `solver_names()`: "euler" ("ddim"), "heun", "dpm2", "dpmpp3m",
            "unipc", "ipndm", "deis", "epd", "epd-ipndm", "amed", "amed-ipndm",
            "d-euler" ("d-ddim"), "d-heun", "d-ipndm", "paradigms".
        nfe: latency budget (sequential denoiser calls), mapped exactly to steps (module
            docstring); None takes it from an explicit schedule or from ``params``. Left
            at its default, 5 for the solvers without params and the params' own NFE for
            those with params (an explicit nfe must match the params).
        params: `EPDParams` for "epd" / "epd-ipndm", `AMEDParams` for "amed" /
            "amed-ipndm", `DODEParams` for the "d-*" solvers (their nfe, afs, sigmas
            and, for EPD / AMED, plugin must agree).
        schedule: None (polynomial, rho=7, sigma in [0.002, 80]), a kind name
            ("polynomial", "logsnr", "time-uniform"), a dict of `get_sigmas` keyword
            arguments (with optional "kind"), or an explicit decreasing list/tensor of
            sigmas (its step count must match nfe).
        afs: analytic first step; None uses the solver's default (on for heun, dpm2 and
            the EPD solvers, off for the one-call-per-step solvers).
        return_stats: also return a `SampleStats`.
        progress: tqdm progress bar. callback: per-step callback (see the solvers).
        **cond: conditioning passed to the denoiser (e.g. ``class_labels``).

    Returns:
        ``x`` at sigma_min, shaped and typed like noise; ``(x, stats)`` with return_stats.
    """
    spec = _spec(solver)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise ValueError("noise must be a floating tensor of shape [B, ...]")
    if nfe is not None and (isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral)):
        raise ValueError(f"nfe must be an integer or None, got {nfe!r}")

    extra = dict(spec.extra)
    if spec.needs_params:
        if nfe is DEFAULT_NFE:
            nfe = None   # not asked for: the params' own budget
        if spec.name.startswith("d-"):
            _check_dode_params(spec, params)
        else:
            _check_params_kind(spec, params)
        sigmas, steps, a = _resolve_epd(spec, params, nfe, schedule, afs)
        nfe = steps_to_nfe(spec.name, steps, a)
    else:
        if params is not None:
            raise ValueError(f"params are only used by the EPD, AMED and D-ODE solvers, not "
                             f"by {spec.name!r}")
        a = _resolve_afs(spec, afs)
        if _is_explicit(schedule):
            sigmas = _schedules.check_sigmas(schedule, "schedule")
            steps = sigmas.numel() - 1
            implied = steps_to_nfe(spec.name, steps, a)
            if nfe is None:
                nfe = implied
            elif nfe != implied:
                raise ValueError(
                    f"the explicit schedule has {steps} steps, which costs nfe={implied} with "
                    f"solver {spec.name!r} (afs={a}), but nfe={nfe} was asked (pass "
                    f"nfe={implied} or nfe=None to take it from the schedule)")
            if implied < 1:
                raise ValueError(f"the explicit schedule gives nfe={implied} < 1")
        else:
            if nfe is None:
                raise ValueError("nfe must be given unless schedule is an explicit list of sigmas")
            steps = nfe_to_steps(spec.name, nfe, a)
            sigmas = _resolve_sigmas(schedule, steps)
            if sigmas.numel() - 1 != steps:
                raise ValueError(f"the schedule has {sigmas.numel() - 1} steps but nfe={nfe} "
                                 f"needs {steps}")
        extra["afs"] = a

    fn = spec.load()
    counter = CountingDenoiser(denoiser, noise.shape[0])
    x = noise * float(sigmas[0])
    sync = noise.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(noise.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if spec.needs_params:
            out = fn(counter, x, sigmas, params=params, callback=callback, progress=progress,
                     **extra, **cond)
        else:
            out = fn(counter, x, sigmas, callback=callback, progress=progress, **extra, **cond)
    if sync:
        torch.cuda.synchronize(noise.device)
    wall = time.perf_counter() - t0
    if not return_stats:
        return out
    stats = SampleStats(latency_nfe=counter.calls, total_evals=counter.evaluations,
                        steps=int(steps), wall_time_s=wall, solver=spec.name, nfe=int(nfe))
    return out, stats


def _check_dode_params(spec, params):
    from .params import DODEParams

    if not isinstance(params, DODEParams):
        raise ValueError(f"solver {spec.name!r} needs params (a DODEParams from "
                         f"epd_kernels.fit_dode(...) or DODEParams.load(path))")
    params.check_compatible(solver=spec.name)


def _check_params_kind(spec, params):
    """EPD solvers take EPDParams, AMED solvers AMEDParams, with the matching plugin flag."""
    from .params import AMEDParams

    amed = spec.name.startswith("amed")
    if amed:
        if params is None:
            raise ValueError(f"solver {spec.name!r} needs params (an AMEDParams from "
                             f"epd_kernels.distill(..., method='amed'), AMEDParams.init(...) "
                             f"or AMEDParams.load(path))")
        if not isinstance(params, AMEDParams):
            raise ValueError(f"solver {spec.name!r} needs AMEDParams, got "
                             f"{type(params).__name__}")
        params.check_compatible(plugin=dict(spec.extra)["plugin"])
    elif isinstance(params, AMEDParams):
        raise ValueError(f"these are AMED params: use solver {params.solver!r}, not "
                         f"{spec.name!r}")


def _resolve_epd(spec, params, nfe, schedule, afs):
    """(sigmas, steps, afs) for an EPD solver, checked against its params."""
    if params is None:
        raise ValueError(f"solver {spec.name!r} needs params (an EPDParams from "
                         f"epd_kernels.distill(...) or EPDParams.load(path))")
    p_afs = getattr(params, "afs", None)
    if afs is not None and p_afs is not None and bool(afs) != bool(p_afs):
        raise ValueError(f"afs={afs} but the params were distilled with afs={p_afs}")
    a = bool(p_afs) if p_afs is not None else _resolve_afs(spec, afs)
    p_plugin = getattr(params, "plugin", None)
    want_plugin = dict(spec.extra).get("plugin")
    if p_plugin is not None and want_plugin is not None and bool(p_plugin) != bool(want_plugin):
        right = "epd-ipndm" if p_plugin else "epd"
        raise ValueError(f"these params are for solver {right!r} (plugin={bool(p_plugin)}), "
                         f"not {spec.name!r}")
    p_sigmas = getattr(params, "sigmas", None)
    if p_sigmas is not None:
        sigmas = _schedules.check_sigmas(p_sigmas, "params.sigmas")
        if schedule is not None:
            other = _resolve_sigmas(schedule, sigmas.numel() - 1)
            if other.shape != sigmas.shape or not torch.allclose(other, sigmas, rtol=1e-6, atol=0):
                raise ValueError("schedule does not match params.sigmas, the grid the params "
                                 "were distilled on (leave schedule=None)")
    else:
        if nfe is None:
            raise ValueError("nfe must be given (params have no sigmas)")
        sigmas = _resolve_sigmas(schedule, nfe_to_steps(spec.name, nfe, a))
    steps = sigmas.numel() - 1
    implied = steps_to_nfe(spec.name, steps, a)
    p_nfe = getattr(params, "nfe", None)
    if p_nfe is not None and int(p_nfe) != implied:
        raise ValueError(f"params.nfe={p_nfe} does not match params.sigmas ({steps} steps, "
                         f"afs={a} -> nfe={implied})")
    if nfe is not None and int(nfe) != implied:
        raise ValueError(f"nfe={nfe} was asked but the params are for nfe={implied} "
                         f"({steps} steps, afs={a}); pass nfe={implied} or nfe=None")
    return sigmas, steps, a
