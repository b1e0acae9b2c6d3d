"""`load_model(spec)`: an embedded denoiser by name, or any model from ``"module:factory"``.

Names: "digits-unet" (the default), "digits-exact", "gaussian", "gmm" (64 dims). Every model
has ``.shape``, ``.sigma_min`` / ``.sigma_max`` and, if conditional, ``.num_classes``. A
factory gets ``**kwargs``; an ``nn.Module`` is put in eval mode and moved to ``device``."""
from __future__ import annotations

import importlib
import math
from typing import Callable, Dict

import torch

__all__ = ["load_model", "model_names", "DEFAULT_MODEL"]

DEFAULT_MODEL = "digits-unet"
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def _tag(model, **attrs):
    for k, v in attrs.items():
        setattr(model, k, v)
    return model


def gaussian_default():
    """64 dims with stds from 0.05 to 1, so the ODE has fast and slow directions."""
    from .analytic import GaussianModel

    i = torch.arange(64, dtype=torch.float64)
    mean = 0.5 * torch.cos(0.3 * i)
    std = torch.exp(torch.linspace(math.log(0.05), math.log(1.0), 64, dtype=torch.float64))
    return _tag(GaussianModel(mean, std), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)


def gmm_default():
    """8 isotropic components in 64 dims (``class_labels`` select them)."""
    from .analytic import GaussianMixtureModel

    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 64, generator=g, dtype=torch.float64)
    stds = torch.linspace(0.1, 0.4, 8, dtype=torch.float64)
    return _tag(GaussianMixtureModel(means, stds), sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX,
                num_classes=8)


def _lazy(module: str, attr: str) -> Callable:
    """A factory calling ``module.attr()``, imported on first use."""
    return lambda: getattr(importlib.import_module(module, __package__), attr)()


_MODELS: Dict[str, Callable] = {
    "digits-unet": _lazy(".unet", "load_digits_unet"),
    "digits-exact": _lazy(".digits", "DigitsExactDenoiser"),
    "gaussian": gaussian_default,
    "gmm": gmm_default,
}


def model_names() -> list:
    """The embedded model names `load_model` accepts."""
    return list(_MODELS)


def _from_factory(spec: str, kwargs: dict):
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(f"bad model spec {spec!r}: expected 'package.module:factory'")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import module {module_name!r} "
                         f"({type(e).__name__}: {e})") from e
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            owner = getattr(obj, "__name__", repr(obj))
            raise ValueError(f"model spec {spec!r}: {owner} has no attribute {part!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr_path!r} is not callable "
                         f"(got {type(obj).__name__}); it must be a factory returning a denoiser")
    model = obj(**kwargs)
    if not callable(model):
        raise ValueError(f"model spec {spec!r}: the factory returned a non-callable "
                         f"{type(model).__name__}, not a denoiser D(x, sigma, **cond)")
    return model


def load_model(spec: str = DEFAULT_MODEL, device=None, **kwargs):
    """A denoiser by name (`model_names()`) or by ``"package.module:factory"``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        model = _from_factory(spec, kwargs)
    else:
        key = spec.lower()
        if key not in _MODELS:
            raise ValueError(f"unknown model {spec!r}; known models: {', '.join(_MODELS)}, "
                             f"or 'package.module:factory'")
        if kwargs:
            raise ValueError(f"model {spec!r} takes no keyword arguments, got {sorted(kwargs)}")
        model = _MODELS[key]()
    if isinstance(model, torch.nn.Module):
        model = model.eval()
        if device is not None:
            model = model.to(device)
    return model
