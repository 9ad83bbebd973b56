"""Options of the experiment commands (``compare``, ``ablate``): output folder, named budget and its overrides.

Nothing here imports torch: the budgets are plain data (``budgets.py``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

from perceptual_diffusion.cli.options import add_arch_option, add_data_options, data_config
from perceptual_diffusion.config import PRESETS_OF, ModelConfig, ScheduleConfig, TrainConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.experiments.budgets import BUDGET_NOTES, BUDGETS, Budget, with_stage1


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,2`` -> [0, 2]; None when not given. An empty, negative or repeated list is refused: read as "every
    seed", ``--seeds ''`` from a launcher would start a second process gathering the report while others train."""
    if text is None:
        return None
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(
            f"--seeds must be comma-separated integers (training seeds such as 0 or 0,1), got {text!r}; leave "
            "--seeds out to run every seed"
        ) from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name distinct training seeds >= 0, got {text!r}")
    return seeds


def parse_floats(text: str, option: str) -> tuple[float, ...]:
    """``1e-3,3e-4`` -> (0.001, 0.0003); anything else is one error line naming ``option``."""
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"{option} must be comma-separated numbers such as 1e-3,3e-4, got {text!r}") from None


def check_teacher_from(path: str) -> None:
    """``--teacher-from`` must be an MSE model: the protocol fine-tunes against an MSE teacher, and the run's own
    config records its loss. Reads the weights' header only (imports torch: called when a command runs)."""
    from perceptual_diffusion.models.loading import weights_config

    config, _ = weights_config(path)
    if config.loss.kind != "mse":
        raise UserError(
            f"--teacher-from {path} was trained with the {config.loss.kind} loss, not mse: the comparison needs a "
            "converged MSE model as teacher; give an MSE run, or leave --teacher-from out to train one"
        )


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The named budget with the command line's overrides applied."""

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
    for name, value in {**overrides, "steps": 1 if args.steps is None else args.steps}.items():
        if value < 1:  # the budget checks these too; here the message can name the option as typed
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "lr_extensions", None) is not None:
        if args.lr_extensions < 0:
            raise UserError(f"--lr-extensions must be >= 0, got {args.lr_extensions}")
        overrides["lr_extensions"] = args.lr_extensions
    if args.extras is not None:
        overrides["extras"] = args.extras
    if getattr(args, "inception", None) is not None:
        overrides["inception"] = args.inception
    if getattr(args, "lora_lrs", None) is not None:  # compare --lora-lrs: the LoRA arm's learning-rate sweep
        if getattr(args, "lora_rank", None) is None:
            raise UserError("--lora-lrs sets the learning rates of the LoRA arm: give --lora-rank R too")
        overrides["lora_lrs"] = parse_floats(args.lora_lrs, "--lora-lrs")
    if getattr(args, "guidance_grids", None) is False:  # v1 rows: fixed CFG scales instead of each method's grid
        overrides["guidance_grids"] = ()
    budget = replace(BUDGETS[args.budget], **overrides)
    if args.steps is not None:  # the step cap of each stage-1 phase, in whole chunks
        chunk = min(budget.stage1.chunk_steps, args.steps)
        if args.steps % chunk:  # rounding up to whole chunks would train more steps than asked for
            raise UserError(
                f"--steps {args.steps} must be at most the budget's chunk of {chunk} steps or a multiple of it: stage "
                f"1 trains and is evaluated in whole chunks; try --steps {args.steps // chunk * chunk}"
            )
        chunks = max(math.ceil(args.steps / chunk), 1)
        stage1 = replace(budget.stage1, chunk_steps=chunk, max_chunks=chunks, min_chunks=min(2, chunks))
        budget = with_stage1(budget, stage1)
    if args.teacher_from is not None:
        if not args.teacher_from.strip():
            raise UserError("--teacher-from '' names no model; give a run directory or a weights file, or leave it out")
        check_teacher_from(args.teacher_from)
        budget = replace(budget, teacher=args.teacher_from)
    budget = _with_schedule(budget, args)
    arch = getattr(args, "arch", None) or budget.arch
    if arch != budget.arch and args.preset is None:
        raise UserError(
            f"--arch {arch} needs --preset: the budget's {budget.preset!r} is a {budget.arch} size; choose one of "
            f"{', '.join(PRESETS_OF[arch])}"
        )
    if args.preset is not None:
        if args.preset not in PRESETS_OF[arch]:
            raise UserError(f"unknown {arch} --preset {args.preset!r}; choose one of {', '.join(PRESETS_OF[arch])}")
        budget = replace(budget, arch=arch, preset=args.preset)
    if args.data is not None:
        budget = replace(budget, data=data_config(args))
    else:  # the data options without --data change the budget's own data, never go unused
        given = {
            k: v
            for k, v, unset in (
                ("path", args.data_path, None),
                ("image_size", args.image_size, None),
                ("grayscale", args.grayscale, False),
                ("on_bad_image", args.on_bad_image, "skip"),
            )
            if v != unset
        }
        if given:
            budget = replace(budget, data=replace(budget.data, **given))
    # The network the budget trains must exist at its image size, and its batch must be one a run takes: checked now
    # by the configs that type them, before the folder records settings that no rerun could then change.
    if budget.teacher is None:  # (a teacher brought by the user is its own network)
        ModelConfig(preset=budget.preset, image_size=budget.data.image_size, arch=budget.arch)
    TrainConfig(batch_size=budget.batch_size, warmup_images=0)
    return budget


def _with_schedule(budget: Budget, args: argparse.Namespace) -> Budget:
    """The budget's schedule with --schedule and its family's options over it (an option of the other family and
    an impossible value are one error line, from ``ScheduleConfig``)."""
    family = getattr(args, "schedule_family", None) or budget.schedule.family
    given = {
        k: v
        for k, v in (
            ("shift", getattr(args, "shift", None)),
            ("time_distribution", getattr(args, "time_distribution", None)),
            ("logit_mean", getattr(args, "logit_mean", None)),
            ("logit_std", getattr(args, "logit_std", None)),
        )
        if v is not None
    }
    if family != "flow" and "shift" in given:
        raise UserError(f"--shift: not an option of --schedule {family}")
    if family == budget.schedule.family and not given:
        return budget
    base = budget.schedule if family == budget.schedule.family else ScheduleConfig(family=family)
    return replace(budget, schedule=replace(base, **given))


def add_schedule_override_options(p: argparse.ArgumentParser) -> None:
    """--schedule and the flow family's options over a budget's schedule (compare, ablate)."""
    g = p.add_argument_group("schedule family (default: the budget's)")
    g.add_argument(
        "--schedule",
        dest="schedule_family",
        choices=["ddpm", "flow"],
        default=None,
        help="ddpm: the paper's zero-terminal-SNR DDPM; flow: rectified flow as in SD3 (default: the budget's)",
    )
    g.add_argument("--shift", type=float, default=None, help="flow: time shift (default 1)")
    g.add_argument(
        "--time-distribution",
        choices=["uniform", "logit-normal"],
        default=None,
        help="training-time distribution of t (default: the budget's)",
    )
    g.add_argument("--logit-mean", type=float, default=None, help="logit-normal mean (default 0)")
    g.add_argument("--logit-std", type=float, default=None, help="logit-normal std, > 0 (default 1)")


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
    add_arch_option(p, default=None)
    p.add_argument(
        "--preset",
        default=None,
        help="override the budget's model size; "
        + "; ".join(f"--arch {arch}: {', '.join(presets)}" for arch, presets in PRESETS_OF.items()),
    )
    p.add_argument("--batch-size", type=int, default=None, help="override the budget's batch size")
    p.add_argument("--eval-samples", type=int, default=None, help="override the samples per evaluation")
    p.add_argument("--curve-samples", type=int, default=None, help="override the samples per curve/sweep point")
    p.add_argument("--eval-repeats", type=int, default=None, help="override the number of sampling-seed repeats")
    p.add_argument("--training-seeds", type=int, default=None, help="override the number of training seeds")
    p.add_argument("--bootstrap", type=int, default=None, help="override the bootstrap replicates (default 1000)")
    p.add_argument(
        "--lr-extensions",
        type=int,
        default=None,
        help="extend a stage-2 branch's learning-rate sweep past the end where its best rate sits, up to N times "
        "(default: the budget's)",
    )
    p.add_argument("--seeds", default=None, help="only these training seeds, e.g. 0 or 0,1 (to run seeds in parallel)")
    p.add_argument(
        "--teacher-from",
        default=None,
        help="your own converged MSE model (run directory or weights) as teacher and starting point: skips stage 1",
    )
    p.add_argument(
        "--inception",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also measure the headline rows in Inception features (needs `make inception`; default: the budget's)",
    )
    p.add_argument(
        "--guidance-grids",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="choose each guidance method's best setting on held-out seeds (default: the budget's); "
        "--no-guidance-grids evaluates the fixed CFG rows of v1 instead",
    )
    p.add_argument(
        "--extras",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also evaluate beyond the paper: self-perceptual + CFG, autoguidance by the teacher, the null label "
        "(default: the budget's setting)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_schedule_override_options(p)
    add_data_options(p)
    p.set_defaults(data=None)
