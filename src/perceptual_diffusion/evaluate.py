"""Evaluation as a stream: seeds -> samples -> features -> running statistics -> metrics.

Samples are generated, featurised and folded into running sums batch by batch, so memory does not grow with the
number of samples: FID needs only the feature sum and sum of outer products, IS only per-split sums, the exact
shapes metrics only a hit mask over the valid set. KID and precision/recall need feature rows; they use the first
``max_features`` samples (10,000 by default). Every image has its own seed and the seeds are i.i.d., so the first M
samples are a uniform random subset of all N: no reservoir is needed, and the subset does not depend on batch size.

Reference statistics are computed once per (data split, data set contents, extractor) and cached on disk under
``$PD_CACHE_DIR`` (default ``~/.cache/perceptual-diffusion``), keyed by a hash of all three; within a process they
are also kept in memory, so evaluating many (model, guidance) rows pays for the reference once. The reference is the
training data by default; ``reference_split="test"`` measures against held-out images (Fashion-MNIST's official
10,000 test images), which a model cannot have memorised.

Besides the distribution metrics, every sample's distance to its nearest training image is measured (a memorisation
check, next to the same distance for held-out real images), and ``per_sample_path`` writes every sample's features
and per-sample indicators in seed order, for paired statistics between models sampled with the same seeds
(``stats.py``).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import distributed
from .checkpoint import atomic_write
from .config import DataConfig, SampleConfig
from .data import Dataset, load_dataset, to_uint8
from .errors import UserError
from .features import Extractor
from .metrics import FeatureStats, InceptionScoreStats, fid_from_stats, kid, kid_blocks, precision_recall
from .networks import DiffusionUNet
from .realism import NearestTrainDistance, ShapesRealism, nearest_rms
from .sampling import labels_for_seeds, sample_batches

CACHE_ENV = "PD_CACHE_DIR"
REFERENCE_VERSION = "1"  # bump when the reference computation changes, to invalidate old cache files
MAX_FEATURES = 10_000
Features = tuple["Tensor | None", dict[str, Tensor]]  # (images, extractor outputs) of one batch
IS_SPLITS = 10
PR_K = 3
KID_SE_BLOCKS = 10
HELDOUT_NEAREST_MAX = 2_000  # held-out images measured for the memorisation comparison (a seeded random subset)
SPLITS = ("train", "test")


def cache_dir() -> Path:
    """Where reference statistics are cached: $PD_CACHE_DIR or ~/.cache/perceptual-diffusion."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "perceptual-diffusion")


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
            stacklevel=3,
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
    path: str


_DATASETS: dict[tuple[DataConfig, str], tuple[Dataset, str]] = {}
_REFERENCES: dict[str, Reference] = {}
_HELDOUT_NEAREST: dict[str, Tensor] = {}


def check_split(config: DataConfig, split: str) -> None:
    """Refuse a split the data source does not have, with a one-line reason."""
    if split not in SPLITS:
        raise UserError(f"reference split must be one of {', '.join(SPLITS)}, got {split!r}")
    if split == "test" and config.source != "fashion-mnist":
        reason = {
            "shapes": "the shapes data is its whole valid set, so no image is held out",
            "folder": "a folder of images has no held-out split",
        }.get(config.source, f"{config.source} has no held-out split")
        raise UserError(f"reference split 'test' needs Fashion-MNIST: {reason}; use reference split 'train'")


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
    n = min(reference_n or len(ds), len(ds))
    key_text = f"{REFERENCE_VERSION}|{split}|{data_hash}|{extractor.key}|{max_features}|{n}"
    key = hashlib.sha256(key_text.encode()).hexdigest()
    name = ds.name if split == "train" else f"{ds.name}-{split}"
    path = cache_dir() / f"ref-{name}-{extractor.name}-{key[:16]}.pt"
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
    if not _write_cache(path, saved):
        ref.path = "not cached"
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
    reference_split: str = "train",
    per_sample_path: Path | None = None,
    nearest_train: bool = True,
    kid_se_blocks: int = KID_SE_BLOCKS,
) -> dict[str, Any]:
    """Sample ``n`` images (image i from ``seeds[i]``, default seed i) and measure them against ``data``.

    Conditional models get labels drawn in the training data's class proportions (``use_labels=False``: the null
    label). FID, KID, IS and precision/recall compare with ``data``'s ``reference_split`` ("test": Fashion-MNIST's
    held-out images). ``nearest_train`` adds ``memorisation`` (each sample's RMS distance to its nearest training
    image); ``per_sample_path`` writes per-sample arrays in seed order to an .npz (single process only).
    Returns a JSON-ready dict that names the extractor and the sample count next to every number.
    """
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise UserError(f"{len(seeds)} seeds given for {n} samples")
    if n < max(IS_SPLITS, PR_K + 1, 2):
        raise UserError(f"evaluation needs at least {max(IS_SPLITS, PR_K + 1)} samples, got -n {n}")
    check_split(data, reference_split)
    if per_sample_path is not None and distributed.world_size() > 1:
        raise UserError("per-sample output needs one process: evaluate without torchrun to write it")
    mc = model.model_config
    with distributed.main_first():  # under torchrun, rank 0 fills the disk cache and the others read it
        ref = reference_stats(data, extractor, max_features, reference_n, progress=progress, split=reference_split)
    ds, train_hash = dataset_and_hash(data)
    if (mc.channels, mc.image_size) != (ds.channels, ds.image_size):
        raise UserError(
            f"the model makes {mc.channels}x{mc.image_size}px images but the reference data {ds.name} is "
            f"{ds.channels}x{ds.image_size}px"
        )
    # Labels follow the training data whatever the reference split, so both splits score the very same samples.
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).double()
    class_probs = counts / counts.sum()
    labels = None
    if mc.num_classes > 0 and use_labels:
        if mc.num_classes != len(class_probs):
            raise UserError(f"the model has {mc.num_classes} classes but {ds.name} has {len(class_probs)}")
        labels = labels_for_seeds(seeds, class_probs.float())
    if labels is None and sample_config.cfg_scale != 1.0 and guide is None:
        raise UserError("classifier-free guidance needs labels: use cfg scale 1 for unconditional samples")

    stats = FeatureStats(extractor.feature_dim)
    is_stats = InceptionScoreStats(extractor.num_logits, n, IS_SPLITS) if extractor.num_logits else None
    realism = ShapesRealism(ds.image_size) if data.source == "shapes" else None
    kept: list[Tensor] = []
    all_features: list[Tensor] = []
    seconds = {"sampling": 0.0, "features": 0.0, "metrics": 0.0, "memorisation": 0.0}
    if distributed.world_size() == 1:
        batches = sample_batches(model, seeds, labels, sample_config, batch_size, device, guide, progress)
        featurised = _featurised(batches, extractor, seconds)
    else:  # under torchrun: each rank samples seeds[rank::world]; rank 0 gathers them back into seed order
        local_labels = None if labels is None else labels[distributed.rank() :: distributed.world_size()]
        local_seeds = distributed.seed_shard(seeds)
        batches = sample_batches(model, local_seeds, local_labels, sample_config, batch_size, device, guide, progress)
        keep_images = realism is not None or nearest_train
        featurised = _gathered(_featurised(batches, extractor, seconds), batch_size, keep_images=keep_images)
        if not distributed.is_main():
            for _ in featurised:  # sample and featurise this rank's seeds, send them to rank 0
                pass
            return distributed.broadcast_object(None)
    t0 = time.perf_counter()
    memo = nearest_train_metric(data) if nearest_train else None
    seconds["memorisation"] += time.perf_counter() - t0
    done = 0
    for images, out in featurised:
        t2 = time.perf_counter()
        stats.update(out["features"])
        if done < max_features:
            kept.append(out["features"][: max_features - done])
        if per_sample_path is not None:
            all_features.append(out["features"].detach().to("cpu", torch.float32))
        if is_stats is not None:
            is_stats.update(out["logits"].softmax(1))
        if realism is not None:
            realism.update(images, None if labels is None else labels[done : done + len(images)])
        done += len(out["features"])
        t3 = time.perf_counter()
        seconds["metrics"] += t3 - t2
        if memo is not None:
            memo.update(images)
            seconds["memorisation"] += time.perf_counter() - t3

    t0 = time.perf_counter()
    fake = torch.cat(kept)
    mu, cov = stats.mean_cov()
    kid_mean, kid_std, kid_m = kid(ref.features, fake, kid_subsets, kid_subset_size)
    block_mean, kid_se, blocks, block_real, block_fake = kid_blocks(ref.features, fake, kid_se_blocks)
    prdc = precision_recall(ref.features, fake, PR_K)
    is_mean, is_std = is_stats.compute() if is_stats is not None else (None, None)
    seconds["metrics"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    memorisation = memo.compute() if memo is not None else None
    seconds["memorisation"] += time.perf_counter() - t0
    row = {
        "n_samples": n,
        "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + n)) else "custom",
        "extractor": {"name": extractor.name, "key": extractor.key, "description": extractor.description},
        "reference": {"data": ds.name, "split": reference_split, "n": ref.n, "cache": ref.path},
        "sampling": {**asdict(sample_config), "labels": "data proportions" if labels is not None else "none"},
        "fid": fid_from_stats(mu, cov, ref.mu, ref.cov),
        "kid": {
            "mean": kid_mean,
            "std": kid_std,
            "subsets": kid_subsets,
            "subset_size": kid_m,
            "se": kid_se,
            "block_mean": block_mean,
            "se_blocks": blocks,
            "se_based_on": f"std(ddof=1)/sqrt(B) of the unbiased MMD^2 on B={blocks} disjoint blocks of "
            f"{block_real} real and {block_fake} fake feature rows",
        },
        "inception_score": None
        if is_mean is None
        else {"mean": is_mean, "std": is_std, "splits": IS_SPLITS, "data_mean": ref.is_mean, "data_std": ref.is_std},
        "precision_recall": {**prdc, "k": PR_K, "n_fake": len(fake), "n_real": len(ref.features)},
        "realism": realism.compute() if realism is not None else None,
        "memorisation": memorisation,
        "per_sample": None if per_sample_path is None else str(per_sample_path),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if per_sample_path is not None:
        write_per_sample(Path(per_sample_path), all_features, labels, seeds, realism, memo)
    return distributed.broadcast_object(row)  # every process returns the same numbers


def nearest_train_metric(data: DataConfig) -> NearestTrainDistance:
    """Nearest-training-image distances against ``data``'s train split; for Fashion-MNIST, with the distances of
    ``HELDOUT_NEAREST_MAX`` random official test images for comparison (memoised per process: ~10 s on a CPU)."""
    train, train_hash = dataset_and_hash(data)
    heldout = None
    if data.source == "fashion-mnist":
        test, test_hash = dataset_and_hash(data, "test")
        key = f"{train_hash}|{test_hash}|{HELDOUT_NEAREST_MAX}"
        if key not in _HELDOUT_NEAREST:
            order = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:HELDOUT_NEAREST_MAX]
            _HELDOUT_NEAREST[key] = nearest_rms(test.images[order], train.images)
        heldout = _HELDOUT_NEAREST[key]
    return NearestTrainDistance(train.images, heldout_distances=heldout)


def write_per_sample(
    path: Path,
    features: list[Tensor],
    labels: Tensor | None,
    seeds: list[int],
    realism: ShapesRealism | None,
    memo: NearestTrainDistance | None,
) -> None:
    """Write the per-sample arrays of one evaluation, in seed order, atomically to an .npz file."""
    feats = torch.cat(features).numpy().astype(np.float32, copy=False)
    arrays: dict[str, np.ndarray] = {
        "features": feats,
        "labels": np.full(len(seeds), -1, np.int64) if labels is None else labels.cpu().numpy().astype(np.int64),
        "seeds": np.asarray(seeds, dtype=np.int64),
    }
    if realism is not None:
        arrays.update(realism.per_sample())
    if memo is not None:
        arrays["nearest_train_rms"] = memo.per_sample()
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise RuntimeError(f"per-sample arrays of different lengths: {lengths}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.savez would append ".npz" to a path
            np.savez(fh, **arrays)

    atomic_write(path, write)


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
