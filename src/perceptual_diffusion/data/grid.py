"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from perceptual_diffusion.data.datasets import to_uint8
from perceptual_diffusion.runtime.checkpoint import atomic_write


def class_rows(n: int, num_classes: int) -> Tensor:
    """Labels for ``n`` images, one class per grid row (pass them as ``rows`` to :func:`save_grid`): class c fills
    row c, every class gets n // num_classes or one more images, in order (fewer images than classes: one each).

    The one layout of class grids (``sample --label rows``, the report's grids: classes in rows), so that a caption
    "rows: classes" is true everywhere.
    """
    if n < num_classes:
        return torch.arange(n)
    return torch.arange(n) * num_classes // n


def make_grid(
    images: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1, rows: Tensor | None = None
) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (H', W', 3) mosaic, grey padding: ``nrow`` images per row, or with
    ``rows`` (a row key per image, e.g. its class) one grid row per distinct key, in key order, shorter rows padded."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    n, h, w, _ = arr.shape
    if rows is not None:
        keys = sorted({int(k) for k in rows})
        row_of = {k: r for r, k in enumerate(keys)}
        filled = [0] * len(keys)
        cells = []
        for k in rows:
            r = row_of[int(k)]
            cells.append((r, filled[r]))
            filled[r] += 1
        nrows, ncol = len(keys), max(filled, default=1)
    else:
        ncol = nrow or math.ceil(math.sqrt(n))
        nrows = math.ceil(n / ncol)
        cells = [divmod(i, ncol) for i in range(n)]
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, (r, c) in enumerate(cells):
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_grid(images: Tensor, path: Path, nrow: int | None = None, scale: int = 4, rows: Tensor | None = None) -> Path:
    """Write a sample grid PNG atomically (nearest-neighbour upscaled so 16 px images stay visible); ``nrow`` and
    ``rows`` as in :func:`make_grid`."""
    mosaic = Image.fromarray(make_grid(images, nrow, scale=scale, rows=rows))
    atomic_write(Path(path), lambda tmp: mosaic.save(tmp, format="PNG"))
    return Path(path)
