"""Latent, text-conditioned diffusion, of any latent architecture: the paper's own setting (Stable Diffusion's U-Net,
VAE and CLIP text encoder, ``models/sd.py``) and SD3's MMDiT (``models/sd3.py``), through one seam.

A *pretrained folder* is a local diffusers folder: in ``StableDiffusionPipeline`` layout (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``), for example ByteDance's published SD 2.1-base zero-SNR checkpoints, or in
``StableDiffusion3Pipeline`` layout. Its model_index.json says which (``pretrained.folder_kind``), and
``LATENT_ARCHITECTURES`` maps that kind to a :class:`LatentArchitecture`: the checks, frozen parts, network, weights
and export of that kind. The network is trained; the VAE and the text encoders stay frozen and are never saved in a
run (the run records the folder).

The pieces here plug into the same training loop, losses and sampler as the pixel models:
- ``sd.TextConditionedUNet`` (and ``sd3.TextConditionedSD3``) follows ``networks.DiffusionModel``:
  ``model(x_t, t, cond)`` with ``cond`` the text encoder's hidden states (None: the empty prompt),
  ``features(x_t, t, cond, taps)`` running only the encoder half (``networks.encoder_features``, shared with the pixel
  U-Net), ``schedule`` and ``null_condition``;
- ``training.latent.LatentTask`` is the loop's task (caption data as its batch source, latents cached once);
- :func:`sample_latent` is the one sampling loop (``sampling.sample_stream``) in latent space, then the VAE
  decoder; tests check it against diffusers' ``StableDiffusionPipeline`` and ``StableDiffusion3Pipeline``;
- :func:`export_latent` writes the architecture's pipeline folder, which diffusers loads.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LatentRunConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.sampling import sample_stream
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import lora, sd3
from perceptual_diffusion.models.pretrained import (
    LatentParts,
    folder_kind,
    quiet_libraries,
    vae_downsample,
)
from perceptual_diffusion.models.sd import (
    FrozenParts,
    StableDiffusion,
    TextConditionedUNet,
    sd_pipeline,
    unet_config,
)
from perceptual_diffusion.runtime import checkpoint as ckpt

# Re-exported: testing.py, training.latent and the tests import them from here.
__all__ = [
    "FrozenParts",
    "TextConditionedUNet",
    "quiet_libraries",
    "sd_pipeline",
    "unet_config",
    "vae_downsample",
]

# ---------------------------------------------------------------------------------------------------------------
# The pretrained folder and the architecture seam.


class LatentArchitecture(Protocol):
    """What the latent path needs of one kind of pretrained folder (``LATENT_ARCHITECTURES``): Stable Diffusion's
    U-Net (``models/sd.py``) or SD3's MMDiT (``models/sd3.py``). The loop, the cache, resume, EMA, DDP,
    the losses and the sampler use only the model (``networks.DiffusionModel``), its ``latent_side`` and the frozen
    parts (``tokenize``, ``encode_tokens``, ``encode_text``, the VAE of ``pretrained.FrozenVAE``)."""

    name: str  # the kind, as ``pretrained.folder_kind`` reads it
    network: str  # the trained network's subfolder and our model's attribute (lora.NETWORK)
    pipeline: str  # the diffusers pipeline class an export writes

    def check_folder(self, folder: Path) -> Path: ...
    def check(self, config: LatentRunConfig) -> None: ...
    def schedule_defaults(self, folder: Path) -> dict[str, Any]: ...
    def load_parts(self, folder: Path, device: torch.device | str, t5: bool = True) -> LatentParts: ...
    def build(self, config: LatentRunConfig, null_condition: Tensor) -> nn.Module: ...
    def read_network(self, folder: Path) -> dict[str, Tensor]: ...
    def check_export(self, run: str | Path, config: LatentRunConfig) -> None: ...
    def write_pipeline(self, tmp: Path, model: nn.Module, parts: LatentParts, config: LatentRunConfig) -> None: ...
    def write_adapter(self, tmp: Path, layers: dict[str, Tensor], metadata: dict[str, Any]) -> None: ...
    def load_hint(self, folder: Path) -> str: ...


def latent_architecture(folder: str | Path) -> LatentArchitecture:
    """The latent architecture of a pretrained (or exported) folder, read from its model_index.json."""
    return LATENT_ARCHITECTURES[folder_kind(folder)]


def check_pretrained(folder: str | Path) -> Path:
    """The folder, if it has the parts its architecture needs; else one line saying what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--pretrained {path} is not a folder; give a local diffusers Stable Diffusion folder")
    return latent_architecture(path).check_folder(path)


def native_schedule(folder: str | Path, schedule: ScheduleConfig, given: Collection[str] = ()) -> ScheduleConfig:
    """``schedule`` with the pretrained folder's own values for the fields not ``given`` by the user (an SD3 folder's
    FlowMatchEulerDiscreteScheduler: its shift; under --schedule flow only). Stable Diffusion folders keep it."""
    path = Path(folder)
    if not path.is_dir() or schedule.family != "flow":
        return schedule
    defaults = latent_architecture(path).schedule_defaults(path)
    return replace(schedule, **{k: v for k, v in defaults.items() if k not in given})


def load_frozen_parts(folder: str | Path, device: torch.device | str = "cpu", t5: bool = True) -> LatentParts:
    """The frozen parts (VAE, text encoders, tokenizers) of a pretrained folder of any latent architecture, in eval
    mode without gradients, on ``device``; ``t5`` False (``LatentModelConfig.t5``, ``--no-t5``): an SD3 folder's T5
    is not loaded and its tokens are zeros."""
    path = check_pretrained(folder)
    return latent_architecture(path).load_parts(path, device, t5=t5)


def build_model(config: LatentRunConfig, null_embedding: Tensor) -> nn.Module:
    """The trained network of the pretrained folder's architecture (freshly initialised: load weights into it),
    with the run's schedule and the empty prompt's condition; its latent side is the run's resolution's."""
    return latent_architecture(config.model.pretrained).build(config, null_embedding)


def read_unet_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """The trained network's weights in our wrapper's key names (``unet.*``, an SD3 model's ``transformer.*``) from
    a latent run directory, its weights file, or a diffusers folder (``unet/`` or an SD3 ``transformer/``); returns
    them and a description of where they came from."""
    p = Path(path)
    is_folder = p.is_dir() and not (p / ckpt.WEIGHTS_NAME).is_file() and not ckpt.is_adapter_folder(p)
    if is_folder and ((p / "unet").is_dir() or (p / "transformer").is_dir()):
        arch = latent_architecture(p)
        return arch.read_network(p), f"{p / arch.network}"
    state, config, step = read_raw_latent_weights(p)
    if config.lora is not None:  # an adapter: merged into its base through PEFT, a plain network's weights
        # The null embedding is a non-persistent buffer (not in the state dict): a placeholder does for merging.
        model = lora.merge_adapter(latent_lora_model(state, config, torch.zeros(1, 1, 1), str(p)))
        return model.state_dict(), f"{p} (step {step}, LoRA merged into its base)"
    return state, f"{p} (step {step})"


read_network_weights = read_unet_weights  # the architecture-neutral name


def read_raw_latent_weights(path: str | Path) -> tuple[dict[str, Tensor], LatentRunConfig, int]:
    """A latent weights file or exported adapter folder as stored: of a LoRA run, the adapter alone."""
    p = ckpt.resolve_weights(path)
    if ckpt.is_adapter_folder(p):
        from perceptual_diffusion.models.export import adapter_record

        config, step, kind = adapter_record(p)
        if kind != "latent":
            raise ckpt.wrong_kind(p, kind)
        return lora.read_adapter_file(p, lora.NETWORK[lora.architecture(config)]), config, step
    return ckpt.read_weights(p, kind="latent")


def latent_lora_model(
    state: dict[str, Tensor], config: LatentRunConfig, null_embedding: Tensor, source: str
) -> nn.Module:
    """A latent LoRA model: its base (``--init-from`` or the pretrained network, sha256-checked) with the adapter."""
    base = lora.check_base(config.lora, lora.base_path(config), source)
    base_state, where = read_unet_weights(base)
    model = build_model(config, null_embedding)
    ckpt.load_state_dict_checked(model, base_state, where)
    return lora.attach(model, config.lora, state, source)


def load_latent_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, LatentParts, LatentRunConfig, int]:
    """A trained latent model (EMA weights) from a run directory or weights file, with its frozen parts, in eval; of
    a LoRA run, its base with the adapter on top (as trained, not merged)."""
    state, config, step = read_raw_latent_weights(path)
    parts = load_frozen_parts(config.model.pretrained, device, t5=config.model.t5)  # as the run trained
    if config.lora is not None:
        model = latent_lora_model(state, config, parts.encode_text([""]), str(path))
    else:
        model = build_model(config, parts.encode_text([""]))
        ckpt.load_state_dict_checked(model, state, str(path))
    return model.to(device).eval(), parts, config, step


# ---------------------------------------------------------------------------------------------------------------
# Sampling and export.


@torch.inference_mode()
def sample_latent(
    model: nn.Module,
    parts: LatentParts,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SampleConfig,
    batch_size: int = 16,
    decode: bool = True,
) -> Tensor:
    """One image per (prompt, seed): DDIM (flow: Euler) in latent space with CFG (``config.cfg_scale``, one batched
    forward over [prompt; empty prompt]) and guidance rescale, then the VAE decoder (``decode=False``: the latents).
    Any latent architecture: the model's ``latent_side`` and the parts' text encoding are all it reads."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    shape = parts.latent_shape(model.latent_side * parts.downsample)
    cond_of = lambda start, end: parts.encode_text(prompts[start:end])  # noqa: E731 - per batch: bounded memory
    out = []
    for z in sample_stream(model, shape, seeds, cond_of, config, batch_size, parts.device, clamp=False):
        out.append(parts.decode(z).cpu() if decode else z)
    return torch.cat(out)


def export_latent(run: str | Path, out_dir: str | Path, force: bool = False, merge_lora: bool = False) -> Path:
    """A trained latent model (EMA network) as its architecture's diffusers pipeline folder, atomically
    (``LatentArchitecture.write_pipeline``: a ``StableDiffusionPipeline`` with a DDIMScheduler matching the training
    setting, or a ``StableDiffusion3Pipeline`` with its FlowMatchEulerDiscreteScheduler), with the pretrained folder's
    frozen parts. Of a LoRA run, the adapter where diffusers' ``load_lora_weights`` finds it
    (:func:`export_latent_adapter`), or with ``merge_lora`` the pipeline with the adapter merged through PEFT."""
    from perceptual_diffusion.models.publish import CONFIG_FILE, check_export_target, publish_folder

    out_dir = Path(out_dir)
    # The pretrained folder is an input too (its VAE and text encoder are copied): never replace it with the export.
    pretrained = ckpt.config_of(ckpt.resolve_weights(run), "latent")[0].model.pretrained
    check_export_target(out_dir, force, [run, pretrained], command="latent export")
    if ckpt.config_of(ckpt.resolve_weights(run), "latent")[0].lora is None:
        if merge_lora:
            raise UserError(f"{run} is not a LoRA run (no --lora-rank): export it without --merge-lora")
    elif not merge_lora:
        return export_latent_adapter(run, out_dir, force)
    model, parts, config, step = load_latent_model(run)
    if config.lora is not None:
        model, config = lora.merge_adapter(model), replace(config, lora=None)
    arch = latent_architecture(config.model.pretrained)
    arch.check_export(run, config)

    def write(tmp: Path) -> None:
        arch.write_pipeline(tmp, model, parts, config)
        record = {"format": ckpt.FORMAT, "kind": "latent", "step": step, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return publish_folder(out_dir, write, force, checked=True, command="latent export")


def export_latent_adapter(run: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """A latent LoRA run's EMA adapter as diffusers' LoRA file: ``pytorch_lora_weights.safetensors`` with keys
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (an SD3 model's ``transformer.<module>...``) and the PEFT
    config as its adapter metadata (so an alpha other than the rank loads at its scale), written by the pipeline's
    own ``save_lora_weights``, beside our record (the run config: the base's path and sha256).
    ``pipe.load_lora_weights(out_dir)`` on the base pipeline gives this project's model."""
    from perceptual_diffusion.models.publish import CONFIG_FILE, check_export_target, publish_folder

    out_dir = Path(out_dir)
    check_export_target(out_dir, force, [run], command="latent export")
    state, config, step = read_raw_latent_weights(run)
    model = latent_lora_model(state, config, torch.zeros(1, 1, 1), str(run))
    metadata = lora.peft_config(config.lora, lora.architecture(config)).to_dict()
    arch = latent_architecture(config.model.pretrained)

    def write(tmp: Path) -> None:
        arch.write_adapter(tmp, lora.peft_state(model), metadata)
        record = {"format": ckpt.FORMAT, "kind": "latent", "step": step, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return publish_folder(out_dir, write, force, checked=True, command="latent export")


def export_load_hint(folder: str | Path) -> str:
    """How diffusers loads an exported latent folder (the CLI prints it)."""
    return latent_architecture(folder).load_hint(Path(folder))


# The latent architectures by kind (``pretrained.folder_kind`` reads it from the folder): a new one is a class like
# StableDiffusion (or models/sd3.py's SD3) and one line here.
LATENT_ARCHITECTURES: dict[str, LatentArchitecture] = {"sd": StableDiffusion(), "sd3": sd3.SD3()}
