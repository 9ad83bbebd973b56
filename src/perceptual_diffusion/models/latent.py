"""Latent, text-conditioned diffusion: the paper's own setting (Stable Diffusion's U-Net, VAE and CLIP text encoder).

A *pretrained folder* is a local diffusers folder in ``StableDiffusionPipeline`` layout (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``), for example ByteDance's published SD 2.1-base zero-SNR checkpoints. The U-Net is
trained; the VAE and the text encoder stay frozen and are never saved in a run (the run records the folder).

The pieces here plug into the same training loop, losses and sampler as the pixel models:
- :class:`TextConditionedUNet` follows ``networks.DiffusionModel``: ``model(x_t, t, cond)`` with ``cond`` the text
  encoder's hidden states (None: the empty prompt), ``features(x_t, t, cond, taps)`` running only the encoder half
  (``networks.encoder_features``, shared with the pixel U-Net), ``schedule`` and ``null_condition``;
- ``training.latent.LatentTask`` is the loop's task (caption data as its batch source, latents cached once);
- :func:`sample_latent` is the one sampling loop (``sampling.sample_stream``) in latent space, then the VAE
  decoder; a test checks it against diffusers' ``StableDiffusionPipeline``;
- :func:`export_latent` writes a ``StableDiffusionPipeline`` folder that diffusers loads as is.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LatentRunConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.networks import encoder_features, encoder_taps
from perceptual_diffusion.core.sampling import sample_stream
from perceptual_diffusion.core.schedule import build_schedule
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import lora
from perceptual_diffusion.runtime import checkpoint as ckpt

PARTS = ("unet", "vae", "text_encoder", "tokenizer")


# ---------------------------------------------------------------------------------------------------------------
# The pretrained folder.


def check_pretrained(folder: str | Path) -> Path:
    """The folder, if it has the four parts a latent model needs; else one line saying what is missing."""
    path = Path(folder)
    if not path.is_dir():
        raise UserError(f"--pretrained {path} is not a folder; give a local diffusers Stable Diffusion folder")
    missing = [p for p in PARTS if not (path / p).is_dir()]
    if missing:
        raise UserError(
            f"--pretrained {path} has no {', '.join(f'{m}/' for m in missing)}; give a diffusers folder in "
            "StableDiffusionPipeline layout (unet/, vae/, text_encoder/, tokenizer/)"
        )
    return path


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python's stack
        raise UserError(f"cannot read {path} ({exc}); the pretrained folder is damaged") from None


def unet_config(folder: str | Path) -> dict[str, Any]:
    """The U-Net's diffusers config (architecture only: the keys diffusers itself adds are dropped)."""
    config = _read_config(check_pretrained(folder) / "unet" / "config.json")
    return {k: v for k, v in config.items() if not k.startswith("_")}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """diffusers and transformers at error verbosity without their progress bars (loading a few local files prints
    several bars and advice about optional packages otherwise); restored afterwards."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    levels = (dlog.get_verbosity(), tlog.get_verbosity())
    bars = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        for module, enabled in zip((dlog, tlog), bars):
            (module.enable_progress_bar if enabled else module.disable_progress_bar)()


def _from_pretrained(cls: Any, folder: Path, subfolder: str) -> Any:
    try:
        with quiet_libraries():
            return cls.from_pretrained(str(folder), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {folder / subfolder} ({first}); the pretrained folder is damaged") from None


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
class FrozenParts:
    """The frozen VAE, text encoder and tokenizer of a pretrained folder, on one device."""

    vae: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    folder: Path

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def downsample(self) -> int:
        """Pixels per latent side: the VAE halves the resolution once per encoder block but the last."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        side = resolution // self.downsample
        return (self.vae.config.latent_channels, side, side)

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

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents: the VAE posterior's mean, times its scaling factor."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1]."""
        x = self.vae.decode(latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor).sample
        return x.float().clamp(-1, 1)


def load_frozen_parts(folder: str | Path, device: torch.device | str = "cpu") -> FrozenParts:
    """The VAE, text encoder and tokenizer of a pretrained folder, frozen (eval, no grad) on ``device``."""
    from diffusers import AutoencoderKL
    from transformers import AutoTokenizer, CLIPTextModel

    path = check_pretrained(folder)
    vae = _from_pretrained(AutoencoderKL, path, "vae")
    text_encoder = _from_pretrained(CLIPTextModel, path, "text_encoder")
    tokenizer = _from_pretrained(AutoTokenizer, path, "tokenizer")
    for m in (vae, text_encoder):
        m.to(device).eval().requires_grad_(False)
    return FrozenParts(vae, text_encoder, tokenizer, path)


def vae_downsample(folder: str | Path) -> int:
    """Pixels per latent side of a pretrained folder's VAE (it halves the resolution at every block but the last)."""
    return 2 ** (len(_read_config(check_pretrained(folder) / "vae" / "config.json").get("block_out_channels", [0])) - 1)


def build_model(config: LatentRunConfig, null_embedding: Tensor) -> TextConditionedUNet:
    """A U-Net with the pretrained folder's architecture (freshly initialised: load weights into it). Its
    ``sample_size`` (the latent side that samplers and an exported pipeline default to) is the run's resolution."""
    from diffusers import UNet2DConditionModel

    side = config.model.resolution // vae_downsample(config.model.pretrained)
    unet = UNet2DConditionModel.from_config({**unet_config(config.model.pretrained), "sample_size": side})
    return TextConditionedUNet(unet, config.schedule, null_embedding)


def read_unet_weights(path: str | Path) -> tuple[dict[str, Tensor], str]:
    """U-Net weights in our wrapper's key names (``unet.*``) from a latent run directory, its weights file, or a
    diffusers folder with ``unet/``; returns them and a description of where they came from."""
    p = Path(path)
    if p.is_dir() and (p / "unet").is_dir() and not (p / ckpt.WEIGHTS_NAME).is_file() and not ckpt.is_adapter_folder(p):
        from diffusers import UNet2DConditionModel

        kind = _read_config(p / "unet" / "config.json").get("_class_name")
        if kind != "UNet2DConditionModel":
            raise UserError(
                f"{p / 'unet'} is a {kind}, not a text-conditioned UNet2DConditionModel: a pixel-model folder "
                "goes with the pixel commands (train, sample)"
            )

        unet = _from_pretrained(UNet2DConditionModel, p, "unet")
        return {f"unet.{k}": v for k, v in unet.state_dict().items()}, f"{p / 'unet'}"
    state, config, step = read_raw_latent_weights(p)
    if config.lora is not None:  # an adapter: merged into its base through PEFT, a plain U-Net's weights
        # The null embedding is a non-persistent buffer (not in the state dict): a placeholder does for merging.
        model = lora.merge_adapter(latent_lora_model(state, config, torch.zeros(1, 1, 1), str(p)))
        return model.state_dict(), f"{p} (step {step}, LoRA merged into its base)"
    return state, f"{p} (step {step})"


def read_raw_latent_weights(path: str | Path) -> tuple[dict[str, Tensor], LatentRunConfig, int]:
    """A latent weights file or exported adapter folder as stored: of a LoRA run, the adapter alone."""
    p = ckpt.resolve_weights(path)
    if ckpt.is_adapter_folder(p):
        from perceptual_diffusion.models.export import adapter_record

        config, step, kind = adapter_record(p)
        if kind != "latent":
            raise ckpt.wrong_kind(p, kind)
        return lora.read_adapter_file(p), config, step
    return ckpt.read_weights(p, kind="latent")


def latent_lora_model(
    state: dict[str, Tensor], config: LatentRunConfig, null_embedding: Tensor, source: str
) -> TextConditionedUNet:
    """A latent LoRA model: its base (``--init-from`` or the pretrained U-Net, sha256-checked) with the adapter."""
    base = lora.check_base(config.lora, lora.base_path(config), source)
    base_state, where = read_unet_weights(base)
    model = build_model(config, null_embedding)
    ckpt.load_state_dict_checked(model, base_state, where)
    return lora.attach(model, config.lora, state, source)


def load_latent_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[TextConditionedUNet, FrozenParts, LatentRunConfig, int]:
    """A trained latent model (EMA weights) from a run directory or weights file, with its frozen parts, in eval; of
    a LoRA run, its base with the adapter on top (as trained, not merged)."""
    state, config, step = read_raw_latent_weights(path)
    parts = load_frozen_parts(config.model.pretrained, device)
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
    model: TextConditionedUNet,
    parts: FrozenParts,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SampleConfig,
    batch_size: int = 16,
    decode: bool = True,
) -> Tensor:
    """One image per (prompt, seed): DDIM in latent space with CFG (``config.cfg_scale``, one batched forward over
    [prompt; empty prompt]) and guidance rescale, then the VAE decoder (``decode=False``: the latents)."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
    shape = parts.latent_shape(model.unet.config.sample_size * parts.downsample)
    cond_of = lambda start, end: parts.encode_text(prompts[start:end])  # noqa: E731 - per batch: bounded memory
    out = []
    for z in sample_stream(model, shape, seeds, cond_of, config, batch_size, parts.device, clamp=False):
        out.append(parts.decode(z).cpu() if decode else z)
    return torch.cat(out)


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


def export_latent(run: str | Path, out_dir: str | Path, force: bool = False, merge_lora: bool = False) -> Path:
    """A trained latent model (EMA U-Net) as a ``StableDiffusionPipeline`` folder, atomically: the pretrained
    folder's VAE, text encoder and tokenizer, and a ``DDIMScheduler`` matching the training setting. Of a LoRA run,
    the adapter where diffusers' ``load_lora_weights`` finds it (:func:`export_latent_adapter`), or with
    ``merge_lora`` the pipeline with the adapter merged into the U-Net through PEFT."""
    from diffusers import DDIMScheduler

    from perceptual_diffusion.models.export import CONFIG_FILE, check_export_target, publish_folder, scheduler_config

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
    if config.schedule.family != "ddpm":
        # StableDiffusionPipeline samples with DDIM-style schedulers only; writing a DDIMScheduler for a flow model
        # would give wrong images silently. The SD3 path (issue 19) is the flow models' latent pipeline.
        raise UserError(
            f"{run} is a {config.schedule.family} model: latent export writes a StableDiffusionPipeline, which has no "
            "flow sampler; sample it with `latent sample` (flow latent export comes with the SD3 path)"
        )

    def write(tmp: Path) -> None:
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
        record = {"format": ckpt.FORMAT, "kind": "latent", "step": step, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return publish_folder(out_dir, write, force, checked=True, command="latent export")


def export_latent_adapter(run: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """A latent LoRA run's EMA adapter as diffusers' LoRA file: ``pytorch_lora_weights.safetensors`` with keys
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` and the PEFT config as its adapter metadata (so an alpha other
    than the rank loads at its scale), written by ``StableDiffusionPipeline.save_lora_weights``, beside our record
    (the run config: the base's path and sha256). ``pipe.load_lora_weights(out_dir)`` on the base pipeline gives this
    project's model."""
    from perceptual_diffusion.models.export import CONFIG_FILE, check_export_target, publish_folder

    out_dir = Path(out_dir)
    check_export_target(out_dir, force, [run], command="latent export")
    state, config, step = read_raw_latent_weights(run)
    model = latent_lora_model(state, config, torch.zeros(1, 1, 1), str(run))
    metadata = lora.peft_config(config.lora).to_dict()

    def write(tmp: Path) -> None:
        with quiet_libraries():
            from diffusers import StableDiffusionPipeline

            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers=lora.peft_state(model), unet_lora_adapter_metadata=metadata
            )
        record = {"format": ckpt.FORMAT, "kind": "latent", "step": step, "config": config.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return publish_folder(out_dir, write, force, checked=True, command="latent export")
