"""Evaluation as a stream: seeds -> samples -> features -> running statistics -> metrics.

Samples are generated, featurised and folded into running sums batch by batch, so memory does not grow with the
number of samples: FID needs only the feature sum and sum of outer products, IS only per-split sums, the exact
shapes metrics only a hit mask over the valid set. KID and precision/recall need feature rows; they use the first
``max_features`` samples (10,000 by default). Every image has its own seed and the seeds are i.i.d., so the first M
samples are a uniform random subset of all N: no reservoir is needed, and the subset does not depend on batch size.

Reference statistics are computed once per (data set contents, extractor) and cached on disk under
``$PD_CACHE_DIR`` (default ``~/.cache/perceptual-diffusion``), keyed by a hash of both; within a process they are
also kept in memory, so evaluating many (model, guidance) rows pays for the reference once.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .checkpoint import atomic_write
from .config import DataConfig, SampleConfig
from .data import Dataset, load_dataset, to_uint8
from .errors import UserError
from .features import Extractor
from .metrics import FeatureStats, InceptionScoreStats, fid_from_stats, kid, precision_recall
from .networks import DiffusionUNet
from .realism import ShapesRealism
from .sampling import labels_for_seeds, sample_batches

CACHE_ENV = "PD_CACHE_DIR"
REFERENCE_VERSION = "1"  # bump when the reference computation changes, to invalidate old cache files
MAX_FEATURES = 10_000
Features = tuple["Tensor | None", dict[str, Tensor]]  # (images, extractor outputs) of one batch
IS_SPLITS = 10
PR_K = 3


def cache_dir() -> Path:
    """Where reference statistics are cached: $PD_CACHE_DIR or ~/.cache/perceptual-diffusion."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "perceptual-diffusion")


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
    path: str


_DATASETS: dict[DataConfig, tuple[Dataset, str]] = {}
_REFERENCES: dict[str, Reference] = {}


def dataset_and_hash(config: DataConfig) -> tuple[Dataset, str]:
    """The training data of a config and a hash of its pixels and labels (memoised: Fashion-MNIST loads in ~1 s)."""
    if config not in _DATASETS:
        ds = load_dataset(config)
        h = hashlib.sha256(to_uint8(ds.images).tobytes())
        h.update(ds.labels.numpy().tobytes())
        _DATASETS[config] = (ds, h.hexdigest()[:16])
    return _DATASETS[config]


def reference_stats(
    data: DataConfig,
    extractor: Extractor,
    max_features: int = MAX_FEATURES,
    reference_n: int | None = None,
    batch_size: int = 256,
    progress: bool = False,
) -> Reference:
    """Reference statistics of ``data`` under ``extractor``: from memory, else the disk cache, else computed."""
    ds, data_hash = dataset_and_hash(data)
    n = min(reference_n or len(ds), len(ds))
    key = hashlib.sha256(f"{REFERENCE_VERSION}|{data_hash}|{extractor.key}|{max_features}|{n}".encode()).hexdigest()
    path = cache_dir() / f"ref-{ds.name}-{extractor.name}-{key[:16]}.pt"
    if key in _REFERENCES:
        return _REFERENCES[key]
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            ref = Reference(**{**saved, "path": str(path)})
        except Exception:  # a corrupt or old cache file is recomputed, never trusted
            ref = None
        if ref is not None:
            _REFERENCES[key] = ref
            return ref
    # A seeded permutation: with reference_n < len(ds) the subset is random, and its first max_features rows too.
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
    stats = FeatureStats(extractor.feature_dim)
    is_stats = InceptionScoreStats(extractor.num_logits, n, IS_SPLITS) if extractor.num_logits else None
    kept: list[Tensor] = []
    for start in _progress(range(0, n, batch_size), progress, "reference features"):
        out = extractor(ds.images[order[start : start + batch_size]])
        stats.update(out["features"])
        if sum(len(k) for k in kept) < max_features:
            kept.append(out["features"])
        if is_stats is not None:
            is_stats.update(out["logits"].softmax(1))
    mu, cov = stats.mean_cov()
    is_mean, is_std = is_stats.compute() if is_stats is not None else (None, None)
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).double()
    ref = Reference(mu, cov, n, torch.cat(kept)[:max_features], counts / counts.sum(), is_mean, is_std, str(path))
    saved = {k: v for k, v in asdict(ref).items() if k != "path"}
    atomic_write(path, lambda tmp: torch.save(saved, tmp))
    _REFERENCES[key] = ref
    return ref


def _progress(it: range, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, unit="batch", disable=not enabled, leave=False)


def evaluate_model(
    model: DiffusionUNet,
    sample_config: SampleConfig,
    data: DataConfig,
    n: int,
    extractor: Extractor,
    seeds: list[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: DiffusionUNet | None = None,
    use_labels: bool = True,
    max_features: int = MAX_FEATURES,
    reference_n: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    progress: bool = False,
) -> dict[str, Any]:
    """Sample ``n`` images (image i from ``seeds[i]``, default seed i) and measure them against ``data``.

    Conditional models get labels drawn in the data's class proportions (``use_labels=False``: the null label).
    Returns a JSON-ready dict that names the extractor and the sample count next to every number.
    """
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise UserError(f"{len(seeds)} seeds given for {n} samples")
    if n < max(IS_SPLITS, PR_K + 1, 2):
        raise UserError(f"evaluation needs at least {max(IS_SPLITS, PR_K + 1)} samples, got -n {n}")
    mc = model.model_config
    with distributed.main_first():  # under torchrun, rank 0 fills the disk cache and the others read it
        ref = reference_stats(data, extractor, max_features, reference_n, progress=progress)
    ds, _ = dataset_and_hash(data)
    if (mc.channels, mc.image_size) != (ds.channels, ds.image_size):
        raise UserError(
            f"the model makes {mc.channels}x{mc.image_size}px images but the reference data {ds.name} is "
            f"{ds.channels}x{ds.image_size}px"
        )
    labels = None
    if mc.num_classes > 0 and use_labels:
        if mc.num_classes != len(ref.class_probs):
            raise UserError(f"the model has {mc.num_classes} classes but {ds.name} has {len(ref.class_probs)}")
        labels = labels_for_seeds(seeds, ref.class_probs.float())
    if labels is None and sample_config.cfg_scale != 1.0 and guide is None:
        raise UserError("classifier-free guidance needs labels: use cfg scale 1 for unconditional samples")

    stats = FeatureStats(extractor.feature_dim)
    is_stats = InceptionScoreStats(extractor.num_logits, n, IS_SPLITS) if extractor.num_logits else None
    realism = ShapesRealism(ds.image_size) if data.source == "shapes" else None
    kept: list[Tensor] = []
    seconds = {"sampling": 0.0, "features": 0.0, "metrics": 0.0}
    if distributed.world_size() == 1:
        batches = sample_batches(model, seeds, labels, sample_config, batch_size, device, guide, progress)
        featurised = _featurised(batches, extractor, seconds)
    else:  # under torchrun: each rank samples seeds[rank::world]; rank 0 gathers them back into seed order
        local_labels = None if labels is None else labels[distributed.rank() :: distributed.world_size()]
        local_seeds = distributed.seed_shard(seeds)
        batches = sample_batches(model, local_seeds, local_labels, sample_config, batch_size, device, guide, progress)
        featurised = _gathered(_featurised(batches, extractor, seconds), batch_size, keep_images=realism is not None)
        if not distributed.is_main():
            for _ in featurised:  # sample and featurise this rank's seeds, send them to rank 0
                pass
            return distributed.broadcast_object(None)
    done = 0
    for images, out in featurised:
        t2 = time.perf_counter()
        stats.update(out["features"])
        if done < max_features:
            kept.append(out["features"][: max_features - done])
        if is_stats is not None:
            is_stats.update(out["logits"].softmax(1))
        if realism is not None:
            realism.update(images, None if labels is None else labels[done : done + len(images)])
        done += len(out["features"])
        seconds["metrics"] += time.perf_counter() - t2

    t0 = time.perf_counter()
    fake = torch.cat(kept)
    mu, cov = stats.mean_cov()
    kid_mean, kid_std, kid_m = kid(ref.features, fake, kid_subsets, kid_subset_size)
    prdc = precision_recall(ref.features, fake, PR_K)
    is_mean, is_std = is_stats.compute() if is_stats is not None else (None, None)
    seconds["metrics"] += time.perf_counter() - t0
    row = {
        "n_samples": n,
        "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + n)) else "custom",
        "extractor": {"name": extractor.name, "key": extractor.key, "description": extractor.description},
        "reference": {"data": ds.name, "n": ref.n, "cache": ref.path},
        "sampling": {**asdict(sample_config), "labels": "data proportions" if labels is not None else "none"},
        "fid": fid_from_stats(mu, cov, ref.mu, ref.cov),
        "kid": {"mean": kid_mean, "std": kid_std, "subsets": kid_subsets, "subset_size": kid_m},
        "inception_score": None
        if is_mean is None
        else {"mean": is_mean, "std": is_std, "splits": IS_SPLITS, "data_mean": ref.is_mean, "data_std": ref.is_std},
        "precision_recall": {**prdc, "k": PR_K, "n_fake": len(fake), "n_real": len(ref.features)},
        "realism": realism.compute() if realism is not None else None,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    return distributed.broadcast_object(row)  # every process returns the same numbers


def _featurised(batches: Iterator[Tensor], extractor: Extractor, seconds: dict[str, float]) -> Iterator[Features]:
    """(images, extractor outputs) per batch, timing the sampling and the feature extraction apart."""
    while True:
        t0 = time.perf_counter()
        images = next(batches, None)
        t1 = time.perf_counter()
        seconds["sampling"] += t1 - t0
        if images is None:
            return
        out = extractor(images)
        seconds["features"] += time.perf_counter() - t1
        yield images, out


def _gathered(local: Iterator[Features], batch_size: int, keep_images: bool) -> Iterator[Features]:
    """Under torchrun: this rank's (images, outputs) for seeds[rank::world], gathered on rank 0 into seed order and
    re-cut into batches of ``batch_size``, so the statistics are folded in the same order as in one process.

    Rank 0 holds every sample's features (and images, for the exact shapes metrics) at once: n x D floats.
    """
    parts = list(local)
    keys = list(parts[0][1]) if parts else ["features"]
    columns = {k: distributed.gather_seed_order(torch.cat([out[k] for _, out in parts])) for k in keys}
    images = distributed.gather_seed_order(torch.cat([im for im, _ in parts])) if keep_images else None
    if not distributed.is_main():
        return
    for start in range(0, len(columns["features"]), batch_size):
        rows = slice(start, start + batch_size)
        yield (None if images is None else images[rows]), {k: v[rows] for k, v in columns.items()}


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per evaluated row: guidance, then every metric, with the extractor and sample count in the header."""
    head = (
        f"{'cfg':>5} {'rescale':>7} {'FID':>9} {'KID':>17} {'IS':>12} "
        f"{'prec':>5} {'rec':>5} {'dens':>5} {'cov':>5} {'exactP':>6} {'exactR':>6} {'class':>6}"
    )
    lines = []
    for r in rows:
        s, k, pr, rl, is_ = r["sampling"], r["kid"], r["precision_recall"], r["realism"], r["inception_score"]
        is_text = f"{is_['mean']:.2f}±{is_['std']:.2f}" if is_ else "-"
        exact = (
            f"{rl['exact_precision']:6.3f} {rl['exact_recall']:6.3f} "
            + (f"{rl['class_agreement']:6.3f}" if rl["class_agreement"] is not None else f"{'-':>6}")
            if rl
            else f"{'-':>6} {'-':>6} {'-':>6}"
        )
        lines.append(
            f"{s['cfg_scale']:5.2f} {s['guidance_rescale']:7.2f} {r['fid']:9.4g} "
            f"{k['mean']:>9.4g}±{k['std']:<7.2g} {is_text:>12} {pr['precision']:5.3f} {pr['recall']:5.3f} "
            f"{pr['density']:5.3f} {pr['coverage']:5.3f} {exact}"
        )
    first = rows[0]
    title = (
        f"{first['n_samples']} samples vs {first['reference']['data']} ({first['reference']['n']} images); "
        f"features: {first['extractor']['description']}"
    )
    return "\n".join([title, head, *lines])
