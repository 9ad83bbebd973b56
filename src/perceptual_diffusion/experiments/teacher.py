"""Stage 1 trained to a measured plateau: the teacher that the paper's fine-tuning starts from.

The paper fine-tunes a *converged* MSE model (arXiv 2401.00110, Sec. 4: Stable Diffusion 2.1 after long training).
If the teacher is still improving, "MSE continued" in stage 2 measures further convergence (or the gain of a lower
learning rate), not the objective. So stage 1 here is reduce-on-plateau training, in phases of decreasing constant
learning rate (e.g. 2e-3, then 2e-4): each phase trains in chunks of ``chunk_steps``; after every chunk the EMA
weights are evaluated on held-out sampling seeds with the criterion metric (``scoring.criterion_for``); a phase ends
when the last chunk's gain is within twice the combined sampling standard error of two evaluations (a plateau), or at
its step cap. The next phase starts from the previous phase's EMA weights. The teacher is *at a plateau* when its
last phase (the lowest learning rate) ended by the criterion and the curve rose beyond noise since its first point.

Every chunk is a resume of the same run directory (``train.steps`` may grow on resume under a constant learning
rate), every evaluation is cached, and every decision is recomputed from the cached numbers: rerunning the command
after a crash makes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perceptual_diffusion.config import RunConfig
from perceptual_diffusion.evaluation.scoring import Criterion
from perceptual_diffusion.experiments.budgets import PlateauSchedule
from perceptual_diffusion.training.loop import train
from perceptual_diffusion.training.rundir import is_finished, snapshot_path

# (weights file, cache name) -> (criterion value, its standard error, the evaluation result)
EvaluatePoint = Callable[[Path, str], tuple[float, float, dict[str, Any]]]
# (phase index, learning rate, steps, initial weights or None) -> the phase's run configuration
MakeConfig = Callable[[int, float, int, "str | None"], RunConfig]


@dataclass
class CurvePoint:
    phase: int
    lr: float
    step: int  # within the phase's run
    images: int  # images seen since stage 1 began, over all phases
    value: float
    se: float
    metrics: dict[str, float]


@dataclass
class TeacherResult:
    """The teacher's run directory, its curve, and whether its last phase ended at a plateau."""

    run_dir: Path
    at_plateau: bool
    points: list[CurvePoint] = field(default_factory=list)
    phase_ends: list[str] = field(default_factory=list)  # per phase: "plateau at step S" or "step cap S"
    steps: int = 0
    images: int = 0


def phase_dir(root: Path, phase: int, phases: int) -> Path:
    """The last phase is ``stage1-mse`` (the teacher); earlier ones ``stage1-phaseP``."""
    return root / ("stage1-mse" if phase == phases - 1 else f"stage1-phase{phase}")


def within_noise(previous: CurvePoint, current: CurvePoint, criterion: Criterion, multiple: float) -> bool:
    """The gain from ``previous`` to ``current`` is within ``multiple`` combined standard errors (or negative)."""
    noise = math.sqrt(previous.se**2 + current.se**2)
    return criterion.better(current.value, previous.value) <= multiple * noise


def is_plateau(points: list[CurvePoint], criterion: Criterion, multiple: float, first_phase: bool) -> bool:
    """The last chunk gained nothing beyond sampling noise; in the first phase the curve must also have risen
    beyond noise since its first point, so that a model still at the floor (e.g. 0 of N samples right, twice) is
    not mistaken for a converged one."""
    if len(points) < 2 or not within_noise(points[-2], points[-1], criterion, multiple):
        return False
    return not first_phase or not within_noise(points[0], points[-1], criterion, multiple)


def train_to_plateau(
    root: Path,
    schedule: PlateauSchedule,
    make_config: MakeConfig,
    evaluate_point: EvaluatePoint,
    criterion: Criterion,
    log: Callable[[str], None] = print,
) -> TeacherResult:
    """Run (or resume) every phase of stage 1 under ``root``; returns the teacher and its curve."""
    phases = len(schedule.lrs)
    result = TeacherResult(run_dir=phase_dir(root, phases - 1, phases), at_plateau=False)
    init_from: str | None = None
    images_before = 0
    plateaus: list[bool] = []
    for p, lr in enumerate(schedule.lrs):
        run_dir = phase_dir(root, p, phases)
        phase_points: list[CurvePoint] = []
        ended = f"step cap {schedule.max_chunks * schedule.chunk_steps}"
        plateau = False
        for k in range(1, schedule.max_chunks + 1):
            steps = k * schedule.chunk_steps
            config = make_config(p, lr, steps, init_from)
            if not is_finished(run_dir, steps):
                log(f"stage 1 phase {p + 1}/{phases} (lr {lr:g}): training to step {steps} in {run_dir}")
                train(config, run_dir)
            value, se, res = evaluate_point(snapshot_path(run_dir, steps), f"phase{p}-step{steps:08d}")
            point = CurvePoint(
                p, lr, steps, images_before + steps * config.train.batch_size, value, se, res.get("metrics", {})
            )
            phase_points.append(point)
            log(f"stage 1 phase {p + 1} step {steps}: {criterion.key} {value:.4g} ± {se:.2g}")
            if k >= schedule.min_chunks and is_plateau(phase_points, criterion, schedule.noise_multiple, p == 0):
                ended, plateau = f"plateau at step {steps}", True
                break
        result.points += phase_points
        result.phase_ends.append(ended)
        images_before = result.points[-1].images
        result.steps += phase_points[-1].step
        init_from = str(run_dir)
        plateaus.append(plateau)
    result.images = images_before
    # At a plateau: the last phase (the lowest learning rate) ended by the criterion, and the teacher learned
    # something, i.e. its last point is beyond noise from its first (a model flat at the floor is not converged).
    first, last = result.points[0], result.points[-1]
    result.at_plateau = plateaus[-1] and not within_noise(first, last, criterion, schedule.noise_multiple)
    return result
