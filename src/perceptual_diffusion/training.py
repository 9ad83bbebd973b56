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
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import distributed
from .config import RESUMABLE_FIELDS, LatentRunConfig, RunConfig, TrainConfig, config_diff
from .data import Dataset, load_dataset
from .errors import TrainingDiverged, UserError
from .grid import class_rows, save_grid
from .losses import build_loss
from .networks import DiffusionUNet, frozen_copy, unwrap
from .sampling import sample

GRID_SEEDS = 16  # fixed seeds of the periodic sample grids
INIT_STREAM = 2**32 - 1  # the "rank" of the initial-weights seed stream: no real rank reaches it


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
def ema_update(ema: DiffusionUNet, model: DiffusionUNet, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * model, parameters and buffers alike."""
    ema_t = list(ema.state_dict().values())
    model_t = list(unwrap(model).state_dict().values())
    torch._foreach_lerp_(
        [e for e in ema_t if e.is_floating_point()], [m for m in model_t if m.is_floating_point()], 1.0 - beta
    )


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    images_per_second: float
    last_loss: float
    seconds: float


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[DiffusionUNet, RunConfig, int]:
    """A trained model (EMA weights) from a run directory or weights file, in eval mode."""
    state_dict, config, step = ckpt.read_weights(path)
    model = DiffusionUNet(config.model, config.schedule)
    ckpt.load_state_dict_checked(model, state_dict, str(path))
    return model.to(device).eval(), config, step


def _weights_sha256(path: Path) -> str:
    """sha256 of a weights file or folder; of a Stable Diffusion folder, of its ``unet/`` only: the teacher is the
    U-Net, and hashing the VAE and text encoder too would read gigabytes at every start."""
    if path.is_dir() and (path / "unet").is_dir() and (path / "text_encoder").is_dir():
        return ckpt.sha256_file(path / "unet")
    return ckpt.sha256_file(path)


def _with_teacher_hash(config: RunConfig | LatentRunConfig) -> RunConfig | LatentRunConfig:
    """Resolve the teacher (and init) path to the weights file and record the teacher's sha256 in the config."""
    changes = {}
    if config.loss.teacher is not None:
        path = ckpt.resolve_weights(config.loss.teacher).resolve()
        changes["loss"] = replace(config.loss, teacher=str(path), teacher_sha256=_weights_sha256(path))
    train = config.train
    if train.init_from is None and config.loss.kind == "self-perceptual":
        train = replace(train, init_from=changes["loss"].teacher)  # the paper: online model starts as the teacher
    if train.init_from is not None:
        train = replace(train, init_from=str(ckpt.resolve_weights(train.init_from).resolve()))
    return replace(config, train=train, **changes)


def _make_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a folder; choose another --run-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run directory {run_dir} ({exc.strerror or exc})") from None


def prepare_run_dir(
    config: RunConfig | LatentRunConfig, run_dir: Path, override: bool = False
) -> RunConfig | LatentRunConfig:
    """Create the run directory or check that a resume uses the same configuration."""
    _make_run_dir(run_dir)
    for name, what in ((ckpt.STATE_DIR, "checkpoints"), ("samples", "sample grids"), ("snapshots", "EMA snapshots")):
        # Checked before any work: found at the first checkpoint, it would cost the steps trained until then.
        folder = run_dir / name
        if folder.exists() and not folder.is_dir():
            raise UserError(
                f"{folder} is a file, not the folder of the run's {what}; move it away, or use a new --run-dir"
            )
    config = _with_teacher_hash(config)
    saved = run_dir / ckpt.CONFIG_NAME
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (ValueError, OSError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
            raise UserError(f"{saved} is not valid JSON; restore it or use a new --run-dir") from None
        if not isinstance(old, dict):
            raise UserError(f"{saved} does not hold a configuration; restore it or use a new --run-dir")
        _check_same_config(old, config, str(run_dir), override)
    try:
        ckpt.atomic_write_text(saved, config.to_json())
    except OSError as exc:
        raise UserError(f"cannot write {saved} ({exc.strerror or exc}); check the --run-dir") from None
    return config


def _check_same_config(old: dict, config: RunConfig | LatentRunConfig, where: str, override: bool) -> None:
    """Refuse to resume with a configuration that changes what the steps compute, naming the fields that differ."""
    resumable = RESUMABLE_FIELDS
    if config.train.lr_schedule != "constant":  # a decay is a function of the total steps: changing them is new run
        resumable = resumable - {"train.steps"}
    diffs = [d for d in config_diff(old, config.to_dict()) if d.split(":")[0] not in resumable]
    if diffs and not override:
        raise UserError(
            f"{where} was started with another configuration ({'; '.join(diffs)}); use a new --run-dir, "
            "or pass --override-config to resume with the new values"
        )


def _check_fits(config: RunConfig, data: Dataset) -> None:
    mc = config.model
    if len(data) == 0:
        raise UserError(f"the data set {data.name} has no images")
    if data.channels != mc.channels:
        raise UserError(f"the data has {data.channels} channel(s) but the model was configured for {mc.channels}")
    classes = data.num_classes if data.num_classes > 1 else 0
    if mc.num_classes not in (0, classes):
        raise UserError(f"the data has {classes} classes but the model was configured for {mc.num_classes}")


def _build_teacher(config: RunConfig, device: torch.device) -> DiffusionUNet | None:
    if config.loss.kind != "self-perceptual":
        return None
    teacher, tconfig, _ = load_model(config.loss.teacher, device)
    _check_same_network(tconfig, config, f"teacher {config.loss.teacher}", "fine-tune with the teacher's settings")
    return frozen_copy(teacher)


def _check_same_network(other: RunConfig, config: RunConfig, source: str, advice: str) -> None:
    """Weights from ``source`` must come from the same network (preset, image size, channels, classes, schedule)."""
    if (other.model, other.schedule) != (config.model, config.schedule):
        mine = {"model": config.to_dict()["model"], "schedule": config.to_dict()["schedule"]}
        theirs = {"model": other.to_dict()["model"], "schedule": other.to_dict()["schedule"]}
        raise UserError(
            f"{source} was trained with another model or schedule ({'; '.join(config_diff(theirs, mine)[:3])}); "
            + advice
        )


def init_seed(seed: int) -> int:
    """The seed of the initial weights: its own stream, apart from every training step's (seed, rank, step)."""
    return step_seed(seed, 0, rank=INIT_STREAM)


def _trim_log(path: Path, step: int) -> None:
    """Keep only complete log records up to ``step``: the resumed run rewrites the later ones it replays."""
    if not path.exists():
        return
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read the log {path} ({exc.strerror or exc}); move it away to resume") from None
    kept = []
    for line in text.splitlines(keepends=True):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a line cut short by SIGKILL
        complete = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
        if complete and record["step"] <= step:
            kept.append(line)
    if "".join(kept) != text:
        ckpt.atomic_write_text(path, "".join(kept))


@contextlib.contextmanager
def _exclusive(run_dir: Path) -> Iterator[None]:
    """Hold a lock on the run directory so that two processes never train into it at once (freed on any exit)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    try:
        fh = open(run_dir / ".lock", "a")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise UserError(f"cannot write into the run directory {run_dir} ({exc.strerror or exc})") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(f"another process is training in {run_dir}; wait for it to finish or stop it") from None
        yield


def _data_fingerprint(data: Dataset) -> str:
    """A short hash of the training images and labels: a resume must draw its batches from the same data."""
    h = hashlib.sha256()
    h.update(memoryview(data.images.contiguous().numpy()).cast("B"))
    h.update(memoryview(data.labels.contiguous().numpy()).cast("B"))
    return f"{len(data)}:{h.hexdigest()[:16]}"


def _all_finite(*modules: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for m in modules for t in m.state_dict().values() if t.is_floating_point())


def _grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Total gradient norm, clipping to ``max_norm`` when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


class Task(Protocol):
    """What the training loop needs to know about a model family (``PixelTask``, ``latent.LatentTask``)."""

    config: RunConfig | LatentRunConfig

    def load(self) -> None: ...
    def fingerprint(self) -> str: ...
    def source(self, device: torch.device) -> distributed.BatchSource: ...
    def build_model(self, config: Any, device: torch.device) -> torch.nn.Module: ...
    def build_teacher(self, config: Any, device: torch.device) -> torch.nn.Module | None: ...
    def sample_grid(self, ema: torch.nn.Module, config: Any, path: Path, device: torch.device) -> None: ...


class PixelTask:
    """The pixel-space models (shapes, Fashion-MNIST, image folders): resident data and a ``DiffusionUNet``.

    A task is what the one training loop needs to know about a model family: its data as a
    :class:`distributed.BatchSource`, how to build the online model and the teacher, and how to draw a grid.
    ``latent.LatentTask`` is the other one.
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

    def source(self, device: torch.device) -> distributed.TensorSource:
        labels = self.data.labels.to(device) if self.config.model.num_classes > 0 else None
        return distributed.TensorSource(self.data.images.to(device), labels, self.config.model.num_classes)

    def build_model(self, config: RunConfig, device: torch.device) -> DiffusionUNet:
        """Seeded initial weights, or those of ``--init-from``."""
        with torch.random.fork_rng(devices=[]):  # seeded: a run killed before its first checkpoint restarts the same
            torch.manual_seed(init_seed(config.train.seed))
            model = DiffusionUNet(config.model, config.schedule).to(device)
        if config.train.init_from is not None:
            init_state, init_config, _ = ckpt.read_weights(config.train.init_from)
            where = f"--init-from {config.train.init_from}"
            _check_same_network(init_config, config, where, "train with its settings")
            ckpt.load_state_dict_checked(model, init_state, config.train.init_from)
        return model

    def build_teacher(self, config: RunConfig, device: torch.device) -> DiffusionUNet | None:
        return _build_teacher(config, device)

    def sample_grid(self, ema: DiffusionUNet, config: RunConfig, path: Path, device: torch.device) -> None:
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


def run_task(task: Task, run_dir: str | Path, override_config: bool = False) -> TrainResult:
    """The training loop for any task (``PixelTask``, ``latent.LatentTask``): set up, resume, step."""
    run_dir = Path(run_dir)
    config = task.config
    device = resolve_device(config.train.device)
    distributed.check_batch_split(config.train, distributed.launched_world_size())
    task.load()
    with distributed.process_group(device):
        if not distributed.is_main():
            # The others resolve the same teacher path and hash; the resume point comes from rank 0 (below).
            return _train_locked(task, _with_teacher_hash(config), run_dir, device, override_config)
        _make_run_dir(run_dir)
        with _exclusive(run_dir):  # before config.json is touched: a second process must not rewrite it
            config = prepare_run_dir(config, run_dir, override_config)
            return _train_locked(task, config, run_dir, device, override_config)


def apply_speed_options(model: torch.nn.Module, teacher: torch.nn.Module | None, tc: TrainConfig) -> None:
    """channels_last memory format and gradient checkpointing, on the online model and the teacher alike (the
    teacher's features are differentiated through, so its activations cost memory too)."""
    for net in (model, teacher):
        if net is None:
            continue
        if tc.channels_last:
            net.to(memory_format=torch.channels_last)
        if tc.grad_checkpointing:
            net.unet.enable_gradient_checkpointing()


def _train_locked(
    task: Task, config: RunConfig | LatentRunConfig, run_dir: Path, device: torch.device, override_config: bool
) -> TrainResult:
    tc = config.train
    world, is_main = distributed.world_size(), distributed.is_main()
    if is_main:
        ckpt.remove_stale_temporaries(run_dir)  # left by a run killed mid-write

    model = task.build_model(config, device)
    teacher = task.build_teacher(config, device)  # every rank holds its own frozen copy; never wrapped in DDP
    ema = frozen_copy(model).to(device) if is_main else None  # rank 0 alone keeps (and saves) the EMA
    apply_speed_options(model, teacher, tc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = build_loss(config.loss, teacher)
    fingerprint = task.fingerprint() if is_main else ""

    step = 0
    state = ckpt.latest_state(run_dir) if is_main else None
    if state is not None:
        where = f"{run_dir} checkpoint at step {state['step']}"
        try:
            saved_config = json.loads(state.get("config") or "null")
        except (ValueError, TypeError, RecursionError):
            saved_config = None
        if isinstance(saved_config, dict):  # guards a resume whose config.json was deleted or replaced
            _check_same_config(saved_config, config, where, override_config)
        if state.get("data") not in (None, fingerprint) and not override_config:
            raise UserError(
                f"the training data changed since {run_dir} was started ({state['data']} -> {fingerprint}, as "
                "images:hash); restore it, use a new --run-dir, or pass --override-config"
            )
        ckpt.load_state_dict_checked(model, state["model"], where)
        ckpt.load_state_dict_checked(ema, state["ema"], where)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:  # noqa: BLE001 - the file's contents are data from disk: any malformation
            raise UserError(f"{where} has an optimiser state that does not fit this model ({exc})") from None
        step = int(state["step"])
    if world > 1:
        # Synchronisation point: rank 0 alone reads the run directory, the others take the resume step and the
        # optimiser state from it (and its weights in DDP's constructor), so every rank continues the same run.
        step, opt_state = distributed.broadcast_object((step, optimizer.state_dict()))
        if not is_main:
            optimizer.load_state_dict(opt_state)
    if is_main:
        _trim_log(run_dir / "log.jsonl", step)
    train_model = distributed.wrap_for_training(model, tc.compile, device)

    source = task.source(device)  # after the resume checks: a latent task may fill its cache here (rank 0 first)
    use_bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    weights_path = run_dir / ckpt.WEIGHTS_NAME

    def last_good() -> str:
        kept = ckpt.list_states(run_dir)
        return str(kept[-1]) if kept else "none"

    def save_snapshot(at_step: int) -> None:
        ckpt.save_weights(weights_path, ema.state_dict(), config, at_step)

    def checkpoint(at_step: int) -> None:
        # Never write non-finite weights: the last good checkpoint stays the newest one.
        if not _all_finite(model, ema):
            raise TrainingDiverged(
                f"the weights became non-finite by step {at_step}; stopped without saving, last good checkpoint: "
                f"{last_good()}; lower --lr or raise --warmup-images"
            )
        payload = {
            "step": at_step,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
            "config": config.to_json(),
            "data": fingerprint,
        }
        # State first, then the inference snapshot: a kill between the two leaves a stale snapshot, which the
        # resume below refreshes from the state.
        ckpt.save_state(run_dir, at_step, payload, tc.keep_checkpoints)
        save_snapshot(at_step)

    def save_curve_snapshot(at_step: int) -> None:
        ckpt.save_weights(snapshot_path(run_dir, at_step), ema.state_dict(), config, at_step)

    def sample_grid(at_step: int) -> None:
        task.sample_grid(ema, config, run_dir / "samples" / f"step-{at_step:08d}.png", device)

    def write_log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    def bookkeeping(write: Callable[[], None], what: str, at_step: int) -> None:
        """Turn a failed write (a full disk, a read-only folder) into one line; the last checkpoint stays intact.

        Every file is written atomically (``ckpt.atomic_write``, which also turns torch's and safetensors' failed
        writes into ``OSError``), so a failed write leaves the previous version of each file in place.
        """
        try:
            write()
        except OSError as exc:
            if what == "log":
                # The failed line is still in the file's buffer, and closing it in the loop's cleanup would raise
                # the same error again over this message: close it here, where the error is already reported.
                with contextlib.suppress(OSError):
                    log_file.close()
            good = last_good()
            after = (
                f"the last good checkpoint {good} is intact: free space and rerun the same command to resume"
                if good != "none"
                else "no checkpoint had been written yet: free space and rerun the same command to start again"
            )
            raise UserError(
                f"could not write the {what} at step {at_step} ({exc.strerror or exc}); files stayed consistent, "
                + after
            ) from None

    if state is not None and ckpt.weights_step(weights_path) != step:  # killed between state and snapshot writes
        bookkeeping(lambda: save_snapshot(step), "inference snapshot", step)

    # The bar shows one speed, images/s over the optimiser steps since its previous update (the current throughput,
    # not a cumulative average), and tqdm's remaining time from its smoothed step rate; not tqdm's step/s as well.
    bar = tqdm(
        total=tc.steps,
        initial=step,
        desc=f"train {config.loss.kind}",
        unit="step",
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]",
        disable=not (tc.progress and is_main) or step >= tc.steps,  # nothing left to train: no bar
        dynamic_ncols=True,
    )
    bar_mark = (0.0, 0)  # (train_seconds, images_done) at the bar's previous speed update
    log_file = None
    if is_main:
        try:
            log_file = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            bar.close()
            raise UserError(f"cannot write the log in {run_dir} ({exc.strerror or exc})") from None
    # Speed counts optimiser steps only: sampling grids and checkpoint writes are excluded.
    train_seconds, images_done, last_loss = 0.0, 0, float("nan")
    train_model.train()
    try:
        while step < tc.steps:
            t_step = time.perf_counter()
            images_seen = step * tc.batch_size
            # Every rank draws the whole global batch from the (seed, step) stream and keeps its slice.
            gen = torch.Generator(device).manual_seed(step_seed(tc.seed, step))
            batch = distributed.draw_global_batch(config, source, loss_fn, gen)
            lr = learning_rate(
                images_seen, tc.lr, tc.warmup_images, tc.lr_schedule, tc.steps * tc.batch_size, tc.lr_final_ratio
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            names, term_means = distributed.accumulate_gradients(train_model, loss_fn, source, batch, tc, autocast)
            grad_norm = _grad_norm(model, tc.grad_clip)  # gradients are already averaged: equal on every rank
            # One host sync per step; a non-finite loss or gradient stops before the optimiser can spread it. Every
            # rank sees the same averaged values, so every rank stops at the same step.
            *values, norm = torch.cat([term_means, grad_norm.detach().float().reshape(1).to(term_means)]).tolist()
            logged = dict(zip(names, values))
            last_loss = logged["loss"]
            if not (math.isfinite(last_loss) and math.isfinite(norm)):
                what = f"loss became {last_loss}" if not math.isfinite(last_loss) else "gradients became non-finite"
                raise TrainingDiverged(
                    f"{what} at step {step + 1}; stopped without saving, last good checkpoint: {last_good()}; "
                    "lower --lr or raise --warmup-images"
                )
            optimizer.step()
            step += 1
            if ema is not None:
                ema_update(
                    ema, model, ema_beta(step * tc.batch_size, tc.batch_size, tc.ema_halflife_images, tc.ema_rampup)
                )
            train_seconds += time.perf_counter() - t_step
            images_done += tc.batch_size
            bar.update(1)
            if not is_main:
                continue  # the next step's all-reduce waits for rank 0's bookkeeping: no barrier needed here
            # Order matters for resuming after SIGKILL: log and grid first, checkpoint last, so that whatever a kill
            # interrupts is redone (identically) by the replay from the previous checkpoint.
            if step % tc.log_every == 0 or step == tc.steps:
                speed = images_done / max(train_seconds, 1e-9)
                record = {"step": step, "images_seen": step * tc.batch_size, "lr": lr, "images_per_second": speed}
                record.update(logged)
                bookkeeping(lambda r=record: write_log(r), "log", step)
                recent = (images_done - bar_mark[1]) / max(train_seconds - bar_mark[0], 1e-9)
                bar_mark = (train_seconds, images_done)
                bar.set_postfix_str(f"loss {last_loss:.4f}, {recent:.0f} images/s")
            if step % tc.sample_every == 0 or step == tc.steps:
                bookkeeping(lambda s=step: sample_grid(s), "sample grid", step)
            if tc.snapshot_every and (step % tc.snapshot_every == 0 or step == tc.steps):
                bookkeeping(lambda s=step: save_curve_snapshot(s), "EMA snapshot", step)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                bookkeeping(lambda s=step: checkpoint(s), "checkpoint", step)
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if is_main and ckpt.weights_step(weights_path) is None:  # resumed a finished run whose snapshot was removed
        bookkeeping(lambda: save_snapshot(step), "inference snapshot", step)
    distributed.barrier()  # every rank returns once the final checkpoint and snapshot exist
    speed = images_done / train_seconds if images_done else float("nan")
    return TrainResult(run_dir, step, speed, last_loss, train_seconds)


def snapshot_path(run_dir: Path, step: int) -> Path:
    """Where ``TrainConfig.snapshot_every`` keeps the EMA weights of ``step``."""
    return Path(run_dir) / "snapshots" / f"ema-{step:08d}.safetensors"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every EMA snapshot of a run, by step."""
    found = []
    for p in (Path(run_dir) / "snapshots").glob("ema-*.safetensors"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except ValueError:
            continue
    return sorted(found)


def is_finished(run_dir: str | Path, steps: int) -> bool:
    """True if ``run_dir`` holds a checkpoint at or past ``steps`` and the inference snapshot of that checkpoint."""
    states = ckpt.list_states(Path(run_dir))
    if not states or ckpt.state_step(states[-1]) < steps:
        return False
    return ckpt.weights_step(Path(run_dir) / ckpt.WEIGHTS_NAME) == ckpt.state_step(states[-1])
