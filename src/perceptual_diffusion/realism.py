"""Exact realism metrics for the procedural shapes: every valid image is known, so "is this sample real?" has an answer.

Distance is the RMS difference over all pixels and channels in [0, 1] units. A sample is *realistic* when it lies
within ``realism_threshold`` of some valid image. The threshold is half the smallest distance between two distinct
valid images (0.0279 at 16x16: a disc and a cross of the same colour and position differ in a few corner pixels), so
the balls around valid images are disjoint: a realistic sample matches exactly one valid image, and no blend of two
valid images is counted as real. For scale: one pixel completely wrong in all three channels of a 16x16 image is an
RMS error of sqrt(3/768) = 0.0625, so a sample must be right pixel for pixel up to small intensity noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import Tensor

from .data import SHAPE_CLASSES, shapes_valid_set
from .metrics import ideal_coverage

# The threshold as a fraction of the smallest distance between distinct valid images; below 1/2 the balls are
# disjoint, so each realistic sample is attributed to exactly one valid image.
THRESHOLD_FRACTION = 0.5


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


@dataclass
class ShapesRealism:
    """Streaming exact precision, recall (mode coverage) and class agreement against the valid shapes set."""

    image_size: int = 16
    n: int = 0
    realistic: int = 0
    labelled: int = 0
    class_match: int = 0
    valid: Tensor = field(init=False)
    valid_labels: Tensor = field(init=False)
    hit: Tensor = field(init=False)
    threshold: float = field(init=False)

    def __post_init__(self) -> None:
        ds = shapes_valid_set(self.image_size)
        self.valid, self.valid_labels = ds.images, ds.labels
        self.hit = torch.zeros(len(ds), dtype=torch.bool)
        self.threshold = realism_threshold(self.image_size)

    def update(self, samples: Tensor, labels: Tensor | None = None) -> None:
        """Add samples in [-1, 1] (N, 3, H, W) and, for conditional samples, the labels they were drawn with."""
        if samples.shape[1:] != self.valid.shape[1:]:
            raise ValueError(f"samples of shape {tuple(samples.shape[1:])} are not shapes{self.image_size} images")
        dist, nearest = rms_distance(samples, self.valid).min(dim=1)
        close = dist < self.threshold
        self.n += samples.shape[0]
        self.realistic += int(close.sum())
        self.hit[nearest[close]] = True
        if labels is not None:
            self.labelled += samples.shape[0]
            self.class_match += int((self.valid_labels[nearest] == labels.cpu()).sum())

    def compute(self) -> dict[str, float | int | None]:
        """The metrics so far; ``ideal_recall`` is what a perfect sampler's recall would be with this many samples."""
        n_valid = self.valid.shape[0]
        return {
            "exact_precision": self.realistic / self.n if self.n else float("nan"),
            "exact_recall": float(self.hit.float().mean()),
            "ideal_recall": ideal_coverage(self.n, n_valid),
            "class_agreement": self.class_match / self.labelled if self.labelled else None,
            "threshold_rms": self.threshold,
            "valid_images": n_valid,
            "classes": len(SHAPE_CLASSES),
        }
