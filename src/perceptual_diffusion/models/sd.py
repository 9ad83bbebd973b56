"""Stable Diffusion's latent architecture (the paper's setting, arXiv 2401.00110, Sec. 4): a
``StableDiffusionPipeline`` folder's ``UNet2DConditionModel`` trained on one frozen CLIP text encoder's last hidden
states, with the frozen VAE. :class:`StableDiffusion` is its ``latent.LatentArchitecture`` (``LATENT_ARCHITECTURES``
line "sd"); ``models/sd3.py`` is the other.

- :class:`TextConditionedUNet` follows ``networks.DiffusionModel``: ``model(x_t, t, cond)`` with ``cond`` the text
  encoder's hidden states (None: the empty prompt), ``features(x_t, t, cond, taps)`` running only the encoder half
  (``networks.encoder_features``, shared with the pixel U-Net: the paper's mid-block tap), ``schedule`` and
  ``null_condition``;
- :class:`FrozenParts` the frozen VAE (``pretrained.FrozenVAE``), text encoder and tokenizer;
- export writes a ``StableDiffusionPipeline`` with a DDIMScheduler matching the training setting (DDPM family only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LatentRunConfig, ScheduleConfig
from perceptual_diffusion.core.networks import encoder_features, encoder_taps
from perceptual_diffusion.core.schedule import build_schedule
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.pretrained import (
    FrozenVAE,
    load_part,
    network_weights,
    quiet_libraries,
    read_config,
    require_parts,
    vae_downsample,
)

PARTS = ("unet", "vae", "text_encoder", "tokenizer")


def unet_config(folder: str | Path) -> dict[str, Any]:
    """The U-Net's diffusers config (architecture only: the keys diffusers itself adds are dropped)."""
    config = read_config(Path(folder) / "unet" / "config.json")
    return {k: v for k, v in config.items() if not k.startswith("_")}


class TextConditionedUNet(nn.Module):
    """A diffusers ``UNet2DConditionModel`` with its noise schedule and the empty prompt's embedding.

    ``null_embedding`` is a non-persistent buffer: it comes from the frozen text encoder, not from training, so it
    is not in the state dict, the EMA or the checkpoints.
    """

    def __init__(self, unet: nn.Module, schedule_config: ScheduleConfig, null_embedding: Tensor) -> None:
        super().__init__()
        self.schedule_config = schedule_config
        self.schedule = build_schedule(schedule_config)
        self.unet = unet
        self.register_buffer("null_embedding", null_embedding.detach().clone(), persistent=False)

    @property
    def taps(self) -> tuple[str, ...]:
        return encoder_taps(len(self.unet.down_blocks))

    @property
    def latent_side(self) -> int:
        """The latent side it samples at (its ``sample_size``: the run's resolution / the VAE's downsampling)."""
        return self.unet.config.sample_size

    @property
    def default_tap(self) -> str:
        return "mid"  # arXiv 2401.00110, Sec. 3: the mid-block output

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def null_condition(self, cond: Tensor) -> Tensor:
        return self.null_embedding.to(cond.dtype).expand(cond.shape[0], -1, -1)

    def _cond(self, cond: Tensor | None, batch: int) -> Tensor:
        return self.null_embedding.expand(batch, -1, -1) if cond is None else cond

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.unet(x_t, t, encoder_hidden_states=self._cond(cond, x_t.shape[0])).sample

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] = ("mid",)
    ) -> dict[str, Tensor]:
        """Hidden states at the named taps, running the encoder half only (``networks.encoder_features``, with the
        text as cross-attention context). The embedding mirrors ``UNet2DConditionModel.forward`` for Stable
        Diffusion's U-Net (no class, addition or ControlNet inputs); a test checks the taps against hooks."""
        unet = self.unet
        if unet.config.class_embed_type is not None or unet.config.addition_embed_type is not None:
            raise ValueError("feature taps support Stable Diffusion U-Nets (no class or addition embeddings)")
        t = t.to(x_t.device).expand(x_t.shape[0]) if t.ndim == 0 else t.to(x_t.device)
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=t))
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(self._cond(cond, x_t.shape[0]), None)
        return encoder_features(unet, x_t, emb, taps, context)


@dataclass
class FrozenParts(FrozenVAE):
    """The frozen VAE, text encoder and tokenizer of a Stable Diffusion folder, on one device (the VAE side, encoding
    and decoding latents, is ``pretrained.FrozenVAE``'s)."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    folder: Path

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Token ids (N, L), padded and truncated to the tokenizer's length, as Stable Diffusion's pipeline does."""
        tok = self.tokenizer
        return tok(
            list(captions), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids

    @torch.no_grad()
    def encode_tokens(self, ids: Tensor) -> Tensor:
        """The text encoder's last hidden states (N, L, D): the U-Net's cross-attention context."""
        return self.text_encoder(ids.to(self.device))[0]

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(captions))


def sd_pipeline(**parts: Any) -> Any:
    """A ``StableDiffusionPipeline`` without a safety checker. Its constructor rewrites a DDIM config's
    ``steps_offset`` 0 to 1 (with a deprecation warning); that only moves ``leading`` timesteps, not ``trailing``."""
    import warnings

    with warnings.catch_warnings(), quiet_libraries():
        from diffusers import StableDiffusionPipeline

        warnings.filterwarnings("ignore", message="(?s).*steps_offset", category=FutureWarning)
        return StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )


class StableDiffusion:
    """The ``LatentArchitecture`` of a ``StableDiffusionPipeline`` folder: the U-Net is trained (taps ``downK`` and
    ``mid``, the paper's), one CLIP text encoder's last hidden states condition it, both schedule families train,
    and export writes a ``StableDiffusionPipeline`` (DDPM family only: it has no flow sampler)."""

    name = "sd"
    network = "unet"
    pipeline = "StableDiffusionPipeline"

    def check_folder(self, folder: Path) -> Path:
        return require_parts(
            folder,
            PARTS,
            "StableDiffusionPipeline layout (unet/, vae/, text_encoder/, tokenizer/) or StableDiffusion3Pipeline "
            "layout (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizers)",
        )

    def check(self, config: LatentRunConfig) -> None:
        mc, lc = config.model, config.loss
        if not mc.t5:
            raise UserError(
                f"--no-t5 leaves out an SD3 folder's T5 text encoder; {mc.pretrained} is a Stable Diffusion folder "
                "(one CLIP text encoder, no T5): drop --no-t5"
            )
        down = vae_downsample(mc.pretrained)
        unet = unet_config(mc.pretrained)
        levels = 2 ** (len(unet.get("block_out_channels", [0])) - 1)
        taps = [*encoder_taps(len(unet.get("down_block_types", []))), "all"]
        if lc.feature_blocks:
            raise UserError(
                f"--feature-blocks {','.join(map(str, lc.feature_blocks))} taps transformer blocks (an SD3 folder, or "
                f"train --arch dit); {mc.pretrained}'s U-Net has the taps --feature-layer {', '.join(taps)}"
            )
        if lc.kind == "self-perceptual" and lc.feature_layer not in taps:  # before a run directory is written
            raise UserError(
                f"--feature-layer {lc.feature_layer} is not in {mc.pretrained}'s U-Net; choose from {', '.join(taps)}"
            )
        if mc.resolution % (down * levels):
            raise UserError(
                f"--resolution {mc.resolution} does not fit {mc.pretrained}: it must be a multiple of {down * levels} "
                f"(the VAE downsamples by {down}, the U-Net halves the latent {levels.bit_length() - 1} times)"
            )

    def schedule_defaults(self, folder: Path) -> dict[str, Any]:
        return {}  # the run's schedule is the project's (the paper's zero-SNR DDPM by default)

    def load_parts(self, folder: Path, device: torch.device | str, t5: bool = True) -> FrozenParts:
        """The VAE, CLIP text encoder and tokenizer (``t5`` is SD3's: this folder has none, and check refuses
        --no-t5)."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModel

        vae = load_part(AutoencoderKL, folder, "vae")
        text_encoder = load_part(CLIPTextModel, folder, "text_encoder")
        tokenizer = load_part(AutoTokenizer, folder, "tokenizer")
        for m in (vae, text_encoder):
            m.to(device).eval().requires_grad_(False)
        return FrozenParts(vae, text_encoder, tokenizer, folder)

    def build(self, config: LatentRunConfig, null_condition: Tensor) -> TextConditionedUNet:
        """Its ``sample_size`` (the latent side that samplers and an exported pipeline default to) is the run's."""
        from diffusers import UNet2DConditionModel

        side = config.model.resolution // vae_downsample(config.model.pretrained)
        unet = UNet2DConditionModel.from_config({**unet_config(config.model.pretrained), "sample_size": side})
        return TextConditionedUNet(unet, config.schedule, null_condition)

    def read_network(self, folder: Path) -> dict[str, Tensor]:
        from diffusers import UNet2DConditionModel

        return network_weights(
            UNet2DConditionModel,
            folder,
            "unet",
            "not a text-conditioned UNet2DConditionModel: a pixel-model folder goes with the pixel commands "
            "(train, sample)",
        )

    def check_export(self, run: str | Path, config: LatentRunConfig) -> None:
        if config.schedule.family != "ddpm":
            # StableDiffusionPipeline samples with DDIM-style schedulers only; writing a DDIMScheduler for a flow
            # model would give wrong images silently. The SD3 path (models/sd3.py) is the flow models' pipeline.
            raise UserError(
                f"{run} is a {config.schedule.family} model: latent export writes a StableDiffusionPipeline, which "
                "has no flow sampler; sample it with `latent sample` (or train an SD3 folder, whose pipeline is one)"
            )

    def write_pipeline(self, tmp: Path, model: nn.Module, parts: Any, config: LatentRunConfig) -> None:
        from diffusers import DDIMScheduler

        from perceptual_diffusion.models.schedulers import scheduler_config

        scheduler = DDIMScheduler(**scheduler_config(config.schedule, config.sample))
        pipe = sd_pipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=model.unet,
            scheduler=scheduler,
        )
        with quiet_libraries():
            pipe.save_pretrained(tmp, safe_serialization=True)

    def write_adapter(self, tmp: Path, layers: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        with quiet_libraries():
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)

    def load_hint(self, folder: Path) -> str:
        return (
            f"load it with diffusers.StableDiffusionPipeline.from_pretrained({str(folder)!r}); its scheduler is DDIM "
            "set to the training schedule"
        )
