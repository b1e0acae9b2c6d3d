"""`DistillSettings`: every setting of a distillation, its default and its check.

`distill(denoiser, nfe=5, shape=..., iterations=200, class_labels=y)` sorts its keywords by
name: a field of `DistillSettings` (or of `SearchSettings`, the grid search's options) is a
setting, every other keyword conditioning for the denoiser. So that a misspelt setting
never reaches the denoiser silently, `split_keywords` refuses, before any work, a
conditioning keyword that the denoiser cannot take (no such parameter, no ``**kwargs``),
that is one edit away from a setting and not named by the denoiser ("did you mean ..."),
or that is an option of a neighbouring function (``teacher_factor`` of `fit_dode`,
``solver`` of `sample`, ...).

Settings left at `AUTO` (``iterations``, ``pool``, ``M``, ``batch_size``) are sized to
``time_budget_s`` by `budget.plan`; with ``time_budget_s=None`` they take the fixed
defaults below.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import numbers
from typing import Callable, Optional

import torch

from ..solvers.common import check_cond_keywords, check_int

__all__ = ["DistillSettings", "SearchSettings", "AUTO", "split_keywords", "METHODS", "MATCHES",
           "DEFAULT_ITERATIONS", "DEFAULT_BATCH_SIZE", "DEFAULT_LR", "DEFAULT_M",
           "DEFAULT_POOL", "DEFAULT_K", "DEFAULT_TIME_BUDGET_S"]

#: A setting the time budget chooses (`budget.plan`).
AUTO = "auto"
#: Fixed defaults (``time_budget_s=None``), chosen on the 64-dim Gaussian mixture (package
#: docstring); the budget never goes above them.
DEFAULT_ITERATIONS = 300
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 0.05
DEFAULT_M = 15
DEFAULT_POOL = 4096
#: Default number of EPD branches.
DEFAULT_K = 2
#: Default wall-time budget of one `distill` call, seconds.
DEFAULT_TIME_BUDGET_S = 60.0
#: What the loss compares: every student state with the teacher's, or the final one only.
MATCHES = ("trajectory", "final")
#: Distillation methods: EPD-Solver (default) and AMED-Solver.
METHODS = ("epd", "amed")

#: Keywords of neighbouring functions that `distill` does not take (refused, not passed on).
_OTHER_OPTIONS = ("teacher_factor", "refine", "refine_iterations", "solver", "params",
                  "num_steps", "steps", "lambdas", "noise")


@dataclasses.dataclass
class SearchSettings:
    """Options of the grid search (``schedule="auto"``, `schedule_search`); None: its own
    default. candidates: ``{name: schedule}`` or names of ``DEFAULT_CANDIDATES`` / schedule
    kinds; final_iterations / grid_iterations: the final fixed-grid / learned-grid runs
    (default ``iterations``); val_cond: conditioning of the validation draws (default: the
    per-row tensors cycled); reference_*: the validation reference; chunk: sampling rows."""
    candidates: object = None
    search_iterations: object = AUTO   # None: full-length candidate runs, no final run
    final_iterations: Optional[int] = None
    grid_iterations: Optional[int] = None
    val_size: Optional[int] = None
    val_seed: int = 0
    val_cond: Optional[dict] = None
    reference_steps: Optional[int] = None
    reference_solver: str = "unipc"
    chunk: int = 256

    def given(self) -> dict:
        """The options set to something other than their default."""
        base = SearchSettings()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not getattr(base, f.name)
                and getattr(self, f.name) != getattr(base, f.name)}


@dataclasses.dataclass
class DistillSettings:
    """Settings of `distill` (see its docstring for each; `AUTO`: sized by the budget)."""
    nfe: int
    shape: tuple
    num_points: Optional[int] = None
    plugin: bool = False
    method: str = "epd"
    schedule: object = None
    afs: bool = True
    max_order: int = 4
    teacher: str = "ipndm"
    M: object = AUTO
    insert: str = "polynomial"
    iterations: object = AUTO
    batch_size: object = AUTO
    lr: Optional[float] = None
    pool: object = AUTO
    seed: int = 0
    dtype: torch.dtype = torch.float32
    device: object = None
    loss: Optional[Callable] = None
    match: Optional[str] = None
    learn_grid: Optional[bool] = None
    init: object = None
    delta_max: Optional[float] = None
    o_max: Optional[float] = None
    amed_form: str = "predictor"
    features: object = None
    max_failures: int = 5
    checkpoint: object = None
    checkpoint_every: int = 25
    progress: bool = True
    time_budget_s: Optional[float] = DEFAULT_TIME_BUDGET_S
    compare: bool = True
    search: SearchSettings = dataclasses.field(default_factory=SearchSettings)

    def __post_init__(self):
        self.validate()

    # ---- checks (each error names the setting)

    def validate(self) -> "DistillSettings":
        from ..params.amed import AMED_FORMS
        from .teacher import INSERTIONS, TEACHERS

        self.nfe = check_int("nfe", self.nfe, 1)
        shape = (self.shape,) if isinstance(self.shape, numbers.Integral) else self.shape
        try:
            self.shape = tuple(check_int("shape", int(n), 1) for n in shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be a tuple of positive integers (the per-sample "
                             f"shape, e.g. (C, H, W)), got {self.shape!r}") from None
        _one_of("method", self.method, METHODS)
        _one_of("teacher", self.teacher, sorted(TEACHERS))
        _one_of("insert", self.insert, INSERTIONS)
        _one_of("amed_form", self.amed_form, AMED_FORMS)
        if self.match is not None:
            _one_of("match", self.match, MATCHES)
        for name in ("plugin", "afs", "progress", "compare"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.learn_grid not in (None, True, False):
            raise ValueError(f"learn_grid must be True, False or None, got {self.learn_grid!r}")
        for name, low in (("M", 0), ("iterations", 1), ("batch_size", 1)):
            if getattr(self, name) != AUTO:
                setattr(self, name, check_int(name, getattr(self, name), low))
        if self.pool not in (AUTO, None):
            self.pool = check_int("pool", self.pool, 1)
        for name in ("max_order", "max_failures", "checkpoint_every"):
            setattr(self, name, check_int(name, getattr(self, name), 1))
        if self.num_points is not None:
            self.num_points = check_int("num_points", self.num_points, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        self.seed = int(self.seed)
        for name in ("lr", "delta_max", "o_max"):
            _positive_or_none(name, getattr(self, name))
        if self.time_budget_s is not None:
            _positive_or_none("time_budget_s", self.time_budget_s)
            self.time_budget_s = float(self.time_budget_s)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {self.dtype!r}")
        if not isinstance(self.search, SearchSettings):
            raise ValueError(f"search must be SearchSettings, got {type(self.search).__name__}")
        self._check_combinations()
        return self

    def _check_combinations(self):
        auto = self.auto_schedule
        if self.method == "amed":
            if self.num_points not in (None, 1):
                raise ValueError(f"num_points must be 1 or unset for method='amed' (AMED has "
                                 f"one intermediate point per step), got {self.num_points!r}")
            if self.learn_grid:
                raise ValueError("learn_grid is only available for method='epd'")
        elif self.features is not None:
            raise ValueError("features= is only used by method='amed' (the AMED predictor)")
        if self.learn_grid and self.match == "trajectory" and not auto:
            raise ValueError("learn_grid=True needs match='final': the teacher's states at the "
                             "student sigmas move with the grid, its final state does not")
        if auto and self.init is not None:
            raise ValueError("init= cannot be combined with schedule='auto' (each candidate "
                             "grid starts from its own neutral parameters)")
        given = sorted(self.search.given())
        if given and not auto:
            raise ValueError(f"{given} only apply with schedule='auto' (the grid search)")

    # ---- derived values

    @property
    def auto_schedule(self) -> bool:
        return isinstance(self.schedule, str) and self.schedule == "auto"

    @property
    def K(self) -> int:
        """Branches per step (1 for AMED)."""
        if self.method == "amed":
            return 1
        return DEFAULT_K if self.num_points is None else self.num_points

    @property
    def steps(self) -> int:
        from ..solvers.registry import nfe_to_steps

        return nfe_to_steps("epd", self.nfe, self.afs)

    def unresolved(self) -> list:
        """Names of the settings still at `AUTO`."""
        return [n for n in ("iterations", "pool", "M", "batch_size") if getattr(self, n) == AUTO]

    def with_fixed_defaults(self) -> "DistillSettings":
        """`AUTO` settings replaced by the fixed defaults (no budget)."""
        fixed = dict(iterations=DEFAULT_ITERATIONS, pool=DEFAULT_POOL, M=DEFAULT_M,
                     batch_size=DEFAULT_BATCH_SIZE)
        return self.replace(**{n: fixed[n] for n in self.unresolved()})

    def replace(self, **changes) -> "DistillSettings":
        return dataclasses.replace(self, **changes)


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def _positive_or_none(name, value):
    if value is None:
        return
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and math.isfinite(value)
                                       and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


_SETTING_NAMES = tuple(f.name for f in dataclasses.fields(DistillSettings) if f.name != "search")
_SEARCH_NAMES = tuple(f.name for f in dataclasses.fields(SearchSettings))


def _denoiser_names(denoiser) -> Optional[set]:
    """Keyword names the denoiser's signature lists (None when it cannot be read)."""
    try:
        sig = inspect.signature(getattr(denoiser, "forward", denoiser))
    except (TypeError, ValueError):
        return None
    return {p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def split_keywords(denoiser, keywords: dict, base: Optional[DistillSettings] = None,
                   **required) -> tuple:
    """``(settings, cond)``: the keywords naming settings applied over ``base`` (or the
    defaults), and the conditioning; refuses likely-misspelt settings (module docstring)."""
    own = {k: v for k, v in keywords.items() if k in _SETTING_NAMES}
    search = {k: v for k, v in keywords.items() if k in _SEARCH_NAMES}
    cond = {k: v for k, v in keywords.items() if k not in own and k not in search}
    check_cond_keywords(denoiser, cond, where="distill", options=_OTHER_OPTIONS)
    named = _denoiser_names(denoiser) or set()
    for k in cond:
        close = difflib.get_close_matches(k, _SETTING_NAMES + _SEARCH_NAMES, n=1, cutoff=0.8)
        if close and k not in named:
            raise ValueError(f"distill() got {k}=..., which is not a setting of distill() "
                             f"(did you mean {close[0]}=?) and not a parameter the denoiser "
                             f"names; every other keyword is conditioning for the denoiser")
    if base is None:
        settings = DistillSettings(**required, **own)
    else:
        settings = base.replace(**required, **own)
    if search:
        settings = settings.replace(search=dataclasses.replace(settings.search, **search))
    return settings, cond
