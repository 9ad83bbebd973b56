"""The pixel-space commands: each turns parsed options into typed configs and calls one function of the API.

Heavy modules (torch, diffusers, the training loop) are imported inside each command, never at module level: the
parser imports this module to register the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from perceptual_diffusion.cli.budget_options import budget_from_args, parse_seeds
from perceptual_diffusion.cli.options import lora_config, run_config
from perceptual_diffusion.cli.sampling_options import (
    check_image_count,
    check_sample_counts,
    describe_sampler,
    run_sample_config,
    sampling_options_given,
)
from perceptual_diffusion.config import MAX_SEED
from perceptual_diffusion.errors import UserError


def cmd_train(args: argparse.Namespace) -> None:
    from perceptual_diffusion.cli.checks import train_and_report
    from perceptual_diffusion.training.loop import train

    train_and_report(train, run_config(args), args)


def cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from perceptual_diffusion.cli.checks import (
        check_finite_model,
        check_finite_samples,
        check_fits_in_memory,
        check_output_file,
    )
    from perceptual_diffusion.core.sampling import sample
    from perceptual_diffusion.data.datasets import to_uint8
    from perceptual_diffusion.data.grid import save_grid
    from perceptual_diffusion.models.loading import load_model
    from perceptual_diffusion.runtime.checkpoint import atomic_write
    from perceptual_diffusion.training.loop import resolve_device

    check_sample_counts(args, args.n)
    check_image_count(args.n)
    if args.nrow is not None and not 1 <= args.nrow <= args.n:
        raise UserError(f"--nrow must be >= 1 and at most -n ({args.n}), got {args.nrow}")
    if not args.out and not args.npz:
        raise UserError("nothing to write: --out '' and no --npz; give --out GRID.png and/or --npz FILE.npz")
    for target, option in ((args.out, "--out"), (args.npz, "--npz")):
        if target:
            check_output_file(target, option, args.model)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device, kind="pixel")
    check_finite_model(model, args.model)
    cfg = run_sample_config(
        args, config.sample, max_steps=config.schedule.num_train_timesteps, schedule=config.schedule
    )
    guide = _guide_option(args, model, device)
    channels, size, _ = model.sample_shape
    check_fits_in_memory(args.n, channels, size, grid=bool(args.out))
    seeds = range(args.seed, args.seed + args.n)  # a range, not a list: nothing is built per image before sampling
    labels = _labels_option(args, model.num_classes, seeds)
    if labels is None and cfg.cfg_scale != 1.0 and guide is None:
        raise UserError("unconditional sampling (--label none) cannot use CFG; set --cfg-scale 1 (or give --guide)")
    images = sample(model, seeds, labels, cfg, args.batch_size, device, guide=guide, progress=True)
    check_finite_samples(images, args.model)
    sampler = describe_sampler(cfg, guide=args.guide, flow=config.schedule.family == "flow")
    by_class = labels is not None and args.label == "rows" and args.nrow is None
    wrote = []  # printed once every file is written: a closed stdout must not cost the files after it
    try:
        if args.out:
            save_grid(images, Path(args.out), nrow=args.nrow, rows=labels if by_class else None)
            layout = "one row per class" if by_class else f"{args.nrow} per row" if args.nrow else "square grid"
            wrote.append(f"wrote {args.out} ({args.n} images, {layout}; {sampler})")
        if args.npz:
            arr = to_uint8(images)
            lab = np.asarray(labels if labels is not None else np.full(args.n, -1))

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as fh:
                    np.savez(fh, images=arr, labels=lab, seeds=np.asarray(seeds))

            atomic_write(Path(args.npz), write)
            wrote.append(f"wrote {args.npz} ({len(arr)} images, uint8 NHWC; {sampler})")
    except OSError as exc:
        for line in wrote:  # the files that were written
            print(line)
        raise UserError(f"cannot write the samples ({exc.strerror or exc}: {exc.filename})") from None
    for line in wrote:
        print(line)


def _labels_option(args: argparse.Namespace, k: int, seeds: range) -> Any:
    """The labels --label asks for: none, random (uniform), rows (class c fills row c) or one class index."""
    import torch

    from perceptual_diffusion.core.sampling import labels_for_seeds
    from perceptual_diffusion.data.grid import class_rows

    if args.label == "none" or k == 0:
        if args.label not in ("none", "random", "rows") and k == 0:
            raise UserError("this model is unconditional: use --label none")
        return None
    if args.label == "random":
        return labels_for_seeds(seeds, torch.full((k,), 1.0 / k))
    if args.label == "rows":
        return class_rows(args.n, k)
    try:
        label = int(args.label)
    except ValueError:
        raise UserError(f"--label must be none, random, rows or a class index, got {args.label!r}") from None
    if not 0 <= label < k:
        raise UserError(f"--label {label} is out of range: this model has classes 0..{k - 1}")
    return torch.full((args.n,), label)


def _guide_option(args: argparse.Namespace, model: Any, device: Any) -> Any:
    """The --guide model (autoguidance), or None: loaded like the model, and refused unless it makes the same images
    of the same classes under the same noise schedule."""
    if args.guide is None:
        return None
    from perceptual_diffusion.cli.checks import check_finite_model
    from perceptual_diffusion.core.guidance import check_guide
    from perceptual_diffusion.models.loading import load_model

    guide, _, _ = load_model(args.guide, device, kind="pixel")
    check_finite_model(guide, args.guide)
    (c, size, _), (gc, gsize, _) = model.sample_shape, guide.sample_shape
    if (gc, gsize, guide.num_classes) != (c, size, model.num_classes):
        raise UserError(
            f"--guide {args.guide} makes {gc}x{gsize}px images of {guide.num_classes} "
            f"classes, the model {c}x{size}px of {model.num_classes}: autoguidance needs a "
            "weaker model of the same task"
        )
    check_guide(model, guide)
    return guide


def cmd_demo(args: argparse.Namespace) -> None:
    from perceptual_diffusion.experiments.compare import run_demo

    run_demo(Path(args.out), steps=args.steps, finetune_steps=args.finetune_steps, device=args.device)


def cmd_compare(args: argparse.Namespace) -> None:
    from perceptual_diffusion.experiments.compare import run_compare

    run_compare(
        Path(args.out),
        budget_from_args(args),
        device=args.device,
        seeds=parse_seeds(args.seeds),
        require_plateau=args.require_plateau,
        lora=lora_config(args),
    )


def cmd_ablate(args: argparse.Namespace) -> None:
    from perceptual_diffusion.experiments.ablation import default_variants, run_ablation

    seeds = parse_seeds(args.seeds)
    budget = budget_from_args(args)
    variants = default_variants(budget)
    if args.variants is not None:  # '' names no variant: refused below, never read as "all of them"
        names = args.variants.split(",")
        unknown = sorted(set(names) - {v.name for v in variants})
        if unknown:
            raise UserError(f"unknown --variants {unknown}; choose from {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in names]
    result_dir = Path(args.out)
    run_ablation(result_dir, budget, variants, device=args.device, seeds=seeds)
    print(f"report: {result_dir / 'ablation.md'}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from perceptual_diffusion.cli.checks import check_finite_model, check_output_file, refusing_non_finite
    from perceptual_diffusion.evaluation.evaluate import check_options, evaluate_model, format_table
    from perceptual_diffusion.models.loading import load_model
    from perceptual_diffusion.runtime.checkpoint import atomic_write_text, resolve_weights
    from perceptual_diffusion.runtime.distributed import launched_rank, process_group
    from perceptual_diffusion.training.loop import resolve_device

    check_sample_counts(args, args.n)
    check_image_count(args.n)
    check_options({"max_features": args.max_features, "reference_n": args.reference_n})
    weights = resolve_weights(args.model)
    if args.json is not None and not args.json.strip():
        raise UserError("--json '' names no file; give a path, or leave --json out for the default beside the weights")
    if args.json:  # every output path is checked before the work: a bad one must not cost the evaluation
        check_output_file(args.json, "--json", args.model)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device, kind="pixel")
    check_finite_model(model, args.model)
    data = config.data if args.data_path is None else dataclasses.replace(config.data, path=args.data_path)
    extractor = _extractor_option(args, data, device)
    out = Path(args.json) if args.json else weights.parent / f"eval-{extractor.name}-n{args.n}.json"
    if not args.json:
        check_output_file(out, "--json", args.model)
    extractor = refusing_non_finite(extractor, args.model)
    # The model's own sampling settings unless options override them: its reports used those, so the same model gets
    # the same numbers here.
    timesteps = config.schedule.num_train_timesteps
    configs = [run_sample_config(args, config.sample, scale, timesteps, config.schedule) for scale in args.cfg_scale]
    guide = _guide_option(args, model, device)
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
                guide=guide,
                use_labels=not args.no_labels,
                max_features=args.max_features,
                reference_n=args.reference_n,
                progress=args.progress,
            )
            rows.append({"model": str(weights), **({"guide": args.guide} if args.guide else {}), **row})
    if launched_rank() != 0:
        return  # rank 0 prints and writes the numbers, which every rank holds
    source = "with the options given" if sampling_options_given(args) else "the model's own settings"
    described = describe_sampler(configs[0], guidance=False, guide=args.guide, flow=config.schedule.family == "flow")
    sampler = f"sampler: {described} ({source}); {configs[0].guidance.upper()} scale per row"
    try:  # the file first: a reader that stops early (| head -n1) must not cost the evaluation
        atomic_write_text(out, json.dumps(rows, indent=2) + "\n")
    except OSError as exc:
        print(format_table(rows) + "\n" + sampler)
        raise UserError(f"cannot write {out} ({exc.strerror or exc}); the numbers are printed above") from None
    print(format_table(rows))
    print(sampler)
    print(f"wrote {out}")


def _extractor_option(args: argparse.Namespace, data: Any, device: Any) -> Any:
    """The feature extractor --features names; auto: the shipped domain classifier for the built-in data at its
    size (shapes 16 px, Fashion-MNIST 28 px), else Inception."""
    from perceptual_diffusion.evaluation.classifier import SHIPPED, SHIPPED_SIZE
    from perceptual_diffusion.evaluation.features import make_extractor

    kind = args.features
    if kind == "auto":
        kind = "domain" if data.source in SHIPPED and data.image_size == SHIPPED_SIZE[data.source] else "inception"
    return make_extractor(kind, data.source, data.image_size, args.inception_weights, args.download_inception, device)


def _is_classifier_file(path: Path) -> bool:
    """A file that train-classifier wrote: safetensors whose metadata holds its config and result (a run's weights
    carry a format and a run config instead)."""
    from perceptual_diffusion.runtime.ownership import safetensors_metadata

    meta = safetensors_metadata(path) or {}
    return {"config", "result"} <= meta.keys() and "format" not in meta


def cmd_train_classifier(args: argparse.Namespace) -> None:
    from perceptual_diffusion.cli.checks import check_output_file
    from perceptual_diffusion.evaluation.classifier import train_classifier
    from perceptual_diffusion.runtime.ownership import claim_file

    # Before training: a refusal afterwards would cost the minutes it took, and --force must never replace a run's
    # weights (or any file but a classifier this command made).
    claim_file(args.out, "classifier", _is_classifier_file, args.force, command="train-classifier")
    check_output_file(args.out, "--out")
    if args.epochs is not None and args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be >= 0 and at most 2**63 - 1, got {args.seed}")
    result = train_classifier(
        args.data, args.out, epochs=args.epochs, seed=args.seed, recipe=args.recipe, width=args.width, progress=True
    )
    print(
        f"wrote {args.out}: test accuracy {result['test_accuracy']:.4f} on {result['test_images']} images "
        f"({result['test_accuracy_noise_0.2']:.4f} with noise 0.2), {result['seconds']} s"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from perceptual_diffusion.models.export import export_diffusers
    from perceptual_diffusion.models.loading import weights_config
    from perceptual_diffusion.models.publish import check_export_target

    check_export_target(Path(args.out), args.force, [args.model])  # before reading anything: a refusal costs nothing
    is_lora = weights_config(args.model)[0].lora is not None
    if args.merge_lora and not is_lora:
        raise UserError(f"{args.model} is not a LoRA run (no --lora-rank): export it without --merge-lora")
    if is_lora and not args.merge_lora:
        if args.spacing is not None or args.clip_x0 is not None:
            raise UserError("--spacing and --clip-x0 set an exported pipeline's scheduler: add --merge-lora")
        from perceptual_diffusion.models.export import export_adapter

        out = export_adapter(args.model, args.out, force=args.force)
        print(
            f"wrote {out} (a PEFT LoRA adapter on {weights_config(args.model)[0].train.init_from}; --merge-lora "
            "writes the merged model as a diffusers folder)"
        )
        return
    overrides = {k: v for k, v in (("spacing", args.spacing), ("clip_x0", args.clip_x0)) if v is not None}
    config = weights_config(args.model)[0]
    sample = replace(config.sample, **overrides)  # the run's own setting unless overridden
    out = export_diffusers(args.model, args.out, sample, force=args.force)
    if config.model.arch == "dit":  # no pipeline fits a pixel DiT: the model, the scheduler and a loop
        print(f"wrote {out} (transformer/ and scheduler/; the diffusers sampling loop is in {out / 'README.md'})")
        return
    pipeline = "DDPMPipeline" if config.schedule.family == "flow" else "DDIMPipeline"
    print(f"wrote {out} (load it with diffusers.{pipeline}.from_pretrained; see {out / 'README.md'})")
