"""Many processes (PyTorch DDP under ``torchrun``): the process group, the device of each rank, the few
collectives the training loop and evaluation need (``training/step.py`` draws and splits each step's global batch).

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
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from perceptual_diffusion.config import TrainConfig
from perceptual_diffusion.errors import UserError

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

        # The constructor broadcasts rank 0's weights to every rank, once (the model has no buffers to keep in sync).
        # Its reducer buckets only parameters that require grad, as they are now: a LoRA run's adapter alone
        # (lora.add_adapter runs before this), so the frozen base costs no gradient bucket and no all-reduce.
        # No find_unused_parameters: every trained tensor is in the online forward's graph (a shared teacher's pass
        # runs with the adapter off, on the unwrapped module, and reaches no trained tensor).
        device_ids = [device.index] if device.type == "cuda" else None
        wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
    return wrapped
