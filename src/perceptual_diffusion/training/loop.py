"""One training loop for both stages: the loss object is the only difference between MSE training and
self-perceptual fine-tuning.

Read top to bottom: set up the run directory (or resume it), build data, model, teacher, EMA and optimiser, then
step. All randomness of step s comes from a generator seeded by (seed, s), and the learning rate and EMA decay are
pure functions of images seen, so rerunning the same command after a crash replays the same steps exactly.

Under ``torchrun`` every process runs this same loop on its slice of each global batch (``distributed.py``): DDP
averages the gradients, and rank 0 alone keeps the EMA and writes the log, grids and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from perceptual_diffusion.config import LatentRunConfig, RunConfig, TrainConfig
from perceptual_diffusion.core.losses import build_loss
from perceptual_diffusion.core.networks import PixelModel, frozen_copy
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.data.datasets import Dataset, load_dataset
from perceptual_diffusion.data.grid import class_rows, save_grid
from perceptual_diffusion.errors import TrainingDiverged, UserError
from perceptual_diffusion.models import lora
from perceptual_diffusion.models.architectures import build_model
from perceptual_diffusion.models.classifier_net import DomainClassifier, load_perceptual_net, resolve_perceptual_net
from perceptual_diffusion.models.loading import load_model, read_weights
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.runtime.progress import progress_bar
from perceptual_diffusion.training.rundir import RunDir, config_diff, with_teacher_hash
from perceptual_diffusion.training.step import BatchSource, TensorSource, Trainee, all_finite, step_seed, take_step

GRID_SEEDS = 16  # fixed seeds of the periodic sample grids
INIT_STREAM = 2**32 - 1  # the "rank" of the initial-weights seed stream: no real rank reaches it
LORA_STREAM = 2**32 - 2  # the "rank" of a LoRA adapter's initialisation stream


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; under torchrun, CUDA means the GPU of this process's local rank."""
    if name == "auto":
        return distributed.rank_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return distributed.rank_device(device)


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    images_per_second: float
    last_loss: float
    seconds: float


def _check_fits(config: RunConfig, data: Dataset) -> None:
    mc = config.model
    if len(data) == 0:
        raise UserError(f"the data set {data.name} has no images")
    if data.channels != mc.channels:
        raise UserError(f"the data has {data.channels} channel(s) but the model was configured for {mc.channels}")
    classes = data.num_classes if data.num_classes > 1 else 0
    if mc.num_classes not in (0, classes):
        raise UserError(f"the data has {classes} classes but the model was configured for {mc.num_classes}")


def _build_teacher(config: RunConfig, device: torch.device) -> PixelModel | None:
    if config.loss.kind != "self-perceptual":
        return None
    teacher, tconfig, _ = load_model(config.loss.teacher, device)
    _check_same_network(tconfig, config, f"teacher {config.loss.teacher}", "fine-tune with the teacher's settings")
    return frozen_copy(teacher)


def build_perceptual_net(config: RunConfig, device: torch.device) -> DomainClassifier | None:
    """The external-perceptual loss's frozen classifier (``config.loss.perceptual_net``, resolved and hashed by
    ``rundir.with_teacher_hash``), built once; like the teacher, every rank holds its own and none is in DDP."""
    if config.loss.kind != "external-perceptual":
        return None
    _, path = resolve_perceptual_net(config.loss.perceptual_net, config.data.source)
    mc = config.model
    net = load_perceptual_net(path, config.data.source, mc.image_size, mc.channels)
    return net.to(device).eval().requires_grad_(False)


def _check_same_network(other: RunConfig, config: RunConfig, source: str, advice: str) -> None:
    """Weights from ``source`` must come from the same network (preset, image size, channels, classes, schedule)."""
    if other.schedule.family != config.schedule.family:
        raise UserError(
            f"{source} is a {other.schedule.family} model and this run trains a {config.schedule.family} model "
            f"(--schedule {config.schedule.family}): its predictions mean something else; " + advice
        )
    if (other.model, other.schedule.process()) != (config.model, config.schedule.process()):
        mine = {"model": config.to_dict()["model"], "schedule": config.schedule.process()}
        theirs = {"model": other.to_dict()["model"], "schedule": other.schedule.process()}
        raise UserError(
            f"{source} was trained with another model or schedule ({'; '.join(config_diff(theirs, mine)[:3])}); "
            + advice
        )


def init_seed(seed: int) -> int:
    """The seed of the initial weights: its own stream, apart from every training step's (seed, rank, step)."""
    return step_seed(seed, 0, rank=INIT_STREAM)


def _data_fingerprint(data: Dataset) -> str:
    """A short hash of the training images and labels: a resume must draw its batches from the same data."""
    h = hashlib.sha256()
    h.update(memoryview(data.images.contiguous().numpy()).cast("B"))
    h.update(memoryview(data.labels.contiguous().numpy()).cast("B"))
    return f"{len(data)}:{h.hexdigest()[:16]}"


class Task(Protocol):
    """What the training loop needs to know about a model family (``PixelTask``, ``training.latent.LatentTask``)."""

    config: RunConfig | LatentRunConfig

    def load(self) -> None: ...
    def fingerprint(self) -> str: ...
    def source(self, device: torch.device) -> BatchSource: ...
    def build_model(self, config: Any, device: torch.device) -> torch.nn.Module: ...
    def build_teacher(self, config: Any, device: torch.device) -> torch.nn.Module | None: ...
    def sample_grid(self, ema: torch.nn.Module, config: Any, path: Path, device: torch.device) -> None: ...


class PixelTask:
    """The pixel-space models (shapes, Fashion-MNIST, image folders): resident data and a ``PixelModel`` of any
    architecture (``models.architectures``).

    A task is what the one training loop needs to know about a model family: its data as a
    :class:`BatchSource`, how to build the online model and the teacher, and how to draw a grid.
    ``training.latent.LatentTask`` is the other one.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.data: Dataset | None = None

    def load(self) -> None:
        """Read the data and check it fits the model (before any process group or run directory exists)."""
        self.data = load_dataset(self.config.data)
        _check_fits(self.config, self.data)

    def fingerprint(self) -> str:
        return _data_fingerprint(self.data)

    def source(self, device: torch.device) -> TensorSource:
        labels = self.data.labels.to(device) if self.config.model.num_classes > 0 else None
        return TensorSource(self.data.images.to(device), labels, self.config.model.num_classes)

    def build_model(self, config: RunConfig, device: torch.device) -> PixelModel:
        """Seeded initial weights, or those of ``--init-from``."""
        with torch.random.fork_rng(devices=[]):  # seeded: a run killed before its first checkpoint restarts the same
            torch.manual_seed(init_seed(config.train.seed))
            model = build_model(config.model, config.schedule).to(device)
        if config.train.init_from is not None:
            init_state, init_config, _ = read_weights(config.train.init_from)
            where = f"--init-from {config.train.init_from}"
            _check_same_network(init_config, config, where, "train with its settings")
            ckpt.load_state_dict_checked(model, init_state, config.train.init_from)
        return model

    def build_teacher(self, config: RunConfig, device: torch.device) -> PixelModel | None:
        return _build_teacher(config, device)

    def sample_grid(self, ema: PixelModel, config: RunConfig, path: Path, device: torch.device) -> None:
        n_cls = config.model.num_classes
        grid_labels = class_rows(GRID_SEEDS, n_cls) if n_cls > 0 else None  # one class per row, as everywhere
        images_ = sample(ema, list(range(GRID_SEEDS)), grid_labels, config.sample, device=device)
        save_grid(images_, path, rows=grid_labels)


def train(config: RunConfig, run_dir: str | Path, override_config: bool = False) -> TrainResult:
    """Train (or resume) a pixel-space run in ``run_dir``; returns when ``config.train.steps`` steps are done.

    Under ``torchrun`` every process calls this with the same arguments: they train one model with DDP on equal
    slices of each global batch, and rank 0 alone writes the run directory.
    """
    return run_task(PixelTask(config), run_dir, override_config)


def apply_speed_options(model: torch.nn.Module, teacher: torch.nn.Module | None, tc: TrainConfig) -> None:
    """channels_last memory format and gradient checkpointing, on the online model and the teacher alike (the
    teacher's features are differentiated through, so its activations cost memory too)."""
    for net in (model, teacher):
        if net is None:
            continue
        if tc.channels_last:
            net.to(memory_format=torch.channels_last)
        if tc.grad_checkpointing:
            net.enable_gradient_checkpointing()


class Progress:
    """The progress bar and the speed count. Speed covers optimiser steps only (not grids or checkpoint writes);
    the bar shows images/s over the steps since its previous update (the current throughput, not a cumulative
    average) and the remaining time, not a step/s as well; in a log, plain lines (``runtime.progress``)."""

    def __init__(self, tc: TrainConfig, step: int, desc: str, enabled: bool) -> None:
        self.bar = progress_bar(
            tc.steps,
            desc,
            "steps",
            initial=step,
            enabled=enabled and step < tc.steps,  # nothing left to train: no bar
            show_rate=False,  # the postfix's images/s is the one speed shown
            leave=True,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]",
            dynamic_ncols=True,
        )
        self.seconds, self.images = 0.0, 0
        self._mark = (0.0, 0)  # (seconds, images) at the bar's previous speed update

    @contextlib.contextmanager
    def timing(self, images: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.images += images
        self.bar.update(1)

    def speed(self) -> float:
        return self.images / max(self.seconds, 1e-9)

    def show(self, loss: float) -> None:
        recent = (self.images - self._mark[1]) / max(self.seconds - self._mark[0], 1e-9)
        self._mark = (self.seconds, self.images)
        self.bar.set_postfix_str(f"loss {loss:.4f}, {recent:.0f} images/s")


def run_task(task: Task, run_dir: str | Path, override_config: bool = False) -> TrainResult:
    """The training loop for any task (``PixelTask``, ``training.latent.LatentTask``): set up, resume, step."""
    run = RunDir(run_dir)
    config = task.config
    device = resolve_device(config.train.device)
    distributed.check_batch_split(config.train, distributed.launched_world_size())
    if distributed.launched_rank() == 0:
        run.check_target()  # before the data is read: a folder that is not a run costs nothing
    task.load()
    with distributed.process_group(device):
        if not distributed.is_main():
            # The others resolve the same teacher path and hash; the resume point comes from rank 0 (in _fit).
            return _fit(task, with_teacher_hash(config), run, device, override_config)
        run.create()
        with run.lock():  # before config.json is touched: a second process must not rewrite it
            return _fit(task, run.prepare(config, override_config), run, device, override_config)


def _fit(task: Task, config: Any, run: RunDir, device: torch.device, override: bool) -> TrainResult:
    """Build, resume, then step to ``config.train.steps``; rank 0 alone writes the run directory."""
    tc, main = config.train, distributed.is_main()
    trainee = _build(task, config, device, main)
    fingerprint = task.fingerprint() if main else ""
    step = run.resume(config, fingerprint, override, trainee.model, trainee.ema, trainee.optimizer) if main else 0
    if distributed.world_size() > 1:
        # Rank 0 alone reads the run directory; the others take the resume step and the optimiser state from it
        # (and its weights in DDP's constructor), so every rank continues the same run.
        step, opt_state = distributed.broadcast_object((step, trainee.optimizer.state_dict()))
        if not main:
            trainee.optimizer.load_state_dict(opt_state)
    trainee.train_model = distributed.wrap_for_training(trainee.model, tc.compile, device)
    trainee.source = task.source(device)  # after the resume checks: a latent task may fill its cache here
    use_bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    progress = Progress(tc, step, f"train {config.loss.kind}", tc.progress and main)
    last_loss = float("nan")
    trainee.train_model.train()
    with contextlib.closing(progress.bar), run.log_open() if main else contextlib.nullcontext():
        while step < tc.steps:
            with progress.timing(tc.batch_size):
                lr, logged = take_step(trainee, config, step, device, autocast, run.last_good)
                step += 1
            last_loss = logged["loss"]
            if main:  # the next step's all-reduce waits for rank 0's bookkeeping: no barrier needed here
                _after_step(task, config, run, trainee, step, lr, logged, progress, device, fingerprint)
    if main:
        run.ensure_weights(step, trainee.ema, config)
    distributed.barrier()  # every rank returns once the final checkpoint and snapshot exist
    speed = progress.images / progress.seconds if progress.images else float("nan")
    return TrainResult(run.path, step, speed, last_loss, progress.seconds)


def _build(task: Task, config: Any, device: torch.device, main: bool) -> Trainee:
    tc = config.train
    model = task.build_model(config, device)
    if config.lora is not None:  # PEFT's adapter on the base; only its weights train (models/lora.py)
        lora.add_adapter(model, config.lora, seed=step_seed(tc.seed, 0, rank=LORA_STREAM))
    if lora.shares_teacher(config):
        # The teacher is the base itself (arXiv 2401.00110, Sec. 3: the frozen starting model): the online network
        # with its adapter off, so the base weights exist once. It calls the unwrapped module, never DDP's forward.
        teacher, separate_teacher = lora.BaseTeacher(model), None
    else:
        teacher = separate_teacher = task.build_teacher(config, device)  # every rank's own copy; never in DDP
    perceptual_net = build_perceptual_net(config, device)  # the same: the loss holds it, the optimiser never sees it
    ema = lora.frozen_ema(model).to(device) if main else None  # rank 0 alone keeps (and saves) the EMA
    apply_speed_options(model, separate_teacher, tc)  # the shared teacher's pass is never checkpointed
    trained = [p for p in model.parameters() if p.requires_grad]  # all of them, or a LoRA run's adapter alone
    optimizer = torch.optim.AdamW(trained, lr=tc.lr, weight_decay=tc.weight_decay)
    if config.loss.kind == "latent-perceptual":  # its frozen network is the task's VAE decoder
        loss = task.build_loss(config, model.schedule, device)
    else:
        loss = build_loss(config.loss, model.schedule, teacher, perceptual_net)
    return Trainee(model, model, ema, optimizer, loss)


def _after_step(
    task: Task,
    config: Any,
    run: RunDir,
    trainee: Trainee,
    step: int,
    lr: float,
    logged: dict[str, float],
    progress: Progress,
    device: torch.device,
    fingerprint: str,
) -> None:
    """Rank 0's writes after a step. Order matters for resuming after SIGKILL: log and grid first, checkpoint last,
    so that whatever a kill interrupts is redone (identically) by the replay from the previous checkpoint."""
    tc, last = config.train, step == config.train.steps
    if step % tc.log_every == 0 or last:
        record = {"step": step, "images_seen": step * tc.batch_size, "lr": lr, "images_per_second": progress.speed()}
        run.write_log(record | logged)
        progress.show(logged["loss"])
    if step % tc.sample_every == 0 or last:
        with run.guard("sample grid", step):
            task.sample_grid(trainee.ema, config, run.grid_path(step), device)
    if tc.snapshot_every and (step % tc.snapshot_every == 0 or last):
        run.save_snapshot(step, trainee.ema, config)
    if step % tc.checkpoint_every == 0 or last:
        if not all_finite(trainee.model, trainee.ema):  # never write non-finite weights
            raise TrainingDiverged(
                f"the weights became non-finite by step {step}; stopped without saving, last good checkpoint: "
                f"{run.last_good()}; lower --lr or raise --warmup-images"
            )
        payload = {
            "step": step,
            "model": lora.saved_state(trainee.model),  # of a LoRA run, the adapter: the base is in the config
            "ema": lora.saved_state(trainee.ema),
            "optimizer": trainee.optimizer.state_dict(),
            "config": config.to_json(),
            "data": fingerprint,
        }
        run.save_checkpoint(step, payload, trainee.ema, config)
