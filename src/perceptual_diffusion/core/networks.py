"""The model protocols (``DiffusionModel``, and ``PixelModel`` for pixel denoisers of any architecture), the
pixel-space U-Net (diffusers ``UNet2DModel``) and the explicit feature taps of a U-Net's encoder half, shared with
the latent models. Other architectures live in ``models/`` (``models/dit.py``), registered by name in
``models/architectures.py``; nothing outside the model modules reads a model's inner network or its ModelConfig.

``DiffusionUNet`` owns its noise schedule, because a trained network only means something together with the
schedule and prediction type it was trained for. ``features`` runs only the encoder half (time embedding, input
conv, down blocks, mid block): the self-perceptual loss never needs the decoder.
"""

from __future__ import annotations

import copy
from typing import Protocol, TypeVar

import torch
from diffusers import UNet2DModel
from torch import Tensor, nn

from perceptual_diffusion.config import PRESETS, ModelConfig, ScheduleConfig, min_image_multiple
from perceptual_diffusion.core.schedule import NoiseSchedule, build_schedule


def build_unet(model: ModelConfig) -> UNet2DModel:
    """A diffusers UNet2DModel for a preset; class-conditional models get one extra, learned null class for CFG."""
    p = PRESETS[model.preset]
    return UNet2DModel(
        sample_size=model.image_size,
        in_channels=model.channels,
        out_channels=model.channels,
        block_out_channels=p.block_out_channels,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in p.attention),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p.attention)),
        layers_per_block=p.layers_per_block,
        norm_num_groups=p.norm_num_groups,
        attention_head_dim=32,
        num_class_embeds=model.num_classes + 1 if model.num_classes > 0 else None,
    )


M = TypeVar("M", bound=nn.Module)


def encoder_taps(num_down_blocks: int) -> tuple[str, ...]:
    """The feature taps of a U-Net's encoder half: one per down block, then the mid block."""
    return tuple(f"down{i}" for i in range(num_down_blocks)) + ("mid",)


def block_taps(blocks: tuple[int, ...] | range) -> tuple[str, ...]:
    """A transformer's taps by depth: ``blockK`` is the hidden state after its first K blocks (``models/dit.py``;
    ``LossConfig.feature_blocks`` names them by K)."""
    return tuple(f"block{k}" for k in blocks)


class DiffusionModel(Protocol):
    """What losses, the sampler and the training loop need of a model, pixel (``DiffusionUNet``) or latent
    (``latent.TextConditionedUNet``): ``model(x_t, t, cond)`` is the network output (v, eps or x0 by the schedule's
    prediction type; ``cond`` None means unconditional), ``features`` the encoder half's hidden states at named taps
    (``taps`` lists them), ``null_condition`` the 'no condition' input matching a batch of conditions (CFG), and
    ``schedule`` the noise schedule it was trained under."""

    schedule: NoiseSchedule

    @property
    def taps(self) -> tuple[str, ...]: ...

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor: ...

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] = ("mid",)
    ) -> dict[str, Tensor]: ...

    def null_condition(self, cond: Tensor) -> Tensor: ...

    @property
    def default_tap(self) -> str:
        """The tap of the paper's objective (arXiv 2401.00110, Sec. 3: the mid-block, or its analogue)."""
        ...

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (the speed option ``--grad-checkpointing``)."""
        ...


class PixelModel(DiffusionModel, Protocol):
    """What the training loop, the sampler, evaluation, export and the losses need of a class-conditional (or
    unconditional) pixel denoiser, whatever its architecture (``DiffusionUNet`` here, ``models.dit.DiffusionDiT``):
    the images it makes (``sample_shape``), its classes and null label (CFG's unconditional branch; condition
    dropout), its taps, the down-sampling strides of the grid-artifact probe, gradient checkpointing, the schedule,
    and ``model_config``, the config a checkpoint records (read by the model modules only)."""

    model_config: ModelConfig

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        ...

    @property
    def num_classes(self) -> int: ...

    @property
    def null_label(self) -> int: ...

    @property
    def strides(self) -> tuple[int, ...]:
        """Pixel periods at which the network's structure could print a grid into its samples (spectrum.py)."""
        ...


class PixelDenoiser(nn.Module):
    """What every pixel architecture shares (``DiffusionUNet``, ``models.dit.DiffusionDiT``): its config, its
    schedule, its classes and the null label K = ``num_classes`` (row K of a class embedding of K + 1 rows, the 'no
    condition' of condition dropout and CFG's unconditional branch), and the shape of the images it makes."""

    def __init__(self, model_config: ModelConfig, schedule_config: ScheduleConfig) -> None:
        super().__init__()
        self.model_config = model_config
        self.schedule_config = schedule_config
        self.schedule = build_schedule(schedule_config)

    @property
    def num_classes(self) -> int:
        return self.model_config.num_classes

    @property
    def null_label(self) -> int:
        return self.model_config.num_classes

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        mc = self.model_config
        return (mc.channels, mc.image_size, mc.image_size)

    def null_condition(self, cond: Tensor) -> Tensor:
        """The 'no condition' input matching a batch of conditions (CFG's unconditional branch)."""
        return torch.full_like(cond, self.null_label)


class DiffusionUNet(PixelDenoiser):
    """``model(x_t, t, cond) -> prediction``, plus ``features`` for the perceptual loss (a ``PixelModel``)."""

    def __init__(self, model_config: ModelConfig, schedule_config: ScheduleConfig) -> None:
        super().__init__(model_config, schedule_config)
        self.unet = build_unet(model_config)

    @property
    def taps(self) -> tuple[str, ...]:
        """The feature taps this network has: one per down block, then the mid block."""
        return encoder_taps(len(self.unet.down_blocks))

    @property
    def default_tap(self) -> str:
        return "mid"  # arXiv 2401.00110, Sec. 3: the mid-block output

    @property
    def strides(self) -> tuple[int, ...]:
        """The down-sampling strides 2, 4, ..., 2^(L-1) pixels of a U-Net with L resolution levels."""
        return tuple(2**k for k in range(1, min_image_multiple(self.model_config.preset).bit_length()))

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def _labels(self, cond: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
        if self.num_classes == 0:
            return None
        if cond is None:
            return torch.full((batch,), self.null_label, dtype=torch.long, device=device)
        return cond

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The network output (v, eps or x0 by the schedule's prediction type); cond None means unconditional."""
        return self.unet(x_t, t, class_labels=self._labels(cond, x_t.shape[0], x_t.device)).sample

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] = ("mid",)
    ) -> dict[str, Tensor]:
        """Hidden states at the named taps, running the encoder half only (``encoder_features``). The embedding
        mirrors ``UNet2DModel.forward`` (diffusers 0.3x-0.4x): time, plus the class embedding; a test checks the
        taps against hooks on a full forward pass so that a diffusers change cannot silently break them."""
        unet = self.unet
        t = t.to(x_t.device).expand(x_t.shape[0]) if t.ndim == 0 else t.to(x_t.device)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=x_t.dtype))
        labels = self._labels(cond, x_t.shape[0], x_t.device)
        if labels is not None:
            emb = emb + unet.class_embedding(labels).to(dtype=emb.dtype)
        return encoder_features(unet, x_t, emb, taps)


def encoder_features(
    unet: nn.Module, x_t: Tensor, emb: Tensor, taps: tuple[str, ...], context: Tensor | None = None
) -> dict[str, Tensor]:
    """The encoder half of a diffusers U-Net (input conv, down blocks, mid block) given its embedding ``emb``: the
    hidden states at ``taps``, stopping after the deepest one. ``context`` is the text encoder's hidden states for
    blocks with cross-attention (Stable Diffusion's U-Net); pixel U-Nets have none. Shared by both model kinds, so
    the self-perceptual loss taps the same place in each (arXiv 2401.00110, Sec. 3: the mid-block)."""
    available = encoder_taps(len(unet.down_blocks))
    unknown = set(taps) - set(available)
    if unknown:
        raise ValueError(f"unknown feature taps {sorted(unknown)}; this network has {available}")
    depth = max(available.index(name) for name in taps)
    h = unet.conv_in(x_t)
    out: dict[str, Tensor] = {}
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=context)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        if f"down{i}" in taps:
            out[f"down{i}"] = h
        if i == depth:
            return out
    if getattr(unet.mid_block, "has_cross_attention", False):
        out["mid"] = unet.mid_block(h, emb, encoder_hidden_states=context)
    else:
        out["mid"] = unet.mid_block(h, emb)
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: the one place."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def frozen_copy(model: M) -> M:
    """A teacher (or EMA): same weights, ``eval()``, ``requires_grad_(False)``; never given to an optimiser or DDP."""
    return copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
