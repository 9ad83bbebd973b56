"""A local diffusers folder of a latent text-to-image model: what every latent architecture shares.

Reading its JSON configs (one line on damage), loading one part quietly, which architecture the folder holds
(``folder_kind``: ``models/latent.py`` ``LATENT_ARCHITECTURES`` maps the kind to its code), and the frozen VAE side
of the parts (:class:`FrozenVAE`: latents = (posterior mean - shift_factor) * scaling_factor, and back, as diffusers'
pipelines do; Stable Diffusion's VAE has no shift, SD3's has one).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from perceptual_diffusion.errors import UserError

# The pipeline class a folder's model_index.json names -> the latent architecture that reads it.
PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusion3Pipeline": "sd3"}
SD3_TRANSFORMER = "SD3Transformer2DModel"


def read_config(path: Path) -> dict[str, Any]:
    """A JSON config of a pretrained folder; one line when it is unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested deeper than Python's stack
        raise UserError(f"cannot read {path} ({exc}); the pretrained folder is damaged") from None


def require_parts(folder: Path, parts: Sequence[str], layout: str) -> Path:
    """``folder`` if it has every part folder, else one error line naming the missing ones and the ``layout``
    expected (a ``LatentArchitecture.check_folder``)."""
    missing = [p for p in parts if not (folder / p).is_dir()]
    if missing:
        raise UserError(
            f"--pretrained {folder} has no {', '.join(f'{m}/' for m in missing)}; give a diffusers folder in {layout}"
        )
    return folder


def folder_kind(folder: str | Path) -> str:
    """The latent architecture of a diffusers folder: "sd3" for a ``StableDiffusion3Pipeline`` folder (its
    model_index.json, or a ``transformer/`` of class SD3Transformer2DModel), else "sd" (whose checks then say what a
    Stable Diffusion folder lacks). Reads JSON only: cheap enough for the CLI and the LoRA table."""
    path = Path(folder)
    index = path / "model_index.json"
    if index.is_file():
        with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
            kind = PIPELINE_KINDS.get(json.loads(index.read_text()).get("_class_name"))
            if kind is not None:
                return kind
    transformer = path / "transformer" / "config.json"
    if transformer.is_file() and not (path / "unet").is_dir():
        with contextlib.suppress(OSError, ValueError, RecursionError, AttributeError):
            if json.loads(transformer.read_text()).get("_class_name") == SD3_TRANSFORMER:
                return "sd3"
    return "sd"


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


def load_part(cls: Any, folder: Path, subfolder: str) -> Any:
    """``cls.from_pretrained(folder, subfolder=...)`` quietly; one line when the part is damaged."""
    try:
        with quiet_libraries():
            return cls.from_pretrained(str(folder), subfolder=subfolder)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load {folder / subfolder} ({first}); the pretrained folder is damaged") from None


def network_weights(cls: Any, folder: Path, subfolder: str, wrong_kind: str) -> dict[str, Any]:
    """The trained network of a pretrained or exported folder (``subfolder``, a ``cls``) in our wrapper's key names
    (``subfolder.*``); a folder holding another class is one line: ``{folder/subfolder} is a KIND, {wrong_kind}``."""
    kind = read_config(folder / subfolder / "config.json").get("_class_name")
    if kind != cls.__name__:
        raise UserError(f"{folder / subfolder} is a {kind}, {wrong_kind}")
    network = load_part(cls, folder, subfolder)
    return {f"{subfolder}.{k}": v for k, v in network.state_dict().items()}


def vae_downsample(folder: str | Path) -> int:
    """Pixels per latent side of a pretrained folder's VAE (it halves the resolution at every block but the last)."""
    return 2 ** (len(read_config(Path(folder) / "vae" / "config.json").get("block_out_channels", [0])) - 1)


class FrozenVAE:
    """The VAE side of a latent model's frozen parts (a mixin of each architecture's parts dataclass, which holds
    ``vae`` and ``folder``): latent shapes, encoding into and decoding out of the diffusion's latent space."""

    vae: Any
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

    @property
    def shift_factor(self) -> float:
        return self.vae.config.get("shift_factor") or 0.0

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> latents: (posterior mean - shift_factor) * scaling_factor (StableDiffusion3Pipeline's
        convention; Stable Diffusion's VAE has no shift, and subtracting 0.0 changes no bit)."""
        posterior = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist
        return ((posterior.mean - self.shift_factor) * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images in [-1, 1]: the VAE decoder of latents / scaling_factor + shift_factor."""
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.float().clamp(-1, 1)


class LatentParts(Protocol):
    """What the training loop's caption source, the cache and the sampler use of any architecture's frozen parts
    (``latent.FrozenParts``, ``sd3.SD3Parts``): the VAE side (:class:`FrozenVAE`) and text as token ids, then as the
    network's condition (one tensor row per image)."""

    vae: Any
    folder: Path

    @property
    def device(self) -> torch.device: ...
    @property
    def downsample(self) -> int: ...
    def latent_shape(self, resolution: int) -> tuple[int, int, int]: ...
    def encode_images(self, images: Tensor) -> Tensor: ...
    def decode(self, latents: Tensor) -> Tensor: ...
    def tokenize(self, captions: Sequence[str]) -> Tensor: ...
    def encode_tokens(self, ids: Tensor) -> Tensor: ...
    def encode_text(self, captions: Sequence[str]) -> Tensor: ...
