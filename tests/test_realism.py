"""Exact and structural realism on the procedural shapes, and the nearest-training-image distance on any images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perceptual_diffusion.data.datasets import BACKGROUND, PALETTE, shapes_valid_set
from perceptual_diffusion.evaluation.realism import (
    THRESHOLD_FRACTION,
    NearestTrainDistance,
    ShapesRealism,
    nearest_rms,
    realism_threshold,
    rms_distance,
    snap_margin,
    snap_to_palette,
)


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


# ---------------------------------------------------------------------------------------------------------------
# Structure: snap every pixel to the five colours, then look the snapped image up among the valid ones.


def _recolour_one_shape_pixel(valid, index: int, colour: tuple[int, int, int]) -> torch.Tensor:
    """Valid image ``index`` with its first non-background pixel set to ``colour`` (uint8 RGB)."""
    img = valid.images[index].clone()
    background = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1
    y, x = next((y, x) for y in range(16) for x in range(16) if not torch.allclose(img[:, y, x], background))
    img[:, y, x] = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
    return img[None]


def test_structure_matches_every_valid_image_with_noise_below_the_snapping_margin(valid) -> None:
    margin = snap_margin()
    assert 0.25 < margin < 0.35  # red and yellow, the closest pair, are 151/255 apart
    # Uniform noise of at most margin / sqrt(3) per channel moves no pixel by a full margin in RGB ([-1, 1]: x 2).
    g = torch.Generator().manual_seed(0)
    bound = 0.99 * margin / 3**0.5 * 2
    noisy = valid.images + (torch.rand(valid.images.shape, generator=g) * 2 - 1) * bound
    metric = ShapesRealism(16)
    metric.update(noisy, valid.labels)
    out, per = metric.compute(), metric.per_sample()
    assert out["structure_precision"] == 1.0 and out["structure_recall"] == 1.0
    assert per["structure"].all() and (per["nearest_valid"] == range(1600)).all()
    assert out["exact_precision"] == 0.0  # the same noise defeats the RMS threshold entirely
    assert 0.05 < out["noise_rms_median"] < margin and out["noise_rms_median_structured"] == out["noise_rms_median"]


def test_a_valid_image_has_no_noise_and_one_recoloured_pixel_breaks_its_structure(valid) -> None:
    codes, noise = snap_to_palette(valid.images)
    assert codes.max() == 4 and float(noise.max()) < 1e-6  # float32 round-off of c / 255
    metric = ShapesRealism(16)
    red = next(
        i for i in range(1600) if torch.allclose(valid.images[i].amax((1, 2)), torch.tensor(PALETTE[0]) / 127.5 - 1)
    )
    metric.update(valid.images[red : red + 1])
    metric.update(_recolour_one_shape_pixel(valid, red, PALETTE[3]))  # one red pixel turned yellow
    metric.update(_recolour_one_shape_pixel(valid, red, PALETTE[1]))  # one red pixel turned green
    per = metric.per_sample()
    assert per["structure"].tolist() == [True, False, False]
    # A red pixel turned yellow is RMS 0.021 away: "exact" still accepts it, the structure does not.
    assert per["exact"].tolist() == [True, True, False]
    assert per["noise_rms"].max() < 1e-6  # recoloured to a palette colour: a wrong shape, but no noise
    assert "class_match" not in per  # unlabelled
    assert metric.compute()["structure_recall"] == pytest.approx(1 / 1600)


def test_per_sample_arrays_follow_update_order(valid) -> None:
    metric = ShapesRealism(16)
    order = torch.tensor([5, 3, 900, 5])
    for part in order.split(3):
        metric.update(valid.images[part], valid.labels[part])
    per = metric.per_sample()
    assert set(per) == {"exact", "structure", "noise_rms", "class_match", "nearest_valid"}
    assert per["nearest_valid"].tolist() == order.tolist() and per["class_match"].all()
    assert per["exact"].dtype == bool and per["noise_rms"].dtype == np.float64 and len(per["noise_rms"]) == 4


# ---------------------------------------------------------------------------------------------------------------
# Nearest training image.


def test_nearest_train_distance_is_zero_for_training_images_and_positive_for_held_out_ones() -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.rand(70, 1, 8, 8, generator=g) * 2 - 1
    train, heldout = images[:50], images[50:]
    # Small chunks exercise the chunked search; it must agree with the brute-force RMS distance.
    d_train = nearest_rms(train, train, query_chunk=7, train_chunk=16)
    d_held = nearest_rms(heldout, train, query_chunk=7, train_chunk=16)
    assert (d_train == 0).all()
    assert (d_held > 0).all()
    torch.testing.assert_close(d_held, rms_distance(heldout, train).min(1).values.double(), atol=1e-5, rtol=0)
    metric = NearestTrainDistance(train, heldout=heldout)
    assert metric.update(train[:10]).eq(0).all()
    metric.update(heldout[:5] * 0.5)
    out = metric.compute()
    assert out["n"] == 15 and out["n_train"] == 50 and out["median"] == 0.0 and out["p10"] == 0.0
    assert out["heldout"]["n"] == 20 and out["heldout"]["median"] == pytest.approx(np.median(d_held.numpy()))
    assert metric.per_sample().shape == (15,)
