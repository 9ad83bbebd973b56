"""Image-caption pairs for text-to-image training, read from local disk by index.

Three layouts are read (``caption_formats.py``): a folder of images each with a same-stem ``.txt`` caption, a JSONL
file (HuggingFace imagefolder's ``metadata.jsonl``), and WebDataset ``.tar`` shards; this module holds what they
share: the index, image checks and on-demand decoding. Everything is indexed once at load time (captions read,
every image checked), so an index names the same sample for the whole run and the training loop can pick indices
from a seeded generator. Pixels are decoded on demand.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from perceptual_diffusion.config import CaptionFormat
from perceptual_diffusion.data.datasets import to_8bit
from perceptual_diffusion.errors import UserError

CAPTION_FORMATS = typing.get_args(CaptionFormat)
GLOB_CHARS = "*?["


@dataclass(frozen=True)
class CaptionItem:
    """One sample: where its image is (for messages) and its caption."""

    source: str
    caption: str


@dataclass(frozen=True)
class ItemRef:
    """Where an image's bytes are: a whole file (``offset`` None) or ``size`` bytes at ``offset`` of a tar shard."""

    path: str
    key: str  # location-independent name, hashed by the fingerprint
    offset: int | None = None
    size: int | None = None
    digest: str = ""  # blake2b of the image bytes, taken while indexing (the fingerprint needs no second read)


class CaptionData:
    """Indexable image-caption pairs.

    ``items[i]`` is the caption and location of sample ``i``; :meth:`load_image` decodes its pixels. Tar shards are
    read with positioned reads on descriptors opened lazily per process, so the object works after ``fork``.
    """

    def __init__(self, name: str, items: Sequence[CaptionItem], refs: Sequence[ItemRef]):
        if len(items) != len(refs):
            raise ValueError("items and refs differ in length")
        self.name = name
        self.items: tuple[CaptionItem, ...] = tuple(items)
        self._refs: tuple[ItemRef, ...] = tuple(refs)
        self._fds: dict[str, object] = {}
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return f"CaptionData(name={self.name!r}, {len(self)} items)"

    @property
    def captions(self) -> list[str]:
        return [item.caption for item in self.items]

    # -- raw bytes ---------------------------------------------------------------------------------------------

    def _shard(self, path: str) -> object:
        """This process's handle on a shard: an fd for ``os.pread``, else a file object read under the lock."""
        if os.getpid() != self._pid:  # forked: the inherited handles share a file offset with the parent
            self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
        handle = self._fds.get(path)
        if handle is None:
            handle = self._fds[path] = open_shard(path)
        return handle

    def _read(self, index: int) -> bytes:
        ref, source = self._refs[index], self.items[index].source
        try:
            if ref.offset is None:
                with open(ref.path, "rb") as fh:
                    return fh.read()
            assert ref.size is not None
            with self._lock:
                handle = self._shard(ref.path)
                if isinstance(handle, int):
                    data = os.pread(handle, ref.size, ref.offset)
                else:
                    handle.seek(ref.offset)  # type: ignore[attr-defined]
                    data = handle.read(ref.size)  # type: ignore[attr-defined]
        except OSError as exc:
            raise UserError(
                f"cannot read image {source} ({exc.strerror or exc}); check that the data is still there"
            ) from None
        if len(data) != ref.size:
            raise UserError(
                f"cannot read image {source}: the shard is shorter than when it was indexed; reload the data"
            )
        return data

    def close(self) -> None:
        """Close this process's shard handles (they reopen on the next read)."""
        fds, self._fds = self._fds, {}
        if os.getpid() != self._pid:
            return
        for handle in fds.values():
            with contextlib.suppress(OSError):
                os.close(handle) if isinstance(handle, int) else handle.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"], state["_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock, self._pid = threading.Lock(), os.getpid()

    # -- pixels ------------------------------------------------------------------------------------------------

    def load_image(self, index: int, resolution: int) -> Tensor:
        """Sample ``index`` as float32 (3, resolution, resolution) RGB in [-1, 1].

        The shorter side is resized to ``resolution`` (bicubic), then the centre is cropped.
        """
        index = int(index)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} captioned images")
        return decode_image(self._read(index), self.items[index].source, resolution)

    def load_images(self, indices: Sequence[int] | Tensor, resolution: int) -> Tensor:
        """Samples ``indices`` stacked as float32 (N, 3, resolution, resolution) in [-1, 1]."""
        if isinstance(indices, Tensor):
            indices = indices.reshape(-1).tolist()
        if len(indices) == 0:
            return torch.empty((0, 3, resolution, resolution), dtype=torch.float32)
        return torch.stack([self.load_image(i, resolution) for i in indices])

    def fingerprint(self) -> str:
        """``"N:hex16"``: a hash over every sample's name, caption and image bytes (digests taken while indexing, so
        this reads no image). Names are relative to the data's root, so moving the data keeps its fingerprint;
        editing a caption or an image changes it (for an image changed after loading, load the data again).
        """
        total = hashlib.blake2b(digest_size=8)
        for item, ref in zip(self.items, self._refs):
            for part in (ref.key, item.caption, ref.digest):
                encoded = part.encode("utf-8", "surrogatepass")
                total.update(len(encoded).to_bytes(8, "little"))
                total.update(encoded)
        return f"{len(self)}:{total.hexdigest()}"


def open_shard(path: str) -> object:
    """A raw fd for ``os.pread`` (no shared file offset); on Windows a file object, read under the lock."""
    if hasattr(os, "pread"):
        return os.open(path, os.O_RDONLY)
    return open(path, "rb")  # noqa: SIM115 - kept open across reads, closed by CaptionData.close()


def decode_image(data: bytes, source: str, resolution: int) -> Tensor:
    """Image bytes -> float32 (3, R, R) in [-1, 1]; any mode, shorter side resized to R, centre-cropped."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: the pixels are what matter
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is refused, not loaded
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = to_8bit(img).convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        arr = np.array(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - image decoders fed arbitrary bytes raise many exception types
        raise UserError(f"cannot read image {source}: {reason(exc)}; fix or remove it and reload the data") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def check_image(fp: str | Path | io.BytesIO) -> str | None:
    """Why an image cannot be opened (a short reason), or None if it looks fine. Fast: headers and checksums only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.verify()
    except Exception as exc:  # noqa: BLE001 - see decode_image
        return reason(exc)
    return None


class BadImages:
    """Collects unreadable images: raises on the first with ``on_bad_image="error"``, else warns once at the end."""

    def __init__(self, on_bad_image: str):
        self.on_bad_image = on_bad_image
        self.bad: list[str] = []

    def ok_file(self, path: Path) -> str | None:
        """:meth:`ok` for an image file, read once (checked and digested from memory)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self._bad(str(path), reason(exc))
        return self.ok(data, str(path))

    def ok(self, data: bytes, source: str) -> str | None:
        """The digest of a readable image's bytes, or None for an unreadable one (skipped, or raised)."""
        reason = check_image(io.BytesIO(data))
        if reason is None:
            return digest(data)
        return self._bad(source, reason)

    def _bad(self, source: str, reason: str) -> None:
        if self.on_bad_image == "error":
            raise UserError(f"cannot read image {source}: {reason}; fix or remove it, or pass --on-bad-image skip")
        self.bad.append(source)
        return None

    def warn(self, total: int, where: str) -> None:
        if self.bad:
            warnings.warn(
                f"skipped {len(self.bad)} of {total} images in {where} that could not be read, e.g. {self.bad[0]} "
                "(pass --on-bad-image error to stop instead)",
                UserWarning,
                stacklevel=3,
            )


def finish_index(name: str, items: list[CaptionItem], refs: list[ItemRef], where: str, why: str) -> CaptionData:
    if not items:
        raise UserError(f"no image-caption pairs found in {where} ({why}); check --data-path")
    return CaptionData(name, items, refs)


# ---------------------------------------------------------------------------------------------------------------
# Folder: cat.png + cat.txt


# ---------------------------------------------------------------------------------------------------------------
# JSONL: {"file_name": "a.png", "text": "a cat"} per line


# ---------------------------------------------------------------------------------------------------------------
# WebDataset: tar shards of 000042.jpg + 000042.txt


# ---------------------------------------------------------------------------------------------------------------
