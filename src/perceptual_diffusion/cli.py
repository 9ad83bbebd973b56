"""Command line: a thin layer over the function API (``training.train``, ``sampling.sample``, ``experiment``).

Every subcommand turns its options into the typed configs and calls one function. Bad input raises ``UserError``,
printed here as one line with exit code 2; nothing below this module prints tracebacks for user mistakes.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from .config import DataConfig, LossConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig
from .errors import TrainingDiverged, UserError
from .networks import PRESETS

# ---------------------------------------------------------------------------------------------------------------
# Option groups shared by several subcommands.


def add_sample_options(p: argparse.ArgumentParser, steps_flag: str = "--steps") -> None:
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
        default=SampleConfig.cfg_scale,
        help="classifier-free guidance scale w; 1 means no guidance and costs one forward per step",
    )
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=SampleConfig.guidance_rescale,
        help="guidance rescale phi in [0, 1] (Lin et al. 2023; the paper's CFG baseline uses 0.7)",
    )
    g.add_argument(
        "--no-clip-x0",
        dest="clip_x0",
        action="store_false",
        help="do not clamp the predicted x0 to [-1, 1] at each step",
    )


def sample_config(args: argparse.Namespace) -> SampleConfig:
    return SampleConfig(
        steps=args.sample_steps,
        spacing=args.spacing,
        eta=args.eta,
        cfg_scale=args.cfg_scale,
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
    add_data_options(p)
    g = p.add_argument_group("model and diffusion")
    g.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="small",
        help="U-Net size: " + "; ".join(f"{k}: {v.note}" for k, v in PRESETS.items()),
    )
    g.add_argument("--unconditional", action="store_true", help="ignore class labels (no CFG possible)")
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
    g = p.add_argument_group("objective")
    g.add_argument("--loss", choices=["mse", "self-perceptual"], default="mse", help="training objective")
    g.add_argument(
        "--teacher",
        default=None,
        help="self-perceptual: the frozen perceptual network, an MSE run directory or weights file "
        "(its EMA weights); the online model starts from it unless --init-from says otherwise",
    )
    g.add_argument(
        "--cond-dropout",
        type=float,
        default=LossConfig.cond_dropout,
        help="probability of replacing the label by the null label, for CFG (default %(default)s)",
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
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=TrainConfig.lr, help="AdamW learning rate (default %(default)s)")
    g.add_argument("--warmup-images", type=int, default=TrainConfig.warmup_images, help="linear LR warm-up length")
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
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_config(args: argparse.Namespace) -> RunConfig:
    """Build the RunConfig from parsed ``train`` options; the data decides channels and classes."""
    from .data import data_shape

    data = data_config(args)
    channels, num_classes = data_shape(data)
    return RunConfig(
        schedule=ScheduleConfig(
            beta_schedule=args.beta_schedule, zero_terminal_snr=args.zero_snr, prediction_type=args.prediction_type
        ),
        model=ModelConfig(
            preset=args.preset,
            image_size=data.image_size,
            channels=channels,
            num_classes=0 if args.unconditional else num_classes,
        ),
        data=data,
        loss=LossConfig(
            kind=args.loss,
            cond_dropout=0.0 if args.unconditional else args.cond_dropout,
            feature_layer=args.feature_layer,
            t_prime=args.t_prime,
            distance=args.distance,
            predicted_noise=args.predicted_noise,
            mse_weight=args.mse_weight,
            teacher=args.teacher,
        ),
        train=TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_images=args.warmup_images,
            weight_decay=args.weight_decay,
            grad_clip=args.grad_clip,
            ema_halflife_images=args.ema_halflife_images,
            seed=args.seed,
            log_every=args.log_every,
            sample_every=args.sample_every,
            checkpoint_every=args.checkpoint_every,
            keep_checkpoints=args.keep_checkpoints,
            device=args.device,
            mixed_precision=args.mixed_precision,
            init_from=args.init_from,
            progress=args.progress,
        ),
        sample=sample_config(args),
    )


# ---------------------------------------------------------------------------------------------------------------
# Subcommands.


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train

    result = train(run_config(args), args.run_dir, override_config=args.override_config)
    print(
        f"trained {result.run_dir} to step {result.step} ({result.images_per_second:.0f} images/s); "
        f"weights: {Path(result.run_dir) / 'model.safetensors'}"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .checkpoint import atomic_write
    from .data import to_uint8
    from .grid import save_grid
    from .sampling import labels_for_seeds, sample
    from .training import load_model, resolve_device

    if args.n < 1:
        raise UserError(f"-n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device)
    cfg = sample_config(args)
    if cfg.steps > config.schedule.num_train_timesteps:
        raise UserError(f"--steps {cfg.steps} exceeds the model's {config.schedule.num_train_timesteps} timesteps")
    seeds = list(range(args.seed, args.seed + args.n))
    k = model.num_classes
    if args.label == "none" or k == 0:
        labels = None
        if args.label not in ("none", "random") and k == 0:
            raise UserError("this model is unconditional: use --label none")
    elif args.label == "random":
        labels = labels_for_seeds(seeds, torch.full((k,), 1.0 / k))
    elif args.label == "rows":
        labels = torch.arange(args.n) % k
    else:
        try:
            label = int(args.label)
        except ValueError:
            raise UserError(f"--label must be none, random, rows or a class index, got {args.label!r}") from None
        if not 0 <= label < k:
            raise UserError(f"--label {label} is out of range: this model has classes 0..{k - 1}")
        labels = torch.full((args.n,), label)
    if labels is None and cfg.cfg_scale != 1.0:
        raise UserError("unconditional sampling (--label none) cannot use CFG; set --cfg-scale 1")
    images = sample(model, seeds, labels, cfg, args.batch_size, device, progress=True)
    if args.out:
        save_grid(
            images, Path(args.out), nrow=args.nrow or (k if labels is not None and args.label == "rows" else None)
        )
        print(f"wrote {args.out}")
    if args.npz:
        arr = to_uint8(images)
        lab = np.asarray(labels if labels is not None else np.full(args.n, -1))

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, images=arr, labels=lab, seeds=np.asarray(seeds))

        atomic_write(Path(args.npz), write)
        print(f"wrote {args.npz} ({len(arr)} images, uint8 NHWC)")


def cmd_demo(args: argparse.Namespace) -> None:
    from .experiment import run_demo

    run_demo(Path(args.out), steps=args.steps, finetune_steps=args.finetune_steps, device=args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perceptual-diffusion",
        description="Train diffusion models with MSE and the self-perceptual objective (Lin & Yang 2024), "
        "sample with or without classifier-free guidance, and compare them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (MSE, or self-perceptual fine-tuning from an MSE teacher)",
        description="Train or resume a run. Rerunning the same command in the same --run-dir resumes "
        "from its last checkpoint.",
    )
    p.add_argument("--run-dir", required=True, help="output folder; an existing run in it is resumed")
    p.add_argument(
        "--override-config", action="store_true", help="resume even though the configuration differs from the saved one"
    )
    add_train_options(p)
    add_sample_options(p, steps_flag="--sample-steps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained model into a PNG grid and/or .npz",
        description="Sample with DDIM. Image i uses seed --seed + i, so results do not depend on batch size.",
    )
    p.add_argument("model", help="a run directory or a model.safetensors weights file")
    p.add_argument("-n", type=int, default=64, help="number of images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument(
        "--label",
        default="rows",
        help="class: 'rows' (class i in column i, default), 'random' (uniform), an index, or 'none' "
        "(unconditional, via the null label)",
    )
    p.add_argument("--out", default="samples.png", help="PNG grid to write ('' for none)")
    p.add_argument("--npz", default=None, help="also write images, labels and seeds to this .npz")
    p.add_argument("--nrow", type=int, default=None, help="images per grid row")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_sample_options(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser(
        "demo",
        help="the main job: the two-stage recipe on the built-in shapes data, CPU-sized",
        description="Stage 1 trains an MSE model on the procedural shapes; stage 2 fine-tunes copies of "
        "it with the self-perceptual loss and with MSE for the same steps; writes sample "
        "grids with and without CFG into --out. Rerunning resumes finished stages.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="stage-1 MSE steps (default: the cpu-demo budget)")
    p.add_argument("--finetune-steps", type=int, default=None, help="stage-2 steps for each branch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.func
    warnings.filterwarnings("default", category=UserWarning, module="perceptual_diffusion")
    try:
        handler(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
