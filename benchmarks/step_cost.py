"""What a self-perceptual training step costs against an MSE step (issue 3), on the CPU demo's model.

    python benchmarks/step_cost.py                # timings, saved-activation memory and peak-RSS memory
    python benchmarks/step_cost.py --profile      # plus a torch.profiler table of the self-perceptual step
    python benchmarks/step_cost.py --schedule flow  # the rectified-flow family (issue 18)
    python benchmarks/step_cost.py --arch dit --preset small --image-size 28 --feature-blocks 1,3,4  # issue 19

Setting: ``small`` preset (of ``--arch``, default the U-Net), 16x16 shapes, batch 64, class-conditional, one full
training step each (forward, backward, AdamW step). Four steps are compared:

1. ``mse``: ``losses.MSELoss``.
2. ``self-perceptual``: ``losses.SelfPerceptualLoss`` (encoder-only teacher, real branch under no_grad, teacher
   parameters frozen).
2b. ``batched-teacher``: the same loss, but the two teacher passes run as one ``features`` call over 2N images (the
   real half detached): one launch instead of two, at the price of a graph (and backward) over 2N.
T. ``teacher-pieces``: the teacher's own work in a self-perceptual step, alone: its encoder half forward on the real
   branch under no_grad, forward on a leaf input with a graph, and backward to that input. The bound of (2) is
   1 + T / (1): the MSE step plus what the teacher adds.
3. ``naive``: two FULL teacher forwards (decoder included) with the mid-block output captured by a forward hook,
   teacher parameters with requires_grad=True, and no no_grad on the real branch.

For a DiT (``--arch dit``) the teacher's tap is the output of block K (default n // 2), and (2) and (T) are measured
for every ``--feature-blocks`` tap K: the teacher runs K of n blocks three times' worth (forward, forward, backward),
so the bound 1 + T / (1) is about 1 + K / n, unlike the U-Net's, whose decoder never runs.

Timing: the methods are interleaved round-robin (order shuffled each round), so machine noise hits all of them alike;
each figure is the median over ``--repeats`` rounds. Memory, two ways:
- saved activations: bytes of the distinct tensor storages that autograd saves for backward during one step's forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. This is exact and deterministic, and it is
  what grows with the batch.
- peak RSS: each method runs alone in a fresh subprocess with the same set-up; we report its ``VmHWM`` (the
  process's resident high-water mark, /proc/self/status) and the difference to the MSE process. Not ``ru_maxrss``:
  Linux carries that over fork and exec from the parent, so every child would report the parent's peak. Coarser
  than the saved-activation count (allocator slack, temporaries, the backward's own peak) but it is what the
  machine has to hold.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from perceptual_diffusion.config import LossConfig, ModelConfig, ScheduleConfig, default_feature_block
from perceptual_diffusion.core.losses import MSELoss, SelfPerceptualLoss, feature_distance
from perceptual_diffusion.core.networks import PixelModel, frozen_copy, unwrap
from perceptual_diffusion.core.schedule import NoiseSchedule
from perceptual_diffusion.data.datasets import shapes_valid_set
from perceptual_diffusion.models.architectures import build_model

METHODS = ("mse", "self-perceptual", "batched-teacher", "naive", "teacher-pieces")
PER_TAP = ("self-perceptual", "teacher-pieces")  # measured at every --feature-blocks tap (a DiT's)
Step = Callable[[Tensor, Tensor, torch.Generator], Tensor]


def method_names(taps: tuple[str, ...]) -> tuple[str, ...]:
    """The methods measured: (2) and (T) once per tap when there are several (``self-perceptual@block3``)."""
    if len(taps) == 1:
        return METHODS
    return tuple(m2 for m in METHODS for m2 in ([f"{m}@{tap}" for tap in taps] if m in PER_TAP else [m]))


def tap_module(teacher: PixelModel, tap: str) -> torch.nn.Module:
    """The module whose output is ``tap``, for the naive version's forward hook (the benchmark's only look inside)."""
    if tap.startswith("block"):
        return teacher.transformer.transformer_blocks[int(tap.removeprefix("block")) - 1]
    return teacher.unet.mid_block


def _draws(x0: Tensor, gen: torch.Generator, schedule: NoiseSchedule) -> tuple[Tensor, Tensor, Tensor]:
    """t, eps, t' in the order SelfPerceptualLoss draws them."""
    n = x0.shape[0]
    t = schedule.train_time(n, gen)
    eps = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    return t, eps, schedule.draw_time(n, gen, "uniform")


def batched_teacher_loss(model: PixelModel, teacher: PixelModel, x0: Tensor, cond: Tensor, gen) -> Tensor:
    """Variant 2b: both teacher passes in one ``features`` call of 2N images, the real half detached."""
    schedule = unwrap(model).schedule
    t, eps, t_prime = _draws(x0, gen, schedule)
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.to_x0_eps(model(x_t, t, cond), x_t, t)
    x_hat = schedule.add_noise(x0_hat, eps_hat, t_prime)
    x_real = schedule.add_noise(x0, eps, t_prime)
    tap = teacher.default_tap
    both = teacher.features(torch.cat([x_hat, x_real]), torch.cat([t_prime, t_prime]), torch.cat([cond, cond]), (tap,))
    f_hat, f_real = both[tap].chunk(2)
    return feature_distance(f_hat, f_real.detach(), "mse")


def naive_loss(model: PixelModel, teacher: PixelModel, x0: Tensor, cond: Tensor, gen) -> Tensor:
    """Variant 3: full teacher forwards with a hook at the default tap (the mid block, or a DiT's middle block),
    parameter gradients on, both branches in the graph."""
    schedule = unwrap(model).schedule
    t, eps, t_prime = _draws(x0, gen, schedule)
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat, eps_hat = schedule.to_x0_eps(model(x_t, t, cond), x_t, t)
    captured: list[Tensor] = []
    handle = tap_module(teacher, teacher.default_tap).register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        teacher(schedule.add_noise(x0, eps, t_prime), t_prime, cond)
        teacher(schedule.add_noise(x0_hat, eps_hat, t_prime), t_prime, cond)
    finally:
        handle.remove()
    f_real, f_hat = captured
    return feature_distance(f_hat, f_real, "mse")


def teacher_pieces(
    model: PixelModel, teacher: PixelModel, x0: Tensor, cond: Tensor, gen, tap: str | None = None
) -> Tensor:
    """The teacher's share of a self-perceptual step at ``tap`` (default: the teacher's default tap): real branch
    under no_grad, predicted branch on a leaf input with a graph (backward reaches that input only). Returns a loss
    whose backward is the teacher's backward."""
    schedule = teacher.schedule
    tap = tap or teacher.default_tap
    t, eps, t_prime = _draws(x0, gen, schedule)
    x_real = schedule.add_noise(x0, eps, t_prime)
    x_hat = (x_real + 0.01 * torch.randn(x0.shape, generator=gen)).requires_grad_(True)
    with torch.no_grad():
        f_real = teacher.features(x_real, t_prime, cond, (tap,))[tap]
    f_hat = teacher.features(x_hat, t_prime, cond, (tap,))[tap]
    return feature_distance(f_hat, f_real, "mse")


class Bench:
    """The model (``arch`` / ``preset``), its teachers, the data, and one training-step closure per method; (2) and
    (T) once per tap of ``feature_blocks`` (a DiT's; empty: the default tap)."""

    def __init__(
        self,
        batch_size: int,
        seed: int = 0,
        family: str = "ddpm",
        arch: str = "unet",
        preset: str = "small",
        image_size: int = 16,
        feature_blocks: tuple[int, ...] = (),
    ) -> None:
        torch.manual_seed(seed)
        data = shapes_valid_set(image_size)
        self.images, self.labels, self.batch_size = data.images, data.labels, batch_size
        schedule = ScheduleConfig(family=family)
        mc = ModelConfig(preset=preset, image_size=image_size, num_classes=4, arch=arch)
        self.model = build_model(mc, schedule).train()
        self.teacher = frozen_copy(self.model)
        self.naive_teacher = copy.deepcopy(self.model).eval().requires_grad_(True)  # the naive version's mistake
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-6)
        blocks = feature_blocks or ((default_feature_block(preset),) if arch == "dit" else ())
        self.taps = tuple(f"block{k}" for k in blocks) or (self.teacher.default_tap,)
        self.methods = method_names(self.taps)
        self.description = f"{arch} {preset} preset ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M)"
        mse_fn = MSELoss(LossConfig(), self.teacher.schedule)
        self.losses: dict[str, Callable[[Tensor, Tensor, torch.Generator], Tensor]] = {
            "mse": lambda x0, c, g: mse_fn(self.model, x0, c, g)["loss"],
            "batched-teacher": lambda x0, c, g: batched_teacher_loss(self.model, self.teacher, x0, c, g),
            "naive": lambda x0, c, g: naive_loss(self.model, self.naive_teacher, x0, c, g),
        }
        for tap, k in zip(self.taps, blocks or (None,)):
            sp = LossConfig(
                kind="self-perceptual", teacher="benchmark", cond_dropout=0.0, feature_blocks=(k,) if k else ()
            )
            sp_fn = SelfPerceptualLoss(sp, self.teacher)
            suffix = f"@{tap}" if len(self.taps) > 1 else ""
            self.losses[f"self-perceptual{suffix}"] = lambda x0, c, g, f=sp_fn: f(self.model, x0, c, g)["loss"]
            self.losses[f"teacher-pieces{suffix}"] = lambda x0, c, g, tap=tap: teacher_pieces(
                self.model, self.teacher, x0, c, g, tap
            )
        self.param_storages = {
            p.untyped_storage().data_ptr()
            for m in (self.model, self.teacher, self.naive_teacher)
            for p in m.parameters()
        }

    def batch(self, step: int) -> tuple[Tensor, Tensor, torch.Generator]:
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(0, self.images.shape[0], (self.batch_size,), generator=gen)
        return self.images[idx], self.labels[idx], gen

    def step(self, method: str, step: int, saved: dict[int, int] | None = None) -> None:
        """One full training step; with ``saved``, record the storages autograd keeps for backward."""
        x0, cond, gen = self.batch(step)
        loss = saving(lambda: self.losses[method](x0, cond, gen).mean(), self.param_storages, saved)
        self.optimizer.zero_grad(set_to_none=True)
        self.naive_teacher.zero_grad(set_to_none=True)  # its gradients are computed, and thrown away
        loss.backward()
        self.optimizer.step()


def saving(compute: Callable[[], Tensor], params: set[int], saved: dict[int, int] | None) -> Tensor:
    """``compute()``; with ``saved``, record (storage -> bytes) what autograd keeps for backward, parameters
    (storages in ``params``) left out: the activation memory of a step."""
    if saved is None:
        return compute()

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return compute()


def tap_ratios(median: dict[str, float], taps: tuple[str, ...]) -> list[tuple[str, float, float]]:
    """(tap, (2)/(1), its bound 1 + (T)/(1)) for every tap measured."""
    suffix = (lambda tap: f"@{tap}") if len(taps) > 1 else (lambda tap: "")
    return [
        (
            tap,
            median[f"self-perceptual{suffix(tap)}"] / median["mse"],
            1 + median[f"teacher-pieces{suffix(tap)}"] / median["mse"],
        )
        for tap in taps
    ]


def saved_activation_mib(bench: Bench, method: str) -> float:
    saved: dict[int, int] = {}
    bench.step(method, 0, saved)
    return sum(saved.values()) / 2**20


def peak_rss_mib(method: str, batch_size: int, steps: int, setting: list[str]) -> float:
    """Peak RSS of a fresh process that sets up (``setting``: the model options) and runs ``steps`` steps of one
    method."""
    threads = ["--threads", str(torch.get_num_threads()), *setting]
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", method, "--batch-size", str(batch_size), "--rss-steps", str(steps)]
        + threads,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def rss_child(method: str, batch_size: int, steps: int, bench_options: dict) -> None:
    bench = Bench(batch_size, **bench_options)
    for step in range(steps):
        bench.step(method, step)
    print(vm_hwm_kib() / 1024)


def vm_hwm_kib() -> float:
    """This process's peak resident set size in KiB (Linux; elsewhere ru_maxrss, which may include the parent's)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def profile(bench: Bench, method: str, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for step in range(steps):
            with record_function(f"## {method} step"):
                bench.step(method, step)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=30, help="timed rounds over all methods (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--rss-steps", type=int, default=3, help="steps per peak-RSS subprocess (default %(default)s)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--profile", action="store_true", help="print a profiler table of the self-perceptual step")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--schedule", choices=["ddpm", "flow"], default="ddpm", help="schedule family (default ddpm)")
    parser.add_argument("--arch", choices=["unet", "dit"], default="unet", help="architecture (default unet)")
    parser.add_argument("--preset", default="small", help="size preset of --arch (default small)")
    parser.add_argument("--image-size", type=int, default=16, help="shapes image side in pixels (default 16)")
    parser.add_argument(
        "--feature-blocks", default="", help="--arch dit: taps K[,K..] to measure (default: the middle block)"
    )
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = tuple(int(k) for k in args.feature_blocks.split(",") if k)
    options = {
        "family": args.schedule,
        "arch": args.arch,
        "preset": args.preset,
        "image_size": args.image_size,
        "feature_blocks": blocks,
    }
    setting = ["--schedule", args.schedule, "--arch", args.arch, "--preset", args.preset]
    setting += ["--image-size", str(args.image_size), "--feature-blocks", args.feature_blocks]
    if args.rss_child:
        rss_child(args.rss_child, args.batch_size, args.rss_steps, options)
        return

    bench = Bench(args.batch_size, **options)
    methods = bench.methods
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    shuffle = random.Random(0)
    for rnd in range(args.warmup + args.repeats):
        shuffle.shuffle(order)
        for method in order:
            start = time.perf_counter()
            bench.step(method, rnd)
            if rnd >= args.warmup:
                times[method].append(time.perf_counter() - start)
    median = {m: statistics.median(v) for m, v in times.items()}
    saved = {m: saved_activation_mib(bench, m) for m in methods}
    rss = {
        m: float("nan") if args.no_rss else peak_rss_mib(m, args.batch_size, args.rss_steps, setting) for m in methods
    }

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"# step cost, {datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(load {load:.1f}), torch {torch.__version__} ({torch.get_num_threads()} threads); {args.schedule} "
        f"schedule, {bench.description}, shapes {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"class-conditional; median of {args.repeats} interleaved rounds\n"
    )
    labels = {
        "mse": "(1)",
        "self-perceptual": "(2)",
        "batched-teacher": "(2b)",
        "naive": "(3)",
        "teacher-pieces": "(T)",
    }
    print("| step | median ms | / MSE | IQR ms | saved activations MiB | / MSE | peak RSS MiB | - MSE's |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in methods:
        q = statistics.quantiles(times[m], n=4) if len(times[m]) > 1 else [times[m][0]] * 3
        print(
            f"| {labels[m.split('@')[0]]} {m} | {median[m] * 1e3:.1f} | {median[m] / median['mse']:.2f} | "
            f"{(q[2] - q[0]) * 1e3:.1f} | {saved[m]:.1f} | {saved[m] / saved['mse']:.2f} | {rss[m]:.0f} | "
            f"{rss[m] - rss['mse']:+.0f} |"
        )
    print()
    for tap, ratio, bound in tap_ratios(median, bench.taps):
        print(
            f"(2)/(1) at {tap} = {ratio:.3f} against its bound 1 + (T)/(1) = {bound:.3f}: {ratio / bound - 1:+.1%} "
            f"(target within 5%: {'met' if abs(ratio / bound - 1) <= 0.05 else 'MISSED'})"
        )
    ratio = median[methods[1]] / median["mse"]
    print(
        f"\n(2)/(1) = {ratio:.2f} (target <= 1.3: {'met' if ratio <= 1.3 else 'MISSED'}); "
        f"(2b)/(1) = {median['batched-teacher'] / median['mse']:.2f}; (3)/(1) = {median['naive'] / median['mse']:.2f}"
    )
    if args.profile:
        profile(bench, "self-perceptual")


if __name__ == "__main__":
    main()
