"""Classifier-free guidance as a denoiser: `CFGDenoiser(denoiser, guidance_scale, uncond)`.

``D_cfg = D_u + s (D_c - D_u)`` with the conditional and unconditional rows stacked into one
call of 2N rows, so the latency NFE is unchanged. Values that must follow a distillation's
pool travel as call-time keywords: ``uncond_<name>=`` overrides ``uncond[name]`` and
``guidance_scale=`` the wrapper's scale."""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Union

import torch
from torch import nn

from .conditioning import copy_model_attrs, match_rows

__all__ = ["CFGDenoiser", "UNCOND_PREFIX", "SCALE_KEYWORD"]

#: Call-time keywords ``uncond_<name>`` carry the unconditional value of ``<name>``.
UNCOND_PREFIX = "uncond_"
#: Call-time keyword that overrides the wrapper's guidance scale.
SCALE_KEYWORD = "guidance_scale"

Scale = Union[float, torch.Tensor]


def _check_scale(scale, name: str = "guidance_scale") -> Scale:
    if isinstance(scale, torch.Tensor):
        if scale.dim() > 1 or not scale.is_floating_point() and scale.dtype not in (
                torch.int32, torch.int64):
            raise ValueError(f"{name} must be a float, a 0-d or a [B] tensor, got a tensor of "
                             f"shape {list(scale.shape)} and dtype {scale.dtype}")
        if not torch.isfinite(scale.detach().double()).all():
            raise ValueError(f"{name} must be finite")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{name} must be a finite float or a [B] tensor, got {scale!r}")
    return float(scale)


class CFGDenoiser(nn.Module):
    """``D_u + s (D_c - D_u)`` of ``denoiser`` with one stacked call per evaluation.
    ``uncond`` maps conditioning keywords to their unconditional tensors (1 row or one per
    sample), e.g. ``{"class_labels": null_class}``; each must also be given at call time,
    and keywords not in it are shared by both halves. ``guidance_scale``: a float or [B]."""

    def __init__(self, denoiser: Callable, guidance_scale: Scale,
                 uncond: Dict[str, torch.Tensor]):
        super().__init__()
        if not callable(denoiser):
            raise ValueError("denoiser must be callable: D(x, sigma, **cond) -> x0_hat")
        if not isinstance(uncond, dict) or not uncond:
            raise ValueError("uncond must be a non-empty dict of conditioning tensors for the "
                             "unconditional branch, e.g. {'class_labels': null_class} or "
                             "{'encoder_hidden_states': empty_prompt_embeddings}")
        for k, v in uncond.items():
            if not isinstance(v, torch.Tensor) or v.dim() < 1:
                got = "a 0-d tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"uncond[{k!r}] must be a tensor with a leading batch "
                                 f"dimension (1 row, or one per sample), got {got}")
        self.denoiser = denoiser
        self.guidance_scale = _check_scale(guidance_scale)
        self.uncond = dict(uncond)
        copy_model_attrs(self, denoiser)

    def extra_repr(self) -> str:
        s = self.guidance_scale
        scale = f"[{s.numel()}] tensor" if isinstance(s, torch.Tensor) else f"{s:g}"
        return f"guidance_scale={scale}, uncond={sorted(self.uncond)}"

    def _scale_rows(self, scale: Scale, rows: int, x: torch.Tensor):
        if not isinstance(scale, torch.Tensor):
            return scale
        s = scale.to(device=x.device, dtype=x.dtype)
        if s.dim() == 0:
            return s
        s = match_rows(s, rows, SCALE_KEYWORD)
        return s.reshape((rows,) + (1,) * (x.dim() - 1))

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        n = x.shape[0]
        scale = _check_scale(cond.pop(SCALE_KEYWORD)) if SCALE_KEYWORD in cond \
            else self.guidance_scale
        uncond = dict(self.uncond)
        for key in [k for k in cond if k.startswith(UNCOND_PREFIX)]:
            uncond[key[len(UNCOND_PREFIX):]] = cond.pop(key)
        missing = sorted(k for k in uncond if cond.get(k) is None)
        if missing:
            raise ValueError(f"CFGDenoiser: uncond gives {missing} for the unconditional "
                             f"branch, but the call has no conditional value for "
                             f"{', '.join(k + '=' for k in missing)} (pass the conditioning to "
                             f"sample / distill / the solver)")
        s = torch.as_tensor(sigma, device=x.device)
        s = s.expand(n) if s.dim() == 0 else s
        stacked = {}
        for key, value in cond.items():
            if key in uncond:
                c = match_rows(value, n, key)
                u = match_rows(uncond[key].to(device=c.device, dtype=c.dtype), n,
                               f"uncond[{key!r}]")
                if c.shape[1:] != u.shape[1:]:
                    raise ValueError(f"CFGDenoiser: {key} has per-row shape {list(c.shape[1:])}"
                                     f" but uncond[{key!r}] has {list(u.shape[1:])}")
                stacked[key] = torch.cat([c, u], 0)
            elif isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
                stacked[key] = torch.cat([value, value], 0)
            else:  # shared values (flags, 0-d tensors, tensors the model broadcasts)
                stacked[key] = value
        out = self.denoiser(torch.cat([x, x], 0), torch.cat([s, s], 0), **stacked)
        d_c, d_u = out[:n], out[n:]
        return d_u + self._scale_rows(scale, n, x) * (d_c - d_u)
