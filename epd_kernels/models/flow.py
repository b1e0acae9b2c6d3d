r"""Flow-matching (rectified-flow) models as EDM denoisers: `FlowMatchDenoiser(model)`.

Convention (SD3, Flux): ``x_t = (1 - t) x0 + t n`` with t in [0, 1] and a velocity model
``v(x_t, t) = model(x_t, t [B], **cond)`` predicting ``n - x0``. Dividing by ``1 - t`` gives
EDM's state: ``sigma = t / (1 - t)``, ``x = x_t / (1 - t)``, and ``D(x, sigma) = x_t - t v``
(the same ODE curve). ``t_scale`` multiplies the time handed to the model (diffusers' SD3 /
Flux transformers take ``1000 t``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .conditioning import copy_model_attrs, first_output, per_sample, sigma_rows

__all__ = ["FlowMatchDenoiser", "sigma_to_flow_t", "flow_t_to_sigma"]


def sigma_to_flow_t(sigma):
    """``t = sigma / (1 + sigma)`` (float or tensor)."""
    return sigma / (1 + sigma)


def flow_t_to_sigma(t):
    """``sigma = t / (1 - t)`` (float or tensor; t < 1)."""
    return t / (1 - t)


class FlowMatchDenoiser(nn.Module):
    """EDM denoiser of a velocity model ``model(x_t, t [B], **cond) -> v``; the model gets
    ``t * t_scale`` in float32 (float64 for float64 x)."""

    def __init__(self, model: Callable, t_scale: float = 1.0, shape=None):
        super().__init__()
        if not callable(model):
            raise ValueError("model must be callable: model(x_t, t [B], **cond) -> velocity")
        t_scale = float(t_scale)
        if not t_scale > 0:
            raise ValueError(f"t_scale must be > 0, got {t_scale!r}")
        self.model = model
        self.t_scale = t_scale
        self.shape: Optional[tuple] = None
        # the model's own sigma range, if any, is in t, not sigma: not copied
        copy_model_attrs(self, model, ("shape", "num_classes"), shape=shape)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = sigma_rows(sigma, x, dtype)
        t = s / (1 + s)
        x_t = x / per_sample(1 + s, x).to(x.dtype)
        v = first_output(self.model(x_t, t * self.t_scale if self.t_scale != 1.0 else t, **cond))
        return x_t - per_sample(t, x).to(x.dtype) * v.to(x.dtype)
