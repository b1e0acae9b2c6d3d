"""D-ODE parameters (docs/design.md, "D-ODE"): one extrapolation weight ``lambdas[n]`` per
step (``lambdas[0] = 0``) for the base solver ``base`` ("euler", "heun", "ipndm"; the
solver is ``"d-" + base``), whose latency NFE and default ``afs`` they take."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .base import ParamsBase

__all__ = ["DODEParams"]

#: Base solvers with a D-ODE variant and their sequential denoiser calls per step.
DODE_BASES = {"euler": 1, "heun": 2, "ipndm": 1}
_BASE_ALIASES = {"euler": "euler", "ddim": "euler", "heun": "heun", "edm": "heun",
                 "ipndm": "ipndm"}


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
    """Sequential denoiser calls of a D-ODE solver: those of its base solver."""
    return DODE_BASES[normalize_dode_base(base)] * int(num_steps) - int(bool(afs))


@dataclass
class DODEParams(ParamsBase):
    """Per-step lambdas of a D-ODE solver on one grid, float64 on the CPU (the solver reads
    them as floats): `fit_dode`, `DODEParams.zeros` or `load` make them."""

    lambdas: torch.Tensor
    sigmas: torch.Tensor
    base: str = "euler"
    nfe: Optional[int] = None
    afs: Optional[bool] = None
    max_order: int = 4
    schedule: Union[str, dict, None] = None
    meta: dict = field(default_factory=dict)

    _WHAT = "D-ODE params"
    _MADE = "fitted"
    _FILE = "a D-ODE params file"
    _KIND = "d-ode"
    _VALUES = ("lambdas",)
    _FILE_KEYS = ("base",)

    def __post_init__(self):
        self.base = normalize_dode_base(self.base)
        super().__post_init__()

    @classmethod
    def _convert(cls, name, value) -> torch.Tensor:
        t = super()._convert(name, value).detach()
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"DODEParams.{name} must hold real numbers, got dtype {t.dtype}")
        return t.to("cpu", torch.float64)

    def _default_afs(self) -> bool:
        return self.base == "heun"

    @classmethod
    def zeros(cls, sigmas, base: str = "euler", *, afs: Optional[bool] = None,
              max_order: int = 4, schedule: Union[str, dict, None] = None,
              meta: Optional[dict] = None) -> "DODEParams":
        """All lambdas 0 on `sigmas`: the D-ODE solver is then exactly its base solver."""
        sig = cls._grid(sigmas)
        return cls(lambdas=torch.zeros(sig.numel() - 1, dtype=torch.float64), sigmas=sig,
                   base=base, afs=afs, max_order=max_order, schedule=schedule,
                   meta=dict(meta or {})).validate()

    @property
    def solver(self) -> str:
        """The `sample` name: "d-euler", "d-heun" or "d-ipndm"."""
        return "d-" + self.base

    @property
    def evals_per_step(self) -> int:
        return DODE_BASES[self.base]

    def _is_solver(self, solver) -> bool:
        return normalize_dode_base(solver) == self.base

    def _shapes(self, S):
        return {"lambdas": ("[S]", (S,))}

    def _check_values(self, values):
        """lambdas[0] == 0: step 0 has no previous estimate."""
        if values["lambdas"][0].item() != 0.0:
            raise ValueError(f"DODEParams.lambdas[0] must be 0 (step 0 has no previous "
                             f"gradient estimate to extrapolate from), got "
                             f"{values['lambdas'][0].item()!r}")

    def _file_fields(self):
        return {"base": self.base}

    @classmethod
    def _from_file(cls, pf):
        S, tensors = pf.meta["S"], pf.tensors
        pf.require_tensors({"lambdas": (S,), "sigmas": (S + 1,)}, f"S={S}")
        for k, t in tensors.items():
            # `save` writes float64 only: another dtype means the file came from elsewhere.
            if t.dtype != torch.float64:
                pf.fail(f"tensor {k!r} must be float64, got {t.dtype}")
        try:
            base = normalize_dode_base(pf.meta["base"])
        except ValueError as e:
            pf.fail(f"metadata 'base': {e}")
        if pf.meta["solver"] != "d-" + base:
            pf.fail(f"solver {pf.meta['solver']!r} contradicts base {pf.meta['base']!r}")
        return dict(tensors, base=base)
