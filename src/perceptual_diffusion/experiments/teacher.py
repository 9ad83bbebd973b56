"""Stage 1 trained to a measured plateau: the teacher that the paper's fine-tuning starts from.

The paper fine-tunes a *converged* MSE model (arXiv 2401.00110, Sec. 4: Stable Diffusion 2.1 after long training).
If the teacher is still improving, "MSE continued" in stage 2 measures further convergence (or the gain of a lower
learning rate), not the objective. So stage 1 here is reduce-on-plateau training, in phases of decreasing constant
learning rate (e.g. 2e-3, then 2e-4): each phase trains in chunks of ``chunk_steps``; after every chunk the EMA
weights are evaluated on held-out sampling seeds with the criterion metric (``scoring.criterion_for``); a phase ends
when the last chunk's gain is not beyond sampling noise (a plateau), or at its step cap. The next phase starts from
the previous phase's EMA weights. The teacher is *at a plateau* when its last phase (the lowest learning rate) ended
by the criterion and the curve rose beyond noise since its first point.

"Beyond noise" is a :class:`Gain` with an interval. Two rules exist (``PlateauSchedule.rule``): ``paired`` estimates
the gain between two snapshots from the *same* sampling seeds with the paired bootstrap (``stats.paired_bootstrap``):
both evaluations share their seeds and labels, so most of their sampling noise cancels and a plateau can be
certified at the sample counts a CPU allows. ``combined-se`` (the rule of the committed v1 results) treats the two
evaluations as independent, ``noise_multiple`` times their combined standard error, which overstates the noise of a
difference of strongly correlated estimates.

Every chunk is a resume of the same run directory (``train.steps`` may grow on resume under a constant learning
rate), every evaluation is cached, and every decision is recomputed from the cached numbers: rerunning the command
after a crash makes the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class Gain:
    """How much better a later curve point is than an earlier one (positive: better), with an interval."""

    estimate: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The later point is better beyond noise: the whole interval lies above 0."""
        return self.low > 0

    def describe(self) -> str:
        return f"{self.estimate:+.4g} [{self.low:+.4g}, {self.high:+.4g}]"


@dataclass
class CurvePoint:
    phase: int
    lr: float
    step: int  # within the phase's run
    images: int  # images seen since stage 1 began, over all phases
    value: float
    se: float
    metrics: dict[str, float]
    name: str = ""  # the evaluation's cache name (the paired rule reads its per-sample arrays)
    gain: dict[str, float] | None = None  # Gain over the previous point of the same phase, as a dict


# (earlier point, later point) -> the later one's gain
GainOf = Callable[[CurvePoint, CurvePoint], Gain]


def combined_se_gain(criterion: Criterion, multiple: float) -> GainOf:
    """The v1 rule: the gain's interval is +- ``multiple`` combined standard errors of two independent estimates."""

    def gain(previous: CurvePoint, current: CurvePoint) -> Gain:
        estimate = criterion.better(current.value, previous.value)
        noise = multiple * math.sqrt(previous.se**2 + current.se**2)
        return Gain(estimate, estimate - noise, estimate + noise)

    return gain


@dataclass
class TeacherResult:
    """The teacher's run directory, its curve, and whether its last phase ended at a plateau."""

    run_dir: Path
    at_plateau: bool
    points: list[CurvePoint] = field(default_factory=list)
    phase_ends: list[str] = field(default_factory=list)  # per phase: "plateau at step S" or "step cap S"
    steps: int = 0
    images: int = 0
    reason: str = ""  # in words: why the teacher is, or is not, at a plateau


def phase_dir(root: Path, phase: int, phases: int) -> Path:
    """The last phase is ``stage1-mse`` (the teacher); earlier ones ``stage1-phaseP``."""
    return root / ("stage1-mse" if phase == phases - 1 else f"stage1-phase{phase}")


def within_noise(previous: CurvePoint, current: CurvePoint, criterion: Criterion, multiple: float) -> bool:
    """The gain from ``previous`` to ``current`` is within ``multiple`` combined standard errors (or negative)."""
    return not combined_se_gain(criterion, multiple)(previous, current).significant


def is_plateau(points: list[CurvePoint], gain_of: GainOf, first_phase: bool) -> bool:
    """The last chunk gained nothing beyond sampling noise; in the first phase the curve must also have risen
    beyond noise since its first point, so that a model still at the floor (e.g. 0 of N samples right, twice) is
    not mistaken for a converged one."""
    if len(points) < 2 or gain_of(points[-2], points[-1]).significant:
        return False
    return not first_phase or gain_of(points[0], points[-1]).significant


def train_to_plateau(
    root: Path,
    schedule: PlateauSchedule,
    make_config: MakeConfig,
    evaluate_point: EvaluatePoint,
    criterion: Criterion,
    log: Callable[[str], None] = print,
    gain_of: GainOf | None = None,
) -> TeacherResult:
    """Run (or resume) every phase of stage 1 under ``root``; returns the teacher and its curve. ``gain_of`` is
    the rule that tells a gain from noise (default: the combined standard errors of ``schedule.noise_multiple``)."""
    gain_of = gain_of or combined_se_gain(criterion, schedule.noise_multiple)
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
            name = f"phase{p}-step{steps:08d}"
            value, se, res = evaluate_point(snapshot_path(run_dir, steps), name)
            images = images_before + steps * config.train.batch_size
            point = CurvePoint(p, lr, steps, images, value, se, res.get("metrics", {}), name)
            if phase_points:
                point.gain = asdict(gain_of(phase_points[-1], point))
            phase_points.append(point)
            gain = f", gain {Gain(**point.gain).describe()}" if point.gain else ""
            log(f"stage 1 phase {p + 1} step {steps}: {criterion.key} {value:.4g} ± {se:.2g}{gain}")
            if k >= schedule.min_chunks and is_plateau(phase_points, gain_of, p == 0):
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
    overall = gain_of(result.points[0], result.points[-1])
    result.at_plateau = plateaus[-1] and overall.significant
    result.reason = _reason(result, schedule, plateaus[-1], overall, criterion)
    return result


def _reason(
    result: TeacherResult, schedule: PlateauSchedule, last_plateau: bool, overall: Gain, crit: Criterion
) -> str:
    """Why the teacher is, or is not, at a plateau, in words."""
    phases = len(schedule.lrs)
    last = result.points[-1]
    chunk = f"its last chunk gained {Gain(**last.gain).describe()} in {crit.key}" if last.gain else "one chunk"
    phase = f"the last phase (lr {schedule.lrs[-1]:g})"
    cap = f"{phase} ended at its step cap of {schedule.max_chunks * schedule.chunk_steps} steps"
    if not last_plateau and last.gain and Gain(**last.gain).significant:
        return f"{cap} while still gaining beyond noise ({chunk})"
    if not last_plateau:
        return (
            f"{cap}: {chunk}, within noise, but the curve never rose beyond noise from its first point "
            f"({crit.key} gain {overall.describe()}), so it may still be at the floor"
        )
    if not overall.significant:
        return (
            f"{phase} ended by the criterion ({result.phase_ends[-1]}), but the curve did not rise beyond noise "
            f"from its first point to its last ({crit.key} gain {overall.describe()}), so it may still be at the floor"
        )
    return (
        f"{phase} of {phases} ended at a plateau ({result.phase_ends[-1]}: {chunk}); overall gain since the first "
        f"point {overall.describe()}"
    )
