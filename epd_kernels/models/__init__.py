"""Denoisers that need no download (analytic, digits data, the digits U-Net), `load_model`,
adapters for other libraries' networks, guidance and flow-matching wrappers. Every model is
called as ``D(x [B, ...], sigma [B], **cond) -> x0_hat``."""
from .adapters import DiffusersDenoiser, EpsDenoiser, KDiffusionDenoiser, VDenoiser
from .analytic import GaussianMixtureModel, GaussianModel
from .conditioning import MissingLabelsWarning, warn_missing_labels
from .digits import DigitsExactDenoiser, load_digits_data
from .flow import FlowMatchDenoiser
from .guidance import CFGDenoiser
from .registry import DEFAULT_MODEL, load_model, model_names
from .unet import load_digits_unet

__all__ = ["GaussianModel", "GaussianMixtureModel", "DigitsExactDenoiser", "load_digits_data",
           "load_digits_unet", "load_model", "model_names", "DEFAULT_MODEL",
           "DiffusersDenoiser", "KDiffusionDenoiser", "EpsDenoiser", "VDenoiser", "CFGDenoiser",
           "FlowMatchDenoiser", "warn_missing_labels", "MissingLabelsWarning"]
