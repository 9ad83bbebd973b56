"""Command-line options shared by several subcommands, and how they become the typed configs.

Nothing here imports torch: building the parser (and `--help`) stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from ..budgets import BUDGET_NOTES, BUDGETS, Budget
from ..config import (
    PRESETS,
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from ..errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Option groups shared by several subcommands.


def add_sample_options(
    p: argparse.ArgumentParser, steps_flag: str = "--steps", several_scales: bool = False, clip_flag: bool = True
) -> None:
    """DDIM and guidance options; ``several_scales``: --cfg-scale takes one or more values (evaluate: a row each);
    ``clip_flag=False``: no --no-clip-x0, x0 is never clamped (latent models: latents are not bounded)."""
    g = p.add_argument_group("sampling (DDIM, classifier-free guidance)")
    g.add_argument(
        steps_flag,
        dest="sample_steps",
        type=int,
        default=SampleConfig.steps,
        help="DDIM steps (default %(default)s, the paper's)",
    )
    g.add_argument(
        "--spacing",
        choices=["trailing", "leading", "linspace"],
        default=SampleConfig.spacing,
        help="timestep spacing; trailing starts at t=T-1, pure noise under zero terminal SNR (default)",
    )
    g.add_argument(
        "--eta", type=float, default=SampleConfig.eta, help="DDIM eta: 0 deterministic (default), 1 DDPM-like"
    )
    g.add_argument(
        "--cfg-scale",
        type=float,
        nargs="+" if several_scales else None,
        default=[SampleConfig.cfg_scale] if several_scales else SampleConfig.cfg_scale,
        help="classifier-free guidance scale w; 1 means no guidance and costs one forward per step"
        + ("; several values give one table row each" if several_scales else ""),
    )
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=SampleConfig.guidance_rescale,
        help="guidance rescale phi in [0, 1] (Lin et al. 2023; the paper's CFG baseline uses 0.7)",
    )
    if not clip_flag:
        p.set_defaults(clip_x0=False)
        return
    g.add_argument(
        "--no-clip-x0",
        dest="clip_x0",
        action="store_false",
        help="do not clamp the predicted x0 to [-1, 1] at each step",
    )


def sample_config(args: argparse.Namespace, cfg_scale: float | None = None) -> SampleConfig:
    """The SampleConfig of parsed sampling options (``cfg_scale`` overrides the option, for several scales)."""
    return SampleConfig(
        steps=args.sample_steps,
        spacing=args.spacing,
        eta=args.eta,
        cfg_scale=args.cfg_scale if cfg_scale is None else cfg_scale,
        guidance_rescale=args.guidance_rescale,
        clip_x0=args.clip_x0,
    )


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (no download needed)")
    g.add_argument(
        "--data",
        choices=["shapes", "fashion-mnist", "folder"],
        default="shapes",
        help="shapes: built-in procedural shapes (default); fashion-mnist: Debian's dataset-fashion-mnist "
        "package; folder: any folder of images, sub-folders as classes",
    )
    g.add_argument(
        "--data-path",
        default=None,
        help="folder of images (--data folder) or of the Fashion-MNIST IDX files "
        "(default /usr/share/datasets/fashion-mnist)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="image side in pixels (default: 16 for shapes, 28 for fashion-mnist, 32 for folders)",
    )
    g.add_argument("--grayscale", action="store_true", help="read folder images as one-channel grey")
    g.add_argument(
        "--on-bad-image",
        choices=["skip", "error"],
        default="skip",
        help="unreadable files in a folder: skip with a warning (default) or stop",
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    default_size = {"shapes": 16, "fashion-mnist": 28, "folder": 32}[args.data]
    return DataConfig(
        source=args.data,
        path=args.data_path,
        image_size=args.image_size or default_size,
        grayscale=args.grayscale,
        on_bad_image=args.on_bad_image,
    )


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every option of the pixel ``train`` command but --run-dir, --override-config and sampling."""
    add_data_options(p)
    add_model_options(p)
    add_training_options(p)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The pixel U-Net (preset, conditioning) and its diffusion schedule."""
    g = p.add_argument_group("model and diffusion")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="small",
        help="U-Net size: " + "; ".join(f"{k}: {v.note}" for k, v in PRESETS.items()),
    )
    g.add_argument("--unconditional", action="store_true", help="ignore class labels (no CFG possible)")
    add_schedule_options(g)


def add_schedule_options(g: argparse._ActionsContainer) -> None:
    """Network target and noise schedule (they build the ScheduleConfig), into a parser or an argument group."""
    g.add_argument("--prediction-type", choices=["v", "eps", "x0"], default="v", help="network target (default v)")
    g.add_argument(
        "--beta-schedule",
        choices=["scaled_linear", "linear", "cosine"],
        default="scaled_linear",
        help="beta schedule (default scaled_linear 0.00085-0.012, Stable Diffusion's)",
    )
    g.add_argument(
        "--no-zero-snr",
        dest="zero_snr",
        action="store_false",
        help="do not rescale the schedule to zero terminal SNR (the paper does)",
    )


def add_training_options(p: argparse.ArgumentParser, latent: bool = False) -> None:
    """The objective, optimisation, speed and bookkeeping groups, shared by ``train`` and ``latent train``
    (``latent``: help texts speak of captions and the empty prompt instead of labels)."""
    add_objective_options(p, latent)
    add_optimisation_options(p)
    add_speed_options(p)
    add_bookkeeping_options(p)


def add_objective_options(p: argparse.ArgumentParser, latent: bool = False) -> None:
    g = p.add_argument_group("objective")
    g.add_argument("--loss", choices=["mse", "self-perceptual"], default="mse", help="training objective")
    g.add_argument(
        "--teacher",
        default=None,
        help=(
            "self-perceptual: the frozen perceptual network, a latent MSE run directory, weights file or diffusers "
            "folder with unet/"
            if latent
            else "self-perceptual: the frozen perceptual network, an MSE run directory or weights file"
        )
        + " (its EMA weights); the online model starts from it unless --init-from says otherwise",
    )
    g.add_argument(
        "--cond-dropout",
        type=float,
        default=LossConfig.cond_dropout,
        help=(
            "probability of replacing the caption by the empty prompt, for CFG (default %(default)s)"
            if latent
            else "probability of replacing the label by the null label, for CFG (default %(default)s)"
        ),
    )
    g.add_argument(
        "--feature-layer",
        choices=["mid", "down0", "down1", "down2", "down3", "all"],
        default="mid",
        help="self-perceptual feature tap of the teacher: mid block (paper), a down block, or the sum of all",
    )
    g.add_argument(
        "--t-prime",
        choices=["uniform", "same-as-t"],
        default="uniform",
        help="distribution of t' (uniform: the paper; same-as-t is degenerate: zero loss)",
    )
    g.add_argument("--distance", choices=["mse", "l1"], default="mse", help="feature distance (default mse)")
    g.add_argument(
        "--predicted-noise",
        choices=["predicted", "true"],
        default="predicted",
        help="noise re-used in the predicted branch: eps_hat (paper) or the true eps",
    )
    g.add_argument(
        "--mse-weight",
        type=float,
        default=0.0,
        help="lambda: add lambda x the plain MSE loss to the self-perceptual loss (default 0, the paper)",
    )
    g.add_argument(
        "--feature-norm",
        choices=["none", "channel"],
        default="none",
        help="beyond the paper: unit-normalise the teacher's features over channels before the distance (LPIPS)",
    )
    g.add_argument(
        "--t-prime-max",
        type=float,
        default=1.0,
        help="beyond the paper: draw t' from the lowest fraction of noise levels only (default 1: all, the paper)",
    )


def add_optimisation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps (default %(default)s)")
    g.add_argument(
        "--batch-size",
        type=int,
        default=TrainConfig.batch_size,
        help="images per optimiser step over all processes (torchrun) and micro-batches",
    )
    g.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--warmup-images", type=int, default=TrainConfig.warmup_images, help="linear LR warm-up length")
    g.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default=TrainConfig.lr_schedule,
        help="after warm-up: constant, or a half cosine to lr x --lr-final-ratio at --steps (default %(default)s)",
    )
    g.add_argument(
        "--lr-final-ratio", type=float, default=TrainConfig.lr_final_ratio, help="cosine: final lr / lr (default 0)"
    )
    g.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=TrainConfig.grad_clip, help="max gradient norm; 0 disables")
    g.add_argument(
        "--ema-halflife-images",
        type=int,
        default=TrainConfig.ema_halflife_images,
        help="EMA half-life in images (ramped up over the first images; 0 disables EMA)",
    )
    g.add_argument("--seed", type=int, default=0, help="training seed; step s uses randomness seeded by (seed, s)")
    g.add_argument("--init-from", default=None, help="start from these weights (a run directory or weights file)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    g.add_argument(
        "--mixed-precision",
        choices=["auto", "bf16", "no"],
        default="auto",
        help="bf16 autocast; auto uses it on CUDA only",
    )


def add_speed_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed (results change only by float rounding; see docs/gpu.md)")
    g.add_argument(
        "--grad-accum",
        type=int,
        default=TrainConfig.grad_accum,
        help="micro-batches per optimiser step; --batch-size stays the global batch (default 1)",
    )
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (minutes of start-up on a CPU)")
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, slower steps"
    )


def add_bookkeeping_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=TrainConfig.log_every, help="steps between log lines")
    g.add_argument("--sample-every", type=int, default=TrainConfig.sample_every, help="steps between sample grids")
    g.add_argument(
        "--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, help="steps between checkpoints"
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=TrainConfig.keep_checkpoints,
        help="how many full training states to keep",
    )
    g.add_argument(
        "--snapshot-every",
        type=int,
        default=TrainConfig.snapshot_every,
        help="keep the EMA weights every this many steps under snapshots/ for a training curve (0: never)",
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_config(args: argparse.Namespace) -> RunConfig:
    """Build the RunConfig from parsed ``train`` options; the data decides channels and classes."""
    from ..data import data_shape

    data = data_config(args)
    channels, num_classes = data_shape(data)
    return RunConfig(
        schedule=schedule_config(args),
        model=ModelConfig(
            preset=args.preset,
            image_size=data.image_size,
            channels=channels,
            num_classes=0 if args.unconditional else num_classes,
        ),
        data=data,
        loss=loss_config(args, unconditional=args.unconditional),
        train=train_config(args),
        sample=sample_config(args),
    )


def schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    """The ScheduleConfig of parsed :func:`add_schedule_options`."""
    return ScheduleConfig(
        beta_schedule=args.beta_schedule, zero_terminal_snr=args.zero_snr, prediction_type=args.prediction_type
    )


def loss_config(args: argparse.Namespace, unconditional: bool = False) -> LossConfig:
    """The LossConfig of parsed objective options (``unconditional``: no condition dropout)."""
    return LossConfig(
        kind=args.loss,
        cond_dropout=0.0 if unconditional else args.cond_dropout,
        feature_layer=args.feature_layer,
        t_prime=args.t_prime,
        distance=args.distance,
        predicted_noise=args.predicted_noise,
        mse_weight=args.mse_weight,
        feature_norm=args.feature_norm,
        t_prime_max=args.t_prime_max,
        teacher=args.teacher,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed optimisation, speed and bookkeeping options."""
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_images=args.warmup_images,
        lr_schedule=args.lr_schedule,
        lr_final_ratio=args.lr_final_ratio,
        weight_decay=args.weight_decay,
        grad_clip=args.grad_clip,
        ema_halflife_images=args.ema_halflife_images,
        seed=args.seed,
        log_every=args.log_every,
        sample_every=args.sample_every,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        snapshot_every=args.snapshot_every,
        device=args.device,
        mixed_precision=args.mixed_precision,
        init_from=args.init_from,
        progress=args.progress,
        grad_accum=args.grad_accum,
        channels_last=args.channels_last,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
    )


def add_run_dir_options(p: argparse.ArgumentParser) -> None:
    """--run-dir and --override-config, the same on every training command."""
    p.add_argument("--run-dir", required=True, help="output folder; an existing run in it is resumed")
    p.add_argument(
        "--override-config", action="store_true", help="resume even though the configuration differs from the saved one"
    )


def check_sample_counts(args: argparse.Namespace, images: int) -> None:
    """-n, --batch-size and --seed of a sampling command that draws ``images`` images with seeds seed..seed+images-1."""
    if args.n < 1:
        raise UserError(f"-n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed <= 2**63 - 1 - images:
        raise UserError(f"--seed must be in [0, 2**63 - 1 - {images}], got {args.seed}")


# ---------------------------------------------------------------------------------------------------------------
# Subcommands.


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,2`` -> [0, 2]; None when not given."""
    if not text:
        return None
    try:
        return [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got {text!r}") from None


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides applied."""
    import math
    from dataclasses import replace

    overrides = {
        k: v
        for k, v in (
            ("finetune_steps", args.finetune_steps),
            ("eval_samples", args.eval_samples),
            ("curve_samples", args.curve_samples),
            ("eval_repeats", args.eval_repeats),
            ("training_seeds", args.training_seeds),
            ("batch_size", args.batch_size),
            ("bootstrap", args.bootstrap),
        )
        if v is not None
    }
    for name, value in {**overrides, "steps": args.steps or 1}.items():
        if value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.extras is not None:
        overrides["extras"] = args.extras
    budget = replace(BUDGETS[args.budget], **overrides)
    if args.steps is not None:  # the step cap of each stage-1 phase, in whole chunks
        chunk = min(budget.stage1.chunk_steps, args.steps)
        chunks = max(math.ceil(args.steps / chunk), 1)
        budget = replace(
            budget,
            stage1=replace(budget.stage1, chunk_steps=chunk, max_chunks=chunks, min_chunks=min(2, chunks)),
        )
    if args.teacher_from is not None:
        budget = replace(budget, teacher=args.teacher_from)
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise UserError(f"unknown --preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
        budget = replace(budget, preset=args.preset)
    if args.data is not None:
        budget = replace(budget, data=data_config(args))
    return budget


def add_budget_options(p: argparse.ArgumentParser) -> None:
    """Options of the experiment commands: output folder, budget preset and its overrides, data."""
    p.add_argument("--out", required=True, help="output folder; rerunning resumes it")
    p.add_argument(
        "--budget",
        choices=list(BUDGETS),
        default="cpu-demo",
        help="; ".join(f"{name}: {note}" for name, note in BUDGET_NOTES.items()),
    )
    p.add_argument("--steps", type=int, default=None, help="override the step cap of each stage-1 phase")
    p.add_argument("--finetune-steps", type=int, default=None, help="override the budget's stage-2 steps")
    p.add_argument("--preset", default=None, help=f"override the budget's U-Net size ({', '.join(PRESETS)})")
    p.add_argument("--batch-size", type=int, default=None, help="override the budget's batch size")
    p.add_argument("--eval-samples", type=int, default=None, help="override the samples per evaluation")
    p.add_argument("--curve-samples", type=int, default=None, help="override the samples per curve/sweep point")
    p.add_argument("--eval-repeats", type=int, default=None, help="override the number of sampling-seed repeats")
    p.add_argument("--training-seeds", type=int, default=None, help="override the number of training seeds")
    p.add_argument("--bootstrap", type=int, default=None, help="override the bootstrap replicates (default 1000)")
    p.add_argument("--seeds", default=None, help="only these training seeds, e.g. 0 or 0,1 (to run seeds in parallel)")
    p.add_argument(
        "--teacher-from",
        default=None,
        help="your own converged MSE model (run directory or weights) as teacher and starting point: skips stage 1",
    )
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also evaluate beyond the paper: self-perceptual + CFG, autoguidance by the teacher, the null label "
        "(default: the budget's setting)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_data_options(p)
    p.set_defaults(data=None)


# ---------------------------------------------------------------------------------------------------------------
# Sampling settings: the run's own unless an option says otherwise; bounds on image counts.

# The most images one sampling or evaluation command draws. It bounds -n as --seed is bounded: far above any real
# use (FID is usually measured on 50,000), far below what would exhaust memory in per-image bookkeeping alone.
MAX_IMAGES = 10_000_000

# (option dest, SampleConfig field) of the sampling options whose default is the run's own setting.
_RUN_SAMPLING = (
    ("sample_steps", "steps"),
    ("spacing", "spacing"),
    ("eta", "eta"),
    ("guidance_rescale", "guidance_rescale"),
    ("clip_x0", "clip_x0"),
)


def use_run_sampling_defaults(p: argparse.ArgumentParser) -> None:
    """Make the sampling options of ``p`` (added by ``add_sample_options``) default to the model's own settings,
    the ``sample`` section of its run config, and say so in their help."""
    dests = {dest for dest, _ in _RUN_SAMPLING}
    for action in p._actions:
        if action.dest in dests:
            action.default = None
            # The fixed default the help named no longer holds.
            text = re.sub(r" \(default(?: %\(default\)s)?[^)]*\)", "", action.help or "")
            action.help = f"{text} (default: the model's own sampling setting)"


def run_sample_config(args: argparse.Namespace, run: SampleConfig, cfg_scale: float | None = None) -> SampleConfig:
    """The model's own sampling settings (``run``), with the options given on the command line over them."""
    given = {field: getattr(args, dest) for dest, field in _RUN_SAMPLING if getattr(args, dest, None) is not None}
    scale = args.cfg_scale if cfg_scale is None else cfg_scale
    return dataclasses.replace(run, cfg_scale=scale, **given)


def describe_sampler(cfg: SampleConfig, guidance: bool = True) -> str:
    """One phrase naming every sampler setting that changes the numbers (``guidance``: the CFG scale too, and the
    rescale where guidance is on), for a line beside samples or a table of metrics."""
    text = f"DDIM {cfg.steps} steps, {cfg.spacing} spacing, eta {cfg.eta:g}, clip x0 {'on' if cfg.clip_x0 else 'off'}"
    if guidance:
        text += f", CFG scale {cfg.cfg_scale:g}"
    if cfg.guidance_rescale and (not guidance or cfg.cfg_scale != 1):
        text += f", guidance rescale {cfg.guidance_rescale:g}"
    return text


def check_image_count(n: int, option: str = "-n") -> None:
    """Bound a number of images before anything is allocated for it."""
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"{option} must be in [1, {MAX_IMAGES}], got {n}")


def add_report_to_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default="none",
        help="also log losses, learning rate, throughput and sample grids for TensorBoard, in RUN_DIR/tensorboard "
        "(needs `pip install tensorboard`); log.jsonl is written either way",
    )
