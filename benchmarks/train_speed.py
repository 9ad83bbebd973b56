"""Training images/second for each speed option, relative to plain fp32 eager, as one markdown table.

    python benchmarks/train_speed.py                       # small preset on the default device (CUDA if present)
    python benchmarks/train_speed.py --preset base --batch-size 256 --with-compile    # a GPU
    python benchmarks/train_speed.py --arch dit --preset small --schedule flow          # the DiT, rectified flow

Every variant runs the training loop's own step (trainstep.draw_global_batch, accumulate_gradients, gradient
clipping, AdamW) on its own copy of the same model. The variants are interleaved: each round times ``--steps`` steps
of every variant in turn, so a slow phase of a shared machine hits all of them alike; the table reports the median
round. torch.compile takes minutes to compile on a CPU, so it is only measured with ``--with-compile``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import statistics
import time
from dataclasses import replace

import torch

from perceptual_diffusion.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
    default_sampler,
)
from perceptual_diffusion.core.losses import build_loss
from perceptual_diffusion.core.networks import count_parameters
from perceptual_diffusion.data.datasets import load_dataset
from perceptual_diffusion.models.architectures import build_model
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.training.loop import apply_speed_options, resolve_device
from perceptual_diffusion.training.step import TensorSource, accumulate_gradients, draw_global_batch, grad_norm

# name -> (TrainConfig changes, bf16 autocast)
VARIANTS: dict[str, tuple[dict, bool]] = {
    "fp32 eager": ({}, False),
    "bf16 autocast": ({}, True),
    "channels_last": ({"channels_last": True}, False),
    "bf16 + channels_last": ({"channels_last": True}, True),
    "grad checkpointing": ({"grad_checkpointing": True}, False),
    "grad accum 2": ({"grad_accum": 2}, False),
    "grad accum 4": ({"grad_accum": 4}, False),
}
COMPILED: dict[str, tuple[dict, bool]] = {
    "compile": ({"compile": True}, False),
    "compile + bf16 + channels_last": ({"compile": True, "channels_last": True}, True),
}


class Variant:
    """One speed setting: its own model, optimiser and loss, stepping through the same seeded batches."""

    def __init__(self, config: RunConfig, bf16: bool, device: torch.device, images: torch.Tensor, labels) -> None:
        self.config, self.device = config, device
        self.source = TensorSource(images, labels, config.model.num_classes)
        torch.manual_seed(0)
        self.model = build_model(config.model, config.schedule).to(device)
        apply_speed_options(self.model, None, config.train)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.train_model = distributed.wrap_for_training(self.model, config.train.compile, device)
        self.loss_fn = build_loss(config.loss, self.model.schedule)
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        self.step = 0

    def run(self, steps: int) -> float:
        """Seconds for ``steps`` full training steps, synchronised with the device at both ends."""
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            gen = torch.Generator(self.device).manual_seed(self.step)
            batch = draw_global_batch(self.config, self.source, self.loss_fn, gen)
            self.optimizer.zero_grad(set_to_none=True)
            _, means = accumulate_gradients(
                self.train_model, self.loss_fn, self.source, batch, self.config.train, self.autocast
            )
            grad_norm(self.model, self.config.train.grad_clip)
            self.optimizer.step()
            means.tolist()  # the loop's one host sync per step
            self.step += 1
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=["unet", "dit"], default="unet", help="architecture (default %(default)s)")
    p.add_argument("--preset", default="small", help="model preset of --arch (default %(default)s)")
    p.add_argument("--schedule", choices=["ddpm", "flow"], default="ddpm", help="schedule family (default ddpm)")
    p.add_argument("--image-size", type=int, default=16, help="shapes image size (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (default %(default)s)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compile happens here)")
    p.add_argument("--with-compile", action="store_true", help="also time torch.compile (minutes on a CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    args = p.parse_args()

    device = resolve_device(args.device)
    data_config = DataConfig(source="shapes", image_size=args.image_size)
    data = load_dataset(data_config)
    schedule = ScheduleConfig(family=args.schedule)
    model = ModelConfig(
        preset=args.preset, image_size=args.image_size, channels=3, num_classes=data.num_classes, arch=args.arch
    )
    config = RunConfig(
        schedule=schedule,
        model=model,
        data=data_config,
        loss=LossConfig(),
        train=TrainConfig(batch_size=args.batch_size, device=str(device)),
        sample=default_sampler(schedule, steps=2) if args.schedule == "flow" else SampleConfig(steps=2),
    )
    images, labels = data.images.to(device), data.labels.to(device)
    chosen = {**VARIANTS, **(COMPILED if args.with_compile else {})}
    variants = {
        name: Variant(replace(config, train=replace(config.train, **changes)), bf16, device, images, labels)
        for name, (changes, bf16) in chosen.items()
    }
    for variant in variants.values():
        variant.run(args.warmup)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, variant in variants.items():
            seconds[name].append(variant.run(args.steps))

    speed = {name: args.batch_size * args.steps / statistics.median(s) for name, s in seconds.items()}
    base = speed["fp32 eager"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    n_params = count_parameters(variants["fp32 eager"].model) / 1e6
    print(
        f"# Training speed by option: {args.arch} {args.preset} preset ({n_params:.2f} M parameters), "
        f"{args.schedule} schedule, {args.image_size}x{args.image_size} shapes, global batch {args.batch_size}, "
        "MSE loss\n\n"
        f"{datetime.date.today()}, torch {torch.__version__}, {device.type} ({device_name}), "
        f"{torch.get_num_threads()} CPU threads; median of {args.rounds} interleaved rounds of {args.steps} steps "
        f"after {args.warmup} warm-up steps.\n"
    )
    # The spread shows how much a shared machine moved the rounds: differences inside it are noise.
    print("| option | images/s | vs fp32 eager | slowest-fastest round, images/s |")
    print("|---|---:|---:|---:|")
    for name, value in speed.items():
        low, high = (args.batch_size * args.steps / t for t in (max(seconds[name]), min(seconds[name])))
        print(f"| {name} | {value:.0f} | {value / base:.2f}x | {low:.0f}-{high:.0f} |")


if __name__ == "__main__":
    main()
