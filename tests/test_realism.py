"""Exact realism metrics on the procedural shapes: 1.0 on real samples, ~0 on noise, blends rejected."""

from __future__ import annotations

import pytest
import torch

from perceptual_diffusion.data import shapes_valid_set
from perceptual_diffusion.realism import THRESHOLD_FRACTION, ShapesRealism, realism_threshold, rms_distance


@pytest.fixture(scope="module")
def valid():
    return shapes_valid_set(16)


def test_threshold_is_half_the_closest_pair_so_balls_are_disjoint(valid) -> None:
    d = rms_distance(valid.images, valid.images)
    d.fill_diagonal_(float("inf"))
    closest = float(d.min())
    assert THRESHOLD_FRACTION == 0.5
    assert realism_threshold(16) == pytest.approx(closest / 2, rel=1e-4)
    assert 0.02 < realism_threshold(16) < 0.04  # 0.0279 at 16x16, as documented
    assert (d > 2 * realism_threshold(16) * 0.999).all()


def test_real_samples_score_one(valid) -> None:
    metric = ShapesRealism(16)
    for images, labels in zip(valid.images.split(300), valid.labels.split(300)):
        metric.update(images, labels)
    out = metric.compute()
    assert out["exact_precision"] == 1.0
    assert out["exact_recall"] == 1.0
    assert out["class_agreement"] == 1.0
    assert out["valid_images"] == 1600


def test_slightly_noisy_real_samples_still_count_but_blends_do_not(valid) -> None:
    g = torch.Generator().manual_seed(0)
    metric = ShapesRealism(16)
    metric.update((valid.images[:200] + 0.02 * torch.randn(valid.images[:200].shape, generator=g)).clamp(-1, 1))
    assert metric.compute()["exact_precision"] == 1.0
    # Pixel blends of two valid images (MSE's "mode averaging") are not realistic.
    square, disc = valid.images[valid.labels == 0][:50], valid.images[valid.labels == 1][:50]
    blends = ShapesRealism(16)
    blends.update((square + disc) / 2)
    assert blends.compute()["exact_precision"] == 0.0


def test_noise_scores_near_zero() -> None:
    g = torch.Generator().manual_seed(1)
    metric = ShapesRealism(16)
    noise = torch.rand(500, 3, 16, 16, generator=g) * 2 - 1
    metric.update(noise, torch.randint(4, (500,), generator=g))
    out = metric.compute()
    assert out["exact_precision"] == 0.0 and out["exact_recall"] == 0.0
    assert out["class_agreement"] < 0.5  # the nearest valid image of noise has an arbitrary class


def test_recall_counts_distinct_valid_images_and_wrong_labels_disagree(valid) -> None:
    metric = ShapesRealism(16)
    repeated = valid.images[:10].repeat(20, 1, 1, 1)  # 200 samples, only 10 distinct valid images
    metric.update(repeated, (valid.labels[:10].repeat(20) + 1) % 4)
    out = metric.compute()
    assert out["exact_precision"] == 1.0
    assert out["exact_recall"] == pytest.approx(10 / 1600)
    assert out["ideal_recall"] > 0.1  # a perfect sampler would have hit ~12% of the modes with 200 draws
    assert out["class_agreement"] == 0.0
