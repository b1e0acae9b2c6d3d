"""The 8x8 handwritten digits and their exact (optimal) denoiser.

The 1797 digits scikit-learn ships (CC BY 4.0, see ``models/data/README.md``), scaled to
``[-1, 1]`` as ``x / 8 - 1``. `DigitsExactDenoiser` is the exact denoiser of the empirical
distribution, ``D = sum_i softmax_i(-|x - y_i|^2 / (2 sigma^2)) y_i``; its ODE memorises
(every trajectory ends on a training image)."""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from .conditioning import check_shape, int_labels, sigma_rows

__all__ = ["load_digits_data", "DigitsExactDenoiser"]

DATA_FILE = Path(__file__).parent / "data" / "digits.npz"
NUM_CLASSES = 10


def load_digits_data(device=None, dtype: torch.dtype = torch.float32
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(images [1797, 1, 8, 8] in [-1, 1], labels [1797] int64 in 0..9)``."""
    with np.load(DATA_FILE) as f:
        imgs = f["images"]
        labels = f["labels"]
    x = torch.from_numpy(imgs.astype(np.float64) / 8.0 - 1.0).unsqueeze(1)
    return (x.to(device=device, dtype=dtype),
            torch.from_numpy(labels.astype(np.int64)).to(device=device))


class DigitsExactDenoiser(nn.Module):
    """Exact denoiser of ``images`` (default: the digits), in x's dtype. Integer
    ``class_labels [B]`` restrict each sample to its class's images; float ``[B, 10]``
    multiply each image's prior weight by its class's entry. ``batch_size`` rows at a time
    bound the ``[chunk, N]`` distance matrix. The data is centred, which keeps the
    ``|x|^2 - 2 x.y + |y|^2`` expansion accurate in float32 down to sigma_min."""

    sigma_min = 0.002
    sigma_max = 80.0
    num_classes = NUM_CLASSES

    def __init__(self, images: Optional[torch.Tensor] = None,
                 labels: Optional[torch.Tensor] = None, batch_size: int = 1024):
        super().__init__()
        if images is None:
            images, default_labels = load_digits_data(dtype=torch.float64)
            labels = default_labels if labels is None else labels
        images = torch.as_tensor(images, dtype=torch.float64).cpu()
        if images.dim() < 2:
            raise ValueError("images must be [N, *shape]")
        self.shape = tuple(int(n) for n in images.shape[1:])
        flat = images.reshape(images.shape[0], -1)
        mean = flat.mean(dim=0)
        self.register_buffer("mean", mean)
        self.register_buffer("data", flat - mean)              # centred, [N, F]
        self.register_buffer("sqnorm", ((flat - mean) ** 2).sum(dim=1))
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu().reshape(-1)
            if labels.shape[0] != flat.shape[0]:
                raise ValueError("labels must have one entry per image")
        self.register_buffer("labels", labels)
        # Image indices of each class, found once: every conditional call uses them.
        self._class_images = (None if labels is None else
                              [(labels == c).nonzero().squeeze(1) for c in range(NUM_CLASSES)])
        self.batch_size = int(batch_size)

    @property
    def num_images(self) -> int:
        return int(self.data.shape[0])

    @property
    def images(self) -> torch.Tensor:
        """The data, ``[N, *shape]`` float64."""
        return (self.data + self.mean).reshape((-1,) + self.shape)

    def _int_labels(self, class_labels, B: int, device) -> Optional[torch.Tensor]:
        """Integer ``class_labels`` as a checked ``[B]``; None for none or float labels."""
        if class_labels is None:
            return None
        if self.labels is None:
            raise ValueError("class_labels given but this denoiser has no labels")
        lab = torch.as_tensor(class_labels, device=device)
        if lab.is_floating_point():
            return None
        lab = int_labels(lab, B, NUM_CLASSES)
        if any(len(self._class_images[c]) == 0 for c in torch.unique(lab).tolist()):
            raise ValueError("a requested class has no image in this data set")
        return lab

    def _log_weights(self, class_labels, B: int, device, dtype) -> torch.Tensor:
        """``[B, N]`` log prior weight of every image for float class weights ``[B, 10]``."""
        lab = torch.as_tensor(class_labels, device=device)
        if lab.dim() != 2 or lab.shape[0] != B:
            raise ValueError(f"float class_labels must be [B, {NUM_CLASSES}], got "
                             f"{list(lab.shape)}")
        return torch.log(lab.to(dtype)[:, self.labels.to(device)])

    def _posterior_mean(self, xf, s, Y, y2, logp=None) -> torch.Tensor:
        """``sum_i w_i Y_i`` for centred rows ``xf`` against centred images ``Y``, by chunks."""
        out = []
        for a in range(0, xf.shape[0], self.batch_size):
            b = min(xf.shape[0], a + self.batch_size)
            xc = xf[a:b]
            sq = ((xc * xc).sum(dim=1, keepdim=True) - 2.0 * (xc @ Y.T) + y2[None]).clamp_min(0)
            logits = sq * (-0.5 / (s[a:b, None] ** 2))
            if logp is not None:
                logits = logits + logp[a:b]
            w = torch.exp(logits - logits.amax(dim=1, keepdim=True))
            out.append((w @ Y) / w.sum(dim=1, keepdim=True))
        return torch.cat(out)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **unused) -> torch.Tensor:
        check_shape(x, self.shape)
        B = x.shape[0]
        dt, dev = x.dtype, x.device
        s = sigma_rows(sigma, x)
        Y = self.data.to(device=dev, dtype=dt)
        y2 = self.sqnorm.to(device=dev, dtype=dt)
        mu = self.mean.to(device=dev, dtype=dt)
        xf = x.reshape(B, Y.shape[1]) - mu
        lab = self._int_labels(class_labels, B, dev)
        if B == 0:
            out = xf.clone()
        elif lab is None:
            logp = None if class_labels is None else self._log_weights(class_labels, B, dev, dt)
            out = self._posterior_mean(xf, s, Y, y2, logp)
        else:
            # Other classes' images have weight exactly 0: each class's rows against its own
            # images only is ~10x less work than masking [B, N], with the same sums
            # (out-of-place index_copy keeps it differentiable).
            out = torch.zeros_like(xf)
            for c in torch.unique(lab).tolist():
                r = (lab == c).nonzero().squeeze(1)
                keep = self._class_images[c].to(dev)
                out = out.index_copy(0, r, self._posterior_mean(xf[r], s[r], Y[keep], y2[keep]))
        return (out + mu).reshape(x.shape)

    @torch.no_grad()
    def reference_solution(self, noise: torch.Tensor, sigma_max: float = 80.0,
                           sigma_min: float = 0.002, tol: float = 1e-6,
                           min_steps: int = 64, max_steps: int = 8192,
                           return_info: bool = False, class_labels=None):
        """x at ``sigma_min`` of the ODE from ``noise * sigma_max``, to ``tol`` (max-abs).

        Float64 RK4 on ``dz/dw = D(z / w, 1 / w)`` (``z = x / sigma``, ``w = 1 / sigma``: an
        exact, non-stiff rewrite, since D is nearly constant at both ends), on a grid uniform
        in log sigma whose steps double from ``min_steps`` until two solutions agree
        (a warning at ``max_steps``). ``return_info`` adds ``{"steps", "evals",
        "error_estimate"}`` (the last difference / 15, Richardson for 4th order)."""
        check_shape(noise, self.shape, "noise")
        model = self
        if self.data.dtype != torch.float64 or self.data.device.type != "cpu":
            import copy

            model = copy.deepcopy(self).to("cpu", torch.float64)
        z0 = noise.detach().to("cpu", torch.float64)   # z = x / sigma_max = noise
        lab = class_labels.cpu() if isinstance(class_labels, torch.Tensor) else class_labels
        B = noise.shape[0]

        def f(w: float, z: torch.Tensor) -> torch.Tensor:
            return model(z / w, torch.full((B,), 1.0 / w, dtype=torch.float64),
                         class_labels=lab)

        def solve(n: int) -> torch.Tensor:
            ws = torch.exp(torch.linspace(-math.log(sigma_max), -math.log(sigma_min), n + 1,
                                          dtype=torch.float64)).tolist()
            z = z0.clone()          # x / sigma at sigma_max = noise
            for i in range(n):
                w, h = ws[i], ws[i + 1] - ws[i]
                k1 = f(w, z)
                k2 = f(w + h / 2, z + (h / 2) * k1)
                k3 = f(w + h / 2, z + (h / 2) * k2)
                k4 = f(w + h, z + h * k3)
                z = z + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            return z * sigma_min    # x = sigma z

        n = int(min_steps)
        evals = 4 * n
        prev = solve(n)
        err = math.inf
        while True:
            n *= 2
            cur = solve(n)
            evals += 4 * n
            err = float((cur - prev).abs().max())
            prev = cur
            if err <= tol or n >= max_steps:
                break
        if err > tol:
            warnings.warn(f"reference_solution: not converged to tol={tol} with {n} RK4 steps "
                          f"(last change {err:.3g})", RuntimeWarning, stacklevel=2)
        out = prev.to(device=noise.device, dtype=noise.dtype)
        if return_info:
            return out, {"steps": n, "evals": evals, "error_estimate": err / 15.0}
        return out
