"""A probe for grid artifacts: radially averaged power spectra, and each sample's *grid excess* in dB.

Lin & Yang (arXiv 2401.00110, Sec. 6, limitations) see grid-like artifacts in some self-perceptual samples. A U-Net
with L resolution levels down-samples by strides 2, 4, ..., 2^(L-1) pixels (:func:`preset_strides`), and a pattern
that repeats every p pixels puts its energy at the harmonics of p, which is what this module measures.

Definitions, for images in [-1, 1] of shape (N, C, H, W):

- **Power spectrum** (:func:`power_spectrum`): per image and channel, the 2D DFT X of the image minus its mean;
  P = |X|^2 / (H W), averaged over channels. P averages, over the H W frequencies, to the pixel variance
  (Parseval), so white noise of variance s^2 has E P = s^2 at every non-DC frequency; P at DC is 0.
- **Radial spectrum** (:func:`radial_profile`): the mean of P over the frequencies whose radius
  sqrt((ky / H)^2 + (kx / W)^2) (signed ky, kx; cycles per pixel) times min(H, W) rounds to r, for
  r = 0 .. min(H, W) // 2 (cycles per image along the shorter side); the corners outside the Nyquist circle, which
  are no full ring, are left out. It is linear in P, so the radial spectrum of the mean P is the mean radial spectrum.
- **Grid frequencies of a stride p** (:func:`grid_masks`): every harmonic of a pattern of period p in both
  directions, the lattice (a H / p, b W / p), a, b in 0 .. p - 1, without DC (a doubly periodic pattern's Fourier
  series lives exactly there; its fundamentals are (H / p, 0), (0, W / p) and (H / p, W / p)). A side not divisible
  by p takes the nearest DFT bin (the signed frequency rounded half away from zero), and the set is closed under
  k -> -k, so an odd side's half-integer frequency takes both nearest bins. The *grid set* is the union over the
  strides; per stride, each lattice alone.
- **Grid excess** of a sample (:func:`grid_excess_db`): 10 log10((E + K q) / (E_real + K q)), E the sample's sum of
  P over the grid set, E_real the same sum for the real images' mean P (the mean of their grid energies, by
  linearity), K the number of grid frequencies and q = (2/255)^2 / 12 the power per frequency of 8-bit rounding
  noise: the epsilon is the floor below which an image saved as 8-bit cannot tell two energies apart. 0 dB: as much
  energy at the grid frequencies as real images; +10 dB: ten times as much. Per sample, so two models sampled with
  the same seeds give paired differences (``stats.mean_of("grid_excess")``).

Broadband noise raises every frequency, the grid ones included: read the excess next to the radial spectra (a
periodic artifact is a peak at the grid radii, residual noise a raised tail).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from perceptual_diffusion.config import min_image_multiple
from perceptual_diffusion.errors import UserError

QUANTISATION_POWER = (2 / 255) ** 2 / 12  # E P per frequency of uniform 8-bit rounding noise on [-1, 1] pixels
DEFAULT_STRIDES = (2,)  # the first level's halving, which every down-sampling U-Net has


def preset_strides(preset: str) -> tuple[int, ...]:
    """The down-sampling strides 2, 4, ..., 2^(L-1) pixels of a U-Net preset with L resolution levels."""
    return tuple(2**k for k in range(1, min_image_multiple(preset).bit_length()))


def power_spectrum(images: Tensor) -> Tensor:
    """Per-image power |DFT|^2 / (H W) of the mean-removed image, averaged over channels: (N, C, H, W) -> (N, H, W)."""
    x = images.detach().to("cpu", torch.float64)
    x = x - x.mean(dim=(-2, -1), keepdim=True)
    return torch.fft.fft2(x).abs().square().mean(1) / (x.shape[-2] * x.shape[-1])


@lru_cache(maxsize=16)
def _radius_bins(height: int, width: int) -> Tensor:
    """Radius bin of every DFT frequency, in cycles per image along the shorter side (rounded half up)."""
    ky = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    kx = torch.fft.fftfreq(width, dtype=torch.float64)[None, :]
    return torch.floor((ky.square() + kx.square()).sqrt() * min(height, width) + 0.5).long()


def radial_profile(power: Tensor) -> Tensor:
    """Mean power per radius bin r = 0 .. min(H, W) // 2: (..., H, W) -> (..., min(H, W) // 2 + 1)."""
    radius = _radius_bins(*power.shape[-2:])
    bins = min(power.shape[-2:]) // 2 + 1
    inside = radius < bins
    index = radius[inside]
    sums = torch.zeros(*power.shape[:-2], bins, dtype=power.dtype).index_add_(-1, index, power[..., inside])
    return sums / torch.bincount(index, minlength=bins).to(power.dtype)


def _nearest_bin(frequency: Tensor) -> Tensor:
    """Signed frequency (cycles per image) -> the nearest integer bin, ties away from zero."""
    return (frequency.sign() * torch.floor(frequency.abs() + 0.5)).long()


def _lattice(height: int, width: int, stride: int) -> Tensor:
    """Bool (H, W) mask of the DFT bins nearest the harmonics (a H / p, b W / p) of period p, DC excluded."""
    if not 2 <= stride <= min(height, width):
        raise UserError(f"a grid stride must be 2 to {min(height, width)} pixels (the image side), got {stride}")
    harmonics = torch.arange(stride, dtype=torch.float64)
    harmonics = torch.where(harmonics <= stride / 2, harmonics, harmonics - stride)  # signed: -p/2 < a <= p/2
    ky = _nearest_bin(harmonics * height / stride)[:, None].expand(stride, stride)
    kx = _nearest_bin(harmonics * width / stride)[None, :].expand(stride, stride)
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[ky % height, kx % width] = True
    mask[-ky % height, -kx % width] = True  # closed under k -> -k: P(k) = P(-k) for real images
    mask[0, 0] = False
    return mask


@lru_cache(maxsize=16)
def grid_masks(height: int, width: int, strides: tuple[int, ...]) -> Tensor:
    """(1 + S, H, W) float64 masks: the grid set (the union over ``strides``), then each stride's lattice."""
    if not strides:
        raise UserError("grid strides must name at least one stride")
    lattices = torch.stack([_lattice(height, width, int(p)) for p in strides])
    return torch.cat([lattices.any(0, keepdim=True), lattices]).double()


def measure(images: Tensor, strides: tuple[int, ...]) -> dict[str, Tensor]:
    """Per-sample spectrum numbers of one batch: ``radial_power`` (N, R) and ``grid_energy`` (N, 1 + S), the
    energy on the grid set and then on each stride's lattice."""
    power = power_spectrum(images)
    masks = grid_masks(power.shape[-2], power.shape[-1], tuple(int(p) for p in strides))
    return {"radial_power": radial_profile(power), "grid_energy": torch.einsum("nhw,khw->nk", power, masks)}


def grid_excess_db(energy: Tensor, reference_energy: Tensor, frequencies: Tensor) -> Tensor:
    """10 log10 of a sample's grid energy over the real images' mean, both floored by 8-bit rounding noise."""
    floor = frequencies.double() * QUANTISATION_POWER
    return 10 * torch.log10((energy.double() + floor) / (reference_energy.double() + floor))


class SpectrumStats:
    """The sample side: running radial-spectrum sums and every sample's grid energies, in seed order."""

    def __init__(self, strides: tuple[int, ...]) -> None:
        self.strides = tuple(int(p) for p in strides)
        self.radial_sum: Tensor | None = None
        self.energies: list[Tensor] = []
        self.size: tuple[int, int] | None = None

    def update(self, images: Tensor | None, out: dict[str, Tensor]) -> None:
        """Fold one batch in: the numbers ``measure`` put into ``out`` (under torchrun), else measured on ``images``."""
        if images is not None:
            self.size = (images.shape[-2], images.shape[-1])
        measured = out if "grid_energy" in out else measure(images, self.strides) if images is not None else None
        if measured is None:
            return
        radial = measured["radial_power"].double().sum(0)
        self.radial_sum = radial if self.radial_sum is None else self.radial_sum + radial
        self.energies.append(measured["grid_energy"].double())

    def summary(self, reference_power: Tensor) -> tuple[dict, np.ndarray | None]:
        """The result's ``spectrum`` section against the real images' mean power (H, W), and the per-sample excess."""
        height, width = reference_power.shape
        bins = min(height, width) // 2 + 1
        if self.size not in (None, (height, width)) or self.radial_sum is None or len(self.radial_sum) != bins:
            got = "no images" if self.radial_sum is None else "samples of another size"
            return {"skipped": f"{got} against the {height}x{width} px reference: no spectrum to compare"}, None
        energy = torch.cat(self.energies)
        masks = grid_masks(height, width, self.strides)
        excess = grid_excess_db(energy, (masks * reference_power.double()).sum((1, 2)), masks.sum((1, 2)))
        section = {
            "strides": list(self.strides),
            "grid_frequencies": int(masks[0].sum()),
            "grid_excess_db": float(excess[:, 0].mean()),
            "grid_excess_db_by_stride": {str(p): float(excess[:, 1 + i].mean()) for i, p in enumerate(self.strides)},
            "radial_samples": (self.radial_sum / len(energy)).tolist(),
            "radial_reference": radial_profile(reference_power.double()).tolist(),
            "radius_unit": "cycles per image along the shorter side",
            "definition": "per sample, 10 log10 of its DFT power on the strides' harmonics over the real images' "
            "mean, each plus K (2/255)^2/12 (8-bit rounding noise on K frequencies); the mean over samples",
        }
        return section, excess[:, 0].numpy()
