"""Paired statistics: the estimate by hand, bootstrap intervals that behave, statistics that agree with metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_diffusion.evaluation.metrics import fid, mean_cov, mmd_unbiased, precision_recall
from perceptual_diffusion.evaluation.stats import (
    PairedDifference,
    coverage_against,
    fid_against,
    kid_against,
    mean_of,
    paired_bootstrap,
    precision_against,
    resampled_values,
    summary,
)


def _indicators(n: int, p: float, seed: int) -> dict[str, np.ndarray]:
    return {"exact": np.random.default_rng(seed).random(n) < p}


def _features(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    mix = np.random.default_rng(99).standard_normal((d, d)) / d**0.5  # correlated features, one mixing matrix
    return (np.random.default_rng(seed).standard_normal((n, d)) @ mix + shift).astype(np.float32)


def test_estimate_and_per_seed_values_are_the_hand_computed_differences() -> None:
    a = [{"x": np.array([1.0, 2.0, 3.0])}, {"x": np.array([0.0, 0.0, 6.0, 2.0])}]
    b = [{"x": np.array([1.0, 1.0, 1.0])}, {"x": np.array([1.0, 1.0, 1.0, 1.0])}]
    out = paired_bootstrap(a, b, mean_of("x"), n_boot=50)
    assert out.per_seed == pytest.approx((1.0, 1.0))
    assert out.estimate == pytest.approx(1.0)
    assert out.signs_agree and out.n_seeds == 2 and out.n_boot == 50 and out.level == 0.95
    assert out.ci_low <= out.estimate <= out.ci_high
    d = out.to_dict()
    assert d["per_seed"] == [pytest.approx(1.0), pytest.approx(1.0)] and set(d) == set(
        PairedDifference.__dataclass_fields__
    )
    # A plain callable takes the slow path (copied rows) and must give the same numbers.
    slow = paired_bootstrap(a, b, lambda arrays: float(np.mean(arrays["x"])), n_boot=50)
    assert slow.per_seed == pytest.approx(out.per_seed)
    assert (slow.ci_low, slow.ci_high) == pytest.approx((out.ci_low, out.ci_high))


def test_identical_models_give_a_zero_interval() -> None:
    a = [_indicators(200, 0.4, seed=s) for s in range(3)]
    out = paired_bootstrap(a, [dict(x) for x in a], mean_of("exact"), n_boot=200)
    assert (out.estimate, out.ci_low, out.ci_high) == (0.0, 0.0, 0.0)
    assert not out.signs_agree  # all differences are 0: no sign to agree on


def test_a_clear_shift_excludes_zero_and_fewer_samples_widen_the_interval() -> None:
    a = [_indicators(400, 0.6, seed=s) for s in range(3)]
    b = [_indicators(400, 0.4, seed=10 + s) for s in range(3)]
    out = paired_bootstrap(a, b, mean_of("exact"), n_boot=300)
    assert out.ci_low > 0 and out.signs_agree
    assert out.ci_low < out.estimate < out.ci_high
    head = lambda arrays: [{"exact": x["exact"][:50]} for x in arrays]
    small = paired_bootstrap(head(a), head(b), mean_of("exact"), n_boot=300)
    assert small.ci_high - small.ci_low > 1.5 * (out.ci_high - out.ci_low)


def test_the_bootstrap_is_deterministic_given_its_seed() -> None:
    a = [_indicators(100, 0.5, seed=s) for s in range(2)]
    b = [_indicators(100, 0.45, seed=5 + s) for s in range(2)]
    first = paired_bootstrap(a, b, mean_of("exact"), n_boot=100, seed=3)
    assert paired_bootstrap(a, b, mean_of("exact"), n_boot=100, seed=3) == first
    assert paired_bootstrap(a, b, mean_of("exact"), n_boot=100, seed=4) != first


def test_unpaired_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="paired row by row"):
        paired_bootstrap([_indicators(10, 0.5, 0)], [_indicators(11, 0.5, 1)], mean_of("exact"))
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap([_indicators(10, 0.5, 0)], [], mean_of("exact"))


def test_fid_and_kid_statistics_agree_with_metrics() -> None:
    ref, fake = _features(300, 16, seed=0), _features(200, 16, seed=1, shift=0.2)
    mu, cov = mean_cov(torch.from_numpy(ref))
    expected = fid(torch.from_numpy(fake), torch.from_numpy(ref))
    assert fid_against(mu, cov)({"features": fake}) == pytest.approx(expected, rel=1e-6)
    assert kid_against(ref)({"features": fake}) == pytest.approx(
        mmd_unbiased(torch.from_numpy(fake), torch.from_numpy(ref)), rel=1e-9
    )
    # On a resample, the counts path equals the statistic of the copied rows.
    idx = np.random.default_rng(0).integers(0, 200, 200)
    counts = np.bincount(idx, minlength=200)[None].astype(float)
    fid_stat = fid_against(mu.numpy(), cov.numpy())
    copied = fid(torch.from_numpy(fake[idx]).double(), torch.from_numpy(ref).double())
    assert fid_stat.prepare({"features": fake})(counts)[0] == pytest.approx(copied, rel=1e-6)


def test_resampled_values_equal_the_statistic_of_each_copied_resample() -> None:
    """The counts path (FID's precomputation once) and the copied rows (the statistic R times) agree, for a
    ``ResampledStatistic`` and for a plain function; repeated indices count with their multiplicity."""
    ref, fake = _features(300, 16, seed=0), _features(120, 16, seed=1, shift=0.3)
    mu, cov = mean_cov(torch.from_numpy(ref))
    stat = fid_against(mu, cov)
    idx = np.random.default_rng(3).integers(0, 120, size=(5, 120))
    copied = [stat({"features": fake[row]}) for row in idx]
    assert resampled_values(stat, {"features": fake}, idx) == pytest.approx(copied, rel=1e-9)
    mean_x = lambda a: float(np.mean(a["x"]))  # noqa: E731 (not a ResampledStatistic: rows are copied)
    x = np.arange(120.0)
    assert resampled_values(mean_x, {"x": x}, idx) == pytest.approx(x[idx].mean(1))


def test_fid_with_fewer_samples_than_features_takes_the_gram_path_and_gives_the_same_values() -> None:
    """1,000 samples in Inception's 2,048 features: the trace comes from the resample's N x N Gram matrix, which
    must equal the D x D covariance path and the statistic of the copied rows, repeated rows and all."""
    ref, fake = _features(400, 48, seed=0), _features(30, 48, seed=1, shift=0.2)
    mu, cov = mean_cov(torch.from_numpy(ref))
    stat = fid_against(mu, cov)
    idx = np.random.default_rng(5).integers(0, 30, size=(6, 30))
    counts = np.vstack([np.ones(30), np.stack([np.bincount(row, minlength=30) for row in idx])]).astype(float)
    fast = stat.prepare({"features": fake})(counts)  # 30 rows < 48 features: the Gram path
    g = (torch.from_numpy(fake).double() - torch.from_numpy(fake).double().mean(0)) @ stat.sqrt_ref
    w = torch.from_numpy(counts)
    m, mean_c = (
        w.sum(1),
        (w @ (torch.from_numpy(fake).double() - torch.from_numpy(fake).double().mean(0))) / w.sum(1)[:, None],
    )
    primal = stat._primal(g)(w, m, mean_c)
    # rel 1e-7, not 1e-9: the D x D path takes the square root of its D - N round-off eigenvalues (~1e-8 each)
    assert stat._dual(g)(w, m, mean_c).numpy() == pytest.approx(primal.numpy(), rel=1e-7)
    copied = [fid(torch.from_numpy(fake[row]).double(), torch.from_numpy(ref).double()) for row in idx]
    assert fast[1:] == pytest.approx(copied, rel=1e-6)
    assert fast[0] == pytest.approx(fid(torch.from_numpy(fake).double(), torch.from_numpy(ref).double()), rel=1e-6)


def test_the_fid_criterion_standard_error_is_the_std_of_100_bootstrap_fids() -> None:
    from types import SimpleNamespace

    from perceptual_diffusion.evaluation.scoring import Criterion

    ref, fake = _features(300, 16, seed=0), _features(150, 16, seed=2, shift=0.2)
    mu, cov = mean_cov(torch.from_numpy(ref))
    stat = fid_against(mu, cov)
    draws = [stat({"features": fake[row]}) for row in np.random.default_rng(0).integers(0, 150, size=(100, 150))]
    criterion = Criterion("fid", higher_is_better=False)
    result = {"metrics": {"fid": stat({"features": fake})}, "n_samples": 150}
    se = criterion.standard_error(result, {"features": fake}, SimpleNamespace(mu=mu, cov=cov))
    assert se == pytest.approx(float(np.std(draws, ddof=1)), rel=1e-9)
    assert se > 0


def test_precision_and_coverage_statistics_agree_with_prdc() -> None:
    ref, fake = _features(150, 8, seed=2), _features(120, 8, seed=3, shift=0.3)
    pr = precision_recall(torch.from_numpy(ref), torch.from_numpy(fake), k=3)
    assert precision_against(ref, k=3)({"features": fake}) == pytest.approx(pr["precision"])
    assert coverage_against(ref, k=3)({"features": fake}) == pytest.approx(pr["coverage"])
    # Duplicated rows (as a bootstrap draws them) leave each row's precision indicator alone and coverage unchanged.
    doubled = {"features": np.concatenate([fake, fake])}
    assert precision_against(ref)(doubled) == pytest.approx(pr["precision"])
    assert coverage_against(ref)(doubled) == pytest.approx(pr["coverage"])


def test_summary_gives_a_std_only_from_three_values() -> None:
    assert summary([1.0, 3.0]) == {"mean": 2.0, "std": None, "n": 2}
    out = summary([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == pytest.approx(1.0) and out["n"] == 3
    with pytest.raises(ValueError):
        summary([])
