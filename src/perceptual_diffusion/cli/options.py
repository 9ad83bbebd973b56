"""Command-line options shared by several subcommands, and how they become the typed configs.

Nothing here imports torch: building the parser (and `--help`) stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from perceptual_diffusion.config import (
    PRESETS_OF,
    SOURCES,
    DataConfig,
    LoraConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from perceptual_diffusion.errors import UserError


def choices(config: type, field: str) -> list[str]:
    """The allowed values of a config field, read from its ``Literal`` type: the dataclass is the one list."""
    return list(typing.get_args(typing.get_type_hints(config)[field]))


def config_from_args(config: type, args: argparse.Namespace, **explicit: Any) -> Any:
    """A config dataclass from the parsed options whose destinations are named like its fields (others keep their
    defaults), with ``explicit`` values for fields whose option is named differently or computed."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config) if hasattr(args, f.name)}
    return config(**{**given, **explicit})


# ---------------------------------------------------------------------------------------------------------------
# Option groups shared by several subcommands.


def add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (no download needed)")
    g.add_argument(
        "--data",
        choices=choices(DataConfig, "source"),
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
    add_on_bad_image_option(g, DataConfig, "unreadable files in a folder")


def add_on_bad_image_option(g: argparse._ActionsContainer, config: type, what: str) -> None:
    """--on-bad-image, the same for image folders and caption data."""
    g.add_argument(
        "--on-bad-image",
        choices=choices(config, "on_bad_image"),
        default="skip",
        help=f"{what}: skip with a warning (default) or stop",
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    default_size = SOURCES[args.data].default_size
    return DataConfig(
        source=args.data,
        path=args.data_path,
        image_size=default_size if args.image_size is None else args.image_size,  # 0 is refused, not the default
        grayscale=args.grayscale,
        on_bad_image=args.on_bad_image,
    )


def add_train_options(p: argparse.ArgumentParser) -> None:
    """Every option of the pixel ``train`` command but --run-dir, --override-config and sampling."""
    add_data_options(p)
    add_model_options(p)
    add_training_options(p)


def preset_help() -> str:
    """Every architecture's presets with their notes, for --preset's help."""
    return " | ".join(
        f"{arch}: " + "; ".join(f"{k}: {v.note}" for k, v in presets.items()) for arch, presets in PRESETS_OF.items()
    )


def preset_names() -> list[str]:
    return sorted({name for presets in PRESETS_OF.values() for name in presets})


def add_arch_option(g: argparse._ActionsContainer, default: str | None = "unet") -> None:
    g.add_argument(
        "--arch",
        choices=choices(ModelConfig, "arch"),
        default=default,
        help="denoiser architecture: unet (diffusers UNet2DModel, default) or dit (a class-conditional pixel DiT, "
        "diffusers DiTTransformer2DModel)" + ("" if default else "; default: the budget's"),
    )


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The pixel denoiser (architecture, preset, conditioning) and its diffusion schedule."""
    g = p.add_argument_group("model and diffusion")
    add_arch_option(g)
    g.add_argument(
        "--preset",
        choices=preset_names(),
        default="small",
        help="size preset of --arch (default small): " + preset_help(),
    )
    g.add_argument("--unconditional", action="store_true", help="ignore class labels (no CFG possible)")
    add_schedule_options(g)


def add_schedule_options(g: argparse._ActionsContainer) -> None:
    """Network target and noise schedule (they build the ScheduleConfig), into a parser or an argument group. Each
    family's own options default to None, so that one given under the other family is refused by name."""
    g.add_argument(
        "--schedule",
        dest="schedule_family",
        choices=choices(ScheduleConfig, "family"),
        default="ddpm",
        help="the forward process: ddpm, the paper's zero-terminal-SNR DDPM (default), or flow, rectified flow as in "
        "SD3 (x_s = (1 - s) x0 + s eps, velocity eps - x0, Euler sampling on diffusers' FlowMatchEuler grid)",
    )
    g.add_argument(
        "--prediction-type",
        choices=choices(ScheduleConfig, "prediction_type"),
        default="v",
        help="network target (default v: the family's velocity)",
    )
    g.add_argument(
        "--beta-schedule",
        choices=choices(ScheduleConfig, "beta_schedule"),
        default=None,
        help="ddpm: beta schedule (default scaled_linear 0.00085-0.012, Stable Diffusion's)",
    )
    g.add_argument(
        "--no-zero-snr",
        dest="zero_snr",
        action="store_const",
        const=False,
        default=None,
        help="ddpm: do not rescale the schedule to zero terminal SNR (the paper does)",
    )
    g.add_argument(
        "--shift",
        type=float,
        default=None,
        help="flow: time shift s = shift u / (1 + (shift - 1) u) in training and sampling (default 1: none; SD3 uses 3 "
        "at 1024 px)",
    )
    g.add_argument(
        "--time-distribution",
        choices=choices(ScheduleConfig, "time_distribution"),
        default=None,
        help="training-time distribution of t: uniform (default) or logit-normal (SD3's; --logit-mean, --logit-std)",
    )
    g.add_argument("--logit-mean", type=float, default=None, help="logit-normal mean (default 0)")
    g.add_argument("--logit-std", type=float, default=None, help="logit-normal std, > 0 (default 1)")


def add_training_options(p: argparse.ArgumentParser, latent: bool = False) -> None:
    """The objective, optimisation, speed and bookkeeping groups, shared by ``train`` and ``latent train``
    (``latent``: help texts speak of captions and the empty prompt instead of labels)."""
    add_objective_options(p, latent)
    add_lora_options(p)
    add_optimisation_options(p)
    add_speed_options(p)
    add_bookkeeping_options(p)


def add_objective_options(p: argparse.ArgumentParser, latent: bool = False) -> None:
    g = p.add_argument_group("objective")
    g.add_argument(
        "--loss",
        choices=choices(LossConfig, "kind"),
        default="mse",
        help="training objective (external-perceptual: the control, a separately trained classifier's features)",
    )
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
        choices=choices(LossConfig, "feature_layer"),
        default="mid",
        help="self-perceptual feature tap of the teacher: mid block (paper), a down block, or the sum of all",
    )
    g.add_argument(
        "--feature-blocks",
        type=feature_blocks,
        default=(),
        metavar="K[,K..]",
        help=(
            "an SD3 folder: self-perceptual taps after the first K joint transformer blocks, summed"
            if latent
            else "--arch dit: self-perceptual taps after the first K transformer blocks, summed"
        )
        + " (default: the middle block, n // 2 of n, the analogue of the paper's mid-block)",
    )
    g.add_argument(
        "--t-prime",
        choices=choices(LossConfig, "t_prime"),
        default="uniform",
        help="distribution of t' (uniform: the paper; same-as-t is degenerate: zero loss)",
    )
    g.add_argument(
        "--distance", choices=choices(LossConfig, "distance"), default="mse", help="feature distance (default mse)"
    )
    g.add_argument(
        "--predicted-noise",
        choices=choices(LossConfig, "predicted_noise"),
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
        choices=choices(LossConfig, "feature_norm"),
        default="none",
        help="beyond the paper: unit-normalise the teacher's features over channels before the distance (LPIPS)",
    )
    g.add_argument(
        "--t-prime-max",
        type=float,
        default=1.0,
        help="beyond the paper: draw t' from the lowest fraction of noise levels only (default 1: all, the paper)",
    )
    if latent:  # the external-perceptual network is a pixel classifier of the built-in data; LPL needs a VAE
        add_lpl_options(p)
        return
    g.add_argument(
        "--perceptual-net",
        default=None,
        help="external-perceptual: the frozen network, a shipped classifier (shapes-perceptual, "
        "fashion-mnist-perceptual) or a train-classifier weights file (default: the one shipped for --data)",
    )
    g.add_argument(
        "--perceptual-layer",
        choices=choices(LossConfig, "perceptual_layer"),
        default=LossConfig.perceptual_layer,
        help="external-perceptual: the network's layer whose features are compared (default %(default)s, a middle one)",
    )


def add_lpl_options(p: argparse.ArgumentParser) -> None:
    """The Latent Perceptual Loss (Berrada et al., arXiv 2411.04873), ``--loss latent-perceptual``."""
    g = p.add_argument_group("latent perceptual loss (--loss latent-perceptual: MSE + w x LPL on the VAE decoder)")
    g.add_argument("--lpl-weight", type=float, default=LossConfig.lpl_weight, help="w (default %(default)s)")
    g.add_argument("--lpl-snr-min", type=float, default=LossConfig.lpl_snr_min, help="LPL only where SNR(t) >= this")
    g.add_argument("--lpl-up-blocks", type=int, default=None, help="decoder up blocks tapped (default: all)")
    g.add_argument(
        "--lpl-outlier-quantile", type=float, default=LossConfig.lpl_outlier_quantile, help="0: no outlier masking"
    )
    g.add_argument(
        "--lpl-norm",
        choices=choices(LossConfig, "lpl_norm"),
        default=LossConfig.lpl_norm,
        help="feature normalisation: per position over channels (default) or per channel over positions",
    )
    g.add_argument(
        "--lpl-layer-weights",
        choices=choices(LossConfig, "lpl_layer_weights"),
        default=LossConfig.lpl_layer_weights,
        help="weights of the decoder layers: uniform (default) or the reference code's power law",
    )


def add_lora_options(p: argparse.ArgumentParser, rank_help: str | None = None) -> argparse._ArgumentGroup:
    """A LoRA adapter trained through PEFT instead of every weight (``config.LoraConfig``, ``models/lora.py``);
    ``rank_help`` words --lora-rank for another command (``compare``). Returns the group, for more options."""
    g = p.add_argument_group("LoRA (train a low-rank adapter through PEFT; the base stays frozen)")
    g.add_argument(
        "--lora-rank",
        type=int,
        default=None,
        help=rank_help
        or "train a LoRA adapter of this rank (>= 1) on the base (--init-from, or the teacher of --loss "
        "self-perceptual; latent runs: the pretrained U-Net), instead of every weight; a self-perceptual run whose "
        "teacher is the base uses the base itself as teacher (adapter off): no second copy",
    )
    g.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha, > 0 (scale alpha / rank; default: rank)")
    g.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapter's input, in [0, 1)")
    g.add_argument(
        "--lora-targets",
        default=None,
        help="comma-separated module names to adapt (default: the attention projections to_q,to_k,to_v,to_out.0 "
        "where the network has attention levels, else the ResNet convs and time-embedding linears)",
    )
    return g


def lora_config(args: argparse.Namespace) -> LoraConfig | None:
    """The LoraConfig of parsed :func:`add_lora_options` (None without --lora-rank; its other options need it)."""
    rank = getattr(args, "lora_rank", None)
    others = [
        flag
        for flag, dest in (
            ("--lora-alpha", "lora_alpha"),
            ("--lora-dropout", "lora_dropout"),
            ("--lora-targets", "lora_targets"),
        )
        if getattr(args, dest, None) is not None
    ]
    if rank is None:
        if others:
            raise UserError(f"{', '.join(others)} set(s) up a LoRA adapter: give --lora-rank R too")
        return None
    targets = None if args.lora_targets is None else tuple(t.strip() for t in args.lora_targets.split(","))
    fields = {"alpha": args.lora_alpha, "targets": targets}
    if args.lora_dropout is not None:
        fields["dropout"] = args.lora_dropout
    return LoraConfig(rank=rank, **fields)


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
        choices=choices(TrainConfig, "lr_schedule"),
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
        choices=choices(TrainConfig, "mixed_precision"),
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


def feature_blocks(text: str) -> tuple[int, ...]:
    """--feature-blocks K[,K..] as the integers of ``LossConfig.feature_blocks``."""
    try:
        return tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block numbers like 3 or 1,3, got {text!r}") from None


def run_config(args: argparse.Namespace) -> RunConfig:
    """Build the RunConfig from parsed ``train`` options; the data decides channels and classes."""
    from perceptual_diffusion.data.datasets import data_shape

    data = data_config(args)
    channels, num_classes = data_shape(data)
    schedule = schedule_config(args)
    return RunConfig(
        schedule=schedule,
        model=ModelConfig(
            arch=args.arch,
            preset=args.preset,
            image_size=data.image_size,
            channels=channels,
            num_classes=0 if args.unconditional else num_classes,
        ),
        data=data,
        loss=loss_config(args, unconditional=args.unconditional),
        train=train_config(args),
        sample=sample_config(args, schedule=schedule),
        lora=lora_config(args),
    )


# The options of one schedule family only: (option, dest, family).
_FAMILY_OPTIONS = (
    ("--beta-schedule", "beta_schedule", "ddpm"),
    ("--no-zero-snr", "zero_snr", "ddpm"),
    ("--shift", "shift", "flow"),
)


def schedule_config(args: argparse.Namespace) -> ScheduleConfig:
    """The ScheduleConfig of parsed :func:`add_schedule_options`; an option of the other family is one error."""
    family = getattr(args, "schedule_family", "ddpm")
    wrong = [flag for flag, dest, owner in _FAMILY_OPTIONS if owner != family and getattr(args, dest, None) is not None]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: not an option of --schedule {family}")
    fields = {
        "family": family,
        "prediction_type": args.prediction_type,
        "beta_schedule": getattr(args, "beta_schedule", None),
        "zero_terminal_snr": getattr(args, "zero_snr", None),
        "shift": getattr(args, "shift", None),
        "time_distribution": getattr(args, "time_distribution", None),
        "logit_mean": getattr(args, "logit_mean", None),
        "logit_std": getattr(args, "logit_std", None),
    }
    return ScheduleConfig(**{k: v for k, v in fields.items() if v is not None})


def loss_config(args: argparse.Namespace, unconditional: bool = False) -> LossConfig:
    """The LossConfig of parsed objective options (``unconditional``: no condition dropout)."""
    return config_from_args(LossConfig, args, kind=args.loss, cond_dropout=0.0 if unconditional else args.cond_dropout)


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed optimisation, speed and bookkeeping options (each named like its field)."""
    return config_from_args(TrainConfig, args)


def add_run_dir_options(p: argparse.ArgumentParser) -> None:
    """--run-dir and --override-config, the same on every training command."""
    p.add_argument("--run-dir", required=True, help="output folder; an existing run in it is resumed")
    p.add_argument(
        "--override-config", action="store_true", help="resume even though the configuration differs from the saved one"
    )


def add_report_to_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--report-to",
        choices=["none", "tensorboard"],
        default="none",
        help="also log losses, learning rate, throughput and sample grids for TensorBoard, in RUN_DIR/tensorboard "
        "(needs `pip install tensorboard`); log.jsonl is written either way",
    )


def sample_config(
    args: argparse.Namespace, cfg_scale: float | None = None, schedule: ScheduleConfig | None = None
) -> SampleConfig:
    """The SampleConfig of parsed sampling options (``cfg_scale`` overrides the option, for several scales). Under
    a flow ``schedule`` x0 is never clipped (Euler has no clipping), so --no-clip-x0's default is off there."""
    flow = schedule is not None and schedule.family == "flow"
    return SampleConfig(
        steps=args.sample_steps,
        spacing=args.spacing,
        eta=args.eta,
        cfg_scale=args.cfg_scale if cfg_scale is None else cfg_scale,
        guidance_rescale=args.guidance_rescale,
        clip_x0=args.clip_x0 and not flow,
    )
