"""How much work a comparison does, as plain data (no torch import: the command line lists these instantly).

A ``Budget`` names the data, the U-Net preset, stage 1's plateau schedule (``teacher.py``), stage 2's steps and
learning-rate sweep, the sampler and how many samples each evaluation draws; ``BUDGETS`` holds the named ones that
``compare``, ``ablate`` and ``demo`` run. Each is sized by measurement (README, results/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from perceptual_diffusion.config import PRESETS_OF, Architecture, DataConfig, LossConfig, ScheduleConfig
from perceptual_diffusion.errors import UserError


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and x != float("inf")


def _check_count(budget: object, name: str) -> None:
    """A count of a budget must be an integer >= 1; the message names the option that sets it."""
    value = getattr(budget, name)
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value!r}")


@dataclass(frozen=True)
class PlateauSchedule:
    """Phases of constant learning rate, each trained in chunks until its gain is within sampling noise."""

    lrs: tuple[float, ...] = (2e-3, 2e-4)
    chunk_steps: int = 500
    max_chunks: int = 8
    min_chunks: int = 2
    noise_multiple: float = 2.0  # rule "combined-se": a gain below this many combined standard errors is noise
    # "paired": a chunk's gain is noise unless its 95% paired-bootstrap interval (same sampling seeds for both
    # snapshots) lies above 0 (teacher.py); "combined-se" is the rule of the committed v1 results.
    rule: Literal["combined-se", "paired"] = "combined-se"

    def __post_init__(self) -> None:
        # UserError, not ValueError: every schedule built from options is checked here, one line before any work.
        if not self.lrs or not all(_positive(lr) for lr in self.lrs):
            raise UserError(f"a plateau schedule needs at least one learning rate, all > 0, got {self.lrs}")
        if not 1 <= self.min_chunks <= self.max_chunks or self.chunk_steps < 1:
            raise UserError(
                f"a plateau schedule needs chunk_steps >= 1 and 1 <= min_chunks <= max_chunks, got chunk_steps "
                f"{self.chunk_steps}, min_chunks {self.min_chunks}, max_chunks {self.max_chunks}"
            )
        if not _positive(self.noise_multiple):
            raise UserError(f"a plateau schedule's noise_multiple must be > 0, got {self.noise_multiple}")


GridMethod = Literal["cfg", "apg", "interval", "autoguidance", "cfg-zero-star"]


@dataclass(frozen=True)
class GuidanceGrid:
    """The settings of one guidance method that ``compare`` tries on held-out sampling seeds (``guidance_sweep.py``)
    before its best one is compared: every combination of the tuples below. ``scales`` is the axis that is
    extended when the best setting sits at one of its ends."""

    method: GridMethod
    scales: tuple[float, ...]
    rescales: tuple[float, ...] = (0.0,)
    apg_thresholds: tuple[float | None, ...] = (None,)  # APG norm thresholds (None: the method's default)
    intervals: tuple[tuple[float, float | None], ...] = ((0.0, None),)  # (sigma_min, sigma_max) of "interval"
    guides: tuple[str, ...] = ()  # autoguidance: weaker models, "stage1-chunkK" (stage 1's snapshot after K chunks)

    def __post_init__(self) -> None:
        if not self.scales or any(w < 0 for w in self.scales):
            raise ValueError(f"guidance grid {self.method}: needs at least one scale, all >= 0")
        if self.method == "autoguidance" and not self.guides:
            raise ValueError("an autoguidance grid needs at least one guide (e.g. 'stage1-chunk1')")


# The grids of the v2 budgets: for small class-conditional models the FID-optimal CFG scale is usually just above 1
# (so the grid starts at 1.1); each grid is extended past an end where its best setting sits.
GRIDS_V2 = (
    GuidanceGrid("cfg", scales=(1.1, 1.2, 1.3, 1.4, 1.5, 2.0, 3.0), rescales=(0.0, 0.7)),
    # APG (arXiv 2410.02416, Sec. 5): eta 0 and reverse momentum are the method's defaults; thresholds as RMS.
    GuidanceGrid("apg", scales=(1.25, 1.5, 2.0, 3.0, 5.0), apg_thresholds=(None, 0.2)),
    # The guidance interval (arXiv 2404.07724): guidance only at middle noise levels, where it allows larger w.
    GuidanceGrid("interval", scales=(1.5, 2.0, 3.0, 5.0), intervals=((0.3, 5.0), (1.0, None))),
    # Autoguidance (arXiv 2406.02507): the guide is the same network trained for less time (stage 1's first-phase
    # EMA snapshots after one and two chunks, e.g. 500 and 1,000 steps; the teachers train for several thousand).
    GuidanceGrid("autoguidance", scales=(1.1, 1.25, 1.5, 2.0, 3.0), guides=("stage1-chunk1", "stage1-chunk2")),
)


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
    # v2 (issue 22): each guidance method at its best setting on held-out seeds instead of fixed CFG rows (empty:
    # the v1 rows of cfg_scales x guidance_rescales); extensions of a grid whose best setting is at an end; the
    # samples per grid point (0: curve_samples); the standard Inception features for the headline rows.
    guidance_grids: tuple[GuidanceGrid, ...] = ()
    grid_extensions: int = 2
    selection_samples: int = 0
    inception: bool = False
    inception_samples: int = 0  # samples per row in Inception features (0: eval_samples; the first N seeds)
    domain_classifier: str | None = None  # the shipped classifier's version (None: the current one)
    # The forward process of every model of the comparison (issue 18): the paper's zero-SNR DDPM, or rectified flow.
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # The denoiser's architecture (issue 19; ``preset`` is one of its presets): the U-Net, or a pixel DiT.
    arch: Architecture = "unet"
    # compare --lora-rank (issue 20): the stage-2 learning rates of both LoRA branches. An adapter of a few thousand
    # weights on a frozen base moves far less per step than the whole network, so LoRA usually wants a learning
    # rate about 10x the full fine-tune's (these two bracket that for the CPU budgets' 2e-4 / 5e-5); swept, each
    # LoRA branch at its best on held-out seeds, like ``finetune_lrs``.
    lora_lrs: tuple[float, ...] = (1e-3, 3e-4)
    # How many times a branch's learning-rate sweep is extended past the end where its best rate sits, by the
    # sweep's own geometric step (x4 for 2e-4 / 5e-5), so that each branch's chosen rate is bracketed (0: the v1 and
    # v2 runs' fixed two-value sweeps). The full fine-tune's sweep of ``finetune_lrs``.
    lr_extensions: int = 0
    # The same for a LoRA arm's sweep of ``lora_lrs`` (guarded by the arm's own settings file, so that an arm joins a
    # finished folder with it): on by default, as no committed arm predates it.
    lora_lr_extensions: int = 2

    def __post_init__(self) -> None:
        # Every budget, named or built from options (compare, ablate, demo), is checked here: an impossible count is
        # one line before any work, never a clamp or a failure after stage 1 trained.
        counts = ("batch_size", "finetune_steps", "sample_steps", "eval_samples", "curve_samples", "training_seeds")
        for name in (*counts, "eval_repeats", "bootstrap", "loss_batch"):
            _check_count(self, name)
        if self.arch not in PRESETS_OF:
            raise UserError(f"unknown --arch {self.arch!r}; choose one of {', '.join(PRESETS_OF)}")
        if self.preset not in PRESETS_OF[self.arch]:
            raise UserError(
                f"unknown {self.arch} --preset {self.preset!r}; choose one of {', '.join(PRESETS_OF[self.arch])}"
            )
        if not self.finetune_lrs or not all(_positive(lr) for lr in self.finetune_lrs):
            raise UserError(f"a budget needs at least one stage-2 learning rate, all > 0, got {self.finetune_lrs}")
        if not self.lora_lrs or not all(_positive(lr) for lr in self.lora_lrs):
            raise UserError(f"a budget needs at least one LoRA learning rate, all > 0, got {self.lora_lrs}")
        if not (isinstance(self.finetune_warmup, (int, float)) and 0 <= self.finetune_warmup < 1):
            raise UserError(f"the stage-2 warm-up fraction must be in [0, 1), got {self.finetune_warmup}")
        if not (isinstance(self.finetune_ema, (int, float)) and 0 <= self.finetune_ema < float("inf")):
            raise UserError(f"the stage-2 EMA half-life fraction must be >= 0, got {self.finetune_ema}")
        if not all(isinstance(w, (int, float)) and 0 <= w < float("inf") for w in self.cfg_scales):
            raise UserError(f"CFG scales must be >= 0, got {self.cfg_scales}")
        if not all(isinstance(phi, (int, float)) and 0 <= phi <= 1 for phi in self.guidance_rescales):
            raise UserError(f"guidance rescales must be in [0, 1], got {self.guidance_rescales}")
        if self.teacher is not None and not (isinstance(self.teacher, str) and self.teacher.strip()):
            raise UserError("--teacher-from must name a run directory or a weights file")
        if not (isinstance(self.grid_extensions, int) and self.grid_extensions >= 0):
            raise UserError(f"grid extensions must be an integer >= 0, got {self.grid_extensions}")
        for name in ("lr_extensions", "lora_lr_extensions"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise UserError(f"learning-rate extensions must be an integer >= 0, got {name} {value}")
        if not (
            isinstance(self.inception_samples, int) and (self.inception_samples == 0 or self.inception_samples >= 10)
        ):
            raise UserError(f"Inception samples must be 0 (eval samples) or at least 10, got {self.inception_samples}")
        for name in ("eval_samples", "curve_samples"):  # an evaluation's minimum (evaluate.py: IS splits, k-NN)
            if getattr(self, name) < 10:
                raise UserError(f"--{name.replace('_', '-')} must be at least 10, got {getattr(self, name)}")
        selection = self.selection_samples
        if not (isinstance(selection, int) and (selection == 0 or selection >= 10)):
            raise UserError(
                f"selection samples must be 0 (the curve samples) or at least 10 (an evaluation's minimum), got "
                f"{selection}"
            )
        for grid in self.guidance_grids:
            for guide in grid.guides:
                chunks = guide.removeprefix("stage1-chunk")
                if not (guide.startswith("stage1-chunk") and chunks.isdigit() and int(chunks) > 0):
                    raise UserError(f"autoguidance guide {guide!r} must be stage1-chunkK (a first-phase snapshot)")
                if int(chunks) > self.stage1.min_chunks:
                    raise UserError(
                        f"autoguidance guide {guide}: stage 1 always trains its first phase for "
                        f"{self.stage1.min_chunks} chunks, so K must be at most that"
                    )


def with_stage1(budget: Budget, stage1: PlateauSchedule) -> Budget:
    """``budget`` with another stage-1 schedule; autoguidance keeps only the guides (first-phase snapshots after K
    chunks) that the new schedule always trains, and is dropped when none is left."""
    grids = []
    for grid in budget.guidance_grids:
        if grid.method == "autoguidance":
            guides = tuple(g for g in grid.guides if int(g.removeprefix("stage1-chunk")) <= stage1.min_chunks)
            if not guides:
                continue
            grid = replace(grid, guides=guides)
        grids.append(grid)
    return replace(budget, stage1=stage1, guidance_grids=tuple(grids))


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
        # A short CFG grid, chosen on 300 held-out seeds (the fair budgets try every method).
        guidance_grids=(GuidanceGrid("cfg", scales=(1.25, 1.5, 3.0), rescales=(0.7,)),),
        grid_extensions=1,
        selection_samples=300,
    ),
    # The fair test on 2 CPU cores, one process per training seed (results/README.md has the commands and times):
    # the tiny U-Net, whose step costs a third of the small one's, so that three seeds reach a plateau. v2 (issue
    # 22): the paired plateau rule and every guidance method at its best setting on held-out seeds.
    "cpu-fair": Budget(
        name="cpu-fair",
        data=SHAPES,
        preset="tiny",
        batch_size=64,
        stage1=PlateauSchedule(lrs=(2e-3, 2e-4), chunk_steps=500, max_chunks=8, min_chunks=2, rule="paired"),
        finetune_steps=1000,
        finetune_lrs=(2e-4, 5e-5),
        sample_steps=25,
        eval_samples=2000,
        curve_samples=1000,
        variants=("sp-channel-norm", "sp-low-noise"),
        extras=False,
        guidance_grids=GRIDS_V2,
        selection_samples=500,
    ),
    # The same on Fashion-MNIST (28px), at three times its cost per image, so without the unconditional pair; with
    # the external-perceptual arm (a separately trained classifier as the frozen loss network) and the headline rows
    # in standard Inception features.
    "cpu-fair-fmnist": Budget(
        name="cpu-fair-fmnist",
        data=FASHION,
        preset="tiny",
        batch_size=64,
        stage1=PlateauSchedule(lrs=(2e-3, 2e-4), chunk_steps=500, max_chunks=10, min_chunks=2, rule="paired"),
        finetune_steps=1000,
        finetune_lrs=(2e-4, 5e-5),
        sample_steps=25,
        eval_samples=2000,
        curve_samples=1000,
        unconditional=False,
        extras=False,
        variants=("external-perceptual",),
        guidance_grids=GRIDS_V2,
        selection_samples=500,
        inception=True,
        inception_samples=1000,
    ),
    # v1, the budgets of the committed results/shapes-fair and results/fmnist-fair (issue 11):
    # independent-error plateau rule, fixed CFG rows at w 1.5 / 3 / 7.5, the v1 Fashion-MNIST classifier.
    "cpu-fair-v1": Budget(
        name="cpu-fair-v1",
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
    "cpu-fair-fmnist-v1": Budget(
        name="cpu-fair-fmnist-v1",
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
        domain_classifier="fashion-mnist-v1",
    ),
    # One GPU: Fashion-MNIST with the base U-Net and the paper's 50 DDIM steps (benchmarks/gpu_compare.sh).
    "gpu": Budget(
        name="gpu",
        data=FASHION,
        preset="base",
        batch_size=256,
        stage1=PlateauSchedule(lrs=(5e-4, 5e-5), chunk_steps=1000, max_chunks=6, min_chunks=2, rule="paired"),
        finetune_steps=1000,
        finetune_lrs=(5e-5, 1.5e-5),
        sample_steps=50,
        eval_samples=10_000,
        curve_samples=2000,
        variants=("sp-channel-norm", "sp-low-noise"),
        extras=False,
        guidance_grids=GRIDS_V2,
        inception=True,
    ),
}

# Issue 18: the v2 Fashion-MNIST protocol for a rectified-flow U-Net, with CFG-Zero* (arXiv 2503.18886, made for flow
# models) among the guidance baselines. Its stage-1 rates come from the flow sweep (issue 18, item 7;
# results/stage1-lr-sweep/unet-tiny-flow.md): 5e-3 had the lowest FID at every snapshot to 2,000 steps, bracketed by
# 2e-3 and 1e-2 (the DDPM budget's 2e-3 was 84.0 against 78.1 at step 2,000); the second phase is a tenth, as there.
BUDGETS["cpu-fair-fmnist-flow"] = replace(
    BUDGETS["cpu-fair-fmnist"],
    name="cpu-fair-fmnist-flow",
    stage1=replace(BUDGETS["cpu-fair-fmnist"].stage1, lrs=(5e-3, 5e-4)),
    schedule=ScheduleConfig(family="flow"),
    guidance_grids=(*GRIDS_V2, GuidanceGrid("cfg-zero-star", scales=(1.1, 1.2, 1.3, 1.5, 2.0, 3.0))),
    lr_extensions=2,  # the v2 Fashion-MNIST run chose both branches' rates at an end of their sweep
)
# The fair comparison for the pixel DiT (issue 19, item 5): cpu-fair-fmnist with the 6-block DiT at patch 4 in the
# paper's zero-SNR DDPM family, so that its verdict differs from the U-Net's in the architecture alone (and its swept
# stage-1 rates). Prepared, not run.
BUDGETS["cpu-fair-fmnist-dit"] = replace(
    BUDGETS["cpu-fair-fmnist"],
    name="cpu-fair-fmnist-dit",
    arch="dit",
    preset="small",
    # results/stage1-lr-sweep/dit-small-ddpm.md: 5e-3 best at every snapshot, bracketed by 2e-3 and 1e-2.
    stage1=replace(BUDGETS["cpu-fair-fmnist"].stage1, lrs=(5e-3, 5e-4)),
    lr_extensions=2,
)

# One line each for --help.
BUDGET_NOTES: dict[str, str] = {
    "cpu-demo": "under 10 min on 2 cores, with a teacher that is NOT converged (the demo)",
    "cpu-fair": "the fair test on the CPU (shapes), one process per training seed, guidance at its best settings",
    "cpu-fair-fmnist": "the same on Fashion-MNIST 28px, with an external-perceptual arm and Inception features",
    "cpu-fair-v1": "the v1 protocol of results/shapes-fair (fixed CFG rows, independent-error plateau rule)",
    "cpu-fair-fmnist-v1": "the v1 protocol of results/fmnist-fair (and the v1 classifier)",
    "gpu": "Fashion-MNIST with the base U-Net on one GPU",
    "cpu-fair-fmnist-flow": "cpu-fair-fmnist for a rectified-flow U-Net with CFG-Zero* (stage-1 lr 5e-3, swept)",
    "cpu-fair-fmnist-dit": "cpu-fair-fmnist for the pixel DiT (small, patch 4; stage-1 lr 5e-3, swept)",
}
assert BUDGET_NOTES.keys() == BUDGETS.keys()
