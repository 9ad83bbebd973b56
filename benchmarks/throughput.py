"""Training and sampling throughput of every model preset at its natural data size, as one markdown table.

    python benchmarks/throughput.py                          # all presets (base / large are slow on a CPU)
    python benchmarks/throughput.py --presets tiny small medium

Training: images/s of a full MSE training step (forward, backward, AdamW step), batch 64, median over timed steps
after warm-up. Sampling: images/s of 50 DDIM steps for a batch of 64, at CFG 1 (one forward per step) and at
CFG 7.5 (one batched forward of 2N per step), median of ``--sample-repeats`` runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from perceptual_diffusion.config import PRESETS, LossConfig, ModelConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.losses import MSELoss
from perceptual_diffusion.core.networks import DiffusionUNet, count_parameters
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.data.datasets import shapes_valid_set

# Natural data size per preset: 16x16 shapes for the CPU presets, 32x32 shapes for the GPU ones.
IMAGE_SIZE = {"tiny": 16, "small": 16, "medium": 16, "base": 32, "large": 32}


def train_images_per_second(model: DiffusionUNet, images: torch.Tensor, labels: torch.Tensor, args) -> float:
    """Median images/s of a training step: sample a batch, MSE loss, backward, AdamW step."""
    loss_fn = MSELoss(LossConfig(), model.schedule)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for step in range(args.train_warmup + args.train_steps):
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
        start = time.perf_counter()
        loss = loss_fn(model, images[idx], labels[idx], gen)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= args.train_warmup:
            times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times)


def sample_images_per_second(model: DiffusionUNet, cfg_scale: float, args) -> float:
    """Median images/s of ``args.sample_steps``-step DDIM for one batch."""
    model.eval()
    seeds = list(range(args.batch_size))
    labels = torch.arange(args.batch_size) % model.num_classes
    config = SampleConfig(steps=args.sample_steps, cfg_scale=cfg_scale)
    sample(model, seeds, labels, SampleConfig(steps=2, cfg_scale=cfg_scale), args.batch_size)  # warm-up
    times = []
    for _ in range(args.sample_repeats):
        start = time.perf_counter()
        sample(model, seeds, labels, config, args.batch_size)
        times.append(time.perf_counter() - start)
    return args.batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS), help="presets to time")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps (default %(default)s)")
    parser.add_argument("--train-warmup", type=int, default=2, help="untimed warm-up steps (default %(default)s)")
    parser.add_argument("--sample-steps", type=int, default=50, help="DDIM steps (default %(default)s)")
    parser.add_argument("--sample-repeats", type=int, default=1, help="timed sampling runs (default %(default)s)")
    parser.add_argument("--cfg-scale", type=float, default=7.5, help="the guided column's scale (default 7.5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"# throughput, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"batch {args.batch_size}, {args.sample_steps} DDIM steps\n"
    )
    print(
        "| preset | params | data | train img/s | sample img/s (CFG 1) | "
        f"sample img/s (CFG {args.cfg_scale:g}) | CFG cost |"
    )
    print("|---|---:|---|---:|---:|---:|---:|")
    for preset in args.presets:
        size = IMAGE_SIZE[preset]
        data = shapes_valid_set(size)
        torch.manual_seed(0)
        model = DiffusionUNet(
            ModelConfig(preset=preset, image_size=size, channels=3, num_classes=data.num_classes), ScheduleConfig()
        )
        train_speed = train_images_per_second(model, data.images, data.labels, args)
        plain = sample_images_per_second(model, 1.0, args)
        guided = sample_images_per_second(model, args.cfg_scale, args)
        print(
            f"| {preset} | {count_parameters(model) / 1e6:.2f} M | shapes {size}x{size} | {train_speed:.0f} | "
            f"{plain:.1f} | {guided:.1f} | {plain / guided:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
