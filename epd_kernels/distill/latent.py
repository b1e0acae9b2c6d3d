"""Unconstrained latent parameters of EPD (and of table-form AMED) and their maps.

The optimiser works on four free float64 tensors; the sampler sees their images
(docs/design.md, "EPD step": ``r = sigmoid(a)``, ``weights = softmax(b)``,
``delta = delta_max tanh(c)``, ``o = o_max tanh(e)``), always inside the ranges
`EPDParams.validate` demands. `DELTA_MAX` = `O_MAX` = 0.1: delta and o are small corrections
in the paper, and the bound keeps a badly conditioned start away from ``1 + delta`` or
``1 + o`` near zero.

With ``learn_grid=True`` a fifth latent ``g [S]`` moves the interior noise levels: the
log-sigma increments are ``softmax(g) * log(sigma_max / sigma_min)`` (strictly decreasing,
ends fixed; start: ``g = log`` of the start grid's increments).

`LatentAMEDTable` is the same map for table-form `AMEDParams` (r, delta, o per step, no
weights), with AMED's default bounds 0.2 / 0.01 chosen by the caller.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..params import EPDParams

__all__ = ["DELTA_MAX", "O_MAX", "LatentEPD", "LatentAMEDTable"]

#: Default bound of |delta| (evaluation noise level (1 + delta) tau).
DELTA_MAX = 0.1
#: Default bound of |o| (update scale 1 + o).
O_MAX = 0.1

# Natural values are clamped this far inside their open ranges before inverting the map,
# so that an exact 0 / 1 / one-hot start gives finite latents.
_EPS = 1e-6


def _atanh_scaled(v: torch.Tensor, bound: float, name: str) -> torch.Tensor:
    if bound <= 0:
        raise ValueError(f"{name}_max must be > 0, got {bound}")
    if (v.abs() > bound).any():
        raise ValueError(f"the start value of {name} ({v.abs().max().item():.4g} in absolute "
                         f"value) is outside the latent range |{name}| < {name}_max = {bound}")
    return torch.atanh((v / bound).clamp(-1 + _EPS, 1 - _EPS))


class LatentEPD(nn.Module):
    """Free parameters ``a, b, c [S, K]``, ``e [S]`` behind an `EPDParams`: built by
    `from_params(start)`; `natural()` gives the differentiable params (start's grid, meta)."""

    def __init__(self, template: EPDParams, a, b, c, e, delta_max: float = DELTA_MAX,
                 o_max: float = O_MAX, g=None):
        super().__init__()
        self.template = template.detach()
        self.delta_max = float(delta_max)
        self.o_max = float(o_max)
        self.a = nn.Parameter(a)
        self.b = nn.Parameter(b)
        self.c = nn.Parameter(c)
        self.e = nn.Parameter(e)
        # (registered last: the flat gradient of a fixed-grid latent keeps its layout)
        self.g = None if g is None else nn.Parameter(g)

    @property
    def learns_grid(self) -> bool:
        return self.g is not None

    def grid(self) -> torch.Tensor:
        """The grid ``[S+1]`` (float64; differentiable in g when the grid is learned)."""
        s = self.template.sigmas
        if self.g is None:
            return s
        s = s.to(self.g.device)
        top, span = torch.log(s[0]), torch.log(s[0] / s[-1])
        inner = top - span * torch.cumsum(torch.softmax(self.g, dim=0), dim=0)[:-1]
        return torch.cat([s[:1], torch.exp(inner), s[-1:]])

    @classmethod
    def from_params(cls, params: EPDParams, delta_max: float = DELTA_MAX, o_max: float = O_MAX,
                    device=None, learn_grid: bool = False) -> "LatentEPD":
        """The latents whose image is ``params`` (r, weights clamped 1e-6 inside their range)."""
        params.validate()
        nat = {n: getattr(params, n).detach().to(device=device, dtype=torch.float64)
               for n in ("r", "weights", "delta", "o")}
        r = nat["r"].clamp(_EPS, 1 - _EPS)
        a = torch.log(r) - torch.log1p(-r)
        b = torch.log(nat["weights"].clamp_min(_EPS))
        b = b - b.mean(dim=-1, keepdim=True)  # softmax is shift invariant: centre it
        c = _atanh_scaled(nat["delta"], delta_max, "delta")
        e = _atanh_scaled(nat["o"], o_max, "o")
        g = None
        if learn_grid:
            g = torch.log(-torch.diff(torch.log(params.sigmas.to(device=device))))
            g = g - g.mean()
        return cls(params, a, b, c, e, delta_max, o_max, g)

    def natural(self, meta: Optional[dict] = None) -> EPDParams:
        """The `EPDParams` image of the latents (differentiable in a, b, c, e; its sigmas
        are the current grid's values, detached: the sampler takes the differentiable grid
        from `grid()`)."""
        t = self.template
        return EPDParams(r=torch.sigmoid(self.a), weights=torch.softmax(self.b, dim=-1),
                         delta=self.delta_max * torch.tanh(self.c),
                         o=self.o_max * torch.tanh(self.e),
                         sigmas=self.grid().detach().cpu(), nfe=t.nfe,
                         afs=t.afs, plugin=t.plugin, max_order=t.max_order,
                         schedule=t.schedule, meta=dict(t.meta if meta is None else meta))


class LatentAMEDTable(nn.Module):
    """Free parameters ``a, c, e [S]`` behind table-form `AMEDParams` (EPD with K = 1, no
    weights), built and read back as `LatentEPD`'s."""

    def __init__(self, template, a, c, e, delta_max: float, o_max: float):
        super().__init__()
        self.template = template.detach()
        self.delta_max = float(delta_max)
        self.o_max = float(o_max)
        self.a = nn.Parameter(a)
        self.c = nn.Parameter(c)
        self.e = nn.Parameter(e)

    @classmethod
    def from_params(cls, params, delta_max: float, o_max: float,
                    device=None) -> "LatentAMEDTable":
        """The latents whose image is the table ``params`` (r clamped 1e-6 inside (0, 1))."""
        params.validate()
        if params.form != "table":
            raise ValueError("LatentAMEDTable needs table-form AMEDParams")
        nat = {n: getattr(params, n).detach().to(device=device, dtype=torch.float64)
               for n in ("r", "delta", "o")}
        r = nat["r"].clamp(_EPS, 1 - _EPS)
        return cls(params, torch.log(r) - torch.log1p(-r),
                   _atanh_scaled(nat["delta"], delta_max, "delta"),
                   _atanh_scaled(nat["o"], o_max, "o"), delta_max, o_max)

    def natural(self, meta: Optional[dict] = None):
        """The table `AMEDParams` image of the latents (differentiable in a, c, e)."""
        return self.template.replace(r=torch.sigmoid(self.a),
                                     delta=self.delta_max * torch.tanh(self.c),
                                     o=self.o_max * torch.tanh(self.e),
                                     meta=dict(self.template.meta if meta is None else meta))
