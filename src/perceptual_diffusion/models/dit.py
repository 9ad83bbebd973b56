"""A class-conditional pixel DiT (Peebles & Xie 2023, arXiv 2212.09748) on diffusers' ``DiTTransformer2DModel``, with
the explicit feature taps of the self-perceptual objective: the hidden states after the first K transformer blocks.

Why this class: it is diffusers' DiT itself (patch embedding, adaLN-Zero blocks with a time + class embedding each,
the final modulated projection), the model of ``DiTPipeline``; only its pixel use is ours. The class embedding is
diffusers' own ``LabelEmbedding``: built with ``num_embeds_ada_norm = K`` classes it holds K + 1 rows, row K being
DiT's learned null class of classifier-free guidance (``DiTPipeline`` samples it as label K). So label K =
``num_classes`` is the null label here, as for the U-Net (whose class embedding has K + 1 rows too); an unconditional
model (K = 0) has that one row and always sees it.

diffusers draws DiT's own label dropout (``class_dropout_prob=0.1``) from the global RNG in train mode, in every
block: that is set to 0 here, because the project's condition dropout is drawn from (seed, step) with the batch
(training/step.py), and a draw from the global RNG would make training forwards irreproducible and break a
bit-identical resume.

The self-perceptual tap (arXiv 2401.00110, Sec. 3) is the mid-block of a U-Net; on a transformer its analogue is the
output of the middle block, ``block{n // 2}`` (``default_tap``). ``features`` runs the patch embedding and the blocks
in our own loop and stops after the deepest tap asked for: the teacher then runs K of n blocks (diffusers' forward
has no early exit). Unlike a U-Net, whose decoder half is never run, a tap at block K costs K / n of a full forward,
so a self-perceptual step costs about 1 + K / n MSE steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import DiTTransformer2DModel
from torch import Tensor, nn

from perceptual_diffusion.config import DIT_PRESETS, ModelConfig, ScheduleConfig, default_feature_block
from perceptual_diffusion.core.networks import PixelDenoiser, block_taps


def build_transformer(model: ModelConfig) -> DiTTransformer2DModel:
    """A diffusers DiTTransformer2DModel for a DiT preset, predicting one output per input channel (v, not the
    learned variance of the DiT paper), with K classes plus the null class K and diffusers' label dropout off."""
    p = DIT_PRESETS[model.preset]
    transformer = DiTTransformer2DModel(
        num_attention_heads=p.num_heads,
        attention_head_dim=p.width // p.num_heads,
        in_channels=model.channels,
        out_channels=model.channels,
        num_layers=p.num_layers,
        sample_size=model.image_size,
        patch_size=p.patch_size,
        num_embeds_ada_norm=model.num_classes,  # LabelEmbedding adds row K, the null class
    )
    disable_label_dropout(transformer)
    adaln_zero_init(transformer)
    return transformer


@torch.no_grad()
def adaln_zero_init(transformer: DiTTransformer2DModel) -> None:
    """DiT's adaLN-Zero initialisation (arXiv 2212.09748, Sec. 3.2), which diffusers' class does not apply (it is
    built to load trained weights): every block's modulation linear is zero, so each block starts as the identity
    (its gates alpha are 0), and the final layer's modulation and projection are zero, so the network starts by
    predicting 0. The DiT paper found this the best of its conditioning schemes by a clear margin in FID."""
    for block in transformer.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (transformer.proj_out_1, transformer.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def disable_label_dropout(transformer: DiTTransformer2DModel) -> None:
    """diffusers' DiT drops labels itself in train mode, with the global RNG, in every block: off (module doc)."""
    for block in transformer.transformer_blocks:
        embedder = block.norm1.emb.class_embedder
        if embedder.embedding_table.num_embeddings != embedder.num_classes + 1:
            raise RuntimeError("this diffusers DiT has no null-class row in its LabelEmbedding; cannot build it")
        embedder.dropout_prob = 0.0


class DiffusionDiT(PixelDenoiser):
    """``model(x_t, t, cond) -> prediction``, plus ``features`` for the perceptual loss (a ``networks.PixelModel``).

    ``t`` is the schedule's time as the network sees it: DDPM's integer step, or flow's continuous t = 1000 s; both go
    through diffusers' sinusoidal timestep embedding, which takes fractional times.
    """

    def __init__(self, model_config: ModelConfig, schedule_config: ScheduleConfig) -> None:
        super().__init__(model_config, schedule_config)
        self.transformer = build_transformer(model_config)  # null label K: diffusers' null class (module doc)

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def taps(self) -> tuple[str, ...]:
        return block_taps(range(1, self.num_blocks + 1))

    @property
    def default_tap(self) -> str:
        return f"block{default_feature_block(self.model_config.preset)}"

    @property
    def strides(self) -> tuple[int, ...]:
        """The patch size: a transformer on patches can print a grid of that period (spectrum.py)."""
        return (DIT_PRESETS[self.model_config.preset].patch_size,)

    def enable_gradient_checkpointing(self) -> None:
        self.transformer.enable_gradient_checkpointing()

    def _inputs(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """(timesteps, labels), one per image: diffusers' DiT takes a 1-D time and always a label (the null one for
        cond None and for every image of an unconditional model)."""
        n = x_t.shape[0]
        t = t.to(x_t.device)
        t = t.expand(n) if t.ndim == 0 else t
        if cond is None or self.num_classes == 0:
            cond = torch.full((n,), self.null_label, dtype=torch.long, device=x_t.device)
        return t, cond

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """The network output (v, eps or x0 by the schedule's prediction type); cond None means unconditional."""
        t, labels = self._inputs(x_t, t, cond)
        return self.transformer(x_t, timestep=t, class_labels=labels).sample

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] | None = None
    ) -> dict[str, Tensor]:
        """Hidden states (N, tokens, width) after the first K blocks for each tap ``blockK`` (default: the middle
        block), running the patch embedding and blocks 1..K_max only. The block call mirrors
        ``DiTTransformer2DModel.forward`` (diffusers 0.3x-0.4x); a test checks the taps against hooks on a full
        forward pass so that a diffusers change cannot silently break them."""
        taps = (self.default_tap,) if taps is None else taps
        unknown = set(taps) - set(self.taps)
        if unknown:
            raise ValueError(f"unknown feature taps {sorted(unknown)}; this network has {self.taps}")
        depth = max(self.taps.index(name) for name in taps) + 1
        tr = self.transformer
        t, labels = self._inputs(x_t, t, cond)
        h = tr.pos_embed(x_t)
        out: dict[str, Tensor] = {}
        for k, block in enumerate(tr.transformer_blocks[:depth], start=1):
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                h = tr._gradient_checkpointing_func(block, h, None, None, None, t, None, labels)
            else:
                h = block(h, timestep=t, class_labels=labels)
            if f"block{k}" in taps:
                out[f"block{k}"] = h
        return out


def dit_config_from_transformer(config: dict[str, Any]) -> ModelConfig | None:
    """The DiT preset whose transformer has exactly this config (a DiTTransformer2DModel config.json), or None."""
    for preset, p in DIT_PRESETS.items():
        wanted = {
            "num_attention_heads": p.num_heads,
            "attention_head_dim": p.width // p.num_heads,
            "num_layers": p.num_layers,
            "patch_size": p.patch_size,
        }
        if all(config.get(k) == v for k, v in wanted.items()):
            channels = config.get("in_channels")
            out = config.get("out_channels")
            if out not in (None, channels):  # a learned-variance DiT (2C outputs) is not a model of ours
                return None
            return ModelConfig(preset, config["sample_size"], channels, config["num_embeds_ada_norm"], arch="dit")
    return None
