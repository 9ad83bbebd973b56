"""Evaluation as a stream: samples -> features -> running statistics -> metrics.

``evaluate_model`` samples a pixel model seed by seed; ``evaluate_images`` takes any other source (a latent model's
decoded samples, a folder of PNGs); both end in ``score``, which only sees batches of images and their features.

Samples are generated, featurised and folded into running sums batch by batch, so memory does not grow with the
number of samples: FID needs only the feature sum and sum of outer products, IS only per-split sums, the exact
shapes metrics only a hit mask over the valid set. KID and precision/recall need feature rows; they use the first
``max_features`` samples (10,000 by default). Every image has its own seed and the seeds are i.i.d., so the first M
samples are a uniform random subset of all N: no reservoir is needed, and the subset does not depend on batch size.

The real side (reference statistics, cached per data split and extractor) is ``reference.py``.

Besides the distribution metrics, every sample's distance to its nearest training image is measured (a memorisation
check, next to the same distance for held-out real images), and ``per_sample_path`` writes every sample's features
and per-sample indicators in seed order, for paired statistics between models sampled with the same seeds
(``stats.py``). The grid-artifact probe (``spectrum.py``) adds the radial power spectra of samples and real images
and each sample's grid excess in dB at the harmonics of the network's down-sampling ``strides``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from perceptual_diffusion.config import DataConfig, SampleConfig
from perceptual_diffusion.core.networks import PixelModel
from perceptual_diffusion.core.sampling import labels_for_seeds, sample_batches
from perceptual_diffusion.data.datasets import Dataset
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.features import Extractor
from perceptual_diffusion.evaluation.metrics import (
    FeatureStats,
    InceptionScoreStats,
    fid_from_stats,
    kid,
    kid_blocks,
    precision_recall,
)
from perceptual_diffusion.evaluation.realism import NearestTrainDistance, ShapesRealism
from perceptual_diffusion.evaluation.reference import (
    IS_SPLITS,
    MAX_FEATURES,
    check_split,
    dataset_and_hash,
    nearest_train_metric,
    reference_stats,
)
from perceptual_diffusion.evaluation.spectrum import DEFAULT_STRIDES, SpectrumStats, measure
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.runtime.checkpoint import atomic_write

Features = tuple["Tensor | None", dict[str, Tensor]]  # (images, extractor outputs) of one batch
PR_K = 3
KID_SE_BLOCKS = 10


def evaluate_model(
    model: PixelModel,
    sample_config: SampleConfig,
    data: DataConfig,
    n: int,
    extractor: Extractor,
    seeds: list[int] | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: PixelModel | None = None,
    use_labels: bool = True,
    progress: bool = False,
    **options: Any,
) -> dict[str, Any]:
    """Sample ``n`` images (image i from ``seeds[i]``, default seed i) and score them against ``data`` (``score``;
    ``options`` are its keyword options).

    Conditional models get labels drawn in the training data's class proportions (``use_labels=False``: the null
    label). Under torchrun each process samples and featurises seeds[rank::world] and rank 0 scores them in seed
    order; every process returns the same numbers. The grid probe's ``strides`` default to the model's.
    """
    seeds = _check_seeds(seeds, n)
    check_options(options)
    check_split(data, options.get("reference_split", "train"))
    if options.get("per_sample_path") is not None and distributed.world_size() > 1:
        raise UserError("per-sample output needs one process: evaluate without torchrun to write it")
    ds, _ = dataset_and_hash(data)
    channels, size, _ = model.sample_shape
    if (channels, size) != (ds.channels, ds.image_size):
        raise UserError(
            f"the model makes {channels}x{size}px images but the reference data {ds.name} is "
            f"{ds.channels}x{ds.image_size}px"
        )
    labels = _sampling_labels(model, ds, seeds, use_labels)
    options["strides"] = strides = tuple(options.get("strides") or model.strides)
    if labels is None and sample_config.cfg_scale != 1.0 and guide is None:
        raise UserError("classifier-free guidance needs labels: use cfg scale 1 for unconditional samples")
    with distributed.main_first():  # under torchrun, rank 0 fills the disk cache and the others read it
        reference_stats(data, extractor, options.get("max_features", MAX_FEATURES), options.get("reference_n"),
                        progress=progress, split=options.get("reference_split", "train"))  # fmt: skip
    seconds = _seconds()
    local_labels = None if labels is None else labels[distributed.rank() :: distributed.world_size()]
    batches = sample_batches(
        model, distributed.seed_shard(seeds), local_labels, sample_config, batch_size, device, guide, progress
    )
    featurised = _featurised(batches, extractor, seconds)
    if distributed.world_size() > 1:  # rank 0 gathers every rank's samples back into seed order
        keep_images = data.source == "shapes" or options.get("nearest_train", True)
        featurised = _gathered(featurised, batch_size, keep_images, strides)
        if not distributed.is_main():
            for _ in featurised:  # sample and featurise this rank's seeds, send them to rank 0
                pass
            return distributed.broadcast_object(None)
    sampling = {**asdict(sample_config), "labels": "data proportions" if labels is not None else "none"}
    row = score(featurised, n, data, extractor, labels, seeds, sampling, seconds, progress=progress, **options)
    return distributed.broadcast_object(row)


def evaluate_images(
    batches: Iterable[Tensor],
    n: int,
    data: DataConfig,
    extractor: Extractor,
    labels: Tensor | None = None,
    seeds: list[int] | None = None,
    source: str = "images",
    **options: Any,
) -> dict[str, Any]:
    """Score any sample source: ``n`` images in [-1, 1], batch by batch, in seed order (a latent model's decoded
    samples, a folder of PNGs read back, another library's samples); ``labels``: the class of each, if any; the
    grid probe's ``strides`` option: the generating network's down-sampling strides in pixels (default 2)."""
    seeds = _check_seeds(seeds, n)
    check_options(options)
    seconds = _seconds()
    featurised = _featurised(iter(batches), extractor, seconds)
    sampling = {"source": source, "labels": "given" if labels is not None else "none"}
    return score(featurised, n, data, extractor, labels, seeds, sampling, seconds, **options)


def score(
    featurised: Iterator[Features],
    n: int,
    data: DataConfig,
    extractor: Extractor,
    labels: Tensor | None,
    seeds: list[int],
    sampling: dict[str, Any],
    seconds: dict[str, float],
    *,
    max_features: int = MAX_FEATURES,
    reference_n: int | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    kid_se_blocks: int = KID_SE_BLOCKS,
    reference_split: str = "train",
    nearest_train: bool = True,
    per_sample_path: Path | None = None,
    progress: bool = False,
    strides: tuple[int, ...] = DEFAULT_STRIDES,
) -> dict[str, Any]:
    """Fold (images, features) batches into running statistics and compute every metric against ``data``'s
    ``reference_split`` ("test": Fashion-MNIST's held-out images): FID, KID with its standard error, IS, precision
    / recall / density / coverage, the exact shapes metrics, and (``nearest_train``) each sample's RMS distance to
    its nearest training image, and the spectra and grid excess at ``strides`` (``spectrum.py``).
    ``per_sample_path`` writes per-sample arrays in seed order to an .npz. Returns a
    JSON-ready dict that names the extractor and the sample count next to every number."""
    ref = reference_stats(data, extractor, max_features, reference_n, progress=progress, split=reference_split)
    ds, _ = dataset_and_hash(data)
    keep_all = per_sample_path is not None
    acc = _Accumulator(data, ds, extractor, n, max_features, nearest_train, keep_all, seconds, strides)
    for images, out in featurised:
        acc.update(images, out, None if labels is None else labels[acc.done : acc.done + len(out["features"])])
    spectrum, grid_excess = acc.spectrum.summary(ref.power_mean)
    row = {
        "n_samples": n,
        "seeds": f"{seeds[0]}..{seeds[-1]}" if seeds == list(range(seeds[0], seeds[0] + n)) else "custom",
        "extractor": {"name": extractor.name, "key": extractor.key, "description": extractor.description},
        "reference": {"data": ds.name, "split": reference_split, "n": ref.n, "cache": ref.path},
        "sampling": sampling,
        **_metrics(acc, ref, kid_subsets, kid_subset_size, kid_se_blocks),
        "spectrum": spectrum,
        "per_sample": None if per_sample_path is None else str(per_sample_path),
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    if per_sample_path is not None:
        write_per_sample(Path(per_sample_path), acc.all_features, labels, seeds, acc.realism, acc.memo, grid_excess)
    return row


class _Accumulator:
    """Running statistics of the samples seen so far: features (all of them for FID, the first ``max_features``
    rows for KID and precision/recall), IS, the exact shapes metrics, nearest-training-image distances and spectra."""

    def __init__(self, data, ds, extractor, n, max_features, nearest_train, keep_all, seconds, strides) -> None:
        self.stats = FeatureStats(extractor.feature_dim)
        self.is_stats = InceptionScoreStats(extractor.num_logits, n, IS_SPLITS) if extractor.num_logits else None
        self.realism = ShapesRealism(ds.image_size) if data.source == "shapes" else None
        self.max_features, self.keep_all, self.seconds = max_features, keep_all, seconds
        self.spectrum = SpectrumStats(strides)
        self.kept: list[Tensor] = []
        self.all_features: list[Tensor] = []
        self.done = 0
        t0 = time.perf_counter()
        self.memo = nearest_train_metric(data) if nearest_train else None
        seconds["memorisation"] += time.perf_counter() - t0

    def update(self, images: Tensor | None, out: dict[str, Tensor], labels: Tensor | None) -> None:
        t0 = time.perf_counter()
        self.stats.update(out["features"])
        if self.done < self.max_features:
            self.kept.append(out["features"][: self.max_features - self.done])
        if self.keep_all:
            self.all_features.append(out["features"].detach().to("cpu", torch.float32))
        if self.is_stats is not None:
            self.is_stats.update(out["logits"].softmax(1))
        if self.realism is not None:
            self.realism.update(images, labels)
        self.spectrum.update(images, out)
        self.done += len(out["features"])
        t1 = time.perf_counter()
        self.seconds["metrics"] += t1 - t0
        if self.memo is not None:
            self.memo.update(images)
            self.seconds["memorisation"] += time.perf_counter() - t1


def _metrics(acc: _Accumulator, ref: Any, kid_subsets: int, kid_subset_size: int, kid_se_blocks: int) -> dict:
    """Every metric of the accumulated samples against the reference, timed into ``acc.seconds``."""
    t0 = time.perf_counter()
    fake = torch.cat(acc.kept)
    mu, cov = acc.stats.mean_cov()
    kid_mean, kid_std, kid_m = kid(ref.features, fake, kid_subsets, kid_subset_size)
    block_mean, kid_se, blocks, block_real, block_fake = kid_blocks(ref.features, fake, kid_se_blocks)
    prdc = precision_recall(ref.features, fake, PR_K)
    is_mean, is_std = acc.is_stats.compute() if acc.is_stats is not None else (None, None)
    acc.seconds["metrics"] += time.perf_counter() - t0
    t0 = time.perf_counter()
    memorisation = acc.memo.compute() if acc.memo is not None else None
    acc.seconds["memorisation"] += time.perf_counter() - t0
    return {
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
        "realism": acc.realism.compute() if acc.realism is not None else None,
        "memorisation": memorisation,
    }


def check_options(options: dict[str, Any]) -> None:
    """Refuse, before any sampling, an option the metrics cannot work with."""
    max_features = options.get("max_features", MAX_FEATURES)
    if not (isinstance(max_features, int) and max_features >= PR_K + 1):
        raise UserError(
            f"--max-features must be an integer >= {PR_K + 1} (KID and the k={PR_K} nearest-neighbour precision "
            f"and recall need that many samples), got {max_features}"
        )
    reference_n = options.get("reference_n")
    least = max(IS_SPLITS, PR_K + 1)  # the reference's Inception Score splits too, as the samples' do
    if reference_n is not None and not (isinstance(reference_n, int) and reference_n >= least):
        raise UserError(f"the number of reference images (--reference-n) must be >= {least}, got {reference_n}")


def _check_seeds(seeds: list[int] | None, n: int) -> list[int]:
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise UserError(f"{len(seeds)} seeds given for {n} samples")
    if n < max(IS_SPLITS, PR_K + 1, 2):
        raise UserError(f"evaluation needs at least {max(IS_SPLITS, PR_K + 1)} samples, got -n {n}")
    return seeds


def _sampling_labels(model: PixelModel, ds: Dataset, seeds: list[int], use_labels: bool) -> Tensor | None:
    """Labels in the training data's class proportions, one per seed (whatever the reference split, so both
    splits score the very same samples); None for an unconditional model or ``use_labels=False``."""
    k = model.num_classes
    if k == 0 or not use_labels:
        return None
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).double()
    class_probs = counts / counts.sum()
    if k != len(class_probs):
        raise UserError(f"the model has {k} classes but {ds.name} has {len(class_probs)}")
    return labels_for_seeds(seeds, class_probs.float())


def _seconds() -> dict[str, float]:
    return {"sampling": 0.0, "features": 0.0, "metrics": 0.0, "memorisation": 0.0}


def write_per_sample(
    path: Path,
    features: list[Tensor],
    labels: Tensor | None,
    seeds: list[int],
    realism: ShapesRealism | None,
    memo: NearestTrainDistance | None,
    grid_excess: np.ndarray | None = None,
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
    if grid_excess is not None:
        arrays["grid_excess"] = grid_excess.astype(np.float64)
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


def _gathered(
    local: Iterator[Features], batch_size: int, keep_images: bool, strides: tuple[int, ...]
) -> Iterator[Features]:
    """Under torchrun: this rank's (images, outputs) for seeds[rank::world], gathered on rank 0 into seed order and
    re-cut into batches of ``batch_size``, so the statistics are folded in the same order as in one process. Each
    rank measures its own images' spectra first (``spectrum.measure``), so rank 0 needs no images for them.

    Rank 0 holds every sample's features (and images, for the exact shapes metrics) at once: n x D floats.
    """
    parts = [(images, {**out, **measure(images, strides)}) for images, out in local]
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
        f"{'prec':>5} {'rec':>5} {'dens':>5} {'cov':>5} {'exactP':>6} {'exactR':>6} {'class':>6} {'gridDB':>6}"
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
        grid = (r.get("spectrum") or {}).get("grid_excess_db")
        grid_text = f"{grid:+6.2f}" if grid is not None else f"{'-':>6}"
        lines.append(
            f"{s['cfg_scale']:5.2f} {s['guidance_rescale']:7.2f} {r['fid']:9.4g} "
            f"{k['mean']:>9.4g}±{k['std']:<7.2g} {is_text:>12} {pr['precision']:5.3f} {pr['recall']:5.3f} "
            f"{pr['density']:5.3f} {pr['coverage']:5.3f} {exact} {grid_text}"
        )
    first = rows[0]
    title = (
        f"{first['n_samples']} samples vs {first['reference']['data']} ({first['reference']['n']} images); "
        f"features: {first['extractor']['description']}"
    )
    strides = (first.get("spectrum") or {}).get("strides")
    if strides:
        title += f"; gridDB: grid excess (dB) at strides {', '.join(map(str, strides))} px"
    return "\n".join([title, head, *lines])
