"""Metrics against closed forms."""
import numpy as np
import pytest
import torch
from scipy import linalg

from epd_kernels.metrics import (feature_stats, frechet_distance, frechet_distance_from_stats,
                                 global_rmse, nfe_table, rmse)
from epd_kernels.solvers.counting import SampleStats


def test_global_rmse_definition():
    a = torch.zeros(2, 2, 2)
    b = torch.stack([torch.full((2, 2), 1.0), torch.tensor([[3.0, 0], [0, 0]])])
    # all 8 elements at once: sqrt((4 * 1 + 9) / 8); a mean of per-sample RMS values,
    # (1 + 1.5) / 2 = 1.25, is another quantity
    assert global_rmse(a, b) == pytest.approx(np.sqrt(13 / 8), rel=1e-15)
    assert global_rmse(a, b) != pytest.approx(1.25)
    # float64 on numpy input, zero on equal inputs; `rmse` is the same function
    x = np.random.default_rng(0).normal(size=(5, 3, 4)).astype(np.float32)
    y = x + np.float32(1e-3) * np.arange(60, dtype=np.float32).reshape(5, 3, 4)
    expect = np.sqrt(np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2))
    assert global_rmse(x, y) == pytest.approx(expect, rel=1e-12)
    assert global_rmse(np.ones((3, 5)), np.ones((3, 5))) == 0.0
    assert rmse is global_rmse
    with pytest.raises(ValueError, match="shapes differ"):
        global_rmse(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="empty"):
        global_rmse(torch.zeros(0, 3), torch.zeros(0, 3))


def test_fd_refuses_non_finite_samples_with_their_count():
    x = np.random.default_rng(2).normal(size=(10, 4))
    x[[1, 4, 7], 2] = np.nan
    x[9, 0] = np.inf
    with pytest.raises(ValueError, match=r"^4 of 10 samples have non-finite values"):
        frechet_distance(x, np.ones((5, 4)) + np.eye(5, 4))
    with pytest.raises(ValueError, match=r"^10 of 10 samples"):
        frechet_distance(np.full((10, 4), np.nan), np.eye(5, 4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.array([0.0, np.nan]), np.eye(2))


def _closed_form(mu1, c1, mu2, c2):
    covmean = linalg.sqrtm(c1 @ c2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def test_fd_closed_form_diagonal_and_general():
    rng = np.random.default_rng(0)
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance_from_stats(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-12)
    # general SPD matrices against scipy's sqrtm formula
    A, B = rng.normal(size=(8, 8)), rng.normal(size=(8, 8))
    c1, c2 = A @ A.T + 0.1 * np.eye(8), B @ B.T + 0.1 * np.eye(8)
    m1, m2 = rng.normal(size=8), rng.normal(size=8)
    assert frechet_distance_from_stats(m1, c1, m2, c2) == pytest.approx(_closed_form(m1, c1, m2, c2), rel=1e-9)
    # symmetric, zero on identical stats, 1-D case
    assert frechet_distance_from_stats(m2, c2, m1, c1) == pytest.approx(
        frechet_distance_from_stats(m1, c1, m2, c2), rel=1e-9)
    assert frechet_distance_from_stats(m1, c1, m1, c1) == pytest.approx(0, abs=1e-9)
    assert frechet_distance_from_stats([1.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(2.0)
    # singular (rank-deficient) covariances: finite, no complex parts
    v = rng.normal(size=(8, 2))
    fd = frechet_distance_from_stats(m1, v @ v.T, m2, c2)
    assert np.isfinite(fd) and fd == pytest.approx(_closed_form(m1, v @ v.T, m2, c2), rel=1e-6)


def test_fd_from_samples_matches_population_value():
    rng = np.random.default_rng(1)
    A = rng.normal(size=(4, 4)) * 0.5
    c1, c2 = A @ A.T + 0.2 * np.eye(4), np.diag([0.5, 1.0, 1.5, 2.0])
    m1, m2 = np.zeros(4), np.array([1.0, -1.0, 0.5, 0.0])
    x = rng.multivariate_normal(m1, c1, size=20000)
    y = rng.multivariate_normal(m2, c2, size=20000)
    expect = _closed_form(m1, c1, m2, c2)
    assert frechet_distance(torch.from_numpy(x), y) == pytest.approx(expect, rel=0.05)
    # images are flattened (pixel space); precomputed stats as tuple or dict
    xi = torch.from_numpy(x).reshape(-1, 1, 2, 2)
    mu, cov = feature_stats(y)
    assert frechet_distance(xi, (mu, cov)) == pytest.approx(frechet_distance(x, y), rel=1e-12)
    assert frechet_distance(xi, {"mu": mu, "sigma": cov}) == pytest.approx(
        frechet_distance(x, y), rel=1e-12)


def test_fd_same_set_is_zero_and_features_are_used():
    x = torch.randn(500, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-8
    calls = []

    def feats(batch):
        calls.append(batch.shape[0])
        return batch.flatten(1)[:, :3] * 2

    fd = frechet_distance(x, x + 1.0, features=feats, batch_size=128)
    assert fd == pytest.approx(3 * 4.0, rel=1e-6)           # mean shift of 2 in 3 features
    assert calls == [128, 128, 128, 116] * 2


def test_nfe_table():
    s = SampleStats(latency_nfe=5, total_evals=9.0, steps=3, wall_time_s=0.0123, solver="epd", nfe=5)
    t = nfe_table([(s, {"rmse": 0.01234, "fd": 1.5}),
                   {"solver": "heun", "nfe": 5, "latency_nfe": 5, "total_evals": 5, "steps": 3}])
    lines = t.splitlines()
    assert lines[0] == "| solver | nfe | latency nfe | total evals | steps | time (ms) | rmse | fd |"
    assert lines[2] == "| epd | 5 | 5 | 9 | 3 | 12.3 | 0.01234 | 1.5 |"
    assert lines[3].startswith("| heun | 5 | 5 | 5 | 3 |  |")
