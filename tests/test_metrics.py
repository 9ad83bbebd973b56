"""Metrics against closed forms and second implementations: FID, KID, IS, precision/recall/density/coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from perceptual_diffusion.evaluation.metrics import (
    FeatureStats,
    InceptionScoreStats,
    fid,
    fid_from_stats,
    ideal_coverage,
    inception_score,
    kid,
    kid_blocks,
    mean_cov,
    mmd_unbiased,
    precision_recall,
)


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    # One fixed mixing matrix: correlated features (covariances are not diagonal), the same distribution per seed.
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) / d**0.5
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * scale + shift


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    """pytorch-fid's formula with scipy's sqrtm: the second implementation."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_against_itself_is_zero() -> None:
    f = _features(500, 32, seed=0)
    assert fid(f, f) == pytest.approx(0.0, abs=1e-6)


def test_fid_between_gaussians_matches_closed_form() -> None:
    # Commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i)).
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0, 0.5]), torch.tensor([1.0, 1.0, 0.0, -0.5])
    s1, s2 = torch.tensor([1.0, 4.0, 0.25, 2.0]), torch.tensor([9.0, 1.0, 0.25, 0.5])
    expected = float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    assert fid_from_stats(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # Equal full covariances: the trace term cancels and only the mean distance is left.
    cov = mean_cov(_features(200, 8, seed=1))[1]
    assert fid_from_stats(mu1.repeat(2), cov, mu2.repeat(2), cov) == pytest.approx(2 * 6.0, rel=1e-6)


def test_fid_of_sampled_gaussians_approaches_closed_form() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(20000, 3, generator=g)
    b = 2.0 * torch.randn(20000, 3, generator=g) + 1.0  # N(1, 4 I): d^2 = 3 * 1 + 3 * (1 + 4 - 2 * 2) = 6
    assert fid(a, b) == pytest.approx(6.0, rel=0.03)


def test_fid_agrees_with_scipy_sqrtm() -> None:
    a, b = _features(400, 64, seed=3), _features(300, 64, seed=4, shift=0.3, scale=1.2)
    ours = fid(a, b)
    theirs = _scipy_fid(a.double().numpy(), b.double().numpy())
    assert ours > 1.0
    assert ours == pytest.approx(theirs, abs=1e-3)


def test_streamed_statistics_equal_one_shot_numpy() -> None:
    f = _features(333, 16, seed=5, shift=100.0)  # a large mean: the case where float32 sums would lose digits
    stats = FeatureStats(16)
    for chunk in f.split(50):
        stats.update(chunk)
    mu, cov = stats.mean_cov()
    assert stats.n == 333
    np.testing.assert_allclose(mu.numpy(), f.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov.numpy(), np.cov(f.double().numpy(), rowvar=False), rtol=1e-6, atol=1e-8)


def _numpy_mmd(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3 (Binkowski et al. 2018), written out."""
    d, m = a.shape[1], a.shape[0]
    kxx, kyy, kxy = ((a @ a.T) / d + 1) ** 3, ((b @ b.T) / d + 1) ** 3, ((a @ b.T) / d + 1) ** 3
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    )


def test_kid_matches_written_out_mmd_and_separates_sets() -> None:
    a, b = _features(200, 16, seed=6), _features(200, 16, seed=7, shift=0.5)
    mean, std, m = kid(a, b, subsets=1, subset_size=200)  # one subset of everything: no randomness left
    assert m == 200 and std == 0.0
    assert mean == pytest.approx(_numpy_mmd(a.double().numpy(), b.double().numpy()), rel=1e-9)
    same_mean, same_std, _ = kid(a, _features(200, 16, seed=8), subsets=20, subset_size=100)
    shifted_mean, _, _ = kid(a, b, subsets=20, subset_size=100)
    assert abs(same_mean) < 3 * same_std + 1e-3
    assert shifted_mean > 10 * abs(same_mean) and shifted_mean > 0.05
    assert kid(a, b, subsets=5, subset_size=100) == kid(a, b, subsets=5, subset_size=100)  # seeded subsets


def test_unbiased_mmd_of_unequal_sets_matches_the_written_out_formula() -> None:
    a, b = _features(60, 8, seed=10), _features(90, 8, seed=11, shift=0.3)
    x, y = a.double().numpy(), b.double().numpy()
    k = lambda p, q: (p @ q.T / 8 + 1) ** 3
    kxx, kyy = k(x, x), k(y, y)
    expected = (kxx.sum() - np.trace(kxx)) / (60 * 59) + (kyy.sum() - np.trace(kyy)) / (90 * 89) - 2 * k(x, y).mean()
    assert mmd_unbiased(a, b) == pytest.approx(expected, rel=1e-12)
    c = _features(60, 8, seed=12)
    assert mmd_unbiased(a, c) == pytest.approx(_numpy_mmd(a.double().numpy(), c.double().numpy()), rel=1e-9)


def test_kid_blocks_standard_error_from_disjoint_blocks() -> None:
    a, b = _features(400, 16, seed=6), _features(200, 16, seed=7, shift=0.5)
    mean, se, blocks, m_a, m_b = kid_blocks(a, b, blocks=10)
    assert (blocks, m_a, m_b) == (10, 40, 20)
    # By hand: the same seeded permutations, then the MMD of block i of each set.
    g = torch.Generator().manual_seed(0)
    pa, pb = torch.randperm(400, generator=g), torch.randperm(200, generator=g)
    values = np.array([mmd_unbiased(a[pa[i * 40 : (i + 1) * 40]], b[pb[i * 20 : (i + 1) * 20]]) for i in range(10)])
    assert mean == pytest.approx(values.mean()) and se == pytest.approx(values.std(ddof=1) / 10**0.5)
    assert mean == pytest.approx(kid(a, b)[0], abs=3 * se)  # both estimate the same MMD^2
    same_mean, same_se, *_ = kid_blocks(a, _features(400, 16, seed=8))
    assert abs(same_mean) < 4 * same_se
    # Tiny sets: the blocks shrink so each keeps 2 rows; one block has no standard error.
    assert kid_blocks(a[:12], b[:12], blocks=10)[2:] == (6, 2, 2)
    assert kid_blocks(a[:3], b[:3])[1] is None


def test_inception_score_of_uniform_predictions_is_one() -> None:
    mean, std = inception_score(torch.full((100, 7), 1 / 7))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10])
def test_inception_score_of_confident_balanced_predictions_is_k(k: int) -> None:
    probs = torch.eye(k).repeat(30, 1)  # every split holds each class equally often
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


@pytest.mark.filterwarnings("ignore:std\\(\\)")
def test_inception_score_agrees_with_torchmetrics_and_streams() -> None:
    from torchmetrics.image.inception import InceptionScore

    logits = 3 * torch.randn(200, 10, generator=torch.Generator().manual_seed(9))
    ours = inception_score(logits.softmax(1), splits=1)
    with pytest.warns(UserWarning):
        tm = InceptionScore(feature=torch.nn.Identity(), splits=1)
    tm.update(logits)
    # torchmetrics warns that the std of one split is undefined; only the mean is compared.
    assert ours[0] == pytest.approx(float(tm.compute()[0]), rel=1e-5)
    assert 1.5 < ours[0] < 10
    streamed = InceptionScoreStats(10, 200, splits=4)
    for chunk in logits.softmax(1).split(37):
        streamed.update(chunk)
    assert streamed.compute() == pytest.approx(inception_score(logits.softmax(1), splits=4), rel=1e-12)


def test_precision_recall_of_a_set_against_itself_is_one_and_drops_when_shifted() -> None:
    a = _features(300, 8, seed=10)
    same = precision_recall(a, a)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    shifted = precision_recall(a, a + 3.0)
    assert shifted["precision"] < 0.2 and shifted["recall"] < 0.2 and shifted["coverage"] < 0.2
    # A generator that collapses onto 10 of the data points: every sample is real (precision 1), recall is tiny.
    collapsed = precision_recall(a, a[:10].repeat(10, 1) + 1e-3 * _features(100, 8, seed=13))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.1


def test_precision_recall_agrees_with_a_cdist_implementation() -> None:
    real, fake = _features(150, 6, seed=11), _features(120, 6, seed=12, shift=0.4)
    k = 3
    radius_real = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # k-th neighbour, excluding the point itself
    radius_fake = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    d = torch.cdist(real, fake)
    expected_precision = float((d < radius_real[:, None]).any(0).float().mean())
    expected_recall = float((d < radius_fake[None, :]).any(1).float().mean())
    out = precision_recall(real, fake, k=k)
    assert out["precision"] == pytest.approx(expected_precision)
    assert out["recall"] == pytest.approx(expected_recall)
    assert 0.1 < out["precision"] < 1.0


def test_ideal_coverage() -> None:
    assert ideal_coverage(1, 1600) == pytest.approx(1 / 1600)
    assert ideal_coverage(1600, 1600) == pytest.approx(1 - (1 - 1 / 1600) ** 1600)
    assert ideal_coverage(100_000, 1600) == pytest.approx(1.0)
    assert math.isclose(ideal_coverage(5, 1), 1.0)
