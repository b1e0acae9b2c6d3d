r"""The AMED predictor network and the features it reads (arXiv 2312.00094).

``AMEDPredictor(features [B, F], t, t') -> (r, delta, o)``: a sinusoidal embedding of
``log sigma`` for t and t', a two-layer feature encoder, and three sigmoid-bounded heads
(``|delta| < delta_max``, ``|o| < o_max``) starting at zero (r = 1/2, delta = o = 0).
Features (detached): ``"denoised"`` (the main-point x0 estimate), ``"module:<dotted.name>"``
(a forward hook on that submodule, e.g. ``"module:net.mid2"`` of the digits U-Net), or a
callable ``(x, sigma, denoised) -> [B, F]``, pooled to at most 64 values per sample."""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AMEDPredictor"]

#: Pooled side of a 4-d feature map, and pooled length of any other feature tensor.
_MAX_SIDE, _MAX_FLAT = 8, 64

FeatureSpec = Union[str, Callable]


def pool_features(t: torch.Tensor) -> torch.Tensor:
    """``[B, ...] -> [B, F]``, F <= 64: a 4-d map is averaged over channels and pooled to at
    most 8x8; anything else is flattened and pooled to at most 64 values."""
    if t.dim() == 4:
        m = t.mean(dim=1)
        side = (min(m.shape[1], _MAX_SIDE), min(m.shape[2], _MAX_SIDE))
        if tuple(m.shape[1:]) != side:
            m = F.adaptive_avg_pool2d(m[:, None], side)[:, 0]
        return m.reshape(m.shape[0], -1)
    flat = t.reshape(t.shape[0], -1)
    if flat.shape[1] > _MAX_FLAT:
        flat = F.adaptive_avg_pool1d(flat[:, None], _MAX_FLAT)[:, 0]
    return flat


def pooled_dim(shape) -> int:
    """F that `pool_features` gives for a per-sample shape (without the batch dim)."""
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3:
        return min(shape[1], _MAX_SIDE) * min(shape[2], _MAX_SIDE)
    return min(math.prod(shape), _MAX_FLAT)


def check_feature_spec(spec) -> FeatureSpec:
    """``"denoised"``, ``"module:<name>"``, a callable, or ``"callable:<name>"`` (a named
    callable from a file, supplied at load time); ValueError otherwise."""
    if callable(spec) and not isinstance(spec, str) or spec == "denoised":
        return spec
    if isinstance(spec, str) and spec.partition(":")[0] in ("module", "callable") \
            and spec.partition(":")[2]:
        return spec
    raise ValueError(f"features must be 'denoised', 'module:<dotted.submodule.name>' or a "
                     f"callable (x, sigma, denoised) -> [B, F], got {spec!r}")


def feature_spec_name(spec: FeatureSpec, name: Optional[str] = None) -> str:
    """The string stored in a params file: the spec itself, or ``"callable:" + name``."""
    if isinstance(spec, str):
        return spec
    if not name or not isinstance(name, str):
        raise ValueError("AMED params with a callable feature source cannot be saved without a "
                         "name: pass feature_name='...' to save, and features=<the callable> "
                         "to AMEDParams.load")
    return "callable:" + name


def _unwrap_module(denoiser) -> nn.Module:
    """The user's nn.Module behind wrappers such as `CountingDenoiser` (``.denoiser``)."""
    d = denoiser
    while not isinstance(d, nn.Module) and "denoiser" in getattr(d, "__dict__", {}):
        d = d.__dict__["denoiser"]
    if not isinstance(d, nn.Module):
        raise ValueError(f"features='module:...' needs an nn.Module denoiser to hook, got "
                         f"{type(denoiser).__name__}; use features='denoised' or a callable")
    return d


class FeatureExtractor:
    """Reads the predictor's features at each step's main point: ``with FeatureExtractor(
    spec, denoiser, F) as fx`` (a forward hook for "module:"), then per step ``fx.arm()``
    before the main-point call and ``fx.collect(x, sigma, denoised)`` after it, or
    ``fx.zeros(x)`` on the AFS step."""

    def __init__(self, spec: FeatureSpec, denoiser, feature_dim: Optional[int], dtype=None):
        self.spec = check_feature_spec(spec)
        if isinstance(self.spec, str) and self.spec.startswith("callable:"):
            raise ValueError(f"these AMED params read features from the callable "
                             f"{self.spec[len('callable:'):]!r}, which a file cannot hold: "
                             f"pass it with AMEDParams.load(path, features=fn) or "
                             f"params.with_features(fn)")
        self.feature_dim = feature_dim
        self.dtype = dtype
        self.denoiser = denoiser
        self._hook = None
        self._armed = False
        self._out: Optional[torch.Tensor] = None

    def __enter__(self):
        if isinstance(self.spec, str) and self.spec.startswith("module:"):
            name = self.spec[len("module:"):]
            root = _unwrap_module(self.denoiser)
            try:
                module = root.get_submodule(name)
            except AttributeError as e:
                raise ValueError(f"features={self.spec!r}: {type(root).__name__} has no "
                                 f"submodule {name!r} ({e})") from None
            self._hook = module.register_forward_hook(self._on_forward)
        return self

    def __exit__(self, *exc):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return False

    def _on_forward(self, module, inputs, output):
        if self._armed:
            if isinstance(output, (tuple, list)):
                output = next((o for o in output if isinstance(o, torch.Tensor)), None)
            if isinstance(output, torch.Tensor):
                self._out = output.detach()  # the last call wins if the module runs twice

    def arm(self) -> None:
        self._armed, self._out = True, None

    def _finish(self, feats: torch.Tensor, B: int) -> torch.Tensor:
        if feats.dim() != 2 or feats.shape[0] != B:
            raise ValueError(f"features {self._label()} gave shape {list(feats.shape)}, "
                             f"expected [B, F] with B = {B}")
        if self.feature_dim is not None and feats.shape[1] != self.feature_dim:
            raise ValueError(f"features {self._label()} gave F = {feats.shape[1]} values per "
                             f"sample but the AMED predictor expects {self.feature_dim}: "
                             f"the params were made for another feature source or data shape")
        return feats.detach() if self.dtype is None else feats.detach().to(self.dtype)

    def _label(self) -> str:
        return repr(self.spec) if isinstance(self.spec, str) else _callable_name(self.spec)

    def collect(self, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
        self._armed = False
        B = x.shape[0]
        if self.spec == "denoised":
            return self._finish(pool_features(denoised), B)
        if callable(self.spec) and not isinstance(self.spec, str):
            return self._finish(self.spec(x, float(sigma), denoised), B)
        out = self._out
        self._out = None
        if out is None:
            raise ValueError(f"features={self.spec!r}: the hooked submodule did not run "
                             f"during the main-point denoiser call")
        if out.dim() >= 1 and out.shape[0] != B and out.shape[0] % B == 0:
            # e.g. classifier-free guidance stacking [uncond, cond]: the last B rows, the
            # conditional half, as in the authors' code
            out = out[-B:]
        return self._finish(pool_features(out), B)

    def zeros(self, x: torch.Tensor) -> torch.Tensor:
        self._armed = False
        dt = self.dtype or x.dtype
        return torch.zeros(x.shape[0], int(self.feature_dim), dtype=dt, device=x.device)


@torch.no_grad()
def probe_feature_dim(spec: FeatureSpec, denoiser, x: torch.Tensor, sigma: float,
                      cond: Optional[dict] = None) -> int:
    """F of a feature source for states like ``x`` (one no-grad denoiser call for "module:")."""
    spec = check_feature_spec(spec)
    if spec == "denoised":
        return pooled_dim(x.shape[1:])
    with FeatureExtractor(spec, denoiser, None) as fx:
        if callable(spec) and not isinstance(spec, str):
            return int(fx.collect(x, sigma, torch.zeros_like(x)).shape[1])
        fx.arm()
        sig = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        denoised = denoiser(x, sig, **(cond or {}))
        return int(fx.collect(x, sigma, denoised).shape[1])


def _callable_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


class AMEDPredictor(nn.Module):
    """``(features [B, F], t, t') -> (r, delta, o)``, each ``[B]``. The encoder's initial
    weights come from a generator seeded with ``seed``, so every process starts alike."""

    def __init__(self, feature_dim: int, hidden: int = 128, bottleneck: int = 4,
                 time_channels: int = 8, delta_max: float = 0.2, o_max: float = 0.01,
                 seed: int = 0, dtype: torch.dtype = torch.float64, device=None):
        super().__init__()
        for name, v in (("feature_dim", feature_dim), ("hidden", hidden),
                        ("bottleneck", bottleneck), ("time_channels", time_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"AMEDPredictor.{name} must be an integer >= 1, got {v!r}")
        if time_channels % 2:
            raise ValueError(f"AMEDPredictor.time_channels must be even (cos and sin), got "
                             f"{time_channels}")
        for name, v in (("delta_max", delta_max), ("o_max", o_max)):
            if not (isinstance(v, (int, float)) and 0 < v < 1):
                raise ValueError(f"AMEDPredictor.{name} must be in (0, 1) (1 + {name[:-4]} "
                                 f"must stay positive), got {v!r}")
        self.feature_dim, self.hidden, self.bottleneck = feature_dim, hidden, bottleneck
        self.time_channels = time_channels
        self.delta_max, self.o_max = float(delta_max), float(o_max)
        kw = dict(dtype=dtype, device=device if device is not None else "cpu")
        half = time_channels // 2
        # frequencies 1/4, 1/2, 1, 2, ... on log sigma (which spans about -6.2 .. 4.4)
        self.register_buffer("freqs", 0.25 * 2.0 ** torch.arange(half, **kw), persistent=False)
        # skip_init: every weight is set below from our own generator, so building a
        # predictor never draws from (and shifts) the global torch RNG
        lin = lambda i, o: nn.utils.skip_init(nn.Linear, i, o, **kw)  # noqa: E731
        self.map_time = lin(time_channels, time_channels)
        self.enc0 = lin(feature_dim, hidden)
        self.enc1 = lin(hidden, bottleneck)
        width = bottleneck + 2 * time_channels
        self.head_r = lin(width, 1)
        self.head_delta = lin(width, 1)
        self.head_o = lin(width, 1)
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        with torch.no_grad():
            for layer in (self.map_time, self.enc0, self.enc1):
                bound = math.sqrt(6.0 / (layer.in_features + layer.out_features))  # xavier
                w = torch.rand(layer.weight.shape, generator=g, dtype=torch.float64) * 2 - 1
                layer.weight.copy_(w * bound)
                layer.bias.zero_()
            for head in (self.head_r, self.head_delta, self.head_o):
                head.weight.zero_()  # the neutral start: r = 1/2, delta = o = 0
                head.bias.zero_()

    @property
    def config(self) -> dict:
        """The constructor arguments that define the architecture (JSON-serialisable)."""
        return {"feature_dim": self.feature_dim, "hidden": self.hidden,
                "bottleneck": self.bottleneck, "time_channels": self.time_channels,
                "delta_max": self.delta_max, "o_max": self.o_max}

    def _embed(self, sigma, B: int) -> torch.Tensor:
        s = torch.as_tensor(sigma, dtype=self.freqs.dtype, device=self.freqs.device)
        a = torch.log(s).reshape(1, 1) * self.freqs[None]
        e = F.silu(self.map_time(torch.cat([torch.cos(a), torch.sin(a)], dim=1)))
        return e.expand(B, -1)

    def forward(self, features: torch.Tensor, t, t_next):
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"AMEDPredictor expects features [B, {self.feature_dim}], got "
                             f"{list(features.shape)}")
        B = features.shape[0]
        f = features.to(self.enc0.weight.dtype)
        f = self.enc1(F.silu(self.enc0(f)))
        z = torch.cat([f, self._embed(t, B), self._embed(t_next, B)], dim=1)
        r = torch.sigmoid(self.head_r(z))[:, 0]
        delta = self.delta_max * (2.0 * torch.sigmoid(self.head_delta(z))[:, 0] - 1.0)
        o = self.o_max * (2.0 * torch.sigmoid(self.head_o(z))[:, 0] - 1.0)
        return r, delta, o
