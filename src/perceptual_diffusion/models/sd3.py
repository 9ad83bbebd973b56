"""An SD3-style latent model (Esser et al. 2024, arXiv 2403.03206): diffusers' ``SD3Transformer2DModel`` (MMDiT) on
the flow schedule, a frozen VAE with a shift, two CLIP text encoders with projections and an optional T5.

A pretrained folder is in ``StableDiffusion3Pipeline`` layout: ``transformer/``, ``vae/``, ``text_encoder/`` and
``text_encoder_2/`` (``CLIPTextModelWithProjection``), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``
(``FlowMatchEulerDiscreteScheduler``, whose shift is the run's default) and optionally ``text_encoder_3/`` +
``tokenizer_3/`` (T5). The transformer is trained; everything else stays frozen.

The condition is the pipeline's own (``StableDiffusion3Pipeline.encode_prompt``): both CLIPs' penultimate hidden
states concatenated on the channel axis, zero-padded to the transformer's ``joint_attention_dim``, then T5's
sequence appended (T5 absent, or left out by ``--no-t5``, ``LatentModelConfig.t5``: never loaded, zeros of
``T5_LENGTH`` tokens, as the pipeline does without ``text_encoder_3``); the pooled vector is both CLIPs' projected
pooled outputs concatenated. The losses, the sampler and guidance pass one tensor per image as the condition, so the
two are packed into one row (:func:`pack_condition`): the sequence flattened, then the pooled vector. The null
condition is the empty prompt through every encoder (CFG, dropout).

Taps (arXiv 2401.00110, Sec. 3: the mid-block; on a transformer the middle block, as for the pixel DiT in
``models/dit.py``): ``blockK`` is the image stream's hidden states after the first K joint blocks, default K = n // 2.
``features`` runs the embeddings and the blocks in our own loop and stops after the deepest tap, so the teacher runs
K of n blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LatentRunConfig, ScheduleConfig
from perceptual_diffusion.core.networks import block_taps
from perceptual_diffusion.core.schedule import FlowSchedule, build_schedule
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

CLIP_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
T5_PARTS = ("text_encoder_3", "tokenizer_3")
# StableDiffusion3Pipeline's default max_sequence_length: the T5 tokens (real or, without T5, zeros) of every prompt.
# A different length changes the joint attention's context, so the same number is used in training and sampling,
# and `pipe(prompt)` with its default reproduces it.
T5_LENGTH = 256


def pack_condition(prompt_embeds: Tensor, pooled: Tensor) -> Tensor:
    """(N, L, D) prompt embeddings and (N, P) pooled embeddings as one row per image, (N, L * D + P)."""
    return torch.cat([prompt_embeds.flatten(1), pooled], dim=1)


def unpack_condition(cond: Tensor, joint_dim: int, pooled_dim: int) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`pack_condition` for a transformer with these ``joint_attention_dim`` and
    ``pooled_projection_dim``."""
    n, width = cond.shape
    return cond[:, : width - pooled_dim].reshape(n, -1, joint_dim), cond[:, width - pooled_dim :]


def transformer_config(folder: str | Path) -> dict[str, Any]:
    """The SD3 transformer's diffusers config (architecture only)."""
    config = read_config(Path(folder) / "transformer" / "config.json")
    return {k: v for k, v in config.items() if not k.startswith("_")}


def has_t5(folder: Path) -> bool:
    """Whether the folder brings T5 (model_index.json names it and its folder exists): else its tokens are zeros."""
    index = folder / "model_index.json"
    named = True
    if index.is_file():
        entry = read_config(index).get("text_encoder_3")
        named = isinstance(entry, list) and entry[0] is not None
    return named and all((folder / p).is_dir() for p in T5_PARTS)


def default_feature_block(num_layers: int) -> int:
    """The default tap: the output of the first n // 2 of n joint blocks (the analogue of the mid-block)."""
    return max(num_layers // 2, 1)


class TextConditionedSD3(nn.Module):
    """A diffusers ``SD3Transformer2DModel`` with its flow schedule and the empty prompt's packed condition (a
    ``networks.DiffusionModel``). ``null_embedding`` is a non-persistent buffer: it comes from the frozen text
    encoders, so it is not in the state dict, the EMA or the checkpoints."""

    def __init__(self, transformer: nn.Module, schedule_config: ScheduleConfig, null_embedding: Tensor) -> None:
        super().__init__()
        self.schedule_config = schedule_config
        self.schedule = build_schedule(schedule_config)
        self.transformer = transformer
        self.register_buffer("null_embedding", null_embedding.detach().clone(), persistent=False)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def taps(self) -> tuple[str, ...]:
        return block_taps(range(1, self.num_blocks + 1))

    @property
    def default_tap(self) -> str:
        return f"block{default_feature_block(self.num_blocks)}"  # arXiv 2401.00110, Sec. 3: the middle of the net

    @property
    def latent_side(self) -> int:
        return self.transformer.config.sample_size

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def null_condition(self, cond: Tensor) -> Tensor:
        return self.null_embedding.to(cond.dtype).expand(cond.shape[0], -1)

    def _inputs(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(timesteps, prompt embeddings, pooled embeddings), one per image (cond None: the empty prompt)."""
        n = x_t.shape[0]
        t = t.to(x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        cond = self.null_embedding.expand(n, -1) if cond is None else cond
        config = self.transformer.config
        prompt, pooled = unpack_condition(cond, config.joint_attention_dim, config.pooled_projection_dim)
        return t, prompt, pooled

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The velocity eps - x0 at (x_t, t = 1000 s): the transformer as StableDiffusion3Pipeline calls it."""
        t, prompt, pooled = self._inputs(x_t, t, cond)
        return self.transformer(
            hidden_states=x_t, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t
        ).sample

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] | None = None
    ) -> dict[str, Tensor]:
        """The image stream (N, tokens, width) after the first K joint blocks for each tap ``blockK`` (default the
        middle block), running the embeddings and blocks 1..K_max only. Mirrors ``SD3Transformer2DModel.forward``
        (diffusers 0.3x-0.4x; no ControlNet, IP-adapter or skipped layers); a test checks the taps against hooks on
        a full forward pass and that the later blocks never run."""
        taps = (self.default_tap,) if taps is None else taps
        unknown = set(taps) - set(self.taps)
        if unknown:
            raise ValueError(f"unknown feature taps {sorted(unknown)}; this network has {self.taps}")
        depth = max(self.taps.index(name) for name in taps) + 1
        tr = self.transformer
        t, prompt, pooled = self._inputs(x_t, t, cond)
        h = tr.pos_embed(x_t).contiguous()
        temb = tr.time_text_embed(t, pooled)
        context = tr.context_embedder(prompt)
        out: dict[str, Tensor] = {}
        for k, block in enumerate(tr.transformer_blocks[:depth], start=1):
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                context, h = tr._gradient_checkpointing_func(block, h, context, temb, None)
            else:
                context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb)
            if f"block{k}" in taps:
                out[f"block{k}"] = h
        return out


@dataclass
class SD3Parts(FrozenVAE):
    """The frozen VAE (with its shift), both CLIP text encoders with projections and their tokenizers, and T5 (or
    None) of an SD3 folder, on one device. Token ids of a prompt are every tokenizer's ids side by side, so the
    training loop's caption tokens stay one tensor (``tokenize``; ``encode_tokens`` splits them again)."""

    vae: nn.Module
    text_encoders: tuple[nn.Module, nn.Module]
    tokenizers: tuple[Any, Any]
    t5: nn.Module | None
    t5_tokenizer: Any | None
    joint_dim: int
    folder: Path

    @property
    def clip_length(self) -> int:
        """Both CLIP tokenizers pad to the first one's length (``StableDiffusion3Pipeline.tokenizer_max_length``)."""
        return self.tokenizers[0].model_max_length

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """(N, 2 L [+ T5_LENGTH]) token ids: CLIP 1, CLIP 2 (padded and truncated to L), T5 when present."""
        captions = list(captions)
        ids = [
            tok(captions, padding="max_length", max_length=self.clip_length, truncation=True, return_tensors="pt")
            for tok in self.tokenizers
        ]
        if self.t5_tokenizer is not None:
            ids.append(
                self.t5_tokenizer(
                    captions,
                    padding="max_length",
                    max_length=T5_LENGTH,
                    truncation=True,
                    add_special_tokens=True,
                    return_tensors="pt",
                )
            )
        return torch.cat([i.input_ids for i in ids], dim=1)

    @torch.no_grad()
    def embeddings(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(prompt_embeds (N, L + T5_LENGTH, joint_dim), pooled (N, P)) exactly as
        ``StableDiffusion3Pipeline.encode_prompt`` builds them (clip_skip None)."""
        ids = ids.to(self.device)
        length = self.clip_length
        hidden, pooled = [], []
        for i, encoder in enumerate(self.text_encoders):
            out = encoder(ids[:, i * length : (i + 1) * length], output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected pooled output
            hidden.append(out.hidden_states[-2].to(self.text_encoders[0].dtype))  # the penultimate layer
        clip = torch.cat(hidden, dim=-1)
        if self.t5 is not None:
            t5 = self.t5(ids[:, 2 * length :])[0].to(self.t5.dtype)
        else:
            t5 = torch.zeros(ids.shape[0], T5_LENGTH, self.joint_dim, device=self.device, dtype=clip.dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def encode_tokens(self, ids: Tensor) -> Tensor:
        """The packed condition (N, L * joint_dim + P) of :func:`pack_condition`."""
        return pack_condition(*self.embeddings(ids))

    def encode_text(self, captions: Sequence[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(captions))


class SD3:
    """The ``latent.LatentArchitecture`` of a ``StableDiffusion3Pipeline`` folder (module docstring)."""

    name = "sd3"
    network = "transformer"
    pipeline = "StableDiffusion3Pipeline"

    def check_folder(self, folder: Path) -> Path:
        return require_parts(
            folder,
            CLIP_PARTS,
            "StableDiffusion3Pipeline layout (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/, "
            "tokenizer_2/, scheduler/; text_encoder_3/ and tokenizer_3/ optional)",
        )

    def scheduler_config(self, folder: Path) -> dict[str, Any]:
        return read_config(folder / "scheduler" / "scheduler_config.json")

    def schedule_defaults(self, folder: Path) -> dict[str, Any]:
        """The folder's FlowMatchEulerDiscreteScheduler as ScheduleConfig fields (its shift: SD3 uses 3.0)."""
        from perceptual_diffusion.models.schedulers import flow_schedule_from_scheduler

        config = self.scheduler_config(folder)
        schedule, _ = flow_schedule_from_scheduler(config, str(folder / "scheduler"))
        return {"shift": schedule.shift}

    def check(self, config: LatentRunConfig) -> None:
        """Schedule, taps and resolution against the folder, before a run directory is written (one line each)."""
        mc, lc, folder = config.model, config.loss, Path(config.model.pretrained)
        if config.schedule.family != "flow":
            raise UserError(
                f"--pretrained {folder} is an SD3 model, a rectified-flow model: train it with --schedule flow "
                f"(its scheduler's shift is the default), not --schedule {config.schedule.family}"
            )
        scheduler = self.scheduler_config(folder)
        if scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise UserError(
                f"{folder / 'scheduler'} is a {scheduler.get('_class_name')}, not the FlowMatchEulerDiscreteScheduler "
                "of an SD3 folder"
            )
        from perceptual_diffusion.models.schedulers import flow_schedule_from_scheduler

        theirs, _ = flow_schedule_from_scheduler(scheduler, str(folder / "scheduler"))
        if theirs.num_train_timesteps != config.schedule.num_train_timesteps:
            raise UserError(
                f"{folder} was trained with {theirs.num_train_timesteps} timesteps, this run has "
                f"{config.schedule.num_train_timesteps}"
            )
        tc = transformer_config(folder)
        n = tc.get("num_layers", 0)
        if lc.feature_layer not in ("mid", "all"):
            raise UserError(
                f"--feature-layer {lc.feature_layer} is a U-Net tap; an SD3 transformer's taps are --feature-blocks "
                f"K[,K..] (default {default_feature_block(n)}, the middle of its {n} blocks) or --feature-layer all"
            )
        if any(k > n for k in lc.feature_blocks):
            raise UserError(
                f"--feature-blocks {','.join(map(str, lc.feature_blocks))}: {folder}'s transformer has {n} blocks; "
                f"choose taps in 1..{n}"
            )
        down, patch = vae_downsample(folder), tc.get("patch_size", 2)
        if mc.resolution % (down * patch):
            raise UserError(
                f"--resolution {mc.resolution} does not fit {folder}: it must be a multiple of {down * patch} (the VAE "
                f"downsamples by {down}, the transformer's patches are {patch} latents wide)"
            )
        if not mc.t5 and not has_t5(folder):
            raise UserError(
                f"--no-t5: {folder} has no T5 (text_encoder_3/ and tokenizer_3/, named in model_index.json), so its "
                "T5 tokens are zeros already: drop --no-t5"
            )
        if mc.t5 and has_t5(folder):  # the pipeline appends T5's states to the CLIPs' padded ones: one width
            width = read_config(folder / "text_encoder_3" / "config.json").get("d_model")
            if width != tc.get("joint_attention_dim"):
                raise UserError(
                    f"{folder / 'text_encoder_3'} is {width} wide, {folder}'s transformer joins "
                    f"{tc.get('joint_attention_dim')}-wide text states: they must match (a T5 of another model?)"
                )
        most = tc.get("pos_embed_max_size")
        if most is not None and mc.resolution // down // patch > most:
            raise UserError(
                f"--resolution {mc.resolution} is beyond {folder}'s position embedding ({most} patches a side: at most "
                f"{most * patch * down} px)"
            )

    def load_parts(self, folder: Path, device: torch.device | str, t5: bool = True) -> SD3Parts:
        """The frozen parts; T5 only if ``t5`` and the folder has it (else never loaded: its tokens are zeros, as
        the pipeline's ``text_encoder_3=None``)."""
        from diffusers import AutoencoderKL
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        vae = load_part(AutoencoderKL, folder, "vae")
        encoders = tuple(load_part(CLIPTextModelWithProjection, folder, p) for p in ("text_encoder", "text_encoder_2"))
        tokenizers = tuple(load_part(AutoTokenizer, folder, p) for p in ("tokenizer", "tokenizer_2"))
        t5_encoder = t5_tokenizer = None
        if t5 and has_t5(folder):  # tested offline on a tiny random T5 (testing.make_tiny_sd3_pipeline(t5=True))
            from transformers import T5EncoderModel

            t5_encoder = load_part(T5EncoderModel, folder, "text_encoder_3")
            t5_tokenizer = load_part(AutoTokenizer, folder, "tokenizer_3")
        for m in (vae, *encoders, t5_encoder):
            if m is not None:
                m.to(device).eval().requires_grad_(False)
        joint_dim = transformer_config(folder)["joint_attention_dim"]
        return SD3Parts(vae, encoders, tokenizers, t5_encoder, t5_tokenizer, joint_dim, folder)

    def build(self, config: LatentRunConfig, null_condition: Tensor) -> TextConditionedSD3:
        """Its ``sample_size`` (the latent side the pipeline defaults to) is the run's resolution's."""
        from diffusers import SD3Transformer2DModel

        folder = config.model.pretrained
        side = config.model.resolution // vae_downsample(folder)
        transformer = SD3Transformer2DModel.from_config({**transformer_config(folder), "sample_size": side})
        return TextConditionedSD3(transformer, config.schedule, null_condition)

    def read_network(self, folder: Path) -> dict[str, Tensor]:
        from diffusers import SD3Transformer2DModel

        return network_weights(
            SD3Transformer2DModel,
            folder,
            "transformer",
            "not an SD3Transformer2DModel: a pixel DiT's folder goes with the pixel commands (train, sample)",
        )

    def check_export(self, run: str | Path, config: LatentRunConfig) -> None:
        return None  # every SD3 run is a flow run (check), which StableDiffusion3Pipeline samples

    def write_pipeline(self, tmp: Path, model: nn.Module, parts: SD3Parts, config: LatentRunConfig) -> None:
        """A ``StableDiffusion3Pipeline`` folder: the EMA transformer, the run's FlowMatchEulerDiscreteScheduler
        (its shift), the frozen parts; T5 as the run used it: the pretrained folder's, or absent (the folder has none,
        or a --no-t5 run: null in model_index.json, so it loads with text_encoder_3=None, tokenizer_3=None and
        conditions as the run trained, never on a T5 it did not see)."""
        with quiet_libraries():
            from diffusers import StableDiffusion3Pipeline

            pipe = StableDiffusion3Pipeline(
                transformer=model.transformer,
                scheduler=FlowSchedule(config.schedule).diffusers_scheduler(),
                vae=parts.vae,
                text_encoder=parts.text_encoders[0],
                tokenizer=parts.tokenizers[0],
                text_encoder_2=parts.text_encoders[1],
                tokenizer_2=parts.tokenizers[1],
                text_encoder_3=parts.t5,
                tokenizer_3=parts.t5_tokenizer,
            )
            pipe.save_pretrained(tmp, safe_serialization=True)

    def write_adapter(self, tmp: Path, layers: dict[str, Tensor], metadata: dict[str, Any]) -> None:
        with quiet_libraries():
            from diffusers import StableDiffusion3Pipeline

            StableDiffusion3Pipeline.save_lora_weights(
                tmp, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
            )

    def load_hint(self, folder: Path) -> str:
        extra = "" if has_t5(folder) else ", text_encoder_3=None, tokenizer_3=None"
        return (
            f"load it with diffusers.StableDiffusion3Pipeline.from_pretrained({str(folder)!r}{extra}); its scheduler "
            "is the run's FlowMatchEulerDiscreteScheduler"
        )
