"""Numbers computed from a finished comparison's runs and cached evaluations, for the report to render: paired
differences with hierarchical bootstrap intervals (``stats.py``), both losses of every model on one fixed batch,
and the training-loss series of both stages.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from perceptual_diffusion.core.losses import SelfPerceptualLoss, mse_loss, self_perceptual_loss
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.data.datasets import load_dataset
from perceptual_diffusion.evaluation import stats
from perceptual_diffusion.evaluation.reference import reference_stats
from perceptual_diffusion.evaluation.scoring import load_per_sample
from perceptual_diffusion.experiments.lora_arm import LoraArm
from perceptual_diffusion.experiments.rows import Pair, PairRole, Row
from perceptual_diffusion.experiments.variants import PAPER
from perceptual_diffusion.experiments.workspace import branch_dir, model_dir, teacher_dir
from perceptual_diffusion.models.loading import load_model


def _statistics(ctx: Any, per_sample: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-sample statistics available for this data: name -> function of per-sample arrays."""

    ref = reference_stats(ctx.data, ctx.extractor, split=ctx.reference_split)
    out: dict[str, Any] = {}
    for key, array in (
        ("structure_precision", "structure"),
        ("exact_precision", "exact"),
        ("noise_rms", "noise_rms"),
        ("class_accuracy", "class_match"),
        ("nearest_train_rms", "nearest_train_rms"),
        ("grid_excess_db", "grid_excess"),
    ):
        if array in per_sample:
            out[key] = stats.mean_of(array)
    out["fid"] = stats.fid_against(ref.mu, ref.cov)
    out["kid"] = stats.kid_against(ref.features)
    out["precision"] = stats.precision_against(ref.features)
    out["coverage"] = stats.coverage_against(ref.features)
    return out


def paired(ctx: Any, seeds: list[int], key_a: str, key_b: str, n_boot: int = 1000) -> dict[str, dict[str, Any]]:
    """Every available metric of row ``key_a`` minus row ``key_b``, paired per training seed."""
    load = lambda key, s: load_per_sample(ctx.cache(f"{key}-rep0", s))  # noqa: E731
    a = [load(key_a, s) for s in seeds]
    b = [load(key_b, s) for s in seeds]
    out = {}
    for metric, statistic in _statistics(ctx, a[0]).items():
        # Set statistics (FID, KID, k-NN precision and coverage) cost far more per replicate than means of
        # per-sample values: 200 replicates put their interval ends within a few percent of the width.
        boot = n_boot if metric not in ("fid", "precision", "coverage", "kid") else min(n_boot, 200)
        diff = stats.paired_bootstrap(a, b, statistic, n_boot=boot)
        out[metric] = diff.to_dict()
    return out


def guidance_pairs(rows: list[Row], a: Row, baseline: str, role: PairRole, selected: bool) -> list[Pair]:
    """``a`` (no guidance) against each guidance row of ``baseline``: each method's best setting (``selected``, one
    row per method), or (v1) the first CFG row with rescale 0.7."""
    if selected:
        guided = [r for r in rows if r.model == baseline and r.guidance in ("cfg", "apg", "autoguidance")]
        return [Pair(role, a, r, method="interval" if r.interval else r.guidance, selected=True) for r in guided]
    cfg = sorted(
        (r for r in rows if r.model == baseline and r.guidance == "cfg" and r.guidance_rescale == 0.7),
        key=lambda r: r.slug,
    )
    return [Pair(role, a, cfg[0], method="cfg")] if cfg else []


def plan_pairs(
    rows: list[Row], variants: tuple[str, ...] | list[str], selected: bool = False, arm: LoraArm | None = None
) -> list[Pair]:
    """Every pair the report discusses, by role, the paper's headline first: self-perceptual without guidance against
    each guidance method's row (``selected``: each method's best setting, one row per method; otherwise, v1, the
    first CFG row with rescale 0.7). With a LoRA ``arm``, its pairs last: self-perceptual LoRA vs MSE-continued
    LoRA (``lora-headline``), each LoRA branch vs the full fine-tune of the same branch (``lora-vs-full``), and
    self-perceptual LoRA vs MSE-continued LoRA with each guidance method (``lora-vs-guidance``)."""
    by_slug = {r.slug: r for r in rows}
    sp, mse, teacher = Row("self-perceptual"), Row("mse-continued"), Row("stage1-mse")
    pairs = [Pair("headline", sp, mse), Pair("vs-teacher", sp, teacher), Pair("teacher-residual", mse, teacher)]
    pairs += guidance_pairs(rows, sp, mse.model, "vs-guidance", selected)
    pairs.append(Pair("unconditional", Row("uncond/self-perceptual"), Row("uncond/mse-continued")))
    pairs += [Pair("variant", Row(v), mse) for v in variants]
    pairs += [Pair("premise", Row(v), sp) for v in variants if v == "external-perceptual"]
    if arm is not None:
        lora_sp, lora_mse = Row(arm.sp), Row(arm.mse)
        pairs += [Pair("lora-headline", lora_sp, lora_mse), Pair("lora-vs-full", lora_sp, sp)]
        pairs += [Pair("lora-vs-full", lora_mse, mse)]
        pairs += guidance_pairs(rows, lora_sp, arm.mse, "lora-vs-guidance", selected)
    return [p for p in pairs if p.a.slug in by_slug and p.b.slug in by_slug]


@torch.no_grad()
def losses_on_fixed_batch(ctx: Any, seed: int, chosen: dict[str, float], models: list[str], n: int = 512) -> dict:
    """Self-perceptual loss (against the seed's teacher) and MSE loss of each model on one fixed batch: the same x0,
    labels, t, eps and t' for every model, so the numbers compare directly."""

    teacher = frozen_copy(load_model(teacher_dir(ctx, seed), ctx.dev)[0])
    data = load_dataset(ctx.data)
    g = torch.Generator().manual_seed(12345)
    idx = torch.randint(len(data), (n,), generator=g)
    x0 = data.images[idx].to(ctx.dev)
    labels = data.labels[idx].to(ctx.dev) if teacher.num_classes else None
    noise = SelfPerceptualLoss(PAPER, teacher).draw(x0.shape, g)
    t, eps, t_prime = (noise[k].to(ctx.dev) for k in ("t", "eps", "t_prime"))
    out = {}
    for name in [m for m in models if not m.startswith("uncond/")]:
        model = load_model(model_dir(ctx, seed, name, chosen), ctx.dev)[0]
        sp = self_perceptual_loss(model, teacher, x0, labels, t, eps, t_prime).mean()
        out[name] = {
            "self_perceptual": float(sp),
            "mse": float(mse_loss(model, teacher.schedule, x0, labels, t, eps).mean()),
        }
    return out


def training_losses(ctx: Any, chosen: dict[str, float], seed: int = 0) -> dict[str, list[list[float]]]:
    """The training MSE of one training seed vs images seen: stage 1 over its phases (images counted on), then each
    stage-2 branch at its chosen learning rate starting where stage 1 ended. ``{name: [images, losses]}``."""
    root = ctx.root(seed)
    xs_all: list[float] = []
    ys_all: list[float] = []
    offset = 0
    for run in sorted(root.glob("stage1-phase*")) + [root / "stage1-mse"]:
        xs, ys = _log_series(run / "log.jsonl", "mse")
        if xs:
            xs_all += [offset + x for x in xs]
            ys_all += ys
            offset += xs[-1]
    out = {"stage1": [xs_all, ys_all]}
    for branch in ("mse-continued", "self-perceptual"):
        xs, ys = _log_series(branch_dir(root, branch, chosen[branch]) / "log.jsonl", "mse")
        out[branch] = [[offset + x for x in xs], ys]
    return out


def _log_series(path: Path, key: str) -> tuple[list[int], list[float]]:
    if not path.is_file():
        return [], []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if key in r]
    return [r["images_seen"] for r in records], [r[key] for r in records]
