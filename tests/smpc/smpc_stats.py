"""Small statistical tests of uniformity over the int64 ring (no scipy needed).

Each test rejects at about alpha = 1e-4: a correct generator fails one in ten thousand runs.
"""

from __future__ import annotations

import math

import torch

CHI2_15_CRITICAL = 44.26  # chi-square, 15 degrees of freedom, p = 1e-4
CHI2_255_CRITICAL = 347.65  # 255 degrees of freedom
KS_C = math.sqrt(-math.log(1e-4 / 2) / 2)  # Kolmogorov-Smirnov c(alpha)


def unit(values: torch.Tensor) -> torch.Tensor:
    """int64 ring elements as float64 in [0, 1) (read as unsigned)."""
    v = values.flatten().to(torch.float64)
    return torch.where(v < 0, v + 2.0**64, v) / 2.0**64


def chi2(bins: torch.Tensor, k: int) -> float:
    counts = torch.bincount(bins.flatten(), minlength=k).to(torch.float64)
    expected = bins.numel() / k
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_top_nibble(values: torch.Tensor) -> float:
    """Chi-square of the 4 most significant bits (16 bins)."""
    return chi2(((values.flatten() >> 60) & 0xF), 16)


def chi2_low_byte(values: torch.Tensor) -> float:
    """Chi-square of the least significant byte (256 bins)."""
    return chi2(values.flatten() & 0xFF, 256)


def ks_uniform(values: torch.Tensor) -> float:
    """One-sample KS statistic against U[0, 1) times sqrt(n) (compare with KS_C)."""
    u, _ = torch.sort(unit(values))
    n = u.numel()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    d = torch.maximum(i / n - u, u - (i - 1) / n).max()
    return float(d) * math.sqrt(n)


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample KS statistic times sqrt(nm/(n+m)) (compare with KS_C)."""
    ua, ub = torch.sort(unit(a))[0], torch.sort(unit(b))[0]
    grid = torch.cat([ua, ub])
    fa = torch.searchsorted(ua, grid, right=True).to(torch.float64) / ua.numel()
    fb = torch.searchsorted(ub, grid, right=True).to(torch.float64) / ub.numel()
    n, m = ua.numel(), ub.numel()
    return float((fa - fb).abs().max()) * math.sqrt(n * m / (n + m))


def assert_uniform(values: torch.Tensor) -> None:
    """The values look uniform over the whole ring (high bits, low bits, distribution)."""
    assert chi2_top_nibble(values) < CHI2_15_CRITICAL
    assert chi2_low_byte(values) < CHI2_255_CRITICAL
    assert ks_uniform(values) < KS_C


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor) -> None:
    assert ks_two_sample(a, b) < KS_C
