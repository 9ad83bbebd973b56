"""The real side of every evaluation: reference statistics of a data split under a feature extractor, and the
nearest-training-image measure.

Reference statistics are computed once per (data split, data set contents, extractor) and cached on disk under
``$PD_CACHE_DIR`` (default ``~/.cache/perceptual-diffusion``), keyed by a hash of all three; within a process they
are also kept in memory, so evaluating many (model, guidance) rows pays for the reference once. The reference is the
training data by default; ``split="test"`` measures against held-out images (Fashion-MNIST's official 10,000 test
images), which a model cannot have memorised.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from perceptual_diffusion.config import SOURCES, DataConfig
from perceptual_diffusion.data.datasets import Dataset, load_dataset, to_uint8
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.features import Extractor
from perceptual_diffusion.evaluation.metrics import FeatureStats, InceptionScoreStats
from perceptual_diffusion.evaluation.realism import NearestTrainDistance, nearest_rms
from perceptual_diffusion.evaluation.spectrum import power_spectrum
from perceptual_diffusion.runtime.cache import CACHE_ENV, cache_dir, exclusive
from perceptual_diffusion.runtime.checkpoint import atomic_write

MAX_FEATURES = 10_000  # reference (and sample) feature rows kept for KID and precision/recall
IS_SPLITS = 10

_DATASETS: dict[tuple[DataConfig, str], tuple[Dataset, str]] = {}
_REFERENCES: dict[str, Reference] = {}
_HELDOUT_NEAREST: dict[str, Tensor] = {}

# Bump when the reference computation changes: a new version is a new file name, so old cache files are never read
# (2: the mean power spectrum, spectrum.py).
REFERENCE_VERSION = "2"


HELDOUT_NEAREST_MAX = 2_000  # held-out images measured for the memorisation comparison (a seeded random subset)


SPLITS = ("train", "test")


def _write_cache(path: Path, saved: dict[str, Any]) -> bool:
    """Cache reference statistics; a cache folder that cannot take them ($PD_CACHE_DIR a file, read-only, a full
    disk) costs a warning, never the statistics just computed: the evaluation goes on without the cache."""
    try:
        atomic_write(path, lambda tmp: torch.save(saved, tmp))
    except OSError as exc:
        reason = "it is a file" if path.parent.is_file() else exc.strerror or str(exc)
        warnings.warn(
            f"cannot cache the reference statistics in {path.parent} ({reason}); evaluating without the cache (set "
            f"${CACHE_ENV} to a writable folder to keep them)",
            stacklevel=4,
        )
        return False
    return True


@dataclass
class Reference:
    """What the metrics need from the real data under one extractor."""

    mu: Tensor
    cov: Tensor
    n: int
    features: Tensor  # the first ``max_features`` rows of a seeded permutation: a random subset for KID and PR
    class_probs: Tensor  # the data's label proportions, used to draw labels for conditional samples
    is_mean: float | None
    is_std: float | None
    power_mean: Tensor  # (H, W) mean DFT power of the images (spectrum.power_spectrum), for the grid probe
    path: str


def check_split(config: DataConfig, split: str) -> None:
    """Refuse a split the data source does not have, with a one-line reason."""
    if split not in SPLITS:
        raise UserError(f"reference split must be one of {', '.join(SPLITS)}, got {split!r}")
    reason = SOURCES[config.source].no_test_split
    if split == "test" and reason is not None:
        held_out = ", ".join(name for name, facts in SOURCES.items() if facts.no_test_split is None)
        raise UserError(
            f"reference split 'test' needs data with a held-out split ({held_out}): {reason}; "
            "use reference split 'train'"
        )


def dataset_and_hash(config: DataConfig, split: str = "train") -> tuple[Dataset, str]:
    """The data of a config's split and a hash of its pixels and labels (memoised: Fashion-MNIST loads in ~1 s)."""
    check_split(config, split)
    if (config, split) not in _DATASETS:
        ds = load_dataset(config, split=split)
        h = hashlib.sha256(to_uint8(ds.images).tobytes())
        h.update(ds.labels.numpy().tobytes())
        _DATASETS[(config, split)] = (ds, h.hexdigest()[:16])
    return _DATASETS[(config, split)]


def reference_stats(
    data: DataConfig,
    extractor: Extractor,
    max_features: int = MAX_FEATURES,
    reference_n: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
    split: str = "train",
) -> Reference:
    """Reference statistics of ``data``'s ``split`` under ``extractor``: from memory, else the disk cache, else
    computed."""
    ds, data_hash = dataset_and_hash(data, split)
    if reference_n is not None and reference_n > len(ds):  # never clamped to the data: that is not what was asked
        raise UserError(
            f"--reference-n {reference_n} is more than the {len(ds)} {split} images of {ds.name}; give at most "
            f"{len(ds)}, or leave --reference-n out to use them all"
        )
    n = len(ds) if reference_n is None else reference_n
    key_text = f"{REFERENCE_VERSION}|{split}|{data_hash}|{extractor.key}|{max_features}|{n}"
    key = hashlib.sha256(key_text.encode()).hexdigest()
    name = ds.name if split == "train" else f"{ds.name}-{split}"
    path = cache_dir() / f"ref-{name}-{extractor.name}-{key[:16]}.pt"
    if key in _REFERENCES:
        return _REFERENCES[key]
    with exclusive(path):  # parallel processes (seeds side by side, DDP ranks) compute it once; the others read it
        ref = _read_cache(path) or _compute(ds, extractor, n, max_features, batch_size, progress, path)
    _REFERENCES[key] = ref
    return ref


def _read_cache(path: Path) -> Reference | None:
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return Reference(**{**saved, "path": str(path)})
    except Exception:  # a corrupt or old cache file is recomputed, never trusted
        return None


def _compute(
    ds: Any, extractor: Extractor, n: int, max_features: int, batch_size: int, progress: bool, path: Path
) -> Reference:
    """The statistics of ``n`` images of ``ds``, written to the cache at ``path`` where it can take them."""
    # A seeded permutation: with reference_n < len(ds) the subset is random, and its first max_features rows too.
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    stats = FeatureStats(extractor.feature_dim)
    is_stats = InceptionScoreStats(extractor.num_logits, n, IS_SPLITS) if extractor.num_logits else None
    kept: list[Tensor] = []
    power_sum = torch.zeros(ds.images.shape[-2:], dtype=torch.float64)
    for start in _progress(range(0, n, batch_size), progress, "reference features"):
        images = ds.images[order[start : start + batch_size]]
        out = extractor(images)
        power_sum += power_spectrum(images).sum(0)
        stats.update(out["features"])
        if sum(len(k) for k in kept) < max_features:
            kept.append(out["features"])
        if is_stats is not None:
            is_stats.update(out["logits"].softmax(1))
    mu, cov = stats.mean_cov()
    is_mean, is_std = is_stats.compute() if is_stats is not None else (None, None)
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).double()
    features = torch.cat(kept)[:max_features]
    ref = Reference(mu, cov, n, features, counts / counts.sum(), is_mean, is_std, power_sum / n, str(path))
    saved = {k: v for k, v in asdict(ref).items() if k != "path"}
    if not _write_cache(path, saved):
        ref.path = "not cached"
    return ref


def _progress(it: range, enabled: bool, desc: str) -> Any:
    from perceptual_diffusion.runtime.progress import progress

    return progress(it, desc=desc, unit="batch", enabled=enabled)


def nearest_train_metric(data: DataConfig) -> NearestTrainDistance:
    """Nearest-training-image distances against ``data``'s train split; for Fashion-MNIST, with the distances of
    ``HELDOUT_NEAREST_MAX`` random official test images for comparison (memoised per process: ~10 s on a CPU)."""
    train, train_hash = dataset_and_hash(data)
    heldout = None
    if SOURCES[data.source].no_test_split is None:
        test, test_hash = dataset_and_hash(data, "test")
        key = f"{train_hash}|{test_hash}|{HELDOUT_NEAREST_MAX}"
        if key not in _HELDOUT_NEAREST:
            order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:HELDOUT_NEAREST_MAX]
            _HELDOUT_NEAREST[key] = nearest_rms(test.images[order], train.images)
        heldout = _HELDOUT_NEAREST[key]
    return NearestTrainDistance(train.images, heldout_distances=heldout)
