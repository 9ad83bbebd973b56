"""Cached evaluations for the experiment commands, and the one number that selects and stops runs.

Every evaluation an experiment makes is written once as ``NAME.json`` (the metrics) beside ``NAME.npz`` (per-sample
features and indicators, for paired statistics), so a repeated command recomputes nothing. The *criterion* is the
sample metric that decides when a teacher has reached its plateau and which stage-2 learning rate is best: exact
structure on the procedural shapes (noise-tolerant, so faint residual noise does not decide it), FID in the
extractor's feature space elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceptual_diffusion.config import DataConfig, SampleConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.features import Extractor
from perceptual_diffusion.runtime.checkpoint import atomic_write_text

# A fraction-of-samples criterion and the per-sample indicator array it is the mean of.
PER_SAMPLE_OF = {"structure_precision": "structure", "exact_precision": "exact", "class_accuracy": "class_match"}


@dataclass(frozen=True)
class Criterion:
    """A sample metric with its direction; ``value`` and ``standard_error`` read it off one evaluation."""

    key: str
    higher_is_better: bool

    def value(self, result: dict[str, Any]) -> float:
        return float(result["metrics"][self.key])

    def standard_error(
        self, result: dict[str, Any], per_sample: dict[str, np.ndarray] | None = None, reference: Any = None
    ) -> float:
        """Sampling standard error: binomial for a fraction of samples, bootstrap over samples (100 draws) for FID
        (``reference``: the ``reference.Reference`` it was measured against)."""
        value, n = self.value(result), int(result["n_samples"])
        if self.key != "fid":
            return math.sqrt(max(value * (1 - value), 0.0) / n)
        if per_sample is None or reference is None:
            return float("nan")
        from perceptual_diffusion.evaluation import stats

        fid = stats.fid_against(reference.mu, reference.cov)
        draws = stats.resampled_values(fid, per_sample, np.random.default_rng(0).integers(0, n, size=(100, n)))
        return float(np.std(draws, ddof=1))

    def better(self, a: float, b: float) -> float:
        """How much better ``a`` is than ``b`` (positive: better)."""
        return a - b if self.higher_is_better else b - a

    def statistic(self, reference: Any = None) -> Any:
        """The criterion as a statistic of per-sample arrays (``stats.py``), for paired bootstrap intervals;
        ``reference``: the ``reference.Reference`` FID is measured against."""
        from perceptual_diffusion.evaluation import stats

        if self.key == "fid":
            if reference is None:
                raise ValueError("the FID criterion's statistic needs the reference statistics")
            return stats.fid_against(reference.mu, reference.cov)
        return stats.mean_of(PER_SAMPLE_OF[self.key])


def criterion_for(data: DataConfig) -> Criterion:
    """Exact structure on the shapes (their valid set is known), FID in feature space for any other data."""
    if data.source == "shapes":
        return Criterion("structure_precision", True)
    return Criterion("fid", False)


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The numbers a table shows, from one ``evaluate.evaluate_model`` result."""
    flat = {"fid": result["fid"], "kid": result["kid"]["mean"]}
    if result["kid"].get("se") is not None:
        flat["kid_se"] = result["kid"]["se"]
    if result.get("inception_score"):
        flat["is"] = result["inception_score"]["mean"]
    flat.update({k: result["precision_recall"][k] for k in ("precision", "recall", "density", "coverage")})
    realism = result.get("realism") or {}
    for key, name in (
        ("exact_precision", "exact_precision"),
        ("exact_recall", "exact_recall"),
        ("structure_precision", "structure_precision"),
        ("structure_recall", "structure_recall"),
        ("noise_rms_median", "noise_rms"),
        ("class_agreement", "class_accuracy"),
    ):
        if realism.get(key) is not None:
            flat[name] = realism[key]
    memo = result.get("memorisation") or {}
    if memo.get("median") is not None:
        flat["nearest_train_rms"] = memo["median"]
    if (result.get("spectrum") or {}).get("grid_excess_db") is not None:  # the grid probe (spectrum.py)
        flat["grid_excess_db"] = result["spectrum"]["grid_excess_db"]
    return {k: float(v) for k, v in flat.items()}


def evaluate_cached(
    cache: Path,
    model: Any,
    sample_config: SampleConfig,
    data: DataConfig,
    extractor: Extractor,
    seeds: list[int],
    device: torch.device,
    guide: Any = None,
    use_labels: bool = True,
    reference_split: str = "train",
    fingerprint: str | None = None,
    legacy_fingerprints: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``evaluate_model`` once per cache path: metrics to ``cache.json``, per-sample arrays to ``cache.npz``.

    ``model`` and ``guide`` may be callables that load the network, so that a cached row never loads it.
    ``fingerprint`` (a hash of every setting that changes the numbers) is stored with the result; a cached result
    with another fingerprint is refused instead of silently reused (one written before fingerprints is reused, and
    one whose fingerprint is among ``legacy_fingerprints``, the same settings keyed as an older version did).
    """
    from perceptual_diffusion.evaluation.evaluate import evaluate_model

    json_path, npz_path = _with_extension(cache, ".json"), _with_extension(cache, ".npz")
    if is_cached(cache):
        cached = json.loads(json_path.read_text())
        stored = cached.get("fingerprint")
        if fingerprint is not None and stored is not None and stored not in (fingerprint, *legacy_fingerprints):
            raise UserError(
                f"the cached evaluation {json_path} was made with other settings (fingerprint {stored}, now "
                f"{fingerprint}); the folder mixes two configurations: use a new --out, or delete {cache.parent}"
            )
        return cached
    model = model() if callable(model) and not isinstance(model, torch.nn.Module) else model
    guide = guide() if callable(guide) and not isinstance(guide, torch.nn.Module) else guide
    result = evaluate_model(
        model,
        sample_config,
        data,
        len(seeds),
        extractor,
        seeds=seeds,
        device=device,
        guide=guide,
        use_labels=use_labels,
        reference_split=reference_split,
        per_sample_path=npz_path,
    )
    result["metrics"] = flatten_metrics(result)
    if fingerprint is not None:
        result["fingerprint"] = fingerprint
    atomic_write_text(json_path, json.dumps(result, indent=2, default=str))
    return result


def is_cached(cache: Path) -> bool:
    """Whether :func:`evaluate_cached` has written both files of ``cache``."""
    return _with_extension(cache, ".json").is_file() and _with_extension(cache, ".npz").is_file()


def _with_extension(cache: Path, extension: str) -> Path:
    """``NAME`` + extension; not ``with_suffix``, which would cut a name such as ``cfg-w1.5-phi0.7`` at its dot."""
    return cache.parent / (cache.name + extension)


def load_per_sample(cache: Path) -> dict[str, np.ndarray]:
    """The per-sample arrays an :func:`evaluate_cached` call wrote."""
    with np.load(_with_extension(cache, ".npz")) as z:
        return {k: z[k] for k in z.files}
