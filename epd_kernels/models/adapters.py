"""Adapters: other libraries' networks as EDM denoisers ``D(x, sigma [B], **cond) -> x0_hat``.

`DiffusersDenoiser`: a diffusers discrete-time VP unet (input ``x / sqrt(1 + sigma^2)``, a
fractional timestep interpolated in log sigma from ``alphas_cumprod``). `KDiffusionDenoiser`,
`EpsDenoiser` and `VDenoiser`: k-diffusion-style, eps- and v-prediction models."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .conditioning import copy_model_attrs, first_output, per_sample, sigma_rows

__all__ = ["DiffusersDenoiser", "KDiffusionDenoiser", "EpsDenoiser", "VDenoiser",
           "require_diffusers"]


def require_diffusers():
    """Imports diffusers or raises an ImportError saying how to install it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("this needs the optional dependency diffusers: "
                          "pip install diffusers   (or pip install 'epd_kernels[diffusers]')"
                          ) from e
    return diffusers


def config_value(obj, key, default=None):
    """``obj.config[key]`` for a diffusers component (config dict or attribute)."""
    cfg = getattr(obj, "config", None)
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def module_place(module, device=None, dtype=torch.float32):
    """(device, dtype) of a module's first parameter, else the given ones."""
    if isinstance(module, nn.Module):
        for p in module.parameters():
            return p.device, p.dtype
    return torch.device(device or "cpu"), dtype


class DiffusersDenoiser(nn.Module):
    """EDM denoiser of a diffusers discrete-time (VP) unet (or any callable ``unet(sample,
    timestep [B], **cond)``) with its scheduler's ``alphas_cumprod`` and prediction type;
    ``quantize`` rounds the timestep. ``sigma_min`` / ``sigma_max``: its sigma table's ends."""

    def __init__(self, unet: Callable, alphas_cumprod, prediction_type: str = "epsilon",
                 quantize: bool = False):
        super().__init__()
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
                             f"got {prediction_type!r}")
        if not callable(unet):
            raise ValueError("unet must be callable")
        self.unet = unet
        a = torch.as_tensor(alphas_cumprod, dtype=torch.float64).detach().cpu().reshape(-1)
        if a.numel() < 2 or not ((a > 0) & (a < 1)).all():
            raise ValueError("alphas_cumprod must hold >= 2 values in (0, 1)")
        sig = torch.sqrt((1 - a) / a)
        if not (sig[1:] > sig[:-1]).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (sigma increasing with t)")
        self.register_buffer("log_sigmas", sig.log(), persistent=False)
        self.prediction_type = prediction_type
        self.quantize = bool(quantize)
        self.sigma_min = float(sig[0])
        self.sigma_max = float(sig[-1])
        size, chans = config_value(unet, "sample_size"), config_value(unet, "in_channels")
        if size is not None and chans is not None:
            hw = (size, size) if isinstance(size, int) else tuple(size)
            self.shape = (int(chans),) + tuple(int(v) for v in hw)
        else:
            self.shape = None
        ncls = config_value(unet, "num_class_embeds")
        if ncls:
            self.num_classes = int(ncls)

    @classmethod
    def from_scheduler(cls, unet, scheduler, **kw) -> "DiffusersDenoiser":
        """From a diffusers scheduler: its ``alphas_cumprod`` and ``config.prediction_type``."""
        return cls(unet, scheduler.alphas_cumprod,
                   prediction_type=scheduler.config.prediction_type, **kw)

    @classmethod
    def from_pretrained(cls, name_or_path: str, unet_subfolder: Optional[str] = "unet",
                        scheduler_subfolder: Optional[str] = "scheduler", device=None,
                        dtype: torch.dtype = torch.float32, **kw) -> "DiffusersDenoiser":
        """Loads ``UNet2DModel`` and the DDPM noise table of a diffusers model directory
        (or hub id, if your environment can reach the hub). Needs diffusers."""
        diffusers = require_diffusers()
        unet = diffusers.UNet2DModel.from_pretrained(name_or_path, subfolder=unet_subfolder)
        sched = diffusers.DDPMScheduler.from_pretrained(name_or_path, subfolder=scheduler_subfolder)
        unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
        return cls.from_scheduler(unet, sched, **kw)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of each sigma (piecewise linear in log sigma; clamped)."""
        ls = self.log_sigmas.to(sigma.device)
        log_s = sigma.detach().to(ls.dtype).clamp_min(1e-30).log()
        T = ls.numel()
        hi = torch.searchsorted(ls, log_s).clamp(1, T - 1)
        lo = hi - 1
        w = ((log_s - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        t = lo.to(ls.dtype) + w
        return t.round() if self.quantize else t

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of `sigma_to_t` (linear interpolation of log sigma between integers)."""
        ls = self.log_sigmas.to(t.device)
        t = t.to(ls.dtype).clamp(0, ls.numel() - 1)
        lo = t.floor().long().clamp(max=ls.numel() - 2)
        w = t - lo
        return torch.exp(ls[lo] + w * (ls[lo + 1] - ls[lo]))

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = sigma_rows(sigma, x)
        sv = per_sample(s, x)
        x_vp = x / torch.sqrt(1 + sv * sv)
        t = self.sigma_to_t(s)
        net_dtype = module_place(self.unet, dtype=x.dtype)[1]
        # Timesteps in float32 (what diffusers' embeddings compute in), float64 for float64 x.
        t = t.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        out = first_output(self.unet(x_vp.to(net_dtype), t, **cond)).to(x.dtype)
        if out.shape[1] != x.shape[1]:  # learned variance: [eps, var] -> eps
            out = out[:, :x.shape[1]]
        if self.prediction_type == "epsilon":
            return x - sv * out
        if self.prediction_type == "v_prediction":
            return x / (1 + sv * sv) - sv / torch.sqrt(1 + sv * sv) * out
        return out


class KDiffusionDenoiser(nn.Module):
    """A k-diffusion-style ``model(x, sigma [B], **kw) -> denoised``, with sigma made [B];
    ``shape``, ``sigma_min``, ``sigma_max``, ``num_classes`` given or copied from the model."""

    def __init__(self, model: Callable, shape=None, sigma_min: Optional[float] = None,
                 sigma_max: Optional[float] = None):
        super().__init__()
        if not callable(model):
            raise ValueError("model must be callable")
        self.inner = model
        self.shape = None
        copy_model_attrs(self, model, shape=shape, sigma_min=sigma_min, sigma_max=sigma_max)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        return self.inner(x, sigma_rows(sigma, x), **cond)


class EpsDenoiser(KDiffusionDenoiser):
    """``D = x - sigma eps(c_in x, sigma)`` with ``c_in = 1`` (``input_scaling="none"``) or
    ``1 / sqrt(1 + sigma^2)`` (``"vp"``)."""

    def __init__(self, model: Callable, input_scaling: str = "none", **kw):
        super().__init__(model, **kw)
        if input_scaling not in ("none", "vp"):
            raise ValueError("input_scaling must be 'none' or 'vp'")
        self.input_scaling = input_scaling

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = sigma_rows(sigma, x)
        sv = per_sample(s, x)
        xin = x / torch.sqrt(1 + sv * sv) if self.input_scaling == "vp" else x
        return x - sv * self.inner(xin, s, **cond)


class VDenoiser(KDiffusionDenoiser):
    """A v-prediction model in sigma space: ``D = c_skip x + c_out v(c_in x, sigma)`` with
    EDM's coefficients for ``sigma_data`` (c_out negated for v)."""

    def __init__(self, model: Callable, sigma_data: float = 1.0, **kw):
        super().__init__(model, **kw)
        self.sigma_data = float(sigma_data)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = sigma_rows(sigma, x)
        sv = per_sample(s, x)
        sd2 = self.sigma_data ** 2
        r = torch.sqrt(sv * sv + sd2)
        v = self.inner(x / r, s, **cond)
        return sd2 / (sv * sv + sd2) * x - sv * self.sigma_data / r * v
