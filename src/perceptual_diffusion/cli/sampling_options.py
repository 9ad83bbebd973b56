"""The sampling options (DDIM, guidance), defaults that are the model's own settings, and bounds on image counts.

Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import re

from perceptual_diffusion.cli.options import choices
from perceptual_diffusion.config import SampleConfig, ScheduleConfig, check_sampler
from perceptual_diffusion.errors import UserError

# The most images one sampling or evaluation command draws. It bounds -n as --seed is bounded: far above any real
# use (FID is usually measured on 50,000), far below what would exhaust memory in per-image bookkeeping alone.
MAX_IMAGES = 10_000_000


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
        choices=choices(SampleConfig, "spacing"),
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


def add_guidance_options(p: argparse.ArgumentParser) -> None:
    """The guidance method, its interval, APG's settings and --guide (autoguidance), for commands that sample a
    trained model (``sample``, ``evaluate``); call before ``use_run_sampling_defaults``."""
    g = p.add_argument_group("guidance method (core/guidance.py; the scale is --cfg-scale)")
    g.add_argument(
        "--guidance",
        choices=choices(SampleConfig, "guidance"),
        default=SampleConfig.guidance,
        help="how the conditional and the guide prediction combine: cfg (classifier-free guidance) or apg "
        "(adaptive projected guidance, Sadat et al. 2024) (default %(default)s)",
    )
    g.add_argument(
        "--guidance-interval",
        nargs=2,
        type=float,
        metavar=("SIGMA_LO", "SIGMA_HI"),
        default=None,
        help="guide only at EDM noise levels sigma_t/alpha_t in [SIGMA_LO, SIGMA_HI] (Kynkaanniemi et al. 2024; "
        "SIGMA_HI inf: no upper bound, the pure-noise first step included); elsewhere one forward, no guidance "
        "(default: everywhere)",
    )
    g.add_argument(
        "--apg-eta",
        type=float,
        default=SampleConfig.apg_eta,
        help="APG: weight of the guidance part parallel to the conditional x0 (default %(default)s, the paper's)",
    )
    g.add_argument(
        "--apg-momentum",
        type=float,
        default=SampleConfig.apg_momentum,
        help="APG: momentum beta of the guidance's running average, in (-1, 1); negative is the paper's reverse "
        "momentum, 0 off (default %(default)s)",
    )
    g.add_argument(
        "--apg-threshold",
        dest="apg_norm_threshold",
        type=float,
        default=SampleConfig.apg_norm_threshold,
        help="APG: clip the x0-space guidance difference at this RMS per element, 0: no clipping (default "
        "%(default)s: the paper's L2 norm r = 15 on a 4x128x128 latent, per element)",
    )
    g.add_argument(
        "--guide",
        default=None,
        metavar="RUN_OR_WEIGHTS",
        help="autoguidance (Karras et al. 2024): guide with this weaker model of the same task on the same "
        "condition instead of the model's own null label",
    )


# (option dest, SampleConfig field) of the sampling options whose default is the run's own setting.
_RUN_SAMPLING = (
    ("sample_steps", "steps"),
    ("spacing", "spacing"),
    ("eta", "eta"),
    ("guidance_rescale", "guidance_rescale"),
    ("clip_x0", "clip_x0"),
    ("guidance", "guidance"),
    ("apg_eta", "apg_eta"),
    ("apg_momentum", "apg_momentum"),
    ("apg_norm_threshold", "apg_norm_threshold"),
)
_INTERVAL = "guidance_interval"  # one option, two fields: guidance_sigma_min and guidance_sigma_max


def sampling_options_given(args: argparse.Namespace) -> bool:
    """Whether any option that overrides the model's own sampling settings was given."""
    return any(getattr(args, dest, None) is not None for dest in (*(d for d, _ in _RUN_SAMPLING), _INTERVAL))


def use_run_sampling_defaults(p: argparse.ArgumentParser) -> None:
    """Make the sampling options of ``p`` (added by ``add_sample_options``) default to the model's own settings,
    the ``sample`` section of its run config, and say so in their help."""
    dests = {dest for dest, _ in _RUN_SAMPLING} | {_INTERVAL}
    for action in p._actions:
        if action.dest in dests:
            action.default = None
            # The fixed default the help named no longer holds.
            text = re.sub(r" \(default(?: %\(default\)s)?[^)]*\)", "", action.help or "")
            action.help = f"{text} (default: the model's own sampling setting)"


def run_sample_config(
    args: argparse.Namespace,
    run: SampleConfig,
    cfg_scale: float | None = None,
    max_steps: int | None = None,
    schedule: ScheduleConfig | None = None,
) -> SampleConfig:
    """The model's own sampling settings (``run``), with the options given on the command line over them;
    ``max_steps`` (the model's training timesteps) bounds the DDIM steps, and what the model's ``schedule`` cannot
    sample (eta, clipping or another spacing under flow) is one error line before any work."""
    given = {field: getattr(args, dest) for dest, field in _RUN_SAMPLING if getattr(args, dest, None) is not None}
    if getattr(args, _INTERVAL, None) is not None:
        low, high = args.guidance_interval
        given |= {"guidance_sigma_min": low, "guidance_sigma_max": None if high == float("inf") else high}
    scale = args.cfg_scale if cfg_scale is None else cfg_scale
    config = dataclasses.replace(run, cfg_scale=scale, **given)
    if max_steps is not None and config.steps > max_steps:
        raise UserError(f"--steps {config.steps} exceeds the model's {max_steps} timesteps")
    if schedule is not None:
        check_sampler(config, schedule)
    return config


def describe_sampler(cfg: SampleConfig, guidance: bool = True, guide: str | None = None, flow: bool = False) -> str:
    """One phrase naming every sampler setting that changes the numbers, for a line beside samples or a table of
    metrics: ``guidance`` the scale too (False: the scale is given per row), and where guidance acts the method's
    settings, its interval and the rescale; ``guide``: the autoguidance guide model; ``flow``: a flow model's
    sampler (Euler on diffusers' grid)."""
    text = f"DDIM {cfg.steps} steps, {cfg.spacing} spacing, eta {cfg.eta:g}, clip x0 {'on' if cfg.clip_x0 else 'off'}"
    if not cfg.clip_x0 and cfg.eta == 0 and flow:
        text = f"Euler {cfg.steps} steps (FlowMatchEuler grid)"
    name = cfg.guidance.upper()
    if guidance:
        text += f", {name} scale {cfg.cfg_scale:g}"
    elif cfg.guidance != "cfg":
        text += f", {name}"
    if guidance and cfg.cfg_scale == 1:
        return text  # no guidance: nothing else changes the numbers
    if cfg.guidance == "cfg-zero-star":
        text += f" (zero-init {cfg.zero_init_steps} steps)"
    if cfg.guidance == "apg":
        text += f" (eta {cfg.apg_eta:g}, momentum {cfg.apg_momentum:g}, threshold {cfg.apg_norm_threshold:.4g} RMS)"
    if guide is not None:
        text += f", autoguidance by {guide}"
    if cfg.guidance_sigma_min > 0 or cfg.guidance_sigma_max is not None:
        high = "inf" if cfg.guidance_sigma_max is None else f"{cfg.guidance_sigma_max:g}"
        text += f", guidance interval sigma in [{cfg.guidance_sigma_min:g}, {high}]"
    if cfg.guidance_rescale:
        text += f", guidance rescale {cfg.guidance_rescale:g}"
    return text


def check_image_count(n: int, option: str = "-n") -> None:
    """Bound a number of images before anything is allocated for it."""
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"{option} must be in [1, {MAX_IMAGES}], got {n}")


def check_sample_counts(args: argparse.Namespace, images: int) -> None:
    """-n, --batch-size and --seed of a sampling command that draws ``images`` images with seeds seed..seed+images-1."""
    if args.n < 1:
        raise UserError(f"-n must be >= 1, got {args.n}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed <= 2**63 - 1 - images:
        raise UserError(f"--seed must be in [0, 2**63 - 1 - {images}], got {args.seed}")
