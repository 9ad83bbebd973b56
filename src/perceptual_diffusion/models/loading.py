"""One way to load what training made: run directories, weights files and diffusers folders, of either model kind.

``load_model`` returns a ready model (``networks.DiffusionModel``) in eval mode whatever the path holds: a
``networks.PixelModel`` of its architecture (``models.architectures``: a U-Net or a DiT) from our weights or from a
diffusers folder (``export.read_diffusers``), or a latent ``TextConditionedUNet`` with its frozen VAE and text
encoder as ``model.parts``. The kind is read from the weights file's own record, so a command never needs to be told
which family a path belongs to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.architectures import build_model
from perceptual_diffusion.models.export import (
    adapter_record,
    pixel_lora_model,
    read_pixel_weights,
    read_raw_weights,
)
from perceptual_diffusion.runtime import checkpoint as ckpt


def read_weights(path: str | Path, kind: str = "pixel") -> tuple[dict[str, torch.Tensor], Any, int]:
    """(state_dict, config, step) of a run directory, a weights file or (pixel models) a diffusers folder."""
    p = ckpt.resolve_weights(path)
    if kind == "pixel":
        return read_pixel_weights(p)  # a LoRA run or adapter folder: merged into its base
    return ckpt.read_weights(p, kind)


def weights_config(path: str | Path, kind: str = "pixel") -> tuple[Any, int]:
    """(config, step) of trained weights, from a weights file's header alone (no tensors read)."""
    p = ckpt.resolve_weights(path)
    if ckpt.is_adapter_folder(p):
        config, step, theirs = adapter_record(p)
        if theirs != kind:
            raise ckpt.wrong_kind(p, theirs)
        return config, step
    if p.is_dir():
        return read_weights(p, kind)[1:]
    return ckpt.config_of(p, kind)


def weights_kind(path: str | Path) -> str:
    """ "pixel" or "latent": what a path holds (a diffusers folder is read as a pixel model)."""
    p = ckpt.resolve_weights(path)
    if ckpt.is_adapter_folder(p):
        return adapter_record(p)[2]
    return "pixel" if p.is_dir() else ckpt.weights_kind(p)


def load_model(path: str | Path, device: torch.device | str = "cpu", kind: str | None = None) -> tuple[Any, Any, int]:
    """A trained model (EMA weights) of either kind, in eval mode: (model, its run config, its step). ``kind``
    ("pixel" or "latent"): refuse the other kind with a one-line message naming the commands that take it."""
    found = weights_kind(path)
    if kind is not None and found != kind:
        p = ckpt.resolve_weights(path)
        if p.is_dir():
            raise UserError(
                f"{p} is a diffusers folder, which loads as a pixel model; a {kind} model loads from "
                "its run folder or weights file"
            )
        raise ckpt.wrong_kind(p, found)
    if found == "latent":
        from perceptual_diffusion.models.latent import (
            load_latent_model,  # the latent family needs transformers: imported only for it
        )

        model, parts, config, step = load_latent_model(path, device)
        model.parts = parts  # a plain attribute, not a submodule: never in a state dict or checkpoint
        return model, config, step
    p = ckpt.resolve_weights(path)
    if not p.is_dir() or ckpt.is_adapter_folder(p):
        state_dict, config, step = read_raw_weights(p)
        if config.lora is not None:  # the base with the adapter on top, as trained (not merged)
            return pixel_lora_model(state_dict, config, str(path)).to(device).eval(), config, step
    state_dict, config, step = read_weights(path)
    model = build_model(config.model, config.schedule)
    ckpt.load_state_dict_checked(model, state_dict, str(path))
    return model.to(device).eval(), config, step
