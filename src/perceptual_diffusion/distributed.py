"""Many processes (PyTorch DDP under ``torchrun``): the process group, the device of each rank, the few
collectives the training loop and evaluation need, and how one optimiser step's global batch is drawn and split
over processes and gradient-accumulation micro-batches.

A process that ``torchrun`` did not start (no ``WORLD_SIZE`` > 1 in its environment) never creates a process group:
every helper here is then a no-op with rank 0 of 1, so the single-process path costs nothing.

Two rules make results independent of the number of processes:
- training: every rank draws the *whole* global batch (indices, condition dropout, t, eps, t') from the (seed, step)
  generator and keeps its slice, so N processes see the same samples as one process with the same global batch;
- sampling and evaluation: rank r takes seeds[r::world] (each image has its own seed), and rank 0 gathers the
  results back into seed order.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .config import LatentRunConfig, RunConfig, TrainConfig
from .errors import UserError
from .losses import MSELoss, SelfPerceptualLoss, drop_condition

T = TypeVar("T")


def launched_world_size() -> int:
    """The number of processes ``torchrun`` started (1 when run as a plain process)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's global rank as ``torchrun`` set it (``RANK``; 0 when run as a plain process)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 when run as a plain process)."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def rank() -> int:
    """This process's global rank, 0 without a process group."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the group, 1 without a process group."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on the one process that writes files and prints (rank 0)."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """Under ``torchrun`` each process takes the GPU of its local rank; an explicit ``cuda:N`` would put every
    process on one GPU, so it is refused."""
    if device.type != "cuda" or launched_world_size() == 1:
        return device
    if device.index is not None:
        raise UserError(f"--device {device} under torchrun: use --device cuda (process k takes GPU LOCAL_RANK=k)")
    device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)  # NCCL's collectives and object broadcasts use the current device
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the ``torchrun`` process group for the duration of the block (NCCL on CUDA, gloo on CPU).

    Does nothing when not launched by torchrun or when the caller already set up a group (and then leaves it open).
    """
    if launched_world_size() == 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise UserError("this PyTorch build has no gloo backend for CPU processes; run a single process")
    # A long timeout: rank 0 alone writes sample grids and checkpoints while the others wait at the next collective.
    dist.init_process_group(backend, timeout=timedelta(minutes=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a disk cache), then the others run it and find the cache filled."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process (pickled; for small things like a step number and optimiser state)."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across(values: Tensor) -> Tensor:
    """The mean of ``values`` over processes (each process holds an equal share of the global batch)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size()


def seed_shard(items: Sequence[T]) -> Sequence[T]:
    """This process's share of a per-seed list: items[rank::world] (all of it in a single process)."""
    return items[rank() :: world_size()]


def gather_seed_order(local: Tensor) -> Tensor | None:
    """Rows of every process's :func:`seed_shard` back in seed order, on rank 0 (None on the others).

    Row i of the result came from rank i % world, where it was row i // world.
    """
    world = world_size()
    if world == 1:
        return local
    parts: list[Any] = [None] * world if is_main() else None
    dist.gather_object(local.cpu(), parts, dst=0)
    if not is_main():
        return None
    n = sum(len(p) for p in parts)
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out


# -------------------------------------------------------------------------------------------------------------------
# One optimiser step's work, split over processes and gradient-accumulation micro-batches.


def check_batch_split(tc: TrainConfig, world: int) -> None:
    """The global batch must split into equal micro-batches: ``world`` processes x ``grad_accum`` each."""
    if tc.batch_size % (world * tc.grad_accum):
        raise UserError(
            f"--batch-size {tc.batch_size} (the global batch) does not split into {world} process(es) x "
            f"--grad-accum {tc.grad_accum} equal micro-batches; use a multiple of {world * tc.grad_accum}"
        )


def wrap_for_training(model: nn.Module, compile_: bool, device: torch.device) -> nn.Module:
    """torch.compile, then DDP over processes (nanoGPT's order); ``networks.unwrap`` strips both again."""
    wrapped: nn.Module = torch.compile(model) if compile_ else model
    if world_size() > 1:
        from torch.nn.parallel import DistributedDataParallel

        # The constructor broadcasts rank 0's weights to every rank (the model has no buffers to keep in sync).
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped


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
    noise = loss_fn.draw((tc.batch_size, *source.x0_shape), config.schedule.num_train_timesteps, generator)
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
