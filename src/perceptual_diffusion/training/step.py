"""One optimiser step, the same for both stages and both model families: draw the global batch from the (seed, step)
generator, forward and backward over this process's micro-batches, clip, check, step, update the EMA.

Everything random in step s comes from a generator seeded by (seed, s), and the learning rate and the EMA decay are
pure functions of images seen, so a resumed run replays the steps a crash interrupted exactly. Under ``torchrun``
every rank draws the *whole* global batch and keeps its slice: N processes compute what one process does with the
same global batch (``distributed.py``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LatentRunConfig, RunConfig, TrainConfig
from perceptual_diffusion.core.losses import MSELoss, SelfPerceptualLoss, drop_condition
from perceptual_diffusion.core.networks import unwrap
from perceptual_diffusion.errors import TrainingDiverged
from perceptual_diffusion.models.lora import saved_state
from perceptual_diffusion.runtime.distributed import mean_across, rank, world_size


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for one (seed, rank, step): independent streams without storing any RNG state."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def learning_rate(
    images_seen: int,
    base_lr: float,
    warmup_images: int,
    schedule: str = "constant",
    total_images: int = 0,
    final_ratio: float = 0.0,
) -> float:
    """Linear warm-up over ``warmup_images``, then constant, or a half cosine down to ``base_lr * final_ratio`` at
    ``total_images`` (Loshchilov & Hutter 2017, without restarts)."""
    warm = min(1.0, (images_seen + 1) / warmup_images) if warmup_images > 0 else 1.0
    if schedule == "constant" or total_images <= warmup_images:
        return base_lr * warm
    progress = min(max(images_seen - warmup_images, 0) / (total_images - warmup_images), 1.0)
    return base_lr * warm * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def ema_beta(images_seen: int, batch_size: int, halflife_images: int, rampup: float) -> float:
    """EDM (Karras et al. 2022) EMA: half-life in images, ramped up as ``rampup * images_seen`` early in a run."""
    halflife = halflife_images if rampup <= 0 else min(halflife_images, images_seen * rampup)
    return 0.5 ** (batch_size / halflife) if halflife > 0 else 0.0


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameters and buffers alike; of a LoRA model the adapter alone (its
    EMA shares the frozen base, ``lora.frozen_ema``)."""
    ema_state = saved_state(ema)
    model_state = unwrap(model).state_dict()
    keys = [k for k, v in ema_state.items() if v.is_floating_point()]
    torch._foreach_lerp_([ema_state[k] for k in keys], [model_state[k] for k in keys], 1.0 - beta)


DROPOUT_STREAM = 2**33  # the "rank" offset of the seed stream of layers that draw from torch's global generator


def seeded_layers(
    config: RunConfig | LatentRunConfig, step: int, device: torch.device
) -> contextlib.AbstractContextManager:
    """For a step whose network draws from torch's global generator (LoRA dropout), that generator seeded by (seed,
    rank, step) for the step and restored afterwards, so a resumed run replays the same masks; otherwise nothing.
    The masks follow the rank and micro-batch split, as any dropout's do."""
    lora = getattr(config, "lora", None)
    if lora is None or lora.dropout == 0:
        return contextlib.nullcontext()
    return _seeded_global(step_seed(config.train.seed, step, rank=DROPOUT_STREAM + rank()), device)


@contextlib.contextmanager
def _seeded_global(seed: int, device: torch.device):
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values() if t.is_floating_point())


def grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm, clipping to ``max_norm`` when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


class BatchSource(Protocol):
    """What the training loop draws batches from: ``num_items`` items, each an x0 of ``x0_shape`` with a condition
    id (a class label, or a caption's index); ``null_id`` is the id that means 'no condition' (condition dropout).
    ``micro_batch`` turns item indices and (possibly dropped) condition ids into the loss's ``x0`` and ``cond``."""

    num_items: int
    x0_shape: tuple[int, ...]
    cond_ids: Tensor | None
    null_id: int

    def micro_batch(self, indices: Tensor, cond_ids: Tensor | None) -> tuple[Tensor, Tensor | None]: ...


@dataclass
class TensorSource:
    """Resident images and labels (the pixel data sets): a micro-batch is two index operations."""

    images: Tensor
    labels: Tensor | None
    null_id: int

    @property
    def num_items(self) -> int:
        return self.images.shape[0]

    @property
    def x0_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def cond_ids(self) -> Tensor | None:
        return self.labels

    def micro_batch(self, indices: Tensor, cond_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self.images[indices], cond_ids


class GlobalBatch(NamedTuple):
    """The randomness of one optimiser step, for the whole global batch: item indices, condition ids after dropout,
    and the loss's per-sample noise (t, eps, t'); the generator is passed on to the loss."""

    generator: torch.Generator
    indices: Tensor
    cond: Tensor | None
    noise: dict[str, Tensor] | None  # None: a plain loss callable that draws its own noise


def draw_global_batch(
    config: RunConfig | LatentRunConfig,
    source: BatchSource,
    loss_fn: MSELoss | SelfPerceptualLoss,
    generator: torch.Generator,
) -> GlobalBatch:
    """One step's global batch from its (seed, step) generator, the same on every rank.

    Every rank draws all of it and keeps its slice, so what a step computes does not depend on the number of
    processes or micro-batches, and a resume needs no sampler state: the position in the data is the step.
    """
    tc, device = config.train, generator.device
    idx = torch.randint(0, source.num_items, (tc.batch_size,), generator=generator, device=device)
    ids = source.cond_ids
    cond = drop_condition(None if ids is None else ids[idx], config.loss.cond_dropout, source.null_id, generator)
    if not hasattr(loss_fn, "draw"):
        # Any callable with the loss signature works in one process; splitting a batch needs its noise up front.
        if tc.grad_accum > 1 or world_size() > 1:
            raise ValueError("a loss without draw() cannot be split over processes or --grad-accum micro-batches")
        return GlobalBatch(generator, idx, cond, None)
    noise = loss_fn.draw((tc.batch_size, *source.x0_shape), generator)
    return GlobalBatch(generator, idx, cond, noise)


def accumulate_gradients(
    train_model: nn.Module,
    loss_fn: MSELoss | SelfPerceptualLoss,
    source: BatchSource,
    batch: GlobalBatch,
    tc: TrainConfig,
    autocast: contextlib.AbstractContextManager,
) -> tuple[list[str], Tensor]:
    """Forward and backward over this rank's ``grad_accum`` micro-batches of the global batch; returns the loss
    terms' names and their means over the global batch (averaged over ranks, like the gradients)."""
    me, world = rank(), world_size()
    micro_size = tc.batch_size // (world * tc.grad_accum)
    term_sums: Tensor | None = None
    for micro in range(tc.grad_accum):
        start = (me * tc.grad_accum + micro) * micro_size
        rows = slice(start, start + micro_size)
        x0, cond = source.micro_batch(batch.indices[rows], None if batch.cond is None else batch.cond[rows])
        if tc.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        noise = None if batch.noise is None else {k: v[rows] for k, v in batch.noise.items()}
        # DDP all-reduces gradients during backward; no_sync skips that for all but the last micro-batch, so
        # accumulation costs one all-reduce per step.
        last = micro == tc.grad_accum - 1
        with contextlib.nullcontext() if last or world == 1 else train_model.no_sync():
            with autocast:
                terms = (
                    loss_fn(train_model, x0, cond, batch.generator)
                    if noise is None
                    else loss_fn(train_model, x0, cond, batch.generator, noise)
                )
            (terms["loss"].mean() / tc.grad_accum).backward()
        means = torch.stack([v.detach().float().mean() for v in terms.values()])
        term_sums = means if term_sums is None else term_sums + means
    # Equal micro-batches: the mean of their means is the global batch's mean.
    return list(terms), mean_across(term_sums / tc.grad_accum)


@dataclass
class Trainee:
    """What one optimiser step reads and changes: the online model (``train_model``: it wrapped for DDP or
    compile), its EMA (rank 0 only), the optimiser, the loss (``losses.build_loss``) and the batch source."""

    model: nn.Module
    train_model: nn.Module
    ema: nn.Module | None
    optimizer: torch.optim.Optimizer
    loss_fn: MSELoss | SelfPerceptualLoss
    source: BatchSource | None = None


def take_step(
    t: Trainee,
    config: RunConfig | LatentRunConfig,
    step: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager,
    last_good: Callable[[], str],
) -> tuple[float, dict[str, float]]:
    """Optimiser step ``step`` -> ``step + 1``; returns its learning rate and the loss terms' means. A non-finite loss
    or gradient stops before the optimiser can spread it (``TrainingDiverged`` naming ``last_good()``); every rank
    sees the same averaged values, so every rank stops at the same step."""
    tc = config.train
    gen = torch.Generator(device).manual_seed(step_seed(tc.seed, step))
    batch = draw_global_batch(config, t.source, t.loss_fn, gen)
    lr = learning_rate(
        step * tc.batch_size, tc.lr, tc.warmup_images, tc.lr_schedule, tc.steps * tc.batch_size, tc.lr_final_ratio
    )
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    t.optimizer.zero_grad(set_to_none=True)
    with seeded_layers(config, step, device):
        names, term_means = accumulate_gradients(t.train_model, t.loss_fn, t.source, batch, tc, autocast)
    norm_t = grad_norm(t.model, tc.grad_clip)  # gradients are already averaged: equal on every rank
    *values, norm = torch.cat([term_means, norm_t.detach().float().reshape(1).to(term_means)]).tolist()  # one sync
    logged = dict(zip(names, values))
    loss = logged["loss"]
    if not (math.isfinite(loss) and math.isfinite(norm)):
        what = f"loss became {loss}" if not math.isfinite(loss) else "gradients became non-finite"
        raise TrainingDiverged(
            f"{what} at step {step + 1}; stopped without saving, last good checkpoint: {last_good()}; "
            "lower --lr or raise --warmup-images"
        )
    t.optimizer.step()
    if t.ema is not None:
        seen = (step + 1) * tc.batch_size
        ema_update(t.ema, t.model, ema_beta(seen, tc.batch_size, tc.ema_halflife_images, tc.ema_rampup))
    return lr, logged
