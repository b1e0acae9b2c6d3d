"""EPD-Solver / EPD-Plugin parameters (docs/design.md, "EPD step"), in natural values so that
exact settings such as ``r = 0`` or one-hot weights are representable: ``r``, ``weights``,
``delta`` [S, K] and ``o`` [S], plus the common fields and ``plugin``. The tensors may require
grad (distillation maps its latents here); `validate` and `save` look at detached values."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .base import ParamsBase

__all__ = ["EPDParams"]

#: Starting points of `EPDParams.init` (its docstring).
_R_INITS = ("gauss", "gauss-log", "linspace")


@dataclass
class EPDParams(ParamsBase):
    """EPD / EPD-Plugin parameters on one grid: `init`, `distill` or `load` make them."""

    r: torch.Tensor
    weights: torch.Tensor
    delta: torch.Tensor
    o: torch.Tensor
    sigmas: torch.Tensor
    nfe: Optional[int] = None
    afs: bool = True
    plugin: bool = False
    max_order: int = 4
    schedule: Union[str, dict, None] = None
    meta: dict = field(default_factory=dict)

    _WHAT = "EPD params"
    _FILE = "an EPD params file"
    _VALUES = ("r", "weights", "delta", "o")
    _SOLVERS = ("epd", "epd-ipndm")
    _FILE_KEYS = ("K", "plugin")

    @classmethod
    def init(cls, sigmas, num_points: int, *, afs: bool = True, plugin: bool = False,
             max_order: int = 4, schedule: Union[str, dict, None] = None,
             r_init: str = "gauss", dtype: torch.dtype = torch.float64,
             device: Union[str, torch.device, None] = None,
             meta: Optional[dict] = None) -> "EPDParams":
        """An untrained start on `sigmas` with `num_points` branches, ``delta = o = 0``.

        ``r_init``: ``"gauss"`` (default; distilled to a lower test RMSE than "gauss-log" in
        11 of 12 benchmark cases) puts the branches at the Gauss-Legendre nodes of each step
        in sigma with their weights; ``"gauss-log"`` the same nodes as ``r`` with equal
        weights; ``"linspace"`` ``r = (k + 1) / (K + 1)`` with equal weights."""
        if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
            raise ValueError(f"num_points must be an integer >= 1, got {num_points!r}")
        sig = cls._grid(sigmas)
        S, K = sig.numel() - 1, num_points
        if r_init not in _R_INITS:
            raise ValueError(f"r_init must be one of {_R_INITS}, got {r_init!r}")
        weights = torch.full((S, K), 1.0 / K, dtype=torch.float64)
        if r_init == "linspace":
            r = (torch.arange(1, K + 1, dtype=torch.float64) / (K + 1)).expand(S, K)
        else:
            import numpy as np
            nodes, gw = np.polynomial.legendre.leggauss(K)
            c = torch.tensor((nodes + 1.0) / 2.0, dtype=torch.float64)      # nodes on [0, 1]
            if r_init == "gauss-log":
                r = c.expand(S, K)
            else:
                t, t_next = sig[:-1, None], sig[1:, None]                   # [S, 1]
                tau = t + c[None] * (t_next - t)
                r = torch.log(tau / t) / torch.log(t_next / t)
                weights = torch.tensor(gw / 2.0, dtype=torch.float64).expand(S, K)
        kw = dict(dtype=dtype, device=device)
        return cls(r=r.to(**kw).clone(), weights=weights.to(**kw).clone(),
                   delta=torch.zeros(S, K, **kw), o=torch.zeros(S, **kw),
                   sigmas=sig.to(device) if device is not None else sig, afs=afs,
                   plugin=plugin, max_order=max_order, schedule=schedule,
                   meta=dict(meta or {})).validate()

    @property
    def num_points(self) -> int:
        """K, the number of parallel branches per step."""
        return int(self.r.shape[-1]) if self.r.dim() >= 1 else 0

    @property
    def total_evaluations(self) -> int:
        """(K + 1) evaluations per step, minus 1 with AFS."""
        return (self.num_points + 1) * self.num_steps - int(self.afs)

    def step(self, n: int):
        """(r[n], weights[n], delta[n], o[n]) for step n."""
        return self.r[n], self.weights[n], self.delta[n], self.o[n]

    def _shapes(self, S):
        if not isinstance(self.r, torch.Tensor) or self.r.dim() != 2 or self.r.shape[1] < 1:
            raise ValueError(f"EPDParams.r must be a tensor of shape [S, K] = [{S}, K>=1] (S "
                             f"from sigmas of length {S + 1}), got "
                             f"{list(getattr(self.r, 'shape', [])) or type(self.r).__name__}")
        K = self.num_points
        return {"r": ("[S, K]", (S, K)), "weights": ("[S, K]", (S, K)),
                "delta": ("[S, K]", (S, K)), "o": ("[S]", (S,))}

    def _check_values(self, values):
        """EPD's ranges, and weights on the simplex (tolerance 1e-5, 1e-2 for half dtypes)."""
        self._check_step_values(values)
        w = values["weights"]
        tol = 1e-2 if self.weights.dtype in (torch.float16, torch.bfloat16) else 1e-5
        if (w < -tol).any():
            raise ValueError(f"EPDParams.weights must be >= 0 (on the simplex), min is "
                             f"{w.min().item():.6g}")
        sums = w.sum(1)
        bad = (sums - 1).abs() > tol
        if bad.any():
            n = int(bad.nonzero()[0, 0])
            raise ValueError(f"EPDParams.weights must sum to 1 per step (simplex); step {n} sums "
                             f"to {sums[n].item():.8g} (tolerance {tol:g})")

    def check_compatible(self, nfe: Optional[int] = None, num_points: Optional[int] = None,
                         sigmas=None, **kw) -> None:
        """`ParamsBase.check_compatible`, and K (``num_points``)."""
        if num_points is not None and int(num_points) != self.num_points:
            raise ValueError(f"EPD params have K = {self.num_points} parallel points but "
                             f"K = {num_points} was asked")
        super().check_compatible(nfe, sigmas, **kw)

    def _file_fields(self):
        return {"K": self.num_points, "plugin": self.plugin}

    @classmethod
    def _from_file(cls, pf):
        pf.require_solver(cls._SOLVERS)
        pf.require_int("K")
        K, S = pf.meta["K"], pf.meta["S"]
        pf.require_tensors({"r": (S, K), "weights": (S, K), "delta": (S, K), "o": (S,),
                            "sigmas": (S + 1,)}, f"K={K}, S={S}")
        return dict(pf.tensors, plugin=pf.meta["plugin"])
