"""The solvers `sample()` knows, their NFE rules, their options and the sigma grids.

NFE rule (docs/design.md, "NFE rules"): ``nfe = evals_per_step * steps - afs``; a budget
the rule cannot meet is refused.

Options: the keywords of a solver function's signature besides `MANAGED` and the fixed
ones a registration pins (``extra``).
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import numbers
from typing import Callable, Dict, Optional

import torch

from . import schedules as _schedules
from .deis import sample_deis
from .dpm2 import sample_dpm2
from .dpmpp3m import sample_dpmpp3m
from .euler import sample_euler
from .heun import sample_heun
from .ipndm import sample_ipndm
from .unipc import sample_unipc

__all__ = ["register_solver", "solver_names", "solver_options", "all_option_names",
           "valid_budgets", "steps_to_nfe", "nfe_to_steps", "resolve_sigmas", "SolverSpec"]

#: Keywords of a solver function that `sample()` sets itself: never user options.
MANAGED = frozenset({"callback", "progress", "afs", "params", "return_trajectory", "runner",
                     "use_cuda_graph", "sigmas", "x", "denoiser"})


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    name: str
    evals_per_step: int          # sequential denoiser calls per step
    default_afs: bool
    fn: Optional[Callable] = None
    lazy: Optional[str] = None   # "module:function" (relative to this package), imported on use
    needs_params: bool = False
    extra: tuple = ()            # fixed keyword arguments, as (key, value) pairs

    def load(self) -> Callable:
        if self.fn is not None:
            return self.fn
        module, func = self.lazy.split(":")
        try:
            return getattr(importlib.import_module(module, __package__), func)
        except ImportError as e:
            raise ImportError(f"solver {self.name!r} needs {module} ({e})") from e

    @functools.lru_cache(maxsize=None)
    def options(self) -> tuple:
        """The option names this solver takes (sorted), from its function's signature."""
        sig = inspect.signature(self.load())
        fixed = {k for k, _ in self.extra}
        return tuple(sorted(p.name for p in sig.parameters.values()
                            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                            and p.name not in MANAGED and p.name not in fixed))


_SOLVERS: Dict[str, SolverSpec] = {}


def register_solver(name: str, fn: Optional[Callable] = None, *, evals_per_step: int = 1,
                    default_afs: bool = False, lazy: Optional[str] = None,
                    needs_params: bool = False, **extra) -> None:
    """Adds a solver to `sample` (``fn`` or ``lazy="module:function"``, with the baseline
    signature, plus ``params`` and the fixed keywords ``extra`` with ``needs_params``);
    ``evals_per_step`` (1 or 2) sets its NFE rule."""
    if (fn is None) == (lazy is None):
        raise ValueError("give exactly one of fn and lazy")
    if evals_per_step not in (1, 2):
        raise ValueError("evals_per_step must be 1 or 2")
    _SOLVERS[name] = SolverSpec(name, evals_per_step, default_afs, fn, lazy, needs_params,
                                tuple(sorted(extra.items())))


#: Two sequential calls per step, the first one analytic on step 0 by default.
_TWO_CALLS = {"evals_per_step": 2, "default_afs": True}

register_solver("euler", sample_euler)
register_solver("ddim", sample_euler)
register_solver("heun", sample_heun, **_TWO_CALLS)
register_solver("dpm2", sample_dpm2, **_TWO_CALLS)
register_solver("dpmpp3m", sample_dpmpp3m)
register_solver("unipc", sample_unipc)
register_solver("ipndm", sample_ipndm)
register_solver("deis", sample_deis)
# EPD and AMED (table or predictor form), each with its iPNDM plugin variant.
for _family in ("epd", "amed"):
    for _name, _plugin in ((_family, False), (_family + "-ipndm", True)):
        register_solver(_name, lazy=f".{_family}:{_family}_sampler", needs_params=True,
                        plugin=_plugin, **_TWO_CALLS)
# ParaDiGMS: the budget counts batched rounds on a 4x finer Euler grid.
register_solver("paradigms", lazy=".paradigms:paradigms_sampler")
# D-ODE: DODEParams; the NFE rule is the base solver's.
for _name, _base in (("d-euler", "d-euler"), ("d-ddim", "d-euler"), ("d-heun", "d-heun"),
                     ("d-ipndm", "d-ipndm")):
    register_solver(_name, lazy=".dode:dode_sampler", needs_params=True, solver=_base,
                    **(_TWO_CALLS if _base == "d-heun" else {}))


def solver_names() -> list:
    """The solver names `sample` accepts."""
    return list(_SOLVERS)


def spec(solver: str) -> SolverSpec:
    if not isinstance(solver, str) or solver.lower() not in _SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; known solvers: {', '.join(_SOLVERS)}")
    return _SOLVERS[solver.lower()]


def solver_options(solver: str) -> tuple:
    """The names `sample(..., solver=solver, options={...})` accepts in ``options``."""
    return spec(solver).options()


def all_option_names() -> frozenset:
    """Every option name of every registered solver (to catch options given as
    conditioning keywords)."""
    return frozenset(n for s in _SOLVERS.values() for n in s.options())


def resolve_afs(s: SolverSpec, afs: Optional[bool]) -> bool:
    """The afs setting: the solver's default where None."""
    return s.default_afs if afs is None else bool(afs)


def valid_budgets(solver: str, afs: Optional[bool] = None, up_to: int = 12) -> list:
    """The latency budgets <= up_to that `solver` can meet with this afs setting."""
    s = spec(solver)
    a = resolve_afs(s, afs)
    return [s.evals_per_step * n - int(a) for n in range(1, up_to + 2)
            if 1 <= s.evals_per_step * n - int(a) <= up_to]


def _describe_budgets(s: SolverSpec, afs: bool) -> str:
    if s.evals_per_step == 1:
        rule = "1 call per step" + (", minus 1 for the analytic first step" if afs else "")
        return f"any budget >= 1 ({rule})"
    if afs:
        return ("odd budgets 1, 3, 5, 7, 9, ... (2 calls per step, minus 1 for the analytic "
                "first step); pass afs=False for even budgets")
    return "even budgets 2, 4, 6, 8, ... (2 calls per step); pass afs=True for odd budgets"


def steps_to_nfe(solver: str, steps: int, afs: Optional[bool] = None) -> int:
    """Latency NFE of `steps` steps of `solver`."""
    s = spec(solver)
    return s.evals_per_step * int(steps) - int(resolve_afs(s, afs))


def nfe_to_steps(solver: str, nfe: int, afs: Optional[bool] = None) -> int:
    """Number of steps that spends exactly `nfe` sequential calls; ValueError if impossible."""
    s = spec(solver)
    a = resolve_afs(s, afs)
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral):
        raise ValueError(f"nfe must be an integer, got {nfe!r}")
    steps, rem = divmod(int(nfe) + int(a), s.evals_per_step)
    if nfe < 1 or rem != 0 or steps < 1:
        raise ValueError(f"solver {s.name!r} with afs={a} cannot spend exactly nfe={nfe} "
                         f"sequential evaluations; it can meet {_describe_budgets(s, a)}")
    return steps


def resolve_sigmas(schedule, steps: Optional[int]) -> torch.Tensor:
    """float64 CPU grid from `schedule` (None / kind name / dict / explicit sigmas)."""
    if schedule is None or isinstance(schedule, str):
        return _schedules.get_sigmas("polynomial" if schedule is None else schedule, steps)
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


def is_explicit(schedule) -> bool:
    return schedule is not None and not isinstance(schedule, (str, dict))
