"""The grid-artifact probe (spectrum.py): power spectra, grid frequencies, grid excess, and its place in evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perceptual_diffusion.config import DataConfig, SampleConfig
from perceptual_diffusion.data.datasets import shapes_valid_set
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation import evaluate as ev
from perceptual_diffusion.evaluation import reference
from perceptual_diffusion.evaluation import spectrum as sp
from perceptual_diffusion.evaluation.features import domain_extractor
from perceptual_diffusion.evaluation.scoring import flatten_metrics
from perceptual_diffusion.runtime.cache import CACHE_ENV


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own reference cache: nothing is read from or written to $HOME."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    reference._REFERENCES.clear()
    return tmp_path / "cache"


def _smooth(n: int, size: int = 16) -> torch.Tensor:
    """Smooth grey images in [-1, 1]: random mixtures of the 1- and 2-cycle cosines (no energy above 2 cycles)."""
    g = torch.Generator().manual_seed(n)
    yy, xx = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="ij")
    images = torch.zeros(n, 1, size, size)
    for ky, kx in ((1, 0), (0, 1), (1, 1), (2, 0), (0, 2)):
        amplitude, phase = torch.rand(n, 1, 1, 1, generator=g) * 0.15, torch.rand(n, 1, 1, 1, generator=g) * 6.3
        images += amplitude * torch.cos(2 * math.pi * (ky * yy + kx * xx) + phase)
    return images


def _excess(samples: torch.Tensor, real: torch.Tensor, strides: tuple[int, ...]) -> tuple[dict, np.ndarray]:
    stats = sp.SpectrumStats(strides)
    stats.update(samples, {})
    return stats.summary(sp.power_spectrum(real).mean(0))


def _numpy_radial(image: np.ndarray) -> np.ndarray:
    """A direct computation: loop over every DFT bin of each channel, bin its power by rounded radius."""
    c, h, w = image.shape
    side = min(h, w)
    sums, counts = np.zeros(side // 2 + 1), np.zeros(side // 2 + 1)
    for ch in range(c):
        x = image[ch] - image[ch].mean()
        power = np.abs(np.fft.fft2(x)) ** 2 / (h * w)
        for u in range(h):
            for v in range(w):
                fu = u if u < (h + 1) // 2 else u - h  # signed frequency index (numpy's fftfreq order)
                fv = v if v < (w + 1) // 2 else v - w
                r = int(math.floor(math.hypot(fu / h, fv / w) * side + 0.5))
                if r <= side // 2:
                    sums[r] += power[u, v] / c
                    counts[r] += 1 / c
    return sums / counts


@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 15, 15), (2, 12, 17)])
def test_radial_profile_matches_a_direct_numpy_computation(shape: tuple[int, int, int]) -> None:
    images = torch.rand(2, *shape, generator=torch.Generator().manual_seed(sum(shape))) * 2 - 1
    ours = sp.radial_profile(sp.power_spectrum(images))
    assert ours.shape == (2, min(shape[1:]) // 2 + 1)
    for i in range(2):
        np.testing.assert_allclose(ours[i].numpy(), _numpy_radial(images[i].double().numpy()), rtol=1e-10, atol=1e-20)


def test_white_noise_has_a_flat_radial_spectrum_at_its_variance() -> None:
    sigma = 0.3
    noise = torch.randn(400, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * sigma
    radial = sp.radial_profile(sp.power_spectrum(noise)).mean(0)
    assert radial[0] == pytest.approx(0.0, abs=1e-12)  # the mean is removed: no DC power
    # Each ring averages 400 x 3 x (its bins) chi-square draws; 5% is several standard errors even for ring 1.
    np.testing.assert_allclose(radial[1:].numpy(), sigma**2, rtol=0.05)
    # Parseval: the power averages to the pixel variance over all frequencies.
    power = sp.power_spectrum(noise)
    torch.testing.assert_close(power.mean((1, 2)), noise.double().var((1, 2, 3), correction=0), rtol=0.05, atol=0)


def test_a_period_two_checkerboard_gives_a_large_excess_and_a_smooth_image_none() -> None:
    smooth = _smooth(4)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checker = ((yy + xx) % 2 * 2 - 1).float() * 0.05  # period 2, amplitude 0.05 (6 grey levels of 255)
    section, excess = _excess(smooth + checker, smooth, (2,))
    assert excess.shape == (4,) and (excess > 20).all(), excess  # its energy sits exactly on (H/2, W/2)
    assert section["grid_excess_db"] == pytest.approx(float(excess.mean()))
    assert section["strides"] == [2] and section["grid_frequencies"] == 3
    _, itself = _excess(smooth[[1]], smooth[[1]], (2,))
    assert np.abs(itself).max() < 1e-9  # a smooth image against itself: 0 dB
    _, same = _excess(smooth, smooth, (2, 4))
    assert np.abs(same).max() < 1e-6  # smooth images against their own mean: 0 dB, both at the 8-bit floor


def test_each_stride_sees_its_own_period() -> None:
    """A period-4 stripe pattern is a peak on stride 4's lattice (H/4 cycles) but not on stride 2's."""
    smooth = _smooth(3)
    stripes = torch.cos(2 * math.pi * torch.arange(16) / 4).float() * 0.05
    section, _ = _excess(smooth + stripes, smooth, (2, 4))
    by_stride = section["grid_excess_db_by_stride"]
    assert by_stride["4"] > 10 and abs(by_stride["2"]) < 1e-6, by_stride
    assert section["grid_excess_db"] > 10  # the grid set is the union of the lattices


def test_grid_frequencies_take_the_nearest_bin_and_both_conjugates() -> None:
    masks = sp.grid_masks(28, 28, (8,))  # 28 / 8 = 3.5 cycles: harmonics at 3.5 a, rounded half away from 0
    rows = sorted({int(r) for r in torch.nonzero(masks[1])[:, 0]})
    assert rows == [0, 4, 7, 11, 14, 17, 21, 24]
    for mask in sp.grid_masks(27, 20, (2, 4)):  # k -> -k maps the set onto itself
        flipped = torch.roll(mask.flip(0, 1), shifts=(1, 1), dims=(0, 1))
        assert torch.equal(mask, flipped) and mask[0, 0] == 0
    odd = torch.nonzero(sp.grid_masks(27, 28, (2,))[0]).tolist()  # 13.5 cycles on 27 rows: bins 13 and 14 both
    assert odd == [[0, 14], [13, 0], [13, 14], [14, 0], [14, 14]]
    with pytest.raises(UserError, match="2 to 16 pixels"):
        sp.grid_masks(16, 16, (32,))
    with pytest.raises(UserError, match="grid stride"):
        sp.grid_masks(16, 16, (1,))


def test_preset_strides_are_the_down_sampling_strides() -> None:
    assert sp.preset_strides("tiny") == (2,)  # 2 levels: one halving
    assert sp.preset_strides("small") == (2, 4)
    assert sp.preset_strides("large") == (2, 4, 8)


def test_the_floor_keeps_blank_images_finite() -> None:
    blank = torch.zeros(2, 1, 16, 16)
    _, excess = _excess(blank, _smooth(2), (2,))
    assert np.isfinite(excess).all() and (excess < 0).all()
    _, excess = _excess(blank, blank, (2,))
    assert np.abs(excess).max() < 1e-12  # both at the floor of 8-bit rounding: 0 dB, no 0/0


def test_evaluation_records_the_spectrum_and_the_per_sample_excess(tmp_path: Path) -> None:
    """The real valid set scored as samples: its radial spectrum is the reference's, the per-sample excess is in
    the .npz and its mean is the flat metric; against the real data's own mean a sample is at or below 0 dB on
    average (the mean of the log is at most the log of the mean)."""
    data, extractor = DataConfig(source="shapes", image_size=16), domain_extractor("shapes", 16)
    valid = shapes_valid_set(16)
    path = tmp_path / "real.npz"
    row = ev.evaluate_images(valid.images.split(300), 1600, data, extractor, per_sample_path=path, strides=(2, 4))
    spectrum = row["spectrum"]
    assert spectrum["strides"] == [2, 4] and set(spectrum["grid_excess_db_by_stride"]) == {"2", "4"}
    np.testing.assert_allclose(spectrum["radial_samples"], spectrum["radial_reference"], rtol=1e-9)
    with np.load(path) as f:
        grid_excess = f["grid_excess"]
    assert grid_excess.shape == (1600,) and np.isfinite(grid_excess).all()
    assert flatten_metrics(row)["grid_excess_db"] == pytest.approx(grid_excess.mean()) == spectrum["grid_excess_db"]
    assert spectrum["grid_excess_db"] <= 0
    assert "gridDB" in ev.format_table([{**row, "sampling": {"cfg_scale": 1.0, "guidance_rescale": 0.0}}])
    # The real side is cached with the reference statistics and read back the same.
    cached = reference.reference_stats(data, extractor)
    reference._REFERENCES.clear()
    torch.testing.assert_close(reference.reference_stats(data, extractor).power_mean, cached.power_mean)


def test_gathered_batches_carry_their_spectra_without_images(tmp_path: Path) -> None:
    """Under torchrun rank 0 gets no images of a folder without the memorisation check: each rank's measured
    spectra give the same section."""
    from PIL import Image

    from perceptual_diffusion.data.datasets import to_uint8

    for i, im in enumerate(to_uint8(shapes_valid_set(16).images[::80])):
        Image.fromarray(im).save(tmp_path / f"{i:02d}.png")
    data, extractor = DataConfig(source="folder", path=str(tmp_path), image_size=16), domain_extractor("shapes", 16)
    images = reference.dataset_and_hash(data)[0].images
    direct = ev.evaluate_images(images.split(7), 20, data, extractor, nearest_train=False, strides=(2, 4))
    seconds = {"sampling": 0.0, "features": 0.0, "metrics": 0.0, "memorisation": 0.0}
    featurised = ev._featurised(iter(images.split(7)), extractor, seconds)
    gathered = ev._gathered(featurised, 5, False, (2, 4))
    row = ev.score(gathered, 20, data, extractor, None, list(range(20)), {}, seconds, nearest_train=False,
                   strides=(2, 4))  # fmt: skip
    for key, value in direct["spectrum"].items():
        assert row["spectrum"][key] == (pytest.approx(value) if isinstance(value, (list, float)) else value), key


def test_the_report_and_the_paired_analysis_use_the_flat_key() -> None:
    from types import SimpleNamespace

    from perceptual_diffusion.experiments.analysis import _statistics
    from perceptual_diffusion.experiments.report import LABELS

    assert LABELS["grid_excess_db"] == ("grid excess (dB)", False)
    ctx = SimpleNamespace(data=DataConfig(source="shapes", image_size=16), extractor=domain_extractor("shapes", 16))
    ctx.reference_split = "train"
    x = np.array([1.0, -2.0, 4.0])
    statistic = _statistics(ctx, {"grid_excess": x})["grid_excess_db"]  # the flat metric's key: one column
    assert statistic.prepare({"grid_excess": x})(np.ones((1, 3))) == pytest.approx([x.mean()])
    assert "grid_excess_db" not in _statistics(ctx, {})  # an evaluation written before the probe has none


def test_evaluate_model_takes_the_strides_of_its_preset() -> None:
    from perceptual_diffusion.config import ModelConfig, ScheduleConfig
    from perceptual_diffusion.core.networks import DiffusionUNet

    torch.manual_seed(0)
    model = DiffusionUNet(ModelConfig("tiny", 16, 3, 4), ScheduleConfig()).eval()
    data, extractor = DataConfig(source="shapes", image_size=16), domain_extractor("shapes", 16)
    row = ev.evaluate_model(model, SampleConfig(steps=2), data, 10, extractor, nearest_train=False)
    assert row["spectrum"]["strides"] == [2] and math.isfinite(row["spectrum"]["grid_excess_db"])
