"""The embedded default model ``"digits-unet"``: a small trained class-conditional U-Net for
the 8x8 digits with EDM preconditioning (Karras et al. 2022, Table 1; sigma_data = 0.5).

    D = load_model("digits-unet")                  # eval mode, float32, CPU
    x0 = D(x, sigma, class_labels=labels)          # x [B, 1, 8, 8]; labels int [B] or [B, 10]

An all-zero label means "no label" (trained with probability 0.1). The shipped EMA weights
carry their config and training record (`weights_metadata()`);
``python/train_digits_unet.py`` reproduces them."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .conditioning import check_shape, int_labels, per_sample, sigma_rows

__all__ = ["UNetConfig", "EDMPrecond", "load_digits_unet", "weights_metadata"]

WEIGHTS_FILE = Path(__file__).parent / "weights" / "digits_unet.safetensors"


@dataclasses.dataclass
class UNetConfig:
    """Architecture hyperparameters (stored in the weights file's metadata)."""

    img_channels: int = 1
    img_resolution: int = 8
    model_channels: int = 16
    channel_mult: Tuple[int, ...] = (1, 2, 4)      # 8x8, 4x4, 2x2
    num_blocks: int = 1                            # residual blocks per resolution (encoder)
    attn_resolutions: Tuple[int, ...] = (2,)
    emb_channels: int = 64
    noise_channels: int = 32                       # sinusoidal features (cos + sin)
    num_classes: int = 10                          # 0: unconditional
    groups: int = 8
    dropout: float = 0.0
    sigma_data: float = 0.5

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, c), c, eps=1e-5)


class ResBlock(nn.Module):
    """GN, SiLU, conv3x3, (scale, shift) from emb, GN, SiLU, dropout, conv3x3; + skip."""

    def __init__(self, cin: int, cout: int, emb: int, groups: int, dropout: float):
        super().__init__()
        self.norm0 = _norm(cin, groups)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb, 2 * cout)
        self.norm1 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        return h + self.skip(x)


class Attention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = _norm(c, groups)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj = nn.Conv2d(c, c, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(C), dim=2)
        h = torch.einsum("bij,bcj->bci", w, v).reshape(B, C, H, W)
        return x + self.proj(h)


class Level(nn.Module):
    """A residual block, optionally followed by attention."""

    def __init__(self, cin, cout, emb, groups, dropout, attn):
        super().__init__()
        self.res = ResBlock(cin, cout, emb, groups, dropout)
        self.attn = Attention(cout, groups) if attn else None

    def forward(self, x, emb):
        x = self.res(x, emb)
        return self.attn(x) if self.attn is not None else x


class DigitsUNet(nn.Module):
    """The raw network F(x_in [B, C, R, R], c_noise [B], class_onehot [B, K] or None)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        C, E, G, p = cfg.model_channels, cfg.emb_channels, cfg.groups, cfg.dropout
        half = cfg.noise_channels // 2
        # Geometric frequencies from 1/4 to 32 (c_noise = log(sigma)/4 lies in about [-1.6, 1.1]).
        freqs = torch.exp(torch.linspace(math.log(0.25), math.log(32.0), half))
        self.register_buffer("freqs", freqs, persistent=False)
        self.map_noise = nn.Sequential(nn.Linear(2 * half, E), nn.SiLU(), nn.Linear(E, E))
        self.map_label = nn.Linear(cfg.num_classes, E, bias=False) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.img_channels, C, 3, padding=1)

        chans = [C * m for m in cfg.channel_mult]
        # Encoder: the skip stack gets conv_in's output, every block's output and every
        # downsampled tensor; decoder level i has num_blocks + 1 blocks, each taking one.
        self.enc = nn.ModuleList()
        skips = [C]
        cur, res = C, cfg.img_resolution
        for i, ch in enumerate(chans):
            if i > 0:
                res //= 2
                skips.append(cur)
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks):
                blocks.append(Level(cur, ch, E, G, p, res in cfg.attn_resolutions))
                cur = ch
                skips.append(cur)
            self.enc.append(blocks)
        self.mid = Level(cur, cur, E, G, p, True)
        self.mid2 = ResBlock(cur, cur, E, G, p)
        self.dec = nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_blocks + 1):
                blocks.append(Level(cur + skips.pop(), ch, E, G, p, res in cfg.attn_resolutions))
                cur = ch
            self.dec.append(blocks)
            res *= 2
        assert not skips
        self.norm_out = _norm(cur, G)
        self.conv_out = nn.Conv2d(cur, cfg.img_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        a = c_noise[:, None] * self.freqs[None]
        emb = self.map_noise(torch.cat([torch.cos(a), torch.sin(a)], dim=1))
        if self.map_label is not None and labels is not None:
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)
        h = self.conv_in(x)
        hs = [h]
        for i, blocks in enumerate(self.enc):
            if i > 0:
                h = F.avg_pool2d(h, 2)
                hs.append(h)
            for blk in blocks:
                h = blk(h, emb)
                hs.append(h)
        h = self.mid2(self.mid(h, emb), emb)
        for j, blocks in enumerate(self.dec):
            for blk in blocks:
                h = blk(torch.cat([h, hs.pop()], dim=1), emb)
            if j < len(self.dec) - 1:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
        return self.conv_out(F.silu(self.norm_out(h)))


class EDMPrecond(nn.Module):
    """``D(x, sigma, class_labels=None) = c_skip x + c_out F(c_in x, log(sigma)/4, onehot)``
    (EDM, Table 1); labels int ``[B]`` or float ``[B, num_classes]``. Computes in the
    module's dtype and returns x's."""

    sigma_min = 0.002
    sigma_max = 80.0

    def __init__(self, cfg: Optional[UNetConfig] = None):
        super().__init__()
        self.cfg = cfg or UNetConfig()
        self.net = DigitsUNet(self.cfg)
        self.sigma_data = float(self.cfg.sigma_data)
        self.shape = (self.cfg.img_channels, self.cfg.img_resolution, self.cfg.img_resolution)
        self.num_classes = int(self.cfg.num_classes)

    def _labels(self, class_labels, B: int, device, dtype) -> Optional[torch.Tensor]:
        if class_labels is None or self.num_classes == 0:
            return None
        lab = torch.as_tensor(class_labels, device=device)
        K = self.num_classes
        if not lab.is_floating_point():
            return F.one_hot(int_labels(lab, B, K), K).to(dtype)
        if lab.shape != (B, K):
            raise ValueError(f"float class_labels must be [B, {K}] (one-hot), got "
                             f"{list(lab.shape)}")
        return lab.to(dtype)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **unused) -> torch.Tensor:
        check_shape(x, self.shape)
        dtype = self.net.conv_in.weight.dtype
        B = x.shape[0]
        s = sigma_rows(sigma, x, dtype)
        xs = x.to(dtype)
        sd = self.sigma_data
        sv = per_sample(s, x)
        c_skip = sd ** 2 / (sv ** 2 + sd ** 2)
        c_out = sv * sd / (sv ** 2 + sd ** 2).sqrt()
        c_in = 1.0 / (sv ** 2 + sd ** 2).sqrt()
        c_noise = s.log() / 4
        Fx = self.net(c_in * xs, c_noise, self._labels(class_labels, B, x.device, dtype))
        return (c_skip * xs + c_out * Fx).to(x.dtype)


def weights_metadata(path=None) -> dict:
    """The weights file's metadata: {"config": {...}, "training": {...}}."""
    from safetensors import safe_open

    with safe_open(str(path or WEIGHTS_FILE), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def save_weights(model: EDMPrecond, path, training: Optional[dict] = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Saves the network weights with ``{"config", "training"}`` JSON metadata."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.cfg.to_dict()), "training": json.dumps(training or {})}
    save_file(state, str(path), metadata=meta)


def load_digits_unet(path=None, device=None, dtype: torch.dtype = torch.float32) -> EDMPrecond:
    """The trained digits U-Net (eval mode, no grad needed) from `path` (default: shipped)."""
    from safetensors.torch import load_file

    path = Path(path or WEIGHTS_FILE)
    if not path.exists():
        raise FileNotFoundError(f"U-Net weights not found at {path}; train them with "
                                f"python/train_digits_unet.py")
    meta = weights_metadata(path)
    model = EDMPrecond(UNetConfig.from_dict(meta.get("config", {})))
    state = load_file(str(path))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype).eval()
