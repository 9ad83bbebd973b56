"""Sample-quality metrics as pure functions over feature tensors and class probabilities.

Nothing here runs a network: an extractor (``features.py``) turns images into features and logits, and these
functions turn features into numbers, so each can be checked against a closed form or a second implementation.
The maths comes from maintained libraries where one provides it: torchmetrics for the FID matrix square root and
the KID polynomial MMD, ``prdc`` (Naeem et al.'s reference code) for precision, recall, density and coverage. The
Inception Score is written out here because torchmetrics' version shuffles with the global RNG and takes only
logits; the formula is three lines.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

# ---------------------------------------------------------------------------------------------------------------
# FID: Heusel et al. 2017, d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).


@dataclass
class FeatureStats:
    """Running sums for a feature mean and covariance, so 50,000 samples never need 50,000 feature rows at once."""

    dim: int
    n: int = 0
    total: Tensor = field(init=False)
    outer: Tensor = field(init=False)

    def __post_init__(self) -> None:
        # float64: the covariance is a difference of large sums, and float32 loses digits past ~10^4 samples.
        self.total = torch.zeros(self.dim, dtype=torch.float64)
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64)

    def update(self, features: Tensor) -> None:
        """Add a batch of feature rows (N, D)."""
        f = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
        if f.shape[1] != self.dim:
            raise ValueError(f"feature dimension {f.shape[1]} differs from the statistics' {self.dim}")
        self.n += f.shape[0]
        self.total += f.sum(0)
        self.outer += f.T @ f

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """The mean (D,) and the unbiased covariance (D, D), as numpy's ``np.cov`` gives them."""
        if self.n < 2:
            raise ValueError("FID statistics need at least 2 samples")
        mu = self.total / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, cov


def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance of feature rows, in float64."""
    stats = FeatureStats(features.shape[1])
    stats.update(features)
    return stats.mean_cov()


def fid_from_stats(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between two Gaussians; the trace of the square root comes from torchmetrics' eigenvalues."""
    args = [t.to(torch.float64) for t in (mu1, cov1, mu2, cov2)]
    # Tiny negative values are round-off of a distance that is really 0 (a set against itself).
    return max(float(_compute_fid(*args)), 0.0)


def fid(features1: Tensor, features2: Tensor) -> float:
    """FID between two sets of feature rows."""
    return fid_from_stats(*mean_cov(features1), *mean_cov(features2))


# ---------------------------------------------------------------------------------------------------------------
# KID: Binkowski et al. 2018, unbiased MMD^2 with the cubic kernel k(x, y) = (x.y / d + 1)^3, over random subsets.


def kid(
    features1: Tensor, features2: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float, int]:
    """KID mean and standard deviation over ``subsets`` random subsets; returns (mean, std, subset size used).

    The subset size shrinks to the smaller set when a set has fewer rows (torch-fidelity does the same).
    """
    m = min(subset_size, features1.shape[0], features2.shape[0])
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    f1, f2 = features1.to(torch.float64), features2.to(torch.float64)
    values = []
    for _ in range(subsets):
        a = f1[torch.randperm(f1.shape[0], generator=g)[:m]]
        b = f2[torch.randperm(f2.shape[0], generator=g)[:m]]
        values.append(float(poly_mmd(a, b, degree=3, gamma=None, coef=1.0)))
    v = np.asarray(values)
    return float(v.mean()), float(v.std()), m  # population std, as torch-fidelity and torchmetrics report it


def poly_kernel(x: Tensor, y: Tensor, degree: int = 3, coef: float = 1.0) -> Tensor:
    """KID's kernel matrix k(x, y) = (x.y / d + coef)^degree, in float64."""
    x, y = x.to(torch.float64), y.to(torch.float64)
    return (x @ y.T / x.shape[1] + coef) ** degree


def mmd_unbiased(features1: Tensor, features2: Tensor) -> float:
    """Unbiased MMD^2 with KID's cubic kernel between sets of any sizes (at least 2 rows each).

    With equal sizes it is torchmetrics' ``poly_mmd``; the within-set sums leave out the diagonal (i = j).
    """
    m, n = features1.shape[0], features2.shape[0]
    if min(m, n) < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")
    k11, k22 = poly_kernel(features1, features1), poly_kernel(features2, features2)
    within1 = (k11.sum() - k11.diagonal().sum()) / (m * (m - 1))
    within2 = (k22.sum() - k22.diagonal().sum()) / (n * (n - 1))
    return float(within1 + within2 - 2 * poly_kernel(features1, features2).mean())


def kid_blocks(
    features1: Tensor, features2: Tensor, blocks: int = 10, seed: int = 0
) -> tuple[float, float | None, int, int, int]:
    """KID with a standard error: the unbiased MMD^2 on ``blocks`` disjoint random blocks of each set.

    Both sets are permuted (seeded) and cut into B blocks (of n1 // B and n2 // B rows; B shrinks so every block has
    at least 2 rows); block b of set 1 is compared with block b of set 2. The B values are independent and unbiased
    for the same MMD^2, so their mean is an unbiased KID and SE = std(ddof=1) / sqrt(B) its standard error (None for
    B < 2). ``kid()``'s mean over many overlapping subsets estimates the same quantity and is closer to the full
    two-sample U-statistic, the unbiased estimator of smallest variance (Halmos 1946), whereas the blocks drop every
    cross-block pair; so this SE is a slightly conservative error bar for ``kid()``'s mean too.
    Returns (mean, se, blocks used, rows per block of set 1, of set 2).
    """
    n1, n2 = features1.shape[0], features2.shape[0]
    b = min(blocks, n1 // 2, n2 // 2)
    if b < 1:
        raise ValueError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    p1, p2 = torch.randperm(n1, generator=g), torch.randperm(n2, generator=g)
    m1, m2 = n1 // b, n2 // b
    values = np.asarray(
        [mmd_unbiased(features1[p1[i * m1 : (i + 1) * m1]], features2[p2[i * m2 : (i + 1) * m2]]) for i in range(b)]
    )
    se = float(values.std(ddof=1) / math.sqrt(b)) if b > 1 else None
    return float(values.mean()), se, b, m1, m2


# ---------------------------------------------------------------------------------------------------------------
# Inception Score: Salimans et al. 2016, IS = exp(E_x KL(p(y|x) || p(y))), mean and std over consecutive splits.


@dataclass
class InceptionScoreStats:
    """Per-split running sums of p(y|x) and of sum_y p log p, so IS streams like FID does.

    Split i holds images [i n / s, (i + 1) n / s) of the n announced ones, the consecutive splits of the reference
    code (no shuffling).
    """

    num_classes: int
    n_expected: int
    splits: int = 10
    seen: int = 0
    prob_sum: Tensor = field(init=False)
    neg_entropy_sum: Tensor = field(init=False)
    count: Tensor = field(init=False)

    def __post_init__(self) -> None:
        if self.n_expected < self.splits:
            raise ValueError(f"the Inception Score needs at least {self.splits} samples for {self.splits} splits")
        self.prob_sum = torch.zeros(self.splits, self.num_classes, dtype=torch.float64)
        self.neg_entropy_sum = torch.zeros(self.splits, dtype=torch.float64)
        self.count = torch.zeros(self.splits, dtype=torch.float64)

    def update(self, probs: Tensor) -> None:
        """Add class probabilities (N, K) of the next N images."""
        p = probs.detach().to("cpu", torch.float64)
        idx = torch.arange(self.seen, self.seen + p.shape[0])
        if idx[-1] >= self.n_expected:
            raise ValueError(f"more than the announced {self.n_expected} images")
        split = idx * self.splits // self.n_expected
        self.prob_sum.index_add_(0, split, p)
        self.neg_entropy_sum.index_add_(0, split, torch.special.xlogy(p, p).sum(1))
        self.count.index_add_(0, split, torch.ones_like(split, dtype=torch.float64))
        self.seen += p.shape[0]

    def compute(self) -> tuple[float, float]:
        """(mean, std) over splits; the std is numpy's population std, as in the reference code."""
        p_y = self.prob_sum / self.count[:, None]
        # E_x KL(p(y|x) || p(y)) = E_x sum p log p - sum p(y) log p(y)
        kl = self.neg_entropy_sum / self.count - torch.special.xlogy(p_y, p_y).sum(1)
        scores = kl.exp()
        return float(scores.mean()), float(scores.std(unbiased=False))


def inception_score(probs: Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` consecutive splits) of class probabilities (N, K)."""
    stats = InceptionScoreStats(probs.shape[1], probs.shape[0], splits)
    stats.update(probs)
    return stats.compute()


# ---------------------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019) and density and coverage (Naeem et al. 2020).


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> dict[str, float]:
    """Precision, recall (k-NN manifolds, k = 3 as Kynkäänniemi et al.), density and coverage, by ``prdc``."""
    from prdc import compute_prdc  # imported here: it pulls scikit-learn, which only this function needs

    if min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(f"precision and recall with k={k} need more than {k} samples in each set")
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes on every call
        out = compute_prdc(real.detach().cpu().float().numpy(), fake.detach().cpu().float().numpy(), nearest_k=k)
    return {name: float(value) for name, value in out.items()}


def ideal_coverage(n_samples: int, n_modes: int) -> float:
    """Expected fraction of ``n_modes`` equally likely modes hit at least once by ``n_samples`` perfect draws."""
    return 1.0 - math.exp(n_samples * math.log1p(-1.0 / n_modes)) if n_modes > 1 else 1.0
