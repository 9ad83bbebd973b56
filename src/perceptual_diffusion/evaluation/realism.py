"""Exact realism metrics for the procedural shapes: every valid image is known, so "is this sample real?" has an answer.

Distance is the RMS difference over all pixels and channels in [0, 1] units. A sample is *realistic* when it lies
within ``realism_threshold`` of some valid image. The threshold is half the smallest distance between two distinct
valid images (0.0279 at 16x16: a disc and a cross of the same colour and position differ in a few corner pixels), so
the balls around valid images are disjoint: a realistic sample matches exactly one valid image, and no blend of two
valid images is counted as real. For scale: one pixel completely wrong in all three channels of a 16x16 image is an
RMS error of sqrt(3/768) = 0.0625; but one shape pixel recoloured from red to yellow (151/255 apart in RGB) is only
0.021 away and still counts as exact.

That threshold sits at the level of faint residual noise, so it cannot tell "right shape, faint noise" from "wrong
shape" (or a wrong colour in a pixel). The *structure* metrics separate the two: every pixel is snapped to the
nearest of the five colours the data uses (background and the four palette colours; Euclidean distance in RGB, in
[0, 1] units = uint8 / 255), and a sample has the right structure when its snapped image is exactly a valid image;
what snapping removed is the sample's *residual noise* (RMS in [0, 1] units).

:class:`NearestTrainDistance` works on any data: the RMS distance from each sample to its nearest training image, a
memorisation check that reads best next to the same distance for held-out real images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from perceptual_diffusion.data.datasets import BACKGROUND, PALETTE, SHAPE_CLASSES, shapes_valid_set
from perceptual_diffusion.evaluation.metrics import ideal_coverage

# The threshold as a fraction of the smallest distance between distinct valid images; below 1/2 the balls are
# disjoint, so each realistic sample is attributed to exactly one valid image.
THRESHOLD_FRACTION = 0.5

# The five colours of the shapes data, uint8 RGB; a snapped pixel holds the index of one of them (0 = background).
SNAP_COLOURS = (BACKGROUND, *PALETTE)


def rms_distance(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise RMS distance (N, M) between image batches in [-1, 1], measured in [0, 1] units."""
    x, y = (a.flatten(1).float() + 1) / 2, (b.flatten(1).float() + 1) / 2
    return torch.cdist(x, y) / x.shape[1] ** 0.5


@lru_cache(maxsize=4)
def realism_threshold(image_size: int = 16) -> float:
    """``THRESHOLD_FRACTION`` times the smallest RMS distance between two distinct valid images of this size."""
    valid = shapes_valid_set(image_size).images.double()
    x = ((valid + 1) / 2).flatten(1)
    d = torch.cdist(x, x) / x.shape[1] ** 0.5
    d.fill_diagonal_(float("inf"))
    return THRESHOLD_FRACTION * float(d.min())


def _median(x: Tensor) -> float:
    """The median as numpy defines it (the mean of the middle two of an even count; torch's is the lower one)."""
    return float(torch.quantile(x.double(), 0.5))


def _colours01() -> Tensor:
    """The five snap colours (5, 3) in [0, 1] units, float64."""
    return torch.tensor(SNAP_COLOURS, dtype=torch.float64) / 255.0


def snap_margin() -> float:
    """Half the smallest RGB distance between two snap colours, in [0, 1] units: a pixel moved less stays put."""
    c = _colours01()
    d = torch.cdist(c, c)
    d.fill_diagonal_(float("inf"))
    return 0.5 * float(d.min())


def snap_to_palette(samples: Tensor) -> tuple[Tensor, Tensor]:
    """Snap samples in [-1, 1] (N, 3, H, W) to the five colours: (colour index per pixel (N, H, W) uint8, noise RMS
    (N,) float64 in [0, 1] units between each sample and its snapped image)."""
    x = (samples.detach().to("cpu", torch.float64).permute(0, 2, 3, 1) + 1) / 2  # (N, H, W, 3) in [0, 1]
    colours = _colours01()
    codes = ((x[..., None, :] - colours) ** 2).sum(-1).argmin(-1)  # (N, H, W), nearest colour in RGB
    noise = ((x - colours[codes]) ** 2).flatten(1).mean(1).sqrt()
    return codes.to(torch.uint8), noise


@dataclass
class ShapesRealism:
    """Streaming exact and structural precision and recall, class agreement and residual noise on the shapes."""

    image_size: int = 16
    n: int = 0
    realistic: int = 0
    labelled: int = 0
    class_match: int = 0
    structured: int = 0
    valid: Tensor = field(init=False)
    valid_labels: Tensor = field(init=False)
    hit: Tensor = field(init=False)
    structure_hit: Tensor = field(init=False)
    threshold: float = field(init=False)
    _valid_codes: dict[bytes, int] = field(init=False, repr=False)
    _parts: dict[str, list[Tensor]] = field(init=False, repr=False)
    _unlabelled: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        ds = shapes_valid_set(self.image_size)
        self.valid, self.valid_labels = ds.images, ds.labels
        self.hit = torch.zeros(len(ds), dtype=torch.bool)
        self.structure_hit = torch.zeros(len(ds), dtype=torch.bool)
        self.threshold = realism_threshold(self.image_size)
        # Snapping a valid image is the identity, so its snapped image is a dictionary key: O(1) per sample.
        codes, _ = snap_to_palette(self.valid)
        self._valid_codes = {c.numpy().tobytes(): i for i, c in enumerate(codes)}
        self._parts = {k: [] for k in ("exact", "structure", "noise_rms", "class_match", "nearest_valid")}

    def update(self, samples: Tensor, labels: Tensor | None = None) -> None:
        """Add samples in [-1, 1] (N, 3, H, W) and, for conditional samples, the labels they were drawn with."""
        if samples.shape[1:] != self.valid.shape[1:]:
            raise ValueError(f"samples of shape {tuple(samples.shape[1:])} are not shapes{self.image_size} images")
        samples = samples.detach().cpu()
        dist, nearest = rms_distance(samples, self.valid).min(dim=1)
        close = dist < self.threshold
        self.n += samples.shape[0]
        self.realistic += int(close.sum())
        self.hit[nearest[close]] = True
        codes, noise = snap_to_palette(samples)
        matched = torch.tensor([self._valid_codes.get(c.numpy().tobytes(), -1) for c in codes], dtype=torch.long)
        structure = matched >= 0
        self.structured += int(structure.sum())
        self.structure_hit[matched[structure]] = True
        self._parts["exact"].append(close)
        self._parts["structure"].append(structure)
        self._parts["noise_rms"].append(noise)
        self._parts["nearest_valid"].append(nearest)
        if labels is not None:
            agree = self.valid_labels[nearest] == labels.cpu()
            self.labelled += samples.shape[0]
            self.class_match += int(agree.sum())
            self._parts["class_match"].append(agree)
        else:
            self._unlabelled = True

    def per_sample(self) -> dict[str, np.ndarray]:
        """Per-sample arrays in update order: exact, structure, class_match (bool; absent unless every sample was
        labelled), noise_rms (float64, [0, 1] units) and nearest_valid (int64, index into the valid set)."""
        out = {}
        for key, parts in self._parts.items():
            if key == "class_match" and (self._unlabelled or not parts):
                continue
            dtype = {"noise_rms": torch.float64, "nearest_valid": torch.long}.get(key, torch.bool)
            out[key] = (torch.cat(parts) if parts else torch.zeros(0, dtype=dtype)).numpy()
        return out

    def compute(self) -> dict[str, float | int | None]:
        """The metrics so far; ``ideal_recall`` is what a perfect sampler's recall would be with this many samples."""
        n_valid = self.valid.shape[0]
        noise = torch.cat(self._parts["noise_rms"]) if self._parts["noise_rms"] else torch.zeros(0)
        structure = torch.cat(self._parts["structure"]) if self._parts["structure"] else torch.zeros(0, dtype=bool)
        matched_noise = noise[structure]
        return {
            "exact_precision": self.realistic / self.n if self.n else float("nan"),
            "exact_recall": float(self.hit.float().mean()),
            "ideal_recall": ideal_coverage(self.n, n_valid),
            "class_agreement": self.class_match / self.labelled if self.labelled else None,
            "threshold_rms": self.threshold,
            "structure_precision": self.structured / self.n if self.n else float("nan"),
            "structure_recall": float(self.structure_hit.float().mean()),
            "noise_rms_median": _median(noise) if len(noise) else float("nan"),
            "noise_rms_mean": float(noise.mean()) if len(noise) else float("nan"),
            # The noise left on samples whose structure is right: "right shape, faint noise" in one number.
            "noise_rms_median_structured": _median(matched_noise) if len(matched_noise) else None,
            "snap_colours": len(SNAP_COLOURS),
            "valid_images": n_valid,
            "classes": len(SHAPE_CLASSES),
        }


# ---------------------------------------------------------------------------------------------------------------
# Nearest training image: memorisation on any data.


def nearest_rms(queries: Tensor, train: Tensor, query_chunk: int = 1024, train_chunk: int = 8192) -> Tensor:
    """RMS distance (N,) float64 in [0, 1] units from each image in [-1, 1] to its nearest row of ``train``.

    The distance matrix is formed chunk by chunk with the matrix-product form of ``torch.cdist`` (float32), which
    loses a few digits to cancellation; each chunk's winner is therefore re-measured as a direct difference, so a
    sample that copies a training image is at distance exactly 0.
    """
    q_all = queries.detach().to("cpu", torch.float32).flatten(1)
    t_all = train.detach().to("cpu", torch.float32).flatten(1)
    if q_all.shape[1] != t_all.shape[1]:
        raise ValueError(
            f"images of {q_all.shape[1]} values cannot be compared with training images of {t_all.shape[1]}"
        )
    dim = q_all.shape[1]
    best = torch.full((len(q_all),), float("inf"), dtype=torch.float64)
    for qs in range(0, len(q_all), query_chunk):
        q = q_all[qs : qs + query_chunk]
        for ts in range(0, len(t_all), train_chunk):
            t = t_all[ts : ts + train_chunk]
            idx = torch.cdist(q, t, compute_mode="use_mm_for_euclid_dist").argmin(1)
            exact = (q.double() - t[idx].double()).pow(2).sum(1)
            best[qs : qs + query_chunk] = torch.minimum(best[qs : qs + query_chunk], exact)
    return (best / dim).sqrt() / 2  # [-1, 1] units to [0, 1] units: differences halve


def _distance_summary(d: Tensor) -> dict[str, float | int]:
    d = d.double()
    return {
        "median": _median(d),
        "p10": float(torch.quantile(d, 0.1)),
        "mean": float(d.mean()),
        "n": len(d),
    }


@dataclass
class NearestTrainDistance:
    """Streaming RMS distance from each sample to its nearest training image, next to held-out real images'."""

    train: Tensor  # (N, C, H, W) in [-1, 1]
    heldout: Tensor | None = None  # real images not trained on, (M, C, H, W) in [-1, 1]
    heldout_distances: Tensor | None = None  # precomputed distances of ``heldout`` (callers memoise them)
    _parts: list[Tensor] = field(init=False, default_factory=list, repr=False)

    def update(self, samples: Tensor) -> Tensor:
        """Add samples in [-1, 1] (N, C, H, W); returns their nearest-training-image RMS distances (N,)."""
        d = nearest_rms(samples, self.train)
        self._parts.append(d)
        return d

    def per_sample(self) -> np.ndarray:
        """Every sample's distance so far, in update order (float64, [0, 1] units)."""
        return (torch.cat(self._parts) if self._parts else torch.zeros(0, dtype=torch.float64)).numpy()

    def heldout_summary(self) -> dict[str, float | int] | None:
        """Median, 10th percentile and mean of the held-out images' distances (computed once), or None."""
        if self.heldout_distances is None and self.heldout is not None:
            self.heldout_distances = nearest_rms(self.heldout, self.train)
        return None if self.heldout_distances is None else _distance_summary(self.heldout_distances)

    def compute(self) -> dict[str, object]:
        """Median, 10th percentile and mean over samples, and the same for the held-out images when given.

        Samples sitting clearly closer to the training images than held-out real images do are a sign of copying.
        """
        if not self._parts:
            raise ValueError("no samples were added")
        return {
            **_distance_summary(torch.cat(self._parts)),
            "n_train": len(self.train),
            "heldout": self.heldout_summary(),
            "units": "RMS distance in [0, 1] pixel units",
        }
