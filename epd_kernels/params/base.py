"""What the three params families (EPD, AMED, D-ODE) share, written once: the common fields
(``sigmas`` [S+1] float64, ``nfe``, ``afs``, ``max_order``, ``schedule``, ``meta``), their
conversion and checks, the compatibility check against a requested solver / NFE / grid,
copies, and `save` / `load` in the params file format (`file.py`). A family declares its
tensors (``_VALUES``, ``_shapes``), its value checks, file fields and how it reads them back."""
from __future__ import annotations

import dataclasses
import numbers
import os
from typing import ClassVar, Dict, Optional, Tuple, Union

import torch

from .file import ParamsFile, open_params_file, write_params_file

__all__ = []  # the base of EPDParams, AMEDParams, DODEParams; not used on its own

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_COMMON_KEYS = ("format_version", "solver", "S", "nfe", "afs", "max_order", "schedule",
                "package_version", "meta", "checksum")


class ParamsBase:
    #: Version of the file layout `save` writes. Readers refuse newer versions.
    FORMAT_VERSION: ClassVar[int] = 1
    _WHAT: ClassVar[str]                   # the family in messages: "EPD params"
    _MADE: ClassVar[str] = "distilled"     # how they are made: "distilled", "fitted"
    _FILE: ClassVar[str]                   # "an EPD params file"
    _KIND: ClassVar[Optional[str]] = None  # metadata "kind" (EPD files have none)
    _VALUES: ClassVar[Tuple[str, ...]]     # the family's tensors besides sigmas
    _SOLVERS: ClassVar[Tuple[str, ...]] = ()  # (plain, plugin) when there is a `plugin` field
    _FILE_KEYS: ClassVar[Tuple[str, ...]] = ()  # metadata keys beyond the common ones

    def __post_init__(self):
        name = type(self).__name__
        self.sigmas = self._convert("sigmas", self.sigmas).detach().to(torch.float64)
        for n in self._VALUES:
            if getattr(self, n) is not None:
                setattr(self, n, self._convert(n, getattr(self, n)))
        if self.afs is None:
            self.afs = self._default_afs()
        if not isinstance(self.afs, bool) and self.afs not in (0, 1):
            raise ValueError(f"{name}.afs must be True or False, got {self.afs!r}")
        self.afs = bool(self.afs)
        if self._SOLVERS:
            self.plugin = bool(self.plugin)
        if isinstance(self.max_order, bool) or not isinstance(self.max_order, numbers.Integral):
            raise ValueError(f"{name}.max_order must be an int in 1..4, got {self.max_order!r}")
        self.max_order = int(self.max_order)
        if self.meta is None:
            self.meta = {}
        if self.nfe is None and self.sigmas.dim() == 1:
            self.nfe = self._latency_nfe(self.sigmas.numel() - 1)

    @classmethod
    def _convert(cls, name: str, value) -> torch.Tensor:
        """`value` itself if a tensor (dtype, device and autograd kept), else float64."""
        if isinstance(value, torch.Tensor):
            return value
        try:
            return torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"{cls.__name__}.{name}: cannot make a tensor from "
                             f"{type(value).__name__}: {e}") from None

    @classmethod
    def _grid(cls, sigmas) -> torch.Tensor:
        """`sigmas` as the float64 grid of a new object; ValueError unless 1-D, S >= 1."""
        sig = cls._convert("sigmas", sigmas).detach().to(torch.float64)
        cls._check_grid_shape(sig)
        return sig

    def _default_afs(self) -> bool:
        return True

    @property
    def num_steps(self) -> int:
        """S, the number of solver steps."""
        return int(self.sigmas.numel()) - 1

    @property
    def solver(self) -> str:
        """The `sample` name of the solver these params are for."""
        return self._SOLVERS[int(self.plugin)]

    @property
    def evals_per_step(self) -> int:
        """Sequential denoiser calls per step."""
        return 2

    @property
    def total_evaluations(self) -> int:
        """All denoiser evaluations (batch B each); the latency NFE unless overridden."""
        return self._latency_nfe(self.num_steps)

    def _latency_nfe(self, num_steps: int) -> int:
        return self.evals_per_step * int(num_steps) - int(self.afs)

    @classmethod
    def _check_grid_shape(cls, sigmas: torch.Tensor) -> None:
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError(f"{cls.__name__}.sigmas must be a 1-D grid of S+1 >= 2 values, "
                             f"got shape {list(sigmas.shape)}")

    def _shapes(self, S: int) -> Dict[str, Tuple[str, tuple]]:
        """field -> (shape in symbols, e.g. "[S, K]", and in numbers) of the family's tensors."""
        raise NotImplementedError

    def check_structure(self) -> None:
        """Shapes, dtypes, devices, field types and the NFE rule (no device sync)."""
        name = type(self).__name__
        self._check_grid_shape(self.sigmas)
        S = self.num_steps
        shapes = self._shapes(S)
        for n, (symbol, shape) in shapes.items():
            t = getattr(self, n)
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name}.{n} must be a tensor, got {type(t).__name__}")
            if t.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{name}.{n} must be a floating tensor, got {t.dtype}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}.{n} must have shape {symbol} = {list(shape)} (S from "
                                 f"sigmas of length {S + 1}), got {list(t.shape)}")
        devices = {getattr(self, n).device for n in shapes}
        if len(devices) > 1:
            raise ValueError(f"{name} tensors {', '.join(shapes)} are on several devices: "
                             f"{sorted(map(str, devices))}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int):
            raise ValueError(f"{name}.nfe must be an int, got {self.nfe!r}")
        if not 1 <= self.max_order <= 4:
            raise ValueError(f"{name}.max_order must be in 1..4 (iPNDM), got {self.max_order}")
        if self.schedule is not None and not isinstance(self.schedule, (str, dict)):
            raise ValueError(f"{name}.schedule must be a str, a dict or None, got "
                             f"{type(self.schedule).__name__}")
        if not isinstance(self.meta, dict):
            raise ValueError(f"{name}.meta must be a dict, got {type(self.meta).__name__}")
        expected = self._latency_nfe(S)
        if self.nfe != expected:
            rule = ("S" if self.evals_per_step == 1 else f"{self.evals_per_step}*S") + " - afs"
            raise ValueError(f"{name}.nfe = {self.nfe} does not match S = {S} steps of "
                             f"{self.solver} with afs={self.afs}: the latency NFE is {rule} = "
                             f"{expected}")
        if expected < 1:
            raise ValueError(f"{name}: {S} step(s) of {self.solver} with afs={self.afs} make "
                             f"no denoiser call (nfe = {expected}); use more steps")

    def validate(self):
        """`check_structure`, finite values, the family's ranges and a positive, strictly
        decreasing grid. Returns self; raises ValueError naming the field."""
        name = type(self).__name__
        self.check_structure()
        values = {n: getattr(self, n).detach().to("cpu", torch.float64)
                  for n in (*self._shapes(self.num_steps), "sigmas")}
        for n, v in values.items():
            if not torch.isfinite(v).all():
                raise ValueError(f"{name}.{n} has non-finite values (nan or inf)")
        s = values.pop("sigmas")
        self._check_values(values)
        if (s <= 0).any():
            raise ValueError(f"{name}.sigmas must be > 0 (the last is sigma_min), min is "
                             f"{s.min().item():.6g}")
        if not (s[1:] < s[:-1]).all():
            raise ValueError(f"{name}.sigmas must be strictly decreasing (sigma_max first)")
        return self

    def _check_values(self, values: Dict[str, torch.Tensor]) -> None:
        """The family's value ranges; `values` holds its tensors as float64 on the CPU."""

    def _check_step_values(self, values: Dict[str, torch.Tensor]) -> None:
        """r in [0, 1], delta > -1, o > -1 (EPD's and AMED's ranges)."""
        name = type(self).__name__
        r = values["r"]
        if (r < 0).any() or (r > 1).any():
            raise ValueError(f"{name}.r must lie in [0, 1], got values in "
                             f"[{r.min().item():.6g}, {r.max().item():.6g}]")
        for n in ("delta", "o"):
            if (values[n] <= -1).any():
                raise ValueError(f"{name}.{n} must be > -1 (1 + {n} is a positive scale), "
                                 f"min is {values[n].min().item():.6g}")

    def _is_solver(self, solver: str) -> bool:
        return solver == self.solver

    def check_compatible(self, nfe: Optional[int] = None, sigmas=None, *,
                         solver: Optional[str] = None, plugin: Optional[bool] = None,
                         afs: Optional[bool] = None, rtol: float = 1e-5,
                         atol: float = 1e-8) -> None:
        """ValueError unless these params fit the requested solver (or ``plugin``), latency
        NFE, afs and time grid (within rtol / atol)."""
        what, made = self._WHAT, self._MADE
        if plugin is not None:
            if not self._SOLVERS:
                raise TypeError(f"{type(self).__name__} has no plugin variant")
            solver = self._SOLVERS[int(bool(plugin))]
        if solver is not None and not self._is_solver(solver):
            plugin = f" (plugin={self.plugin})" if self._SOLVERS else ""
            raise ValueError(f"these {what} are for solver {self.solver!r}{plugin}, not "
                             f"{solver!r}")
        if afs is not None and bool(afs) != self.afs:
            raise ValueError(f"afs={bool(afs)} was asked but the {what} were {made} with "
                             f"afs={self.afs}")
        if nfe is not None and int(nfe) != self.nfe:
            raise ValueError(f"{what} were {made} for latency NFE {self.nfe} ({self.num_steps} "
                             f"steps of {self.solver}, afs={self.afs}) but NFE {nfe} was asked")
        if sigmas is None:
            return
        mine = self.sigmas.detach().to("cpu", torch.float64)
        given = self._convert("sigmas", sigmas).detach().to("cpu", torch.float64).reshape(-1)
        if given.numel() != mine.numel():
            raise ValueError(f"{what} have {mine.numel()} sigmas ({mine.numel() - 1} steps) but "
                             f"the grid given has {given.numel()} ({given.numel() - 1} steps)")
        if not torch.allclose(given, mine, rtol=rtol, atol=atol):
            i = int(((given - mine).abs() > atol + rtol * mine.abs()).nonzero()[0, 0])
            raise ValueError(f"{what} were {made} on a different time grid: sigma[{i}] is "
                             f"{mine[i].item():.8g} in the params but {given[i].item():.8g} in "
                             f"the grid given (schedule {self.schedule!r})")

    def replace(self, **changes):
        """A shallow copy with some fields changed (``nfe`` recomputed unless given)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw.update(meta=dict(self.meta), nfe=None)
        kw.update(changes)
        return type(self)(**kw)

    def _tensors(self) -> Dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self._VALUES if getattr(self, n) is not None}

    def to(self, device=None, dtype: Optional[torch.dtype] = None):
        """A copy on `device`; `dtype` converts the family's tensors, not the grid."""
        return self.replace(sigmas=self.sigmas.to(device=device),
                            **{n: t.to(device=device, dtype=dtype)
                               for n, t in self._tensors().items()})

    def detach(self):
        """A copy whose tensors are detached from any autograd graph (and cloned)."""
        return self.replace(sigmas=self.sigmas.detach().clone(),
                            **{n: t.detach().clone() for n, t in self._tensors().items()})

    def _tensors_for_file(self) -> Dict[str, torch.Tensor]:
        out = {"sigmas": self.sigmas, **self._tensors()}
        return {n: t.detach().to("cpu").contiguous().clone() for n, t in out.items()}

    def _file_fields(self) -> dict:
        """The family's metadata fields beyond the common ones."""
        return {}

    def save(self, path: Union[str, os.PathLike], *, overwrite: bool = False) -> None:
        """Validates, then writes the params file atomically; an existing `path` is a
        FileExistsError unless ``overwrite=True``."""
        self._save(path, overwrite, self._file_fields())

    def _save(self, path, overwrite: bool, own_fields: dict) -> None:
        self.validate()
        fields = {"format_version": self.FORMAT_VERSION, "solver": self.solver,
                  "S": self.num_steps, "nfe": self.nfe, "afs": self.afs,
                  "max_order": self.max_order, "schedule": self.schedule, "meta": self.meta,
                  **own_fields}
        if self._KIND is not None:
            fields["kind"] = self._KIND
        write_params_file(path, self._tensors_for_file(), fields, type(self).__name__,
                          overwrite=overwrite)

    @classmethod
    def load(cls, path: Union[str, os.PathLike], device=None):
        """Reads and fully validates a file written by `save` (moved to `device` if given);
        errors as in `file.py`'s docstring."""
        return cls._load(path, device)

    @classmethod
    def _load(cls, path, device, **options):
        keys = _COMMON_KEYS + cls._FILE_KEYS + (("kind",) if cls._KIND else ())
        pf = open_params_file(path, cls._FILE, kind=cls._KIND, supported=cls.FORMAT_VERSION,
                              keys=keys)
        meta = pf.meta
        with pf.naming_errors():
            params = cls(**cls._from_file(pf, **options), nfe=meta["nfe"], afs=meta["afs"],
                         max_order=meta["max_order"], schedule=meta["schedule"],
                         meta=meta["meta"]).validate()
        return params.to(device) if device is not None else params

    @classmethod
    def _from_file(cls, pf: ParamsFile, **options) -> dict:
        """The constructor arguments of the family's own fields (sigmas included), checked."""
        raise NotImplementedError
