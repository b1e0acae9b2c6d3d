"""Analytic denoisers: the exact D(x, sigma) of Gaussian and Gaussian-mixture data.

`GaussianModel` (``N(mu, diag(s^2))``: ``D = mu + s^2 / (s^2 + sigma^2) (x - mu)``, with a
closed-form ODE solution) and `GaussianMixtureModel` (posterior-weighted component
denoisers), in x's dtype; `reference_solution`: scipy's DOP853 in ``u = log sigma``."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .conditioning import check_shape, int_labels, per_sample, sigma_rows

__all__ = ["AnalyticDenoiser", "GaussianModel", "GaussianMixtureModel"]

Tensorish = Union[torch.Tensor, float, Sequence[float]]


def _sigma_view(sigma, x: torch.Tensor) -> torch.Tensor:
    return per_sample(sigma_rows(sigma, x), x)


class AnalyticDenoiser(nn.Module):
    """Base class: shape bookkeeping and a high-accuracy ODE reference solution."""

    shape: tuple

    @property
    def dim(self) -> int:
        """Number of scalar dimensions of one sample."""
        return math.prod(self.shape)

    def _check_x(self, x: torch.Tensor) -> None:
        check_shape(x, self.shape)

    @torch.no_grad()
    def reference_solution(self, x_T: torch.Tensor, sigma_T: float, sigma_end: float,
                           rtol: float = 1e-12, atol: float = 1e-12, method: str = "DOP853",
                           **cond) -> torch.Tensor:
        """x(sigma_end) from x(sigma_T) = x_T, by scipy ``solve_ivp`` in float64 in
        ``u = log sigma``, the whole batch at once (one step size: stricter error control)."""
        from scipy.integrate import solve_ivp

        self._check_x(x_T)
        shape = x_T.shape
        B = shape[0]
        model = self
        x64 = x_T.detach().to("cpu", torch.float64)
        cond64 = {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
                  for k, v in cond.items()}
        if any(p.dtype != torch.float64 for p in self.buffers()) or any(
                p.device.type != "cpu" for p in self.buffers()):
            import copy
            model = copy.deepcopy(self).to("cpu", torch.float64)

        def rhs(u, y):
            x = torch.from_numpy(y).view(shape)
            sig = torch.full((B,), math.exp(u), dtype=torch.float64)
            return (x - model(x, sig, **cond64)).reshape(-1).numpy()

        sol = solve_ivp(rhs, (math.log(float(sigma_T)), math.log(float(sigma_end))),
                        x64.reshape(-1).numpy(), method=method, rtol=rtol, atol=atol)
        if not sol.success:  # pragma: no cover - scipy failure is exceptional here
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        out = torch.from_numpy(sol.y[:, -1].copy()).view(shape)
        return out.to(device=x_T.device, dtype=x_T.dtype)


class GaussianModel(AnalyticDenoiser):
    """Per-dimension Gaussian data ``N(mean, std^2)`` (``shape`` default: mean's and std's
    broadcast shape); exact denoiser and exact ODE solution."""

    def __init__(self, mean: Tensorish, std: Tensorish, shape: Optional[Sequence[int]] = None):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64)
        std = torch.as_tensor(std, dtype=torch.float64)
        if shape is None:
            shape = torch.broadcast_shapes(mean.shape, std.shape)
        self.shape = tuple(int(n) for n in shape)
        if len(self.shape) == 0:
            raise ValueError("shape must have at least one dimension (use (1,) for scalars)")
        if not (std > 0).all():
            raise ValueError("std must be > 0 everywhere")
        self.register_buffer("mean", mean.expand(self.shape).clone())
        self.register_buffer("std", std.expand(self.shape).clone())

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        self._check_x(x)
        s = _sigma_view(sigma, x)
        mu = self.mean.to(x.dtype)
        var = self.std.to(x.dtype) ** 2
        return mu + var / (var + s * s) * (x - mu)

    def exact_solution(self, x_T: torch.Tensor, sigma_T, sigma) -> torch.Tensor:
        """x(sigma) on the ODE trajectory through x_T at sigma_T (floats or [B] tensors)."""
        self._check_x(x_T)
        sT = _sigma_view(sigma_T, x_T)
        s = _sigma_view(sigma, x_T)
        mu = self.mean.to(x_T.dtype)
        var = self.std.to(x_T.dtype) ** 2
        return mu + (x_T - mu) * torch.sqrt((var + s * s) / (var + sT * sT))

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """n samples of the data distribution, ``[n, *shape]``."""
        z = torch.randn((n,) + self.shape, generator=generator, dtype=torch.float64)
        return (self.mean.cpu() + self.std.cpu() * z).to(dtype)


class GaussianMixtureModel(AnalyticDenoiser):
    """Mixture ``sum_k w_k N(means_k [K, *shape], diag(stds_k^2))`` with an exact denoiser;
    ``stds`` a number, ``[K]`` or ``[K, *shape]``; ``weights`` default uniform. Integer
    ``class_labels [B]`` select a component; float ``[B, K]`` reweight the prior."""

    def __init__(self, means: Tensorish, stds: Tensorish = 1.0,
                 weights: Optional[Tensorish] = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2:
            raise ValueError(f"means must be [K, *shape] with at least one data dimension, got "
                             f"shape {list(means.shape)}")
        K = means.shape[0]
        self.shape = tuple(means.shape[1:])
        stds = torch.as_tensor(stds, dtype=torch.float64)
        iso = stds.expand(K).clone() if stds.dim() == 0 or stds.shape == (K,) else None
        if iso is not None:
            stds = iso.reshape((K,) + (1,) * len(self.shape)).expand(means.shape)
        if tuple(stds.shape) != tuple(means.shape):
            raise ValueError(f"stds must be a number, [K]={K} or [K, *shape]={list(means.shape)}, "
                             f"got {list(stds.shape)}")
        if not (stds > 0).all():
            raise ValueError("stds must be > 0")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or not (weights >= 0).all() or not weights.sum() > 0:
            raise ValueError(f"weights must be [K]={K} non-negative with a positive sum")
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())
        # One std per component: the per-component variance is a scalar, which allows a
        # cheaper evaluation with [B, K] quantities and two small matmuls.
        self.register_buffer("iso_stds", iso)

    @property
    def num_components(self) -> int:
        return int(self.means.shape[0])

    def _log_prior(self, x: torch.Tensor, class_labels) -> torch.Tensor:
        """[B, K] log prior weights, after conditioning on class_labels."""
        B, K = x.shape[0], self.num_components
        with torch.no_grad():
            logw = torch.log(self.weights.to(x.dtype))
        logw = logw.expand(B, K)
        if class_labels is None:
            return logw
        lab = torch.as_tensor(class_labels, device=x.device)
        if not lab.is_floating_point():
            mask = torch.full((B, K), -math.inf, dtype=x.dtype, device=x.device)
            mask.scatter_(1, int_labels(lab, B, K)[:, None], 0.0)
            return mask  # only the selected component; its weight cancels in the softmax
        if lab.shape != (B, K):
            raise ValueError(f"float class_labels must be [B, K]=[{B}, {K}], got {list(lab.shape)}")
        return logw + torch.log(lab.to(x.dtype))

    @staticmethod
    def _normalise(logits: torch.Tensor) -> torch.Tensor:
        """Softmax over dim 1 with the log-sum-exp shift, written out: numerically stable,
        and free of torch.softmax's thread-pool dispatch, which dominates on tiny [B, K]."""
        e = torch.exp(logits - logits.amax(dim=1, keepdim=True))
        return e / e.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor, sigma, class_labels=None, **cond) -> torch.Tensor:
        self._check_x(x)
        B, K = x.shape[0], self.num_components
        if self.iso_stds is not None:
            return self._forward_isotropic(x, sigma, class_labels)
        s2 = _sigma_view(sigma, x)[:, None] ** 2                 # [B, 1, 1..]
        mu = self.means.to(x.dtype)[None]                        # [1, K, *shape]
        var0 = self.stds.to(x.dtype)[None] ** 2                  # [1, K, *shape]
        var = var0 + s2                                          # [B, K, *shape]
        diff = x[:, None] - mu                                   # [B, K, *shape]
        reduce_dims = tuple(range(2, diff.dim()))
        loglik = -0.5 * (diff * diff / var + torch.log(var)).sum(dim=reduce_dims)  # [B, K]
        gamma = self._normalise(loglik + self._log_prior(x, class_labels))
        comp = mu + var0 / var * diff                            # [B, K, *shape]
        g = gamma.reshape((B, K) + (1,) * len(self.shape))
        return (g * comp).sum(dim=1)

    def _forward_isotropic(self, x, sigma, class_labels):
        """Same formula when component k has covariance s_k^2 I (scalar per component)."""
        B, K = x.shape[0], self.num_components
        xf = x.reshape(B, -1)                                    # [B, N]
        mu = self.means.to(x.dtype).reshape(K, -1)               # [K, N]
        var0 = self.iso_stds.to(x.dtype) ** 2                    # [K]
        var = var0[None] + _sigma_view(sigma, xf) ** 2           # [B, K]
        diff = xf[:, None] - mu[None]                            # [B, K, N]
        sq = (diff * diff).sum(dim=2)                            # [B, K]
        loglik = -0.5 * (sq / var + mu.shape[1] * torch.log(var))
        gamma = self._normalise(loglik + self._log_prior(x, class_labels))
        a = gamma * (var0[None] / var)                           # weight of (x - mu_k)
        out = gamma @ mu + a.sum(dim=1, keepdim=True) * xf - a @ mu
        return out.reshape(x.shape)

    def sample_data(self, n: int, generator: Optional[torch.Generator] = None,
                    dtype: torch.dtype = torch.float64, return_labels: bool = False):
        """n samples ``[n, *shape]`` (and their component labels with ``return_labels``)."""
        k = torch.multinomial(self.weights.cpu(), n, replacement=True, generator=generator)
        z = torch.randn((n,) + self.shape, generator=generator, dtype=torch.float64)
        x = (self.means.cpu()[k] + self.stds.cpu()[k] * z).to(dtype)
        return (x, k) if return_labels else x
