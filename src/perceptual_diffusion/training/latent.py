"""Training latent text-to-image models with the one training loop: caption data as the loop's batch source, latents
cached once by rank 0 (``LatentCache``), and ``LatentTask``, the loop's task for this model family (see
``training.PixelTask``). Condition ids are caption indices (-1: the empty prompt), so condition dropout is the pixel
code's.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from perceptual_diffusion.config import LatentRunConfig
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.data.caption_formats import load_captions
from perceptual_diffusion.data.captions import CaptionData
from perceptual_diffusion.data.grid import save_grid
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.latent import (
    build_model,
    check_pretrained,
    latent_architecture,
    load_frozen_parts,
    read_unet_weights,
    sample_latent,
    vae_downsample,
)
from perceptual_diffusion.models.latent_perceptual import LatentPerceptualLoss
from perceptual_diffusion.models.pretrained import LatentParts
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import distributed, ownership
from perceptual_diffusion.runtime.progress import progress as progress_iter

GRID_PROMPTS = 4  # captions (the data's first ones) in the periodic sample grids: one row each, as in `latent sample`
GRID_SEEDS_PER_PROMPT = 4


def _default_cache_dir() -> Path:
    from perceptual_diffusion.runtime.cache import cache_dir

    return cache_dir() / "latents"


_CACHE_ENTRY = re.compile(r"latents-[0-9a-f]{20}")  # the one kind of entry a latent cache folder holds


def claim_cache_dir(cache_dir: str | Path | None) -> Path:
    """The latent cache folder (``--cache-dir``, default under ``$PD_CACHE_DIR``), claimed before any work: it gets
    an ownership marker, and a folder that holds anything but latent caches (a run, a data folder, the user's own
    files) is refused in one line, never written into. A folder of ``latents-KEY`` caches made before markers existed
    is adopted; an already marked cache is only read (it may sit on a read-only disk once complete)."""
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    marker = ownership.read_marker(folder)
    if marker is not None and marker.kind == "latent-cache":
        return folder
    return ownership.claim_dir(
        folder,
        "latent-cache",
        command="latent cache",
        option="--cache-dir",
        adopt=lambda name: _CACHE_ENTRY.fullmatch(name) is not None,
    )


def _cache_key(fingerprint: str, parts: LatentParts, resolution: int) -> str:
    """The key of what a cache holds, the VAE's latents of the data at the resolution: the data, the VAE's files and
    the resolution. The text encoders are no part of it (captions are encoded every step, never cached), so a run
    with or without T5 (``--no-t5``) reads the same, correct cache."""
    h = hashlib.sha256()
    for piece in (fingerprint, ckpt.sha256_file(parts.folder / "vae"), str(resolution)):
        h.update(piece.encode() + b"\0")
    return h.hexdigest()[:20]


class LatentCache:
    """Every item's latent in fixed-size chunk files (``chunk-000000.safetensors``: rows 0..CHUNK-1, ...) under one
    folder per key, read row by row through safetensors' memory map: memory holds a batch, not the data set.

    Chunks make the cache build resumable (a killed build keeps its finished chunks) and shardable (under torchrun
    rank r encodes chunks r, r + W, ...); each chunk is written atomically, and a damaged one is encoded again.
    """

    CHUNK = 256

    def __init__(self, folder: Path, num_items: int, shape: tuple[int, ...]) -> None:
        self.folder, self.num_items, self.shape = Path(folder), num_items, tuple(shape)
        self._handles: dict[int, Any] = {}

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.CHUNK)

    def chunk_path(self, c: int) -> Path:
        return self.folder / f"chunk-{c:06d}.safetensors"

    def _rows(self, c: int) -> int:
        return min(self.CHUNK, self.num_items - c * self.CHUNK)

    def _valid(self, c: int) -> bool:
        try:
            with safe_open(str(self.chunk_path(c)), framework="pt") as fh:
                return tuple(fh.get_slice("latents").get_shape()) == (self._rows(c), *self.shape)
        except Exception:  # noqa: BLE001 - missing, truncated or foreign: encode it again
            return False

    def missing_chunks(self) -> list[int]:
        return [c for c in range(self.num_chunks) if not self._valid(c)]

    def build(
        self,
        chunks: Sequence[int],
        data: CaptionData,
        parts: LatentParts,
        resolution: int,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        """Encode and write the given chunks ((the VAE posterior mean - shift_factor) * scaling_factor)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            for c in progress_iter(chunks, desc="encoding latents", unit="chunk", enabled=progress):
                rows = list(range(c * self.CHUNK, c * self.CHUNK + self._rows(c)))
                latents = torch.cat(
                    [
                        parts.encode_images(data.load_images(rows[i : i + batch_size], resolution)).cpu()
                        for i in range(0, len(rows), batch_size)
                    ]
                ).contiguous()
                ckpt.atomic_write(self.chunk_path(c), lambda tmp, x=latents: save_file({"latents": x}, str(tmp)))
        except OSError as exc:
            raise UserError(
                f"cannot write the latent cache {self.folder} ({exc.strerror or exc}); set --cache-dir"
            ) from None

    def __getitem__(self, indices: Tensor) -> Tensor:
        rows = []
        for i in indices.tolist():
            c, r = divmod(int(i), self.CHUNK)
            if c not in self._handles:
                self._handles[c] = safe_open(str(self.chunk_path(c)), framework="pt")
            rows.append(self._handles[c].get_slice("latents")[r : r + 1])
        return torch.cat(rows)


def latent_cache(
    data: CaptionData,
    parts: LatentParts,
    resolution: int,
    cache_dir: str | Path | None = None,
    fingerprint: str | None = None,
    progress: bool = True,
) -> LatentCache:
    """The complete latent cache of ``data``, encoding what is missing. Under torchrun every rank encodes its share
    of the missing chunks, then all wait for each other; the key (data fingerprint, the VAE's files, the resolution)
    is computed on rank 0 alone and sent to the others, so a changed input is a new folder, never a stale one."""
    key = None
    if distributed.is_main():
        key = _cache_key(fingerprint or data.fingerprint(), parts, resolution)
    key = distributed.broadcast_object(key)
    folder = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    cache = LatentCache(folder / f"latents-{key}", len(data), parts.latent_shape(resolution))
    missing = cache.missing_chunks()
    cache.build(distributed.seed_shard(missing), data, parts, resolution, progress=progress)
    distributed.barrier()
    if distributed.is_main() and cache.missing_chunks():
        raise UserError(f"the latent cache {cache.folder} is incomplete after building it; check the disk")
    return cache


@dataclass
class LatentSource:
    """Caption data as the loop's batch source: condition ids are caption indices, -1 the empty prompt."""

    data: CaptionData
    parts: LatentParts
    resolution: int
    tokens: Tensor  # (N, L) token ids of every caption
    null_tokens: Tensor  # (1, L) of the empty prompt
    latents: LatentCache | None  # every item's latent, or None to encode each micro-batch
    null_id: int = -1
    cond_ids: Tensor = field(init=False)  # item i's condition is its own caption: made once, read every step

    def __post_init__(self) -> None:
        self.cond_ids = torch.arange(len(self.data), device=self.tokens.device)

    @property
    def num_items(self) -> int:
        return len(self.data)

    @property
    def x0_shape(self) -> tuple[int, ...]:
        return self.parts.latent_shape(self.resolution)

    def micro_batch(self, indices: Tensor, cond_ids: Tensor | None) -> tuple[Tensor, Tensor]:
        if self.latents is not None:
            x0 = self.latents[indices.cpu()]
        else:
            x0 = self.parts.encode_images(self.data.load_images(indices.cpu().tolist(), self.resolution))
        dropped = (cond_ids < 0).unsqueeze(1)
        ids = torch.where(dropped, self.null_tokens.to(self.tokens.device), self.tokens[cond_ids.clamp(min=0)])
        return x0.to(self.tokens.device), self.parts.encode_tokens(ids)


class LatentTask:
    """The training loop's task for latent text-to-image models (see ``training.PixelTask``)."""

    def __init__(self, config: LatentRunConfig) -> None:
        self.config = config
        self.data: CaptionData | None = None
        self._parts: LatentParts | None = None
        self._fingerprint: str | None = None

    def load(self) -> None:
        mc = self.config.model
        check_pretrained(mc.pretrained)
        latent_architecture(mc.pretrained).check(self.config)  # taps, resolution, schedule: before a run directory
        down = vae_downsample(mc.pretrained)
        lc = self.config.loss
        if lc.kind == "latent-perceptual" and lc.lpl_up_blocks is not None and lc.lpl_up_blocks > down.bit_length():
            raise UserError(
                f"--lpl-up-blocks {lc.lpl_up_blocks}: {mc.pretrained}'s VAE decoder has {down.bit_length()} up blocks"
            )
        dc = self.config.data
        if dc.cache_latents and distributed.launched_rank() == 0:  # before the data is read
            claim_cache_dir(dc.cache_dir)
        self.data = load_captions(dc.path, dc.format, dc.on_bad_image)

    def parts(self, device: torch.device) -> LatentParts:
        if self._parts is None:
            mc = self.config.model
            self._parts = load_frozen_parts(mc.pretrained, device, t5=mc.t5)  # --no-t5: T5 never loaded
        return self._parts

    def fingerprint(self) -> str:
        """The data's fingerprint (it reads every image, so once per run)."""
        if self._fingerprint is None:
            self._fingerprint = self.data.fingerprint()
        return self._fingerprint

    def source(self, device: torch.device) -> LatentSource:
        parts, dc = self.parts(device), self.config.data
        latents = None
        if dc.cache_latents:
            fingerprint = self.fingerprint() if distributed.is_main() else None
            progress = distributed.is_main() and self.config.train.progress
            latents = latent_cache(self.data, parts, self.config.model.resolution, dc.cache_dir, fingerprint, progress)
        tokens = parts.tokenize(self.data.captions).to(device)
        return LatentSource(self.data, parts, self.config.model.resolution, tokens, parts.tokenize([""]), latents)

    def _model(self, config: LatentRunConfig, device: torch.device) -> torch.nn.Module:
        return build_model(config, self.parts(device).encode_text([""])).to(device)

    def build_model(self, config: LatentRunConfig, device: torch.device) -> torch.nn.Module:
        """The pretrained network's weights, or those of ``--init-from`` (a latent run or a diffusers folder)."""
        model = self._model(config, device)
        source = config.train.init_from or config.model.pretrained
        state, where = read_unet_weights(source)
        ckpt.load_state_dict_checked(model, state, where)
        return model

    def build_teacher(self, config: LatentRunConfig, device: torch.device) -> torch.nn.Module | None:
        if config.loss.kind != "self-perceptual":
            return None
        teacher = self._model(config, device)
        state, where = read_unet_weights(config.loss.teacher)
        ckpt.load_state_dict_checked(teacher, state, f"teacher {where}")
        return frozen_copy(teacher)

    def build_loss(self, config: LatentRunConfig, schedule: Any, device: torch.device) -> LatentPerceptualLoss:
        """The latent perceptual loss with this run's frozen VAE (held by the loss, never by the optimiser)."""
        return LatentPerceptualLoss(config.loss, schedule, self.parts(device).vae)

    def sample_grid(self, ema: torch.nn.Module, config: LatentRunConfig, path: Path, device: torch.device) -> None:
        prompts = [
            self.data.captions[i % len(self.data)] for i in range(GRID_PROMPTS) for _ in range(GRID_SEEDS_PER_PROMPT)
        ]
        images = sample_latent(ema, self.parts(device), prompts, list(range(len(prompts))), config.sample)
        save_grid(images, path, nrow=GRID_SEEDS_PER_PROMPT)


def precompute_latents(config: LatentRunConfig) -> LatentCache:
    """Fill the latent cache of ``config``'s data ahead of training (under torchrun, every process encodes a share)."""
    from perceptual_diffusion.training.loop import resolve_device

    task = LatentTask(replace(config, data=replace(config.data, cache_latents=True)))
    task.load()
    device = resolve_device(config.train.device)
    with distributed.process_group(device):
        return task.source(device).latents


def train_latent(config: LatentRunConfig, run_dir: str | Path, override_config: bool = False):
    """Train (or resume) a latent text-to-image run: the pixel models' loop, losses and checkpoints."""
    from perceptual_diffusion.training.loop import run_task

    return run_task(LatentTask(config), run_dir, override_config)
