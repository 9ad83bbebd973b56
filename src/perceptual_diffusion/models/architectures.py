"""The denoiser architectures by name: ``ARCHITECTURES[ModelConfig.arch]`` builds a ``networks.PixelModel``.

Like DiT's model table, a new architecture is one module (its ``PixelModel``: forward, taps, null label, sample
shape, gradient checkpointing) plus one line here and its name in ``config.Architecture`` (with its presets in
``config.PRESETS_OF``). The registry sits in ``models/`` because ``core/`` may not import ``models/``
(tests/test_layout.py): the U-Net lives in ``core/networks.py``, the DiT in ``models/dit.py``, and the training
loop, loading and export build every pixel model through :func:`build_model`.
"""

from __future__ import annotations

from collections.abc import Callable

from perceptual_diffusion.config import ModelConfig, ScheduleConfig
from perceptual_diffusion.core.networks import DiffusionUNet, PixelModel
from perceptual_diffusion.models.dit import DiffusionDiT

ARCHITECTURES: dict[str, Callable[[ModelConfig, ScheduleConfig], PixelModel]] = {
    "unet": DiffusionUNet,
    "dit": DiffusionDiT,
}


def build_model(model: ModelConfig, schedule: ScheduleConfig) -> PixelModel:
    """A freshly initialised pixel model of ``model.arch`` (weights from torch's global RNG: seed it first)."""
    return ARCHITECTURES[model.arch](model, schedule)
