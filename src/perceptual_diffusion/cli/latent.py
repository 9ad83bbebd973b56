"""``perceptual-diffusion latent ...``: the latent text-to-image commands, a thin layer over ``latent``'s functions.

Each subcommand turns its options into the typed configs and calls one function of
:mod:`perceptual_diffusion.models.latent`; bad input raises ``UserError`` (one ``error:`` line, exit code 2,
printed by ``cli.main``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from perceptual_diffusion.cli.options import (
    add_on_bad_image_option,
    add_report_to_option,
    add_run_dir_options,
    add_schedule_options,
    add_training_options,
    choices,
    lora_config,
    loss_config,
    sample_config,
    schedule_config,
    train_config,
)
from perceptual_diffusion.cli.sampling_options import (
    add_sample_options,
    check_image_count,
    check_sample_counts,
    describe_sampler,
    run_sample_config,
    use_run_sampling_defaults,
)
from perceptual_diffusion.config import MAX_SEED, MAX_SHAPES_SIZE, CaptionDataConfig
from perceptual_diffusion.errors import UserError


def _data_config(args: argparse.Namespace) -> CaptionDataConfig:
    return CaptionDataConfig(
        path=args.data_path,
        format=args.data_format,
        cache_latents=getattr(args, "cache_latents", True),
        cache_dir=args.cache_dir,
        on_bad_image=args.on_bad_image,
    )


def _model_config(args: argparse.Namespace):
    from perceptual_diffusion.config import LatentModelConfig

    return LatentModelConfig(pretrained=args.pretrained, resolution=args.resolution, t5=args.t5)


def latent_run_config(args: argparse.Namespace):
    """The LatentRunConfig of parsed ``latent train`` options. Under --schedule flow, an SD3 folder's own scheduler
    gives the shift unless --shift does (``latent.native_schedule``)."""
    from perceptual_diffusion.config import LatentRunConfig
    from perceptual_diffusion.models.latent import native_schedule

    given = {"shift"} if getattr(args, "shift", None) is not None else set()
    schedule = native_schedule(args.pretrained, schedule_config(args), given)
    return LatentRunConfig(
        schedule=schedule,
        model=_model_config(args),
        data=_data_config(args),
        loss=loss_config(args),
        train=train_config(args),
        sample=sample_config(args, schedule=schedule),
        lora=lora_config(args),
    )


def cmd_latent_tiny(args: argparse.Namespace) -> None:
    from perceptual_diffusion.testing import make_tiny_pipeline, make_tiny_sd3_pipeline

    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"--seed must be >= 0 and at most 2**63 - 1, got {args.seed}")
    if args.with_t5 and args.kind != "sd3":
        raise UserError("--with-t5 goes with --kind sd3 (a Stable Diffusion folder has one CLIP and no T5)")
    if args.kind == "sd3":
        out = make_tiny_sd3_pipeline(args.out, seed=args.seed, force=args.force, t5=args.with_t5)
        t5 = "with a tiny random T5" if args.with_t5 else "without T5"
        print(
            f"wrote {out} (a tiny random SD3-style folder {t5}; its images are noise until trained); next: "
            f"perceptual-diffusion latent train --pretrained {out} --schedule flow --resolution 16 --data-path DATA "
            "--run-dir RUN"
        )
        return
    out = make_tiny_pipeline(args.out, seed=args.seed, force=args.force)
    print(
        f"wrote {out} (a tiny random Stable-Diffusion-style folder; its images are noise until trained); next: "
        f"perceptual-diffusion latent train --pretrained {out} --resolution 16 --data-path DATA --run-dir RUN"
    )


def cmd_latent_shapes_captions(args: argparse.Namespace) -> None:
    from perceptual_diffusion.testing import write_shapes_captions

    if args.every < 1:
        raise UserError(f"--every must be >= 1, got {args.every}")
    if not 8 <= args.image_size <= MAX_SHAPES_SIZE:  # the shapes set grows as size^4 (config.MAX_SHAPES_SIZE)
        raise UserError(f"--image-size must be >= 8 and at most {MAX_SHAPES_SIZE}, got {args.image_size}")
    try:
        out = write_shapes_captions(args.out, image_size=args.image_size, every=args.every)
    except OSError as exc:
        raise UserError(f"cannot write {args.out} ({exc.strerror or exc})") from None
    count = len(list(out.glob("*.txt")))
    print(f"wrote {count} captioned images to {out} (NNNNNN.png + NNNNNN.txt); use it as --data-path")


def cmd_latent_train(args: argparse.Namespace) -> None:
    from perceptual_diffusion.cli.checks import train_and_report
    from perceptual_diffusion.training.latent import train_latent

    train_and_report(train_latent, latent_run_config(args), args)


def cmd_latent_cache(args: argparse.Namespace) -> None:
    from perceptual_diffusion.config import LatentRunConfig, ScheduleConfig, TrainConfig
    from perceptual_diffusion.models.latent import latent_architecture, native_schedule
    from perceptual_diffusion.runtime.distributed import launched_rank
    from perceptual_diffusion.training.latent import precompute_latents

    # The cache depends on the VAE alone (--no-t5 only spares loading T5: one cache for runs with and without it);
    # the schedule is the folder's own (an SD3 folder is a flow model).
    family = "flow" if latent_architecture(args.pretrained).name == "sd3" else "ddpm"
    config = LatentRunConfig(
        schedule=native_schedule(args.pretrained, ScheduleConfig(family=family)),
        model=_model_config(args),
        data=_data_config(args),
        train=TrainConfig(device=args.device),
    )
    cache = precompute_latents(config)
    if launched_rank() == 0:
        print(f"latent cache complete: {cache.folder} ({cache.num_items} images, {cache.num_chunks} chunk(s))")


def cmd_latent_sample(args: argparse.Namespace) -> None:
    from perceptual_diffusion.cli.checks import (
        check_finite_model,
        check_finite_samples,
        check_fits_in_memory,
        check_output_file,
    )
    from perceptual_diffusion.data.grid import save_grid
    from perceptual_diffusion.models.latent import sample_latent
    from perceptual_diffusion.models.loading import load_model
    from perceptual_diffusion.training.loop import resolve_device

    # Bounded before the prompt list is built: -n 10**12 must be an error, not a list of a trillion strings.
    count = args.n * len(args.prompt)
    check_sample_counts(args, args.n)
    check_image_count(count, "-n x prompts")
    check_sample_counts(args, count)
    check_output_file(args.out, "--out", args.model)
    device = resolve_device(args.device)
    model, config, _ = load_model(args.model, device, kind="latent")
    parts = model.parts
    check_finite_model(model, args.model)
    check_fits_in_memory(count, 3, config.model.resolution, grid=True, what="-n x prompts")
    cfg = run_sample_config(
        args, config.sample, max_steps=config.schedule.num_train_timesteps, schedule=config.schedule
    )
    prompts = [p for p in args.prompt for _ in range(args.n)]  # prompt i fills row i
    seeds = range(args.seed, args.seed + count)
    images = sample_latent(model, parts, prompts, seeds, cfg, batch_size=args.batch_size)
    check_finite_samples(images, args.model)
    try:
        save_grid(images, Path(args.out), nrow=args.n)
    except OSError as exc:
        raise UserError(f"cannot write the samples ({exc.strerror or exc}: {exc.filename})") from None
    print(
        f"wrote {args.out} ({len(args.prompt)} prompt(s) x {args.n} seed(s), one row per prompt; "
        f"{describe_sampler(cfg, flow=config.schedule.family == 'flow')})"
    )


def cmd_latent_export(args: argparse.Namespace) -> None:
    from perceptual_diffusion.models.latent import export_latent, export_load_hint
    from perceptual_diffusion.runtime import checkpoint as ckpt

    out = export_latent(args.model, args.out, force=args.force, merge_lora=args.merge_lora)
    if (out / ckpt.ADAPTER_FILES[2]).is_file():
        # The base pipeline as the run conditioned: a --no-t5 run's without T5, though its base folder has one.
        t5 = ckpt.config_of(ckpt.resolve_weights(args.model), "latent")[0].model.t5
        base = "the base pipeline" if t5 else "the base pipeline loaded with text_encoder_3=None, tokenizer_3=None"
        print(
            f"wrote {out / ckpt.ADAPTER_FILES[2]} (a LoRA adapter: load it with pipe.load_lora_weights({str(out)!r}) "
            f"on {base}{'' if t5 else ', as the run used --no-t5'}; --merge-lora writes the merged pipeline instead)"
        )
        return
    print(f"wrote {out} ({export_load_hint(out)})")


def _add_model_and_data_options(p: argparse.ArgumentParser, cache_flag: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--pretrained",
        required=True,
        help="local diffusers folder in StableDiffusionPipeline layout (unet/, vae/, text_encoder/, tokenizer/) or "
        "StableDiffusion3Pipeline layout (transformer/, vae/, two CLIP text encoders, T5 optional; --schedule flow)",
    )
    g.add_argument("--resolution", type=int, default=512, help="image side in pixels (default %(default)s)")
    g.add_argument(
        "--data-path", required=True, help="captioned images: a folder with .txt captions, a JSONL file or .tar shards"
    )
    g.add_argument(
        "--data-format",
        choices=choices(CaptionDataConfig, "format"),
        default="auto",
        help="how --data-path is laid out (default auto: from what it is)",
    )
    if cache_flag:
        g.add_argument(
            "--no-cache-latents",
            dest="cache_latents",
            action="store_false",
            help="encode each batch with the VAE on the fly instead of caching every latent once before training",
        )
    g.add_argument(
        "--cache-dir", default=None, help="latent cache folder (default ~/.cache/perceptual-diffusion/latents)"
    )
    g.add_argument(
        "--no-t5",
        dest="t5",
        action="store_false",
        help="an SD3 folder with T5 (text_encoder_3/): never load T5 (T5-XXL is 4.7 B parameters); its 256 tokens of "
        "every prompt are zeros, as StableDiffusion3Pipeline with text_encoder_3=None. Recorded in the run: sample, "
        "resume and export follow it (the export has no T5)",
    )
    add_on_bad_image_option(g, CaptionDataConfig, "unreadable images")


def add_latent_parser(sub: argparse._SubParsersAction) -> None:
    """Add ``latent`` and its subcommands to the main CLI's subparsers."""
    latent = sub.add_parser(
        "latent",
        help="latent text-to-image models (Stable Diffusion layout): tiny, shapes-captions, train, sample, export",
        description="The paper's own setting: a Stable-Diffusion-style U-Net trained in a frozen VAE's latent space, "
        "conditioned on a frozen CLIP text encoder, from a local diffusers folder (unet/, vae/, text_encoder/, "
        "tokenizer/). `latent tiny` and `latent shapes-captions` make a tiny offline model and captioned data to try "
        "it on a CPU.",
    )
    lsub = latent.add_subparsers(dest="subcommand", required=True, metavar="subcommand", help="one of:")

    p = lsub.add_parser(
        "tiny",
        help="write a tiny random Stable-Diffusion-style folder (offline; for trying the latent path)",
        description="Write a randomly initialised, tiny diffusers folder in StableDiffusionPipeline layout (16 px "
        "images, VAE downsampling 2x); its images are noise until trained.",
    )
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument(
        "--kind",
        choices=["sd", "sd3"],
        default="sd",
        help="sd: a StableDiffusionPipeline folder (U-Net, one CLIP; default); sd3: a StableDiffusion3Pipeline "
        "folder (SD3Transformer2DModel, two CLIPs with projections, no T5 unless --with-t5, a VAE with a shift; "
        "--schedule flow)",
    )
    p.add_argument(
        "--with-t5",
        action="store_true",
        help="with --kind sd3: add a tiny random T5 text encoder and tokenizer (text_encoder_3/, tokenizer_3/)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default %(default)s)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.set_defaults(func=cmd_latent_tiny)

    p = lsub.add_parser(
        "shapes-captions",
        help="write the built-in shapes as a captioned image folder (NNNNNN.png + NNNNNN.txt)",
        description="The built-in procedural shapes, each with a caption such as 'a red disc', as a folder that "
        "`latent train --data-path` reads.",
    )
    p.add_argument("--out", required=True, help="folder to write into")
    p.add_argument("--every", type=int, default=1, help="keep every N-th of the 1,600 images (default %(default)s)")
    p.add_argument("--image-size", type=int, default=16, help="image side in pixels (default %(default)s)")
    p.set_defaults(func=cmd_latent_shapes_captions)

    p = lsub.add_parser(
        "train",
        help="train a latent U-Net (MSE, or self-perceptual fine-tuning from an MSE teacher)",
        description="Train or resume a latent text-to-image run from a pretrained diffusers folder. Rerunning the "
        "same command in the same --run-dir resumes from its last checkpoint.",
    )
    add_run_dir_options(p)
    _add_model_and_data_options(p)
    g = p.add_argument_group("diffusion")
    add_schedule_options(g)
    add_training_options(p, latent=True)
    add_sample_options(p, steps_flag="--sample-steps", clip_flag=False)
    add_report_to_option(p)
    p.set_defaults(func=cmd_latent_train)

    p = lsub.add_parser(
        "cache",
        help="encode every image of the data with the VAE once, into the latent cache that `latent train` reads",
        description="Fill the latent cache ahead of training (resumable; under torchrun each process encodes its "
        "share of the chunks). `latent train` with the same model, data, resolution and --cache-dir then starts at "
        "once.",
    )
    _add_model_and_data_options(p, cache_flag=False)
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    p.set_defaults(func=cmd_latent_cache)

    p = lsub.add_parser(
        "sample",
        help="draw samples of a trained latent model for some prompts into a PNG grid",
        description="Sample with DDIM (and CFG with --cfg-scale) in latent space, then decode with the VAE. Each "
        "prompt is one row of -n images; image i of the grid uses seed --seed + i.",
    )
    p.add_argument("model", help="a latent run directory or its model.safetensors")
    p.add_argument("--prompt", action="append", required=True, help="a text prompt; repeat for several rows")
    p.add_argument("-n", type=int, default=4, help="images per prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument("--out", default="samples.png", help="PNG grid to write (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_sample_options(p, clip_flag=False)
    use_run_sampling_defaults(p)
    p.set_defaults(func=cmd_latent_sample)

    p = lsub.add_parser(
        "export",
        help="write a trained latent model as a diffusers pipeline folder (StableDiffusion or StableDiffusion3)",
        description="Write a folder that diffusers loads: of a Stable Diffusion run a StableDiffusionPipeline (the "
        "trained U-Net's EMA weights, the pretrained folder's VAE, text encoder and tokenizer, a DDIMScheduler set to "
        "the training schedule); of an SD3 run a StableDiffusion3Pipeline (the EMA transformer, the frozen parts, the "
        "run's FlowMatchEulerDiscreteScheduler; without T5, as of a folder without it or a --no-t5 run, load it with "
        "text_encoder_3=None, tokenizer_3=None).",
    )
    p.add_argument("model", help="a latent run directory or its model.safetensors")
    p.add_argument("--out", required=True, help="folder to write (written atomically: complete or not at all)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run: write the pipeline with the adapter merged into the U-Net (default: the adapter alone, "
        "pytorch_lora_weights.safetensors for load_lora_weights)",
    )
    p.set_defaults(func=cmd_latent_export)
