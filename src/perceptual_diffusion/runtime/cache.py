"""Where the project caches what it derives from data (reference statistics, latents, trained domain classifiers):
``$PD_CACHE_DIR``, else ``~/.cache/perceptual-diffusion``."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PD_CACHE_DIR"


def cache_dir() -> Path:
    """Where reference statistics are cached: $PD_CACHE_DIR or ~/.cache/perceptual-diffusion."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "perceptual-diffusion")
