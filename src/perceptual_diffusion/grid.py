"""Sample grids as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from .checkpoint import atomic_write
from .data import to_uint8


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one uint8 (H', W', 3) mosaic, ``nrow`` images per row, grey padding."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    n, h, w, _ = arr.shape
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return out


def save_grid(images: Tensor, path: Path, nrow: int | None = None, scale: int = 4) -> Path:
    """Write a sample grid PNG atomically (nearest-neighbour upscaled so 16 px images stay visible)."""
    mosaic = Image.fromarray(make_grid(images, nrow, scale=scale))
    atomic_write(Path(path), lambda tmp: mosaic.save(tmp, format="PNG"))
    return Path(path)
