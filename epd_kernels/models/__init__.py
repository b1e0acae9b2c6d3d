"""Denoisers that need no download, and adapters for other libraries' networks.

- analytic: `GaussianModel`, `GaussianMixtureModel` (exact denoisers and ODE references);
- data-based: `DigitsExactDenoiser` (exact denoiser of the 8x8 digits), `load_digits_data`;
- trained: the digits U-Net (`load_digits_unet`, name "digits-unet", the default model);
- `load_model(name or "module:factory")`, `model_names()`;
- adapters: `DiffusersDenoiser`, `KDiffusionDenoiser`, `EpsDenoiser`, `VDenoiser`;
- `CFGDenoiser` (classifier-free guidance in one stacked call per evaluation),
  `FlowMatchDenoiser` (rectified-flow velocity models, SD3 / Flux convention);
- `warn_missing_labels` (a class-conditional model called without labels).

Every model is called as ``D(x, sigma, **cond) -> x0_hat`` with ``x [B, ...]``, ``sigma [B]``.
"""
from .analytic import AnalyticDenoiser, GaussianMixtureModel, GaussianModel
from .adapters import DiffusersDenoiser, EpsDenoiser, KDiffusionDenoiser, VDenoiser
from .conditioning import MissingLabelsWarning, warn_missing_labels
from .digits import DigitsExactDenoiser, load_digits_data
from .flow import FlowMatchDenoiser
from .guidance import CFGDenoiser
from .registry import DEFAULT_MODEL, load_model, model_names
from .unet import EDMPrecond, UNetConfig, load_digits_unet

__all__ = [
    "AnalyticDenoiser",
    "GaussianModel",
    "GaussianMixtureModel",
    "DigitsExactDenoiser",
    "load_digits_data",
    "EDMPrecond",
    "UNetConfig",
    "load_digits_unet",
    "load_model",
    "model_names",
    "DEFAULT_MODEL",
    "DiffusersDenoiser",
    "KDiffusionDenoiser",
    "EpsDenoiser",
    "VDenoiser",
    "CFGDenoiser",
    "FlowMatchDenoiser",
    "warn_missing_labels",
    "MissingLabelsWarning",
]
