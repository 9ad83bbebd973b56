"""Shared fixtures: tiny configs and models, and one tiny trained run per test session.

Everything here is sized for 2 shared CPU cores: the ``tiny`` preset (0.17 M parameters), 8x8 images for unit tests,
a handful of training steps and 2 sampling steps wherever a run directory is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from perceptual_diffusion.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.core.schedule import NoiseSchedule, build_schedule

# Unit tests do not need more; a fixed thread count keeps timings stable when two xdist workers share 2 cores.
torch.set_num_threads(1)

TINY_IMAGE = 8
TINY_CLASSES = 3


@pytest.fixture(scope="session")
def schedule_config() -> ScheduleConfig:
    """The paper's schedule: scaled_linear 0.00085-0.012, zero terminal SNR, v-prediction."""
    return ScheduleConfig()


@pytest.fixture(scope="session")
def schedule(schedule_config: ScheduleConfig) -> NoiseSchedule:
    return build_schedule(schedule_config)


@pytest.fixture(scope="session")
def tiny_model_config() -> ModelConfig:
    """Class-conditional tiny U-Net on 8x8 RGB (taps down0, down1, mid)."""
    return ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=TINY_CLASSES)


def make_model(model_config: ModelConfig, schedule_config: ScheduleConfig, seed: int = 0) -> DiffusionUNet:
    """A freshly initialised model whose weights depend only on ``seed``.

    diffusers zero-initialises some output convolutions, which would make features and gradients trivially zero in
    places; perturbing every parameter makes the comparisons in the tests non-trivial.
    """
    torch.manual_seed(seed)
    model = DiffusionUNet(model_config, schedule_config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def make_tiny_model(tiny_model_config: ModelConfig, schedule_config: ScheduleConfig) -> Callable[..., DiffusionUNet]:
    """``make_tiny_model(seed=0, num_classes=TINY_CLASSES)``: a fresh, perturbed tiny model."""

    def make(seed: int = 0, num_classes: int = TINY_CLASSES) -> DiffusionUNet:
        return make_model(replace(tiny_model_config, num_classes=num_classes), schedule_config, seed)

    return make


@pytest.fixture
def tiny_model(tiny_model_config: ModelConfig, schedule_config: ScheduleConfig) -> DiffusionUNet:
    return make_model(tiny_model_config, schedule_config)


@pytest.fixture
def tiny_uncond_model(tiny_model_config: ModelConfig, schedule_config: ScheduleConfig) -> DiffusionUNet:
    return make_model(replace(tiny_model_config, num_classes=0), schedule_config, seed=1)


def _tiny_run_config(**train_overrides) -> RunConfig:
    """A RunConfig for a tiny class-conditional run on 8x8 shapes: seconds per run on one core."""
    train = TrainConfig(
        steps=3,
        batch_size=4,
        lr=1e-3,
        warmup_images=0,
        log_every=1,
        sample_every=1000,
        checkpoint_every=1000,
        keep_checkpoints=2,
        device="cpu",
        progress=False,
    )
    return RunConfig(
        schedule=ScheduleConfig(),
        model=ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=4),
        data=DataConfig(source="shapes", image_size=TINY_IMAGE),
        loss=LossConfig(),
        train=replace(train, **train_overrides),
        sample=SampleConfig(steps=2),
    )


@pytest.fixture(scope="session")
def tiny_run_config() -> Callable[..., RunConfig]:
    """``tiny_run_config(**train_overrides)``: a RunConfig for a 3-step tiny run on 8x8 shapes."""
    return _tiny_run_config


@pytest.fixture(scope="session")
def trained_mse_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MSE run directory (3 steps), made once per session; use it read-only (e.g. as a teacher)."""
    from perceptual_diffusion.training.loop import train

    run_dir = tmp_path_factory.mktemp("mse-run")
    train(_tiny_run_config(), run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_cli_train() -> list[str]:
    """Options for a CLI ``train`` call on the tiny preset: few steps, tiny batches, 2-step sample grids."""
    return list(_TINY_CLI_TRAIN)


_TINY_CLI_TRAIN = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--warmup-images",
    "0",
    "--log-every",
    "1",
    "--sample-steps",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]
