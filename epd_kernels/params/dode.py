"""D-ODE solver parameters: one scalar lambda per step on one time grid.

A D-ODE solver (Kim, Tang, Yu, CVPR 2024; `epd_kernels.solvers.dode`) replaces its base
solver's gradient estimate ``v_n`` by ``O_n = v_n + lambda_n (v_n - v_{n-1})``. For ``S``
steps:

    lambdas [S]    float64   lambda_n; lambdas[0] = 0 (step 0 has no previous estimate)
    sigmas  [S+1]  float64   the time grid, strictly decreasing, all > 0

plus metadata: ``base`` ("euler", "heun" or "ipndm"; the solver name is ``"d-" + base``),
``afs`` (analytic first step), ``nfe`` (latency NFE, the base solver's rule: ``S - afs``
for euler / ipndm, ``2 S - afs`` for heun), ``max_order`` (iPNDM order cap, used by
d-ipndm only), ``schedule`` (the name or description of the grid) and ``meta``
(free-form, JSON-serialisable: teacher, fitting losses, ...).

File format (`save` / `load`), modelled on `EPDParams`: one safetensors file with the
tensors ``lambdas`` and ``sigmas`` and, in the header's string-to-string metadata,
JSON-encoded values for ``format_version``, ``kind`` (always "d-ode"), ``solver``,
``base``, ``S``, ``nfe``, ``afs``, ``max_order``, ``schedule``, ``package_version``,
``meta`` and ``checksum`` (sha256 over the tensors' names, dtypes, shapes and bytes).
Files are written atomically (temporary file in the same folder, then ``os.replace``).
What the three params files share is in `epd_kernels.params_file`.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .params_file import (check_afs_nfe, check_common_fields, check_grid, check_grid_shape,
                          check_same_grid, open_params_file, to_tensor, write_params_file)

__all__ = ["DODEParams", "DODE_FORMAT_VERSION", "DODE_BASES", "dode_latency_nfe",
           "normalize_dode_base"]

#: Version of the file layout written by `DODEParams.save`. Readers refuse newer versions.
DODE_FORMAT_VERSION = 1

#: Base solvers with a D-ODE variant and their sequential denoiser calls per step.
DODE_BASES = {"euler": 1, "heun": 2, "ipndm": 1}
_BASE_ALIASES = {"euler": "euler", "ddim": "euler", "heun": "heun", "edm": "heun",
                 "ipndm": "ipndm"}

_TENSOR_FIELDS = ("lambdas", "sigmas")
_META_KEYS = ("format_version", "kind", "solver", "base", "S", "nfe", "afs", "max_order",
              "schedule", "package_version", "meta", "checksum")
_KIND = "d-ode"


def normalize_dode_base(name) -> str:
    """"euler" / "heun" / "ipndm" from a base or D-ODE solver name ("d-ddim" -> "euler")."""
    if isinstance(name, str):
        key = name.strip().lower()
        if key.startswith("d-"):
            key = key[2:]
        if key in _BASE_ALIASES:
            return _BASE_ALIASES[key]
    raise ValueError(f"unknown D-ODE solver {name!r}; known: 'd-euler' (alias 'd-ddim'), "
                     f"'d-heun' (alias 'd-edm'), 'd-ipndm' (or the base names "
                     f"{sorted(_BASE_ALIASES)})")


def dode_latency_nfe(num_steps: int, base: str, afs: bool) -> int:
    """Sequential denoiser calls of a D-ODE solver: the same as its base solver,
    ``S - afs`` (euler, ipndm) or ``2 S - afs`` (heun)."""
    return DODE_BASES[normalize_dode_base(base)] * int(num_steps) - int(bool(afs))


def _as_f64(name, value) -> torch.Tensor:
    t = to_tensor("DODEParams", name, value).detach()
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ValueError(f"DODEParams.{name} must hold real numbers, got dtype {t.dtype}")
    return t.to("cpu", torch.float64)


@dataclass
class DODEParams:
    """Per-step lambdas of a D-ODE solver on one time grid (see module docstring).

    Build one with `fit_dode` (closed-form least squares against a teacher), with
    `DODEParams.zeros(sigmas, base)` (lambda = 0: exactly the base solver), or with
    `DODEParams.load(path)`. ``lambdas`` and ``sigmas`` are kept as float64 CPU tensors
    (the solver reads the lambdas as Python floats).
    """

    lambdas: torch.Tensor
    sigmas: torch.Tensor
    base: str = "euler"
    nfe: Optional[int] = None
    afs: Optional[bool] = None
    max_order: int = 4
    schedule: Union[str, dict, None] = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.base = normalize_dode_base(self.base)
        self.lambdas = _as_f64("lambdas", self.lambdas)
        self.sigmas = _as_f64("sigmas", self.sigmas)
        if self.afs is None:  # the base solver's default in `sample` (AFS on for heun)
            self.afs = self.base == "heun"
        if not isinstance(self.afs, bool):
            raise ValueError(f"DODEParams.afs must be True or False, got {self.afs!r}")
        if isinstance(self.max_order, bool) or not isinstance(self.max_order, int):
            raise ValueError(f"DODEParams.max_order must be an int in 1..4, got "
                             f"{self.max_order!r}")
        if self.meta is None:
            self.meta = {}
        if self.nfe is None and self.sigmas.dim() == 1:
            self.nfe = dode_latency_nfe(self.sigmas.numel() - 1, self.base, self.afs)

    # ---------------------------------------------------------------- construction

    @classmethod
    def zeros(cls, sigmas, base: str = "euler", *, afs: Optional[bool] = None,
              max_order: int = 4, schedule: Union[str, dict, None] = None,
              meta: Optional[dict] = None) -> "DODEParams":
        """All lambdas 0 on `sigmas`: the D-ODE solver is then exactly its base solver."""
        sig = _as_f64("sigmas", sigmas)
        check_grid_shape("DODEParams", sig)
        p = cls(lambdas=torch.zeros(sig.numel() - 1, dtype=torch.float64), sigmas=sig,
                base=base, afs=afs, max_order=max_order, schedule=schedule,
                meta=dict(meta or {}))
        return p.validate()

    # ---------------------------------------------------------------- properties

    @property
    def num_steps(self) -> int:
        """S, the number of solver steps."""
        return int(self.sigmas.numel()) - 1

    @property
    def solver(self) -> str:
        """The `sample` name: "d-euler", "d-heun" or "d-ipndm"."""
        return "d-" + self.base

    @property
    def evals_per_step(self) -> int:
        return DODE_BASES[self.base]

    def replace(self, **changes) -> "DODEParams":
        """A copy with some fields changed (``nfe`` is recomputed unless given)."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        kw["lambdas"] = self.lambdas.clone()
        kw["sigmas"] = self.sigmas.clone()
        kw["meta"] = dict(self.meta)
        if "nfe" not in changes and ({"sigmas", "base", "afs"} & set(changes)):
            kw["nfe"] = None
        kw.update(changes)
        return DODEParams(**kw)

    # ---------------------------------------------------------------- checks

    def check_structure(self) -> None:
        """Shapes, metadata types and the NFE rule (no value checks)."""
        check_grid_shape("DODEParams", self.sigmas)
        S = self.num_steps
        if tuple(self.lambdas.shape) != (S,):
            raise ValueError(f"DODEParams.lambdas must have shape [S] = [{S}] (S from sigmas "
                             f"of length {S + 1}), got {list(self.lambdas.shape)}")
        check_common_fields("DODEParams", self)
        expected = dode_latency_nfe(S, self.base, self.afs)
        if self.nfe != expected:
            rule = "2*S - afs" if self.base == "heun" else "S - afs"
            raise ValueError(f"DODEParams.nfe = {self.nfe} does not match S = {S} steps of "
                             f"{self.solver} with afs={self.afs}: the latency NFE is "
                             f"{rule} = {expected}")
        if expected < 1:
            raise ValueError(f"DODEParams: {S} step(s) of {self.solver} with afs={self.afs} "
                             f"make no denoiser call (nfe = {expected}); use more steps")

    def validate(self) -> "DODEParams":
        """Full check: structure, finite lambdas, ``lambdas[0] == 0``, and a valid grid
        (finite, > 0, strictly decreasing). Returns self; raises ValueError."""
        self.check_structure()
        lam = self.lambdas
        if not torch.isfinite(lam).all():
            raise ValueError(f"DODEParams.lambdas has non-finite values: {lam.tolist()}")
        if lam[0].item() != 0.0:
            raise ValueError(f"DODEParams.lambdas[0] must be 0 (step 0 has no previous "
                             f"gradient estimate to extrapolate from), got {lam[0].item()!r}")
        check_grid("DODEParams", self.sigmas)
        return self

    def check_compatible(self, nfe: Optional[int] = None, sigmas=None, *, solver=None,
                         afs: Optional[bool] = None, rtol: float = 1e-5,
                         atol: float = 1e-8) -> None:
        """Raises ValueError unless these params fit the requested solver, nfe, afs, grid."""
        if solver is not None and normalize_dode_base(solver) != self.base:
            raise ValueError(f"these D-ODE params are for solver {self.solver!r}, not "
                             f"{solver!r}")
        check_afs_nfe("D-ODE params", "fitted", afs=self.afs, nfe=self.nfe,
                      detail=f"{self.num_steps} steps of {self.solver}, afs={self.afs}",
                      asked_afs=afs, asked_nfe=nfe)
        if sigmas is not None:
            check_same_grid("D-ODE params", "fitted", self.sigmas, _as_f64("sigmas", sigmas),
                            self.schedule, rtol=rtol, atol=atol)

    # ---------------------------------------------------------------- files

    def _tensors_for_file(self):
        return {n: getattr(self, n).detach().to("cpu", torch.float64).contiguous().clone()
                for n in _TENSOR_FIELDS}

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes a safetensors file atomically (temp file in the same folder + os.replace);
        an invalid or unserialisable object leaves an existing file untouched."""
        self.validate()
        fields = {"format_version": DODE_FORMAT_VERSION, "kind": _KIND, "solver": self.solver,
                  "base": self.base, "S": self.num_steps, "nfe": self.nfe, "afs": self.afs,
                  "max_order": self.max_order, "schedule": self.schedule, "meta": self.meta}
        write_params_file(path, self._tensors_for_file(), fields, "DODEParams")

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "DODEParams":
        """Reads and fully validates a file written by `save`.

        FileNotFoundError for a missing file; ValueError naming the file and the problem for
        a truncated or corrupted file, a file of another kind (e.g. EPD params), a newer
        format_version, missing keys, wrong shapes, an nfe that does not match the sigmas,
        or out-of-range values.
        """
        pf = open_params_file(path, "a D-ODE params file", kind=_KIND,
                              supported=DODE_FORMAT_VERSION, keys=_META_KEYS)
        meta, tensors = pf.meta, pf.tensors
        pf.require_int("S", "nfe", "max_order")
        S = meta["S"]
        pf.require_tensors({"lambdas": (S,), "sigmas": (S + 1,)}, f"S={S}")
        for k in _TENSOR_FIELDS:
            # `save` writes float64 only: another dtype means the file came from elsewhere.
            if tensors[k].dtype != torch.float64:
                pf.fail(f"tensor {k!r} must be float64, got {tensors[k].dtype}")
        try:
            base = normalize_dode_base(meta["base"])
        except ValueError as e:
            pf.fail(f"metadata 'base': {e}")
        if meta["solver"] != "d-" + base:
            pf.fail(f"solver {meta['solver']!r} contradicts base {meta['base']!r}")
        pf.require_bool("afs")
        with pf.naming_errors():
            return cls(**{k: tensors[k] for k in _TENSOR_FIELDS}, base=base, nfe=meta["nfe"],
                       afs=meta["afs"], max_order=meta["max_order"],
                       schedule=meta["schedule"], meta=meta["meta"]).validate()
