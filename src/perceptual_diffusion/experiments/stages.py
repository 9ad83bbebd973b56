"""The two training stages of the fair protocol (arXiv 2401.00110, Sec. 4, read as an experiment about a converged
teacher): their run configurations, stage 1 to a measured plateau, and stage 2's branches with the learning-rate
sweep that chooses each branch's learning rate on held-out sampling seeds.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.config import (
    DataConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    default_sampler,
)
from perceptual_diffusion.data.datasets import data_shape
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.scoring import Criterion, is_cached
from perceptual_diffusion.experiments.budgets import Budget
from perceptual_diffusion.experiments.lora_arm import LoraArm
from perceptual_diffusion.experiments.teacher import TeacherResult, train_to_plateau
from perceptual_diffusion.experiments.variants import VARIANTS
from perceptual_diffusion.experiments.workspace import Context, branch_dir, log, teacher_dir
from perceptual_diffusion.training.loop import train
from perceptual_diffusion.training.rundir import is_finished

STAGE2_SEED_OFFSET = 1000  # stage 2 of training seed s uses seed 1000 + s: it never replays stage 1's draws


def _model_config(budget: Budget, data: DataConfig, unconditional: bool) -> ModelConfig:
    channels, num_classes = data_shape(data)
    return ModelConfig(
        arch=budget.arch,
        preset=budget.preset,
        image_size=data.image_size,
        channels=channels,
        num_classes=0 if unconditional else num_classes,
    )


def stage1_config(
    budget: Budget,
    data: DataConfig,
    phase: int,
    lr: float,
    steps: int,
    init_from: str | None,
    seed: int,
    device: str,
    unconditional: bool = False,
) -> RunConfig:
    """One stage-1 phase: constant lr after warm-up, a checkpoint and an EMA snapshot at every chunk."""
    chunk = budget.stage1.chunk_steps
    return RunConfig(
        schedule=budget.schedule,
        model=_model_config(budget, data, unconditional),
        data=data,
        loss=LossConfig(kind="mse", cond_dropout=0.0 if unconditional else LossConfig.cond_dropout),
        train=TrainConfig(
            steps=steps,
            batch_size=budget.batch_size,
            lr=lr,
            # The first phase warms up from random weights; later ones restart AdamW, so they warm up briefly too.
            warmup_images=TrainConfig.warmup_images if phase == 0 else chunk * budget.batch_size // 10,
            seed=seed + 100 * phase,
            init_from=init_from,
            device=device,
            log_every=25,
            checkpoint_every=chunk,
            sample_every=chunk,
            snapshot_every=chunk,
        ),
        sample=default_sampler(budget.schedule, steps=budget.sample_steps),
    )


def stage2_config(
    budget: Budget,
    data: DataConfig,
    loss: LossConfig,
    lr: float,
    seed: int,
    teacher_dir: str,
    device: str,
    unconditional: bool = False,
    lora: LoraConfig | None = None,
) -> RunConfig:
    """One stage-2 branch; both branches get exactly this, apart from the loss (and of a LoRA arm, ``lora``: the
    same schedule, with an adapter on the teacher's weights instead of every weight trained)."""
    images = budget.finetune_steps * budget.batch_size
    if unconditional:
        loss = replace(loss, cond_dropout=0.0)
    return RunConfig(
        schedule=budget.schedule,
        model=_model_config(budget, data, unconditional),
        data=data,
        loss=loss,
        train=TrainConfig(
            steps=budget.finetune_steps,
            batch_size=budget.batch_size,
            lr=lr,
            warmup_images=int(budget.finetune_warmup * images),
            ema_halflife_images=max(int(budget.finetune_ema * images), 1),
            seed=STAGE2_SEED_OFFSET + seed,
            init_from=teacher_dir,
            device=device,
            log_every=25,
            checkpoint_every=max(budget.finetune_steps // 2, 1),
            sample_every=budget.finetune_steps,
        ),
        sample=default_sampler(budget.schedule, steps=budget.sample_steps),
        lora=lora,
    )


def branch_losses(budget: Budget) -> dict[str, LossConfig]:
    """The stage-2 branches that get the learning-rate sweep: MSE continued and self-perceptual."""
    return {"mse-continued": LossConfig(kind="mse"), "self-perceptual": budget.perceptual}


def swept(budget: Budget, arm: LoraArm | None = None) -> tuple[dict[str, LossConfig], tuple[float, ...]]:
    """The branches of one learning-rate sweep and its rates: the full fine-tune's, or a LoRA arm's."""
    if arm is None:
        return branch_losses(budget), budget.finetune_lrs
    return arm.branches(budget), budget.lora_lrs


def train_teacher(ctx: Context, seed: int, unconditional: bool = False) -> TeacherResult:
    """Stage 1 for one training seed (conditional, or the unconditional pair's teacher)."""
    root = ctx.root(seed, unconditional)
    prefix = "uncond/" if unconditional else ""

    def make_config(phase: int, lr: float, steps: int, init_from: str | None) -> RunConfig:
        return stage1_config(ctx.budget, ctx.data, phase, lr, steps, init_from, seed, ctx.device, unconditional)

    def evaluate_point(weights: Path, name: str) -> tuple[float, float, dict[str, Any]]:
        return ctx.selection_point(f"{prefix}curve-{name}", seed, weights)

    gain_of = None  # the schedule's combined-standard-error rule
    if ctx.budget.stage1.rule == "paired":
        gain_of = lambda a, b: ctx.paired_gain(seed, f"{prefix}curve-{a.name}", f"{prefix}curve-{b.name}")  # noqa: E731
    return train_to_plateau(root, ctx.budget.stage1, make_config, evaluate_point, ctx.criterion, log, gain_of)


def teacher_for(ctx: Context, seed: int, unconditional: bool = False) -> TeacherResult:
    if ctx.budget.teacher is not None and not unconditional:
        return TeacherResult(
            run_dir=Path(ctx.budget.teacher),
            at_plateau=False,
            phase_ends=["brought by the user"],
            reason="brought by the user: its plateau was not measured here",
        )
    return train_teacher(ctx, seed, unconditional)


def check_teachers(ctx: Context, seeds: list[int], require_plateau: bool) -> dict[str, TeacherResult]:
    teachers = {}
    for seed in seeds:
        result = teacher_for(ctx, seed)
        teachers[f"seed{seed}"] = result
        if not result.at_plateau and ctx.budget.teacher is None:
            message = (
                f"seed {seed}: the teacher did not reach a plateau ({result.reason}): stage 2 would "
                "measure further convergence, not the objective"
            )
            if require_plateau:
                raise UserError(message + "; raise the budget's stage-1 step cap or drop --require-plateau")
            log("WARNING: " + message)
    return teachers


def train_branches(
    ctx: Context,
    seed: int,
    lrs: dict[str, tuple[float, ...]],
    unconditional: bool = False,
    arm: LoraArm | None = None,
) -> None:
    """Stage 2: every branch at every learning rate it is given, all from the same teacher weights (``arm``: the
    LoRA arm's branches, adapters on those weights; the self-perceptual one's teacher is its base, so shared)."""

    root = ctx.root(seed, unconditional)
    teacher = str(teacher_dir(ctx, seed, unconditional))
    losses = {**branch_losses(ctx.budget), **{v: VARIANTS[v] for v in ctx.budget.variants}}
    if arm is not None:
        losses = arm.branches(ctx.budget)
    for branch, branch_lrs in lrs.items():
        loss = losses[branch]
        if loss.kind == "self-perceptual":
            loss = replace(loss, teacher=teacher)
        for lr in branch_lrs:
            lora = arm.lora if arm is not None else None
            cfg = stage2_config(ctx.budget, ctx.data, loss, lr, seed, teacher, ctx.device, unconditional, lora)
            run_dir = branch_dir(root, branch, lr)
            if not is_finished(run_dir, cfg.train.steps):
                log(f"seed {seed}: stage 2 {'unconditional ' if unconditional else ''}{branch} at lr {lr:g}")
                train(cfg, run_dir)


LrGrid = dict[str, tuple[float, ...]]  # branch -> the learning rates its sweep tries


def sweep_grid(budget: Budget, arm: LoraArm | None = None) -> LrGrid:
    """Every branch of the sweep at the budget's learning rates, before any extension."""
    branches, lrs = swept(budget, arm)
    return {b: tuple(lrs) for b in branches}


def extend_lrs(grid: LrGrid, chosen: dict[str, float]) -> dict[str, float]:
    """The rate to add to each branch whose chosen rate sits at an end of its sweep: one geometric step of the
    budget's sweep past that end (x4 above 2e-4 for (2e-4, 5e-5), /4 below 5e-5), at 4 significant digits."""
    out = {}
    for branch, lrs in grid.items():
        lo, hi = min(lrs), max(lrs)
        if lo == hi:
            continue
        step = (hi / lo) ** (1 / (len(set(lrs)) - 1))  # the sweep's geometric step; extensions keep it
        best = chosen[branch]
        if best == hi:
            out[branch] = float(f"{hi * step:.4g}")
        elif best == lo:
            out[branch] = float(f"{lo / step:.4g}")
    return out


def sweep_points(
    ctx: Context, seeds: list[int], arm: LoraArm | None = None, grid: LrGrid | None = None
) -> dict[str, dict[float, list[float]]]:
    """Criterion of every (branch, lr) of ``grid`` (default: the budget's sweep) per seed on the selection seeds
    (evaluating what is missing)."""
    points: dict[str, dict[float, list[float]]] = {}
    grid = grid if grid is not None else sweep_grid(ctx.budget, arm)
    for branch, lrs in grid.items():
        for lr in lrs:
            for seed in seeds:
                run_dir = branch_dir(ctx.root(seed), branch, lr)
                value, _, _ = ctx.selection_point(f"sweep-{branch}-lr{lr:g}", seed, run_dir)
                points.setdefault(branch, {}).setdefault(lr, []).append(value)
    return points


def choose_lrs(criterion: Criterion, points: dict[str, dict[float, list[float]]]) -> dict[str, float]:
    """Per branch, the learning rate whose criterion, averaged over seeds, is best."""
    sign = 1.0 if criterion.higher_is_better else -1.0
    return {b: max(by_lr, key=lambda lr: sign * float(np.mean(by_lr[lr]))) for b, by_lr in points.items()}


def sweep_done(ctx: Context, seed: int, arm: LoraArm | None = None, grid: LrGrid | None = None) -> bool:
    """Every stage-2 run of this seed's sweep (``grid``, default the budget's) is trained (and, with several
    learning rates, evaluated)."""
    grid = grid if grid is not None else sweep_grid(ctx.budget, arm)
    if all(len(lrs) == 1 for lrs in grid.values()):
        return all(
            is_finished(branch_dir(ctx.root(seed), b, lrs[0]), ctx.budget.finetune_steps) for b, lrs in grid.items()
        )
    names = [f"sweep-{b}-lr{lr:g}" for b, lrs in grid.items() for lr in lrs]
    return all(is_cached(ctx.cache(n, seed)) for n in names)
