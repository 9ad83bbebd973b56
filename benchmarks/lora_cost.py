"""What a self-perceptual LoRA step costs at the real SD 2.1-base size, with the teacher for free (issue 20, item 5).

    python benchmarks/lora_cost.py --threads 2 --repeats 5                  # SD 2.1-base U-Net, 64x64 latents, batch 1
    python benchmarks/lora_cost.py --threads 2 --repeats 5 --full-cap 24    # + the full step, capped at 24 GiB
    python benchmarks/lora_cost.py --preset small --repeats 15              # the project's pixel U-Net (small preset)

The network is Stable Diffusion 2.1-base's U-Net built from its published architecture (``SD21_BASE_UNET``) with
random weights: nothing is downloaded, and a step's cost does not depend on the weights' values. Input: random
latents of 4x64x64 (512 px images), batch 1, a random text context of 77x1024, the paper's schedule (zero-SNR DDPM,
v-prediction). LoRA: PEFT adapters of ``--rank`` on the attention projections (``models.lora.DEFAULT_TARGETS``),
AdamW over the adapter alone. The steps, each one full training step (forward, backward, AdamW):

(a) ``lora-mse``: the MSE loss on the LoRA model.
(b) ``lora-sp``: the self-perceptual loss (arXiv 2401.00110, Sec. 3, Algorithm 1) with the shared teacher
    (``models.lora.BaseTeacher``: the online network with its adapter off; one copy of the base exists).
(b2) ``lora-sp-two-copy``: the same loss against a separate frozen copy of the base, as a port without the shared
    teacher would hold it (loss and adapter gradients equal (b)'s; it costs one more base copy of memory).
(T) ``teacher``: the teacher's share alone, as ``step_cost.py`` measures it: the encoder half forward on the real
    branch under no_grad, forward on a leaf input with a graph, backward to that input. The bound of (b) is
    1 + (T)/(a). A LoRA step has no weight gradients, so (T) is a larger share of it than of a full step.
(d) ``full-sp``: full fine-tuning with the self-perceptual loss and a separate teacher copy, as the paper trains:
    parameters, gradients, AdamW state, teacher and EMA computed from the parameter count; with ``--full-cap GIB``
    also run once in a subprocess whose address space is capped (``resource.setrlimit(RLIMIT_AS)``), so a machine
    that cannot hold it reports "did not fit" instead of swapping.

Memory: the state (parameters, gradients, AdamW's two moments, EMA and teacher copies) is computed from parameter
counts in fp32; activations are measured as ``step_cost.py`` does (bytes of the distinct storages autograd saves for
backward during one step's forward, ``torch.autograd.graph.saved_tensors_hooks``, parameters excluded); peak RSS
(VmHWM) of a fresh subprocess per step, where the machine holds it (``--no-rss`` skips it). Timing: the steps are
interleaved round-robin (order shuffled each round), median over ``--repeats`` rounds after ``--warmup`` rounds.
Targets: (b)/(a) within 5% of its bound (expect about 1.5x on SD 2.1, 1.35x on the pixel U-Nets); (b) holds one
base copy (3.46 GB fp32 on SD 2.1) less than (b2) and at most 1.2x the memory of (a).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # step_cost.py beside this file: its teacher pieces
from step_cost import saving, teacher_pieces, vm_hwm_kib  # noqa: E402

from perceptual_diffusion.config import LoraConfig, LossConfig, ModelConfig, ScheduleConfig  # noqa: E402
from perceptual_diffusion.core.losses import MSELoss, SelfPerceptualLoss  # noqa: E402
from perceptual_diffusion.core.networks import DiffusionUNet, frozen_copy  # noqa: E402
from perceptual_diffusion.models import lora  # noqa: E402
from perceptual_diffusion.models.latent import TextConditionedUNet  # noqa: E402

# Stable Diffusion 2.1-base's U-Net as published (stabilityai/stable-diffusion-2-1-base, unet/config.json; the same
# architecture as ByteDance/sd2.1-base-zsnr-laionaes6, the paper's MSE model): 865.9 M parameters, 3.46 GB in fp32.
# upcast_attention is False in the 2.1-base config (the 768-px v-model of 2.1 sets True); it changes fp16 attention
# only, so not a CPU fp32 step. Values as recalled from that file, not re-read here (no network).
SD21_BASE_UNET: dict[str, Any] = {
    "sample_size": 64,  # latents of 512 px images
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
    "cross_attention_dim": 1024,  # OpenCLIP ViT-H/14's width
    "attention_head_dim": (5, 10, 20, 20),  # diffusers' name for the number of heads per level (64 channels each)
    "use_linear_projection": True,
    "upcast_attention": False,
}
# A tiny SD-style U-Net for the functional test (the shape of testing.py's tiny components).
TINY_SD_UNET: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "use_linear_projection": True,
}

METHODS = ("lora-mse", "lora-sp", "lora-sp-two-copy", "teacher")
LABELS = {"lora-mse": "(a)", "lora-sp": "(b)", "lora-sp-two-copy": "(b2)", "teacher": "(T)", "full-sp": "(d)"}
FP32 = 4


@dataclass(frozen=True)
class Architecture:
    """One network to measure: an SD-style U-Net from a config, or a pixel preset of the project."""

    name: str
    unet: dict[str, Any] | None = None  # UNet2DConditionModel config (latent models)
    preset: str | None = None  # DiffusionUNet preset (pixel models)
    batch: int = 1
    image: tuple[int, int, int] = (4, 64, 64)
    context: tuple[int, int] = (77, 1024)  # text tokens x width (latent models)
    num_classes: int = 4  # labels (pixel models)

    @property
    def description(self) -> str:
        c, h, w = self.image
        if self.unet is not None:
            tokens, width = self.context
            return f"{self.name} U-Net, {c}x{h}x{w} latents, batch {self.batch}, context {tokens}x{width}"
        return f"pixel preset {self.preset}, {c}x{h}x{w} images, batch {self.batch}, {self.num_classes} classes"


ARCHITECTURES = {
    "sd21": Architecture("SD 2.1-base", unet=SD21_BASE_UNET),
    "tiny-sd": Architecture("tiny SD-style", unet=TINY_SD_UNET, batch=2, image=(4, 8, 8), context=(8, 32)),
    # The step_cost.py setting: the demo's model, 16x16 images, batch 64.
    "small": Architecture("small", preset="small", batch=64, image=(3, 16, 16)),
    "tiny": Architecture("tiny", preset="tiny", batch=64, image=(3, 16, 16)),
}


def build_base(arch: Architecture, seed: int = 0) -> nn.Module:
    """The base network with random weights (seeded): the project's model around a diffusers U-Net."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if arch.unet is not None:
        unet = UNet2DConditionModel(**arch.unet)
        return TextConditionedUNet(unet, ScheduleConfig(), torch.zeros(1, *arch.context)).train()
    config = ModelConfig(
        preset=arch.preset, image_size=arch.image[1], channels=arch.image[0], num_classes=arch.num_classes
    )
    return DiffusionUNet(config, ScheduleConfig()).train()


def parameter_count(module: nn.Module, adapter: bool | None = None) -> int:
    """Parameters of ``module``: all, or only the adapter's (True) or only the base's (False)."""
    return sum(p.numel() for n, p in module.named_parameters() if adapter is None or lora.is_adapter_key(n) == adapter)


def state_bytes(base: int, adapter: int) -> dict[str, int]:
    """fp32 bytes of what each step holds besides activations. LoRA: one base, the adapter with its gradient, AdamW's
    two moments and its EMA (``lora.frozen_ema`` shares the base); two-copy: + a frozen base copy. Full: the network,
    its gradients, AdamW's two moments, an EMA copy and the frozen teacher copy (the paper's recipe)."""
    lora_state = (base + 5 * adapter) * FP32
    return {
        "lora-mse": lora_state,
        "lora-sp": lora_state,
        "lora-sp-two-copy": lora_state + base * FP32,
        "teacher": base * FP32,
        "full-sp": 6 * base * FP32,
    }


def make_batch(arch: Architecture, step: int) -> tuple[Tensor, Tensor, torch.Generator]:
    """Step ``step``'s inputs: random latents (or images) and a random text context (or labels), seeded by step."""
    gen = torch.Generator().manual_seed(step)
    x0 = torch.randn((arch.batch, *arch.image), generator=gen)
    if arch.unet is not None:
        cond = torch.randn((arch.batch, *arch.context), generator=gen)
    else:
        cond = torch.randint(0, arch.num_classes, (arch.batch,), generator=gen)
    return x0, cond, gen


class Bench:
    """The LoRA model (one base), the steps of ``methods`` and what they need (the two-copy teacher only if asked)."""

    def __init__(self, arch: Architecture, rank: int, methods: tuple[str, ...] = METHODS, seed: int = 0) -> None:
        self.arch = arch
        self.model = build_base(arch, seed)
        two_copy = frozen_copy(self.model) if "lora-sp-two-copy" in methods else None
        lora.add_adapter(self.model, LoraConfig(rank=rank), seed=seed)
        with torch.no_grad():  # B starts at zero (the adapter is its base): perturbed, so losses and gradients differ
            gen = torch.Generator().manual_seed(seed + 1)
            for name, p in self.model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(1e-3 * torch.randn(p.shape, generator=gen))
        self.adapter = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.adapter, lr=1e-6)
        self.ema = lora.frozen_ema(self.model)  # held as the training loop holds it (the adapter's memory)
        self.shared = lora.BaseTeacher(self.model)
        schedule = self.model.schedule
        sp_config = LossConfig(kind="self-perceptual", teacher="benchmark", cond_dropout=0.0)
        mse = MSELoss(LossConfig(cond_dropout=0.0), schedule)
        sp = SelfPerceptualLoss(sp_config, self.shared)
        self.losses: dict[str, Callable[[Tensor, Tensor, torch.Generator], Tensor]] = {
            "lora-mse": lambda x0, c, g: mse(self.model, x0, c, g)["loss"],
            "lora-sp": lambda x0, c, g: sp(self.model, x0, c, g)["loss"],
            "teacher": lambda x0, c, g: teacher_pieces(self.model, self.shared, x0, c, g),
        }
        if two_copy is not None:
            sp_two = SelfPerceptualLoss(sp_config, two_copy)
            self.losses["lora-sp-two-copy"] = lambda x0, c, g: sp_two(self.model, x0, c, g)["loss"]
        self.param_storages = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        if two_copy is not None:
            self.param_storages |= {p.untyped_storage().data_ptr() for p in two_copy.parameters()}
        self.counts = (parameter_count(self.model, adapter=False), parameter_count(self.model, adapter=True))

    def batch(self, step: int) -> tuple[Tensor, Tensor, torch.Generator]:
        return make_batch(self.arch, step)

    def step(self, method: str, step: int, saved: dict[int, int] | None = None) -> float:
        """One full training step; with ``saved``, record the storages autograd keeps for backward. Returns the loss."""
        x0, cond, gen = self.batch(step)
        loss = saving(lambda: self.losses[method](x0, cond, gen).mean(), self.param_storages, saved)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if method != "teacher":  # the teacher's pieces reach the input alone: no adapter gradient to apply
            self.optimizer.step()
        return float(loss.detach())

    def losses_at(self, step: int) -> dict[str, float]:
        """The shared-teacher and two-copy losses on the same batch and draws, before any update."""
        out = {}
        with torch.no_grad():
            for method in ("lora-sp", "lora-sp-two-copy"):
                x0, cond, gen = self.batch(step)
                out[method] = float(self.losses[method](x0, cond, gen).mean())
        return out


@dataclass(frozen=True)
class Measurement:
    """One step: median time, saved activations, computed state and (where run) peak RSS."""

    method: str
    median_ms: float
    saved_bytes: int
    state_bytes: int
    rss_mib: float | None = None
    fit: bool = True

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.saved_bytes


@dataclass(frozen=True)
class Report:
    """A whole measurement, as typed data: ``render`` prints it."""

    arch: Architecture
    rank: int
    repeats: int
    base_parameters: int
    adapter_parameters: int
    rows: tuple[Measurement, ...]
    losses: dict[str, float]
    full: Measurement | None = None
    full_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, method: str) -> Measurement:
        return next(r for r in self.rows if r.method == method)

    @property
    def ratio(self) -> float:
        return self.row("lora-sp").median_ms / self.row("lora-mse").median_ms

    @property
    def bound(self) -> float:
        return 1 + self.row("teacher").median_ms / self.row("lora-mse").median_ms


def rss_mib(arch_key: str, method: str, rank: int, steps: int = 2, cap_gib: float | None = None) -> float | None:
    """Peak RSS of a fresh process that builds only what ``method`` needs and runs ``steps`` steps of it (None: it
    did not fit under ``cap_gib``)."""
    result = run_child(
        ["--rss-child", method, "--preset", arch_key, "--rank", str(rank), "--rss-steps", str(steps)], cap_gib
    )
    return None if result is None else result["rss_mib"]


MEMORY_ERRORS = ("MemoryError", "can't allocate", "Cannot allocate memory", "failed to map segment", "bad_alloc")


def run_child(args: list[str], cap_gib: float | None) -> dict[str, Any] | None:
    """Run this script as a subprocess (address space capped at ``cap_gib``); its last stdout line is JSON. None
    when it ran out of memory under the cap."""

    def limit() -> None:
        if cap_gib is not None:
            cap = int(cap_gib * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    threads = ["--threads", str(torch.get_num_threads())]
    proc = subprocess.run([sys.executable, __file__, *args, *threads], capture_output=True, text=True, preexec_fn=limit)
    if proc.returncode != 0:
        if cap_gib is not None and any(m in proc.stderr for m in MEMORY_ERRORS):
            return None
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_child(arch_key: str, method: str, rank: int, steps: int) -> None:
    needs = (method, "lora-sp-two-copy") if method == "lora-sp-two-copy" else (method,)
    bench = Bench(ARCHITECTURES[arch_key], rank, methods=needs)
    for step in range(steps):
        bench.step(method, step)
    print(json.dumps({"rss_mib": vm_hwm_kib() / 1024}))


def full_child(arch_key: str, repeats: int) -> None:
    """The paper's full self-perceptual step: the whole network trained, a frozen teacher copy, an EMA copy, AdamW
    over every weight. Prints time, saved activations and peak RSS as JSON (run under an address-space cap)."""
    arch = ARCHITECTURES[arch_key]
    model = build_base(arch)
    teacher, ema = frozen_copy(model), frozen_copy(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    loss_fn = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="benchmark", cond_dropout=0.0), teacher)
    params = {p.untyped_storage().data_ptr() for m in (model, teacher, ema) for p in m.parameters()}
    saved: dict[int, int] = {}
    times = []
    for step in range(repeats + 1):
        x0, cond, gen = make_batch(arch, step)  # the same inputs as the LoRA steps
        start = time.perf_counter()
        if step == 0:

            def pack(tensor: Tensor) -> Tensor:
                if tensor.untyped_storage().data_ptr() not in params:
                    saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
                return tensor

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                loss = loss_fn(model, x0, cond, gen)["loss"].mean()
        else:
            loss = loss_fn(model, x0, cond, gen)["loss"].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # the EMA is held, its update not timed (as in the LoRA steps)
        if step > 0:  # the first step (with the hook, and AdamW's state allocated) is not timed
            times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {"median_ms": statistics.median(times) * 1e3, "saved": sum(saved.values()), "rss_mib": vm_hwm_kib() / 1024}
        )
    )


def measure(
    arch_key: str,
    rank: int = 8,
    repeats: int = 5,
    warmup: int = 1,
    rss: bool = True,
    full_cap_gib: float | None = None,
) -> Report:
    """Every step of the module docstring on ``ARCHITECTURES[arch_key]``: a typed ``Report``."""
    arch = ARCHITECTURES[arch_key]
    bench = Bench(arch, rank)
    losses = bench.losses_at(10_000)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    order = list(METHODS)
    shuffle = random.Random(0)
    for rnd in range(warmup + repeats):
        shuffle.shuffle(order)
        for method in order:
            start = time.perf_counter()
            bench.step(method, rnd)
            if rnd >= warmup:
                times[method].append(time.perf_counter() - start)
    base, adapter = bench.counts
    state = state_bytes(base, adapter)
    rows = []
    for method in METHODS:
        saved: dict[int, int] = {}
        bench.step(method, 0, saved)
        rows.append(
            Measurement(
                method,
                statistics.median(times[method]) * 1e3,
                sum(saved.values()),
                state[method],
                rss_mib(arch_key, method, rank) if rss and method != "teacher" else None,
            )
        )
    full, note = None, "computed only (run with --full-cap GIB to measure it)"
    if full_cap_gib is not None:
        del bench  # the child gets the machine's memory, not this process's
        result = run_child(["--full-child", "--preset", arch_key, "--repeats", str(max(repeats, 1))], full_cap_gib)
        if result is None:
            full = Measurement("full-sp", float("nan"), 0, state["full-sp"], None, fit=False)
            note = f"did not fit under an address-space cap of {full_cap_gib:g} GiB"
        else:
            full = Measurement("full-sp", result["median_ms"], result["saved"], state["full-sp"], result["rss_mib"])
            note = f"run in a subprocess capped at {full_cap_gib:g} GiB"
    meta = {
        "date": str(datetime.date.today()),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return Report(arch, rank, repeats, base, adapter, tuple(rows), losses, full, note, meta)


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g}"


def render(report: Report) -> str:
    """The markdown table and the target lines."""
    m = report.meta
    mse = report.row("lora-mse")
    lines = [
        f"# LoRA step cost, {m['date']}, {m['cpu']}, {m['cpus']} CPUs (load {m['load']:.1f}), torch {m['torch']} "
        f"({m['threads']} threads); {report.arch.description}; LoRA rank {report.rank} ({report.adapter_parameters:,} "
        f"adapter parameters on a base of {report.base_parameters:,}, {_gib(report.base_parameters * FP32)} GiB fp32); "
        f"median of {report.repeats} interleaved rounds",
        "",
        "| step | median ms | / (a) | state GiB (computed) | saved activations MiB | state + activations GiB | / (a) "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    computed = Measurement("full-sp", float("nan"), 0, 6 * report.base_parameters * FP32, fit=True)
    for r in (*report.rows, report.full or computed):
        measured = r.saved_bytes > 0 or r.method != "full-sp"  # the full step's activations: measured only if run
        rss = "-" if r.rss_mib is None else f"{r.rss_mib:.0f}"
        saved = f"{r.saved_bytes / 2**20:.1f}" if measured else "-"
        time_ms = "did not fit" if not r.fit else ("-" if r.median_ms != r.median_ms else f"{r.median_ms:.1f}")
        ratio = "-" if r.median_ms != r.median_ms else f"{r.median_ms / mse.median_ms:.2f}"
        at_least = "" if measured else "≥ "  # without its activations, a lower bound
        lines.append(
            f"| {LABELS[r.method]} {r.method} | {time_ms} | {ratio} | {_gib(r.state_bytes)} | {saved} | "
            f"{at_least}{_gib(r.total_bytes)} | {at_least}{r.total_bytes / mse.total_bytes:.2f} | {rss} |"
        )
    ratio, bound = report.ratio, report.bound
    sp, two = report.row("lora-sp"), report.row("lora-sp-two-copy")
    base_bytes = report.base_parameters * FP32
    saved_copy = two.total_bytes - sp.total_bytes
    diff = abs(report.losses["lora-sp"] - report.losses["lora-sp-two-copy"])
    lines += [
        "",
        f"(b)/(a) = {ratio:.3f} against its bound 1 + (T)/(a) = {bound:.3f}: {ratio / bound - 1:+.1%} (target within "
        f"5%: {'met' if abs(ratio / bound - 1) <= 0.05 else 'MISSED'})",
        f"(b2) - (b) = {_gib(saved_copy)} GiB, one base copy = {_gib(base_bytes)} GiB (target: equal: "
        f"{'met' if abs(saved_copy - base_bytes) <= 0.05 * base_bytes else 'MISSED'}); (b)/(a) memory = "
        f"{sp.total_bytes / mse.total_bytes:.2f} (target <= 1.2: "
        f"{'met' if sp.total_bytes <= 1.2 * mse.total_bytes else 'MISSED'})",
        f"shared-teacher loss {report.losses['lora-sp']:.8g}, two-copy loss {report.losses['lora-sp-two-copy']:.8g} "
        f"(|difference| {diff:.2g})",
        f"(d) full self-perceptual step with a teacher copy: {report.full_note}.",
    ]
    if sp.rss_mib is not None and two.rss_mib is not None:
        lines.append(f"peak RSS (b2) - (b) = {two.rss_mib - sp.rss_mib:+.0f} MiB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(ARCHITECTURES), default="sd21", help="network (default sd21)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds over all steps (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default %(default)s)")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--full-cap", type=float, default=None, help="also run the full step under this many GiB")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--rss-child", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rss-steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--full-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.preset, args.rss_child, args.rank, args.rss_steps)
        return
    if args.full_child:
        full_child(args.preset, args.repeats)
        return
    report = measure(args.preset, args.rank, args.repeats, args.warmup, not args.no_rss, args.full_cap)
    print(render(report))
    if args.json:
        Path(args.json).write_text(json.dumps(_plain(report), indent=2, default=str))


def _plain(report: Report) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(report) | {"ratio": report.ratio, "bound": report.bound}


if __name__ == "__main__":
    main()
