"""One training loop for both stages: the loss object is the only difference between MSE training and
self-perceptual fine-tuning.

Read top to bottom: set up the run directory (or resume it), build data, model, teacher, EMA and optimiser, then
step. All randomness of step s comes from a generator seeded by (seed, s), and the learning rate and EMA decay are
pure functions of images seen, so rerunning the same command after a crash replays the same steps exactly.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import RESUMABLE_FIELDS, RunConfig, config_diff
from .data import Dataset, load_dataset
from .errors import TrainingDiverged, UserError
from .grid import save_grid
from .losses import build_loss, drop_condition
from .networks import DiffusionUNet, frozen_copy, unwrap
from .sampling import sample

GRID_SEEDS = 16  # fixed seeds of the periodic sample grids


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """A 63-bit seed for one (seed, rank, step): independent streams without storing any RNG state."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def learning_rate(images_seen: int, base_lr: float, warmup_images: int) -> float:
    """Linear warm-up over ``warmup_images``, then constant."""
    return base_lr * min(1.0, (images_seen + 1) / warmup_images) if warmup_images > 0 else base_lr


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


def _with_teacher_hash(config: RunConfig) -> RunConfig:
    """Resolve the teacher (and init) path to the weights file and record the teacher's sha256 in the config."""
    changes = {}
    if config.loss.teacher is not None:
        path = ckpt.resolve_weights(config.loss.teacher).resolve()
        changes["loss"] = replace(config.loss, teacher=str(path), teacher_sha256=ckpt.sha256_file(path))
    train = config.train
    if train.init_from is None and config.loss.kind == "self-perceptual":
        train = replace(train, init_from=changes["loss"].teacher)  # the paper: online model starts as the teacher
    if train.init_from is not None:
        train = replace(train, init_from=str(ckpt.resolve_weights(train.init_from).resolve()))
    return replace(config, train=train, **changes)


def prepare_run_dir(config: RunConfig, run_dir: Path, override: bool = False) -> RunConfig:
    """Create the run directory or check that a resume uses the same configuration."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = _with_teacher_hash(config)
    saved = run_dir / ckpt.CONFIG_NAME
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{saved} is not valid JSON; restore it or use a new --run-dir") from None
        diffs = [d for d in config_diff(old, config.to_dict()) if d.split(":")[0] not in RESUMABLE_FIELDS]
        if diffs and not override:
            raise UserError(
                f"{run_dir} was started with another configuration ({'; '.join(diffs)}); use a new --run-dir, "
                "or pass --override-config to resume with the new values"
            )
    ckpt.atomic_write_text(saved, config.to_json())
    return config


def _check_fits(config: RunConfig, data: Dataset) -> None:
    mc = config.model
    if data.channels != mc.channels:
        raise UserError(f"the data has {data.channels} channel(s) but the model was configured for {mc.channels}")
    classes = data.num_classes if data.num_classes > 1 else 0
    if mc.num_classes not in (0, classes):
        raise UserError(f"the data has {classes} classes but the model was configured for {mc.num_classes}")


def _build_teacher(config: RunConfig, device: torch.device) -> DiffusionUNet | None:
    if config.loss.kind != "self-perceptual":
        return None
    teacher, tconfig, _ = load_model(config.loss.teacher, device)
    if (tconfig.model, tconfig.schedule) != (config.model, config.schedule):
        raise UserError(
            f"teacher {config.loss.teacher} was trained with another model or schedule "
            f"({'; '.join(config_diff(tconfig.to_dict(), config.to_dict())[:3])}); "
            "fine-tune with the teacher's settings"
        )
    return frozen_copy(teacher)


def train(config: RunConfig, run_dir: str | Path, override_config: bool = False) -> TrainResult:
    """Train (or resume) a run in ``run_dir``; returns when ``config.train.steps`` steps are done."""
    run_dir = Path(run_dir)
    tc = config.train
    device = resolve_device(tc.device)
    data = load_dataset(config.data)
    _check_fits(config, data)
    config = prepare_run_dir(config, run_dir, override_config)

    model = DiffusionUNet(config.model, config.schedule).to(device)
    teacher = _build_teacher(config, device)
    if tc.init_from is not None:
        init_state, _, _ = ckpt.read_weights(tc.init_from)
        ckpt.load_state_dict_checked(model, init_state, tc.init_from)
    ema = frozen_copy(model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    loss_fn = build_loss(config.loss, teacher)

    step = 0
    state = ckpt.latest_state(run_dir)
    if state is not None:
        ckpt.load_state_dict_checked(model, state["model"], f"{run_dir} checkpoint")
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])

    images = data.images.to(device)
    labels = data.labels.to(device) if config.model.num_classes > 0 else None
    use_bf16 = tc.mixed_precision == "bf16" or (tc.mixed_precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    def checkpoint(at_step: int) -> None:
        payload = {
            "step": at_step,
            "model": unwrap(model).state_dict(),
            "ema": ema.state_dict(),
            "optimizer": optimizer.state_dict(),
        }
        ckpt.save_state(run_dir, at_step, payload, tc.keep_checkpoints)
        ckpt.save_weights(run_dir / ckpt.WEIGHTS_NAME, ema.state_dict(), config, at_step)

    def sample_grid(at_step: int) -> None:
        n_cls = config.model.num_classes
        grid_labels = torch.arange(GRID_SEEDS) % n_cls if n_cls > 0 else None
        images_ = sample(ema, list(range(GRID_SEEDS)), grid_labels, config.sample, device=device)
        save_grid(images_, run_dir / "samples" / f"step-{at_step:08d}.png", nrow=n_cls if n_cls > 0 else None)

    log_file = open(run_dir / "log.jsonl", "a")  # noqa: SIM115 - closed in finally
    bar = tqdm(
        total=tc.steps,
        initial=step,
        desc=f"train {config.loss.kind}",
        unit="step",
        disable=not tc.progress,
        dynamic_ncols=True,
    )
    t_start, images_done, last_loss = time.perf_counter(), 0, float("nan")
    model.train()
    try:
        while step < tc.steps:
            images_seen = step * tc.batch_size
            gen = torch.Generator(device).manual_seed(step_seed(tc.seed, step))
            idx = torch.randint(0, images.shape[0], (tc.batch_size,), generator=gen, device=device)
            x0 = images[idx]
            cond = drop_condition(
                None if labels is None else labels[idx], config.loss.cond_dropout, config.model.num_classes, gen
            )
            lr = learning_rate(images_seen, tc.lr, tc.warmup_images)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast:
                terms = loss_fn(model, x0, cond, gen)
            loss = terms["loss"].mean()
            if not torch.isfinite(loss):
                kept = ckpt.list_states(run_dir)
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step}; stopped without saving, last good checkpoint: "
                    f"{kept[-1] if kept else 'none'}; lower --lr or raise --warmup-images"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            optimizer.step()
            step += 1
            ema_update(ema, model, ema_beta(step * tc.batch_size, tc.batch_size, tc.ema_halflife_images, tc.ema_rampup))
            images_done += tc.batch_size
            last_loss = loss.item()
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                speed = images_done / (time.perf_counter() - t_start)
                record = {"step": step, "images_seen": step * tc.batch_size, "lr": lr, "images_per_second": speed}
                record.update({k: float(v.detach().float().mean()) for k, v in terms.items()})
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                bar.set_postfix(loss=f"{last_loss:.4f}", img_s=f"{speed:.0f}")
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                checkpoint(step)
            if step % tc.sample_every == 0 or step == tc.steps:
                sample_grid(step)
    finally:
        bar.close()
        log_file.close()
    if not (run_dir / ckpt.WEIGHTS_NAME).is_file():  # resumed a finished run whose snapshot was removed
        checkpoint(step)
    seconds = time.perf_counter() - t_start
    speed = images_done / seconds if images_done else float("nan")
    return TrainResult(run_dir, step, speed, last_loss, seconds)


def is_finished(run_dir: str | Path, steps: int) -> bool:
    """True if ``run_dir`` holds a checkpoint at or past ``steps`` (used to skip finished stages)."""
    states = ckpt.list_states(Path(run_dir))
    return (
        bool(states) and int(states[-1].stem.split("-")[1]) >= steps and (Path(run_dir) / ckpt.WEIGHTS_NAME).is_file()
    )
