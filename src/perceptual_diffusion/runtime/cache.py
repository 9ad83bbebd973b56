"""Where the project caches what it derives from data (reference statistics, latents, trained domain classifiers):
``$PD_CACHE_DIR``, else ``~/.cache/perceptual-diffusion``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CACHE_ENV = "PD_CACHE_DIR"


def cache_dir() -> Path:
    """Where reference statistics are cached: $PD_CACHE_DIR or ~/.cache/perceptual-diffusion."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "perceptual-diffusion")


@contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path``'s sibling lock file while a cache entry is read or made, so that parallel
    processes (training seeds run side by side, DDP ranks) make it once and the others wait and read it. POSIX
    ``flock``, released by the kernel if the holder dies. Without flock (Windows) or where no lock file can be
    made (a read-only or missing cache folder) there is no lock: the atomic write still keeps the entry whole, and
    at worst it is made twice."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.parent / f".{path.name}.lock", "a")  # noqa: SIM115 (closed below, after the unlock)
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
