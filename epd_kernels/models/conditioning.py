"""Conditioning helpers shared by the model wrappers: row matching and a missing-label check.

A call has B rows, or K*B tiled branch after branch in EPD's branch call; `match_rows` gives
a wrapper's own conditioning the same rows. `warn_missing_labels` warns once when a
class-conditional model is called without its labels."""
from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch

__all__ = ["match_rows", "warn_missing_labels", "MissingLabelsWarning"]

#: The keyword under which class-conditional denoisers take their labels (diffusers'
#: ``UNet2DModel``, the package's own models).
LABEL_KEYWORD = "class_labels"


def sigma_rows(sigma, x: torch.Tensor, dtype=None) -> torch.Tensor:
    """sigma (a float, 0-d or [B] tensor) as a [B] tensor in x's device and ``dtype``."""
    s = torch.as_tensor(sigma, dtype=dtype or x.dtype, device=x.device)
    if s.dim() == 0:
        s = s.expand(x.shape[0])
    if s.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a float, 0-d or [B]={x.shape[0]} tensor, got "
                         f"{list(s.shape)}")
    return s


def per_sample(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A [B] tensor viewed as [B, 1, ..., 1] to broadcast against x."""
    return s.reshape((-1,) + (1,) * (x.dim() - 1))


def check_shape(x: torch.Tensor, shape, name: str = "x") -> None:
    """ValueError unless x is [B, *shape]."""
    if tuple(x.shape[1:]) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, {', '.join(map(str, shape))}], got "
                         f"{list(x.shape)}")


def int_labels(labels: torch.Tensor, B: int, num_classes: int) -> torch.Tensor:
    """Integer class labels (0-d broadcast) as a checked int64 [B] tensor."""
    if labels.dim() == 0:
        labels = labels.expand(B)
    if labels.shape != (B,):
        raise ValueError(f"integer class_labels must be [B]={B}, got {list(labels.shape)}")
    if (labels < 0).any() or (labels >= num_classes).any():
        raise ValueError(f"class_labels must be in 0..{num_classes - 1}")
    return labels.long()


def copy_model_attrs(wrapper, model, names=("shape", "sigma_min", "sigma_max", "num_classes"),
                     **given) -> None:
    """Sets on `wrapper` the model attributes that samplers and the CLI read: the ones
    `given`, else `model`'s."""
    for name in names:
        value = given.get(name)
        value = getattr(model, name, None) if value is None else value
        if value is not None:
            setattr(wrapper, name, value)


def first_output(out) -> torch.Tensor:
    """The tensor of a network's output: itself, its ``.sample``, or its first item."""
    if hasattr(out, "sample"):
        return out.sample
    return out[0] if isinstance(out, (tuple, list)) else out


def match_rows(value: torch.Tensor, rows: int, name: str = "conditioning") -> torch.Tensor:
    """``value`` with ``rows`` rows: as is, broadcast from one row, or tiled block-wise as
    `repeat_cond` tiles per-sample tensors."""
    if not isinstance(value, torch.Tensor) or value.dim() < 1:
        got = "a 0-d tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be a tensor with a leading batch dimension, got {got}")
    b = value.shape[0]
    if b == rows:
        return value
    if b == 1:
        return value.expand((rows,) + tuple(value.shape[1:]))
    if b == 0 or rows % b != 0:
        raise ValueError(f"{name} has {b} rows, which cannot follow a denoiser call of {rows} "
                         f"rows: give 1 row (shared by every sample) or one row per sample")
    return torch.cat([value] * (rows // b), 0)


class MissingLabelsWarning(UserWarning):
    """A class-conditional model was sampled or distilled without class labels."""


# denoiser -> the `where`s already warned about (weak keys: a denoiser that goes away takes
# its entry with it); objects that cannot be weakly referenced are remembered by id.
_WARNED = weakref.WeakKeyDictionary()
_WARNED_BY_ID: dict = {}


def _already_warned(denoiser, where: str) -> bool:
    try:
        seen = _WARNED.setdefault(denoiser, set())
    except TypeError:
        seen = _WARNED_BY_ID.setdefault(id(denoiser), set())
    if where in seen:
        return True
    seen.add(where)
    return False


def warn_missing_labels(denoiser: Callable, cond: dict, where: str,
                        keyword: str = LABEL_KEYWORD) -> bool:
    """Warns once per denoiser and ``where`` when a model with ``num_classes`` gets no
    ``keyword``; True when the labels are missing."""
    num_classes = getattr(denoiser, "num_classes", None)
    if not num_classes or isinstance(num_classes, bool):
        return False
    if cond.get(keyword) is not None:
        return False
    if not _already_warned(denoiser, where):
        warnings.warn(f"{where}(): the model is class-conditional (num_classes={num_classes}) "
                      f"but no {keyword}= was given; it runs on its default instead of a "
                      f"class. Pass {keyword}=<tensor of labels> (one per sample, or per "
                      f"pool entry when distilling).", MissingLabelsWarning, stacklevel=3)
    return True
