"""How much work a comparison does, as plain data (no torch import: the command line lists these instantly).

A ``Budget`` names the data, the U-Net preset, stage 1's plateau schedule (``teacher.py``), stage 2's steps and
learning-rate sweep, the sampler and how many samples each evaluation draws; ``BUDGETS`` holds the named ones that
``compare``, ``ablate`` and ``demo`` run. Each is sized by measurement (README, results/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from perceptual_diffusion.config import DataConfig, LossConfig


@dataclass(frozen=True)
class PlateauSchedule:
    """Phases of constant learning rate, each trained in chunks until its gain is within sampling noise."""

    lrs: tuple[float, ...] = (2e-3, 2e-4)
    chunk_steps: int = 500
    max_chunks: int = 8
    min_chunks: int = 2
    noise_multiple: float = 2.0  # a gain below this many combined standard errors is "within sampling noise"

    def __post_init__(self) -> None:
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError("a plateau schedule needs at least one positive learning rate")
        if not 1 <= self.min_chunks <= self.max_chunks or self.chunk_steps < 1:
            raise ValueError("need chunk_steps >= 1 and 1 <= min_chunks <= max_chunks")


@dataclass(frozen=True)
class Budget:
    """How much work a comparison does; presets below are sized by measurement (README, results/README.md)."""

    name: str
    data: DataConfig
    preset: str
    batch_size: int
    stage1: PlateauSchedule
    finetune_steps: int
    finetune_lrs: tuple[float, ...]
    sample_steps: int
    eval_samples: int
    curve_samples: int
    training_seeds: int = 3
    eval_repeats: int = 1
    finetune_warmup: float = 0.1  # warm-up as a fraction of stage-2 images (a fresh AdamW must not start cold)
    finetune_ema: float = 0.1  # EMA half-life as a fraction of stage-2 images
    cfg_scales: tuple[float, ...] = (1.5, 3.0, 7.5)
    guidance_rescales: tuple[float, ...] = (0.0, 0.7)
    unconditional: bool = True  # the paper's unconditional claim: a teacher and both branches without labels
    extras: bool = True  # beyond the paper: self-perceptual + CFG, autoguidance, the conditional model's null label
    variants: tuple[str, ...] = ()  # beyond the paper: loss variants (variants.VARIANTS) at self-perceptual's lr
    teacher: str | None = None  # a user's converged MSE model: skips stage 1 (same teacher for every seed)
    bootstrap: int = 1000  # replicates of the paired bootstrap intervals
    loss_batch: int = 512  # images of the fixed batch on which every model's two losses are measured
    perceptual: LossConfig = field(default_factory=lambda: LossConfig(kind="self-perceptual", teacher="<stage1>"))


SHAPES = DataConfig(source="shapes", image_size=16)
FASHION = DataConfig(source="fashion-mnist", image_size=28)

BUDGETS: dict[str, Budget] = {
    # Under 10 minutes on 2 CPU cores: the demo. Its teacher is deliberately short (one phase, capped at 800
    # steps) and its report says so; the fair results are the cpu-fair ones committed under results/.
    "cpu-demo": Budget(
        name="cpu-demo",
        data=SHAPES,
        preset="small",
        batch_size=64,
        stage1=PlateauSchedule(lrs=(2e-3,), chunk_steps=400, max_chunks=2, min_chunks=2),
        finetune_steps=250,
        finetune_lrs=(2e-4,),
        sample_steps=25,  # half the paper's 50 DDIM steps, for the CPU budget
        eval_samples=500,
        curve_samples=300,
        training_seeds=1,
        guidance_rescales=(0.7,),
        unconditional=False,
        extras=False,
    ),
    # The fair test on 2 CPU cores, one process per training seed (results/README.md has the commands and times):
    # the tiny U-Net, whose step costs a third of the small one's, so that three seeds reach a plateau.
    "cpu-fair": Budget(
        name="cpu-fair",
        data=SHAPES,
        preset="tiny",
        batch_size=64,
        stage1=PlateauSchedule(lrs=(2e-3, 2e-4), chunk_steps=500, max_chunks=8, min_chunks=2),
        finetune_steps=1000,
        finetune_lrs=(2e-4, 5e-5),
        sample_steps=25,
        eval_samples=2000,
        curve_samples=1000,
        variants=("sp-channel-norm", "sp-low-noise"),
    ),
    # The fair test on Fashion-MNIST (28px) on 2 CPU cores, one process per training seed: the protocol of cpu-fair
    # at three times its cost per image, so without the unconditional pair and the extra rows (cpu-fair has them).
    "cpu-fair-fmnist": Budget(
        name="cpu-fair-fmnist",
        data=FASHION,
        preset="tiny",
        batch_size=64,
        stage1=PlateauSchedule(lrs=(2e-3, 2e-4), chunk_steps=500, max_chunks=10, min_chunks=2),
        finetune_steps=1000,
        finetune_lrs=(2e-4, 5e-5),
        sample_steps=25,
        eval_samples=2000,
        curve_samples=1000,
        unconditional=False,
        extras=False,
    ),
    # One GPU: Fashion-MNIST with the base U-Net and the paper's 50 DDIM steps (benchmarks/gpu_compare.sh).
    "gpu": Budget(
        name="gpu",
        data=FASHION,
        preset="base",
        batch_size=256,
        stage1=PlateauSchedule(lrs=(5e-4, 5e-5), chunk_steps=1000, max_chunks=6, min_chunks=2),
        finetune_steps=1000,
        finetune_lrs=(5e-5, 1.5e-5),
        sample_steps=50,
        eval_samples=10_000,
        curve_samples=2000,
        variants=("sp-channel-norm", "sp-low-noise"),
    ),
}


# One line each for --help.
BUDGET_NOTES: dict[str, str] = {
    "cpu-demo": "under 10 min on 2 cores, with a teacher that is NOT converged (the demo)",
    "cpu-fair": "the fair test on the CPU (shapes), one process per training seed",
    "cpu-fair-fmnist": "the same on Fashion-MNIST 28px, without the unconditional pair and extra rows",
    "gpu": "Fashion-MNIST with the base U-Net on one GPU",
}
assert BUDGET_NOTES.keys() == BUDGETS.keys()
