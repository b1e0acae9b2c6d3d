"""Sample-quality metrics: RMSE to a reference, Frechet distance, and an NFE/cost table.

`global_rmse` is the "error to the reference" of every solver comparison in the package.
`frechet_distance` fits Gaussians to features of two sets (pixels by default; Inception
features make it FID): FD = |mu_1 - mu_2|^2 + tr(C_1 + C_2 - 2 (C_1^{1/2} C_2 C_1^{1/2})^{1/2}),
the trace term from the eigenvalues of a symmetric PSD matrix in float64 (negatives
clipped: stable for singular covariances). FD is biased upwards for few samples: report it
with the count, "FD (n=256)".
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["global_rmse", "feature_stats", "frechet_distance", "frechet_distance_from_stats",
           "nfe_table"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def global_rmse(a: ArrayLike, b: ArrayLike) -> float:
    """``sqrt(mean((a - b)^2))`` over all elements (float64), not a mean of per-sample RMS
    values (which would shrink a sample's large error)."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {list(a.shape)} vs {list(b.shape)}")
    if a.numel() == 0:
        raise ValueError("global_rmse of empty inputs")
    return float((a - b).pow(2).mean().sqrt())


#: Another name of `global_rmse` (the same function), for scripts that import ``rmse``.
rmse = global_rmse


def _as_rows(a) -> np.ndarray:
    """A ``[n, ...]`` tensor or array as float64 ``[n, F]``."""
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return a.reshape(a.shape[0], -1).astype(np.float64)


def _features(x: ArrayLike, features: Optional[Callable], batch_size: int) -> np.ndarray:
    if features is None:
        return _as_rows(x)
    with torch.no_grad():
        return np.concatenate([_as_rows(features(x[i:i + batch_size]))
                               for i in range(0, len(x), batch_size)], axis=0)


def feature_stats(x: ArrayLike, features: Optional[Callable] = None,
                  batch_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """``(mu [F], cov [F, F])`` of the features of ``x`` (float64; unbiased covariance)."""
    f = _features(x, features, batch_size)
    if f.shape[0] < 2:
        raise ValueError("need at least 2 samples to estimate a covariance")
    bad = int((~np.isfinite(f)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{bad} of {f.shape[0]} samples have non-finite values (NaN or "
                         f"inf); the Frechet distance needs finite samples")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _sqrt_psd(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """Frechet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (see module doc)."""
    mu1, mu2 = (np.asarray(mu, np.float64).reshape(-1) for mu in (mu1, mu2))
    cov1, cov2 = (np.atleast_2d(np.asarray(cov, np.float64)) for cov in (cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != mu1.shape * 2:
        raise ValueError(f"inconsistent shapes: mu {mu1.shape}, {mu2.shape}; cov {cov1.shape}, "
                         f"{cov2.shape}")
    if not all(np.isfinite(v).all() for v in (mu1, cov1, mu2, cov2)):
        raise ValueError("the feature statistics have non-finite values (NaN or inf)")
    s1 = _sqrt_psd(cov1)
    m = s1 @ cov2 @ s1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    d = mu1 - mu2
    fd = float(d @ d + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)
    return max(fd, 0.0)


def _as_stats(obj, features, batch_size):
    """``(mu, cov)`` of a stats dict or pair (converted by `frechet_distance_from_stats`),
    or of the features of samples."""
    if isinstance(obj, dict):
        mu, cov = obj.get("mu", obj.get("mean")), obj.get("sigma", obj.get("cov"))
        if mu is None or cov is None:
            raise ValueError("stats dict must have 'mu' (or 'mean') and 'sigma' (or 'cov')")
        return mu, cov
    if isinstance(obj, tuple) and len(obj) == 2:
        return obj
    return feature_stats(obj, features, batch_size)


def frechet_distance(samples: ArrayLike, data_or_stats, features: Optional[Callable] = None,
                     batch_size: int = 256) -> float:
    """Frechet distance between the feature Gaussians of ``samples`` and of the reference
    ``data_or_stats``: samples, or statistics as ``(mu, cov)`` or ``{"mu", "sigma"}``.
    ``features``: None (pixel space) or a callable ``batch -> [n, F]``, run in batches."""
    mu1, c1 = feature_stats(samples, features, batch_size)
    mu2, c2 = _as_stats(data_or_stats, features, batch_size)
    return frechet_distance_from_stats(mu1, c1, mu2, c2)


def nfe_table(rows: Iterable, metrics: Optional[Iterable[str]] = None) -> str:
    """A Markdown table of sampling costs: ``rows`` are `SampleStats`, dicts, or
    ``(stats, {metric: value})`` pairs; the metric columns follow (all seen, in order,
    unless ``metrics`` names them)."""
    base = ["solver", "nfe", "latency_nfe", "total_evals", "steps", "wall_time_s"]
    recs, seen = [], []
    for r in rows:
        extra = {}
        if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], dict):
            r, extra = r
        d = dict(r) if isinstance(r, dict) else {k: getattr(r, k) for k in base if hasattr(r, k)}
        d.update(extra)
        seen += [k for k in d if k not in base and k not in seen]
        recs.append(d)
    cols = base + (list(metrics) if metrics is not None else seen)

    def fmt(k, v):
        if v is None:
            return ""
        if k == "wall_time_s":
            return f"{1000 * float(v):.1f}"
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = [("time (ms)" if c == "wall_time_s" else c.replace("_", " ")) for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
    for d in recs:
        lines.append("| " + " | ".join(fmt(c, d.get(c)) for c in cols) + " |")
    return "\n".join(lines)
