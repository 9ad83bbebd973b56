"""Image-caption pairs for text-to-image training, read from local disk by index.

Three layouts are understood: a folder of images each with a same-stem ``.txt`` caption, a JSONL file of
``{"file_name": ..., "text": ...}`` lines (HuggingFace imagefolder's ``metadata.jsonl``), and WebDataset ``.tar``
shards. Everything is indexed once at load time -- captions read, every image checked -- so an index names the same
sample for the whole run and the training loop can pick indices from a seeded generator. Pixels are decoded on demand.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import posixpath
import tarfile
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

from .config import CaptionFormat
from .data import IMAGE_SUFFIXES, to_8bit
from .errors import UserError

CAPTION_FORMATS = typing.get_args(CaptionFormat)
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class CaptionItem:
    """One sample: where its image is (for messages) and its caption."""

    source: str
    caption: str


@dataclass(frozen=True)
class _Ref:
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

    def __init__(self, name: str, items: Sequence[CaptionItem], refs: Sequence[_Ref]):
        if len(items) != len(refs):
            raise ValueError("items and refs differ in length")
        self.name = name
        self.items: tuple[CaptionItem, ...] = tuple(items)
        self._refs: tuple[_Ref, ...] = tuple(refs)
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
            handle = self._fds[path] = _open_shard(path)
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
        return _decode(self._read(index), self.items[index].source, resolution)

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


def _open_shard(path: str) -> object:
    """A raw fd for ``os.pread`` (no shared file offset); on Windows a file object, read under the lock."""
    if hasattr(os, "pread"):
        return os.open(path, os.O_RDONLY)
    return open(path, "rb")  # noqa: SIM115 - kept open across reads, closed by CaptionData.close()


def _decode(data: bytes, source: str, resolution: int) -> Tensor:
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
        raise UserError(f"cannot read image {source}: {_reason(exc)}; fix or remove it and reload the data") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0).contiguous()


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _check_image(fp: str | Path | io.BytesIO) -> str | None:
    """Why an image cannot be opened (a short reason), or None if it looks fine. Fast: headers and checksums only."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                img.verify()
    except Exception as exc:  # noqa: BLE001 - see _decode
        return _reason(exc)
    return None


class _BadImages:
    """Collects unreadable images: raises on the first with ``on_bad_image="error"``, else warns once at the end."""

    def __init__(self, on_bad_image: str):
        self.on_bad_image = on_bad_image
        self.bad: list[str] = []

    def ok_file(self, path: Path) -> str | None:
        """:meth:`ok` for an image file, read once (checked and digested from memory)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return self._bad(str(path), _reason(exc))
        return self.ok(data, str(path))

    def ok(self, data: bytes, source: str) -> str | None:
        """The digest of a readable image's bytes, or None for an unreadable one (skipped, or raised)."""
        reason = _check_image(io.BytesIO(data))
        if reason is None:
            return _digest(data)
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


def _finish(name: str, items: list[CaptionItem], refs: list[_Ref], where: str, why: str) -> CaptionData:
    if not items:
        raise UserError(f"no image-caption pairs found in {where} ({why}); check --data-path")
    return CaptionData(name, items, refs)


# ---------------------------------------------------------------------------------------------------------------
# Folder: cat.png + cat.txt


def _load_folder(root: Path, on_bad_image: str) -> CaptionData:
    if not root.is_dir():
        raise UserError(f"caption data {root} is not a folder; the folder format needs a folder of images + .txt files")
    try:
        files = [p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    except OSError as exc:
        raise UserError(f"cannot list the caption folder {root} ({exc.strerror or exc})") from None
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}; check --data-path")
    missing = [p for p in files if not p.with_suffix(".txt").is_file()]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(files)} images under {root} have no caption, e.g. {missing[0]} has no "
            f"{missing[0].with_suffix('.txt').name}; add a same-name .txt file next to each image, "
            "or describe them in a metadata.jsonl"
        )
    bad = _BadImages(on_bad_image)
    items, refs = [], []
    for p in files:
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read caption {txt} ({_reason(exc)}); save it as UTF-8 text") from None
        digest = bad.ok_file(p)
        if digest is not None:
            items.append(CaptionItem(str(p), caption))
            refs.append(_Ref(str(p), p.relative_to(root).as_posix(), digest=digest))
    bad.warn(len(files), str(root))
    return _finish(root.name, items, refs, str(root), "every image was unreadable")


# ---------------------------------------------------------------------------------------------------------------
# JSONL: {"file_name": "a.png", "text": "a cat"} per line


def _load_jsonl(path: Path, on_bad_image: str) -> CaptionData:
    if path.is_dir():
        if not (path / "metadata.jsonl").is_file():
            raise UserError(
                f"{path} has no metadata.jsonl; pass the .jsonl file itself, or use the folder or webdataset format"
            )
        path = path / "metadata.jsonl"
    base = path.parent
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} ({_reason(exc)}); it should be UTF-8 JSON lines") from None
    bad = _BadImages(on_bad_image)
    items, refs, total = [], [], 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where} is not valid JSON ({exc.msg}); each line must be one JSON object") from None
        except RecursionError:  # nested deeper than Python's stack: not a caption record either
            raise UserError(
                f"{where} is nested too deeply to be a caption record; each line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise UserError(f'{where} is not a JSON object; each line must look like {{"file_name": ..., "text": ...}}')
        name = record.get("file_name", record.get("image"))
        caption = record.get("text", record.get("caption"))
        if not isinstance(name, str) or not name:
            raise UserError(f'{where} has no image path; give it as a string under "file_name" or "image"')
        if not isinstance(caption, str):
            raise UserError(f'{where} has no caption; give it as a string under "text" or "caption"')
        image = Path(name) if Path(name).is_absolute() else base / name
        if not image.is_file():
            raise UserError(f"{where} names {name}, but {image} does not exist; fix the path or remove the line")
        total += 1
        digest = bad.ok_file(image)
        if digest is not None:
            items.append(CaptionItem(str(image), caption))
            refs.append(_Ref(str(image), Path(name).as_posix(), digest=digest))
    bad.warn(total, str(path))
    data_name = base.name if path.name == "metadata.jsonl" else path.stem
    return _finish(data_name, items, refs, str(path), "no non-empty lines, or every image was unreadable")


# ---------------------------------------------------------------------------------------------------------------
# WebDataset: tar shards of 000042.jpg + 000042.txt


def _shards(path: str) -> list[str]:
    if any(c in path for c in _GLOB_CHARS) and not os.path.exists(path):
        shards = sorted(p for p in glob.glob(path) if os.path.isfile(p))
        if not shards:
            raise UserError(f"no files match the shard pattern {path}; check --data-path")
        return shards
    if os.path.isdir(path):
        shards = sorted(str(p) for p in Path(path).glob("*.tar") if p.is_file())
        if not shards:
            raise UserError(f"no .tar shards found in {path}; the webdataset format needs .tar files")
        return shards
    return [path]


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset's key/extension: ``dir/000042.seg.png`` -> (``dir/000042``, ``seg.png``)."""
    head, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(head, stem) if stem else ""), ext.lower()


def _caption_of(members: dict[str, bytes]) -> str | None:
    for ext in ("txt", "caption"):
        if ext in members:
            return members[ext].decode("utf-8-sig", "replace").strip()
    if "json" in members:
        try:
            record = json.loads(members["json"].decode("utf-8-sig", "replace"))
        except (json.JSONDecodeError, RecursionError):
            return None
        if isinstance(record, dict):
            for key in ("caption", "text"):
                if isinstance(record.get(key), str):
                    return record[key].strip()
    return None


def _index_shard(shard: str, bad: _BadImages) -> tuple[list[CaptionItem], list[_Ref], int, int]:
    """(items, refs, samples seen, samples skipped for lacking an image or a caption) of one shard."""
    samples: dict[str, dict[str, object]] = {}  # key -> {"image": TarInfo, ext: caption bytes}
    try:
        with open(shard, "rb") as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
            for member in tar:
                if not member.isreg() or member.issparse():
                    continue
                key, ext = _split_member(member.name)
                if not key or not ext:
                    continue
                sample = samples.setdefault(key, {})
                if "." + ext in IMAGE_SUFFIXES:
                    sample.setdefault("image", member)
                elif ext in ("txt", "caption", "json"):
                    extracted = tar.extractfile(member)
                    sample[ext] = extracted.read() if extracted is not None else b""
            items, refs, skipped = [], [], 0
            for sample in samples.values():
                member = sample.pop("image", None)
                caption = _caption_of(sample)  # type: ignore[arg-type]
                if not isinstance(member, tarfile.TarInfo) or caption is None:
                    skipped += 1
                    continue
                source = f"{shard}:{member.name}"
                fh.seek(member.offset_data)
                data = fh.read(member.size)
                digest = bad.ok(data, source)
                if digest is not None:
                    items.append(CaptionItem(source, caption))
                    key = f"{os.path.basename(shard)}:{member.name}"
                    refs.append(_Ref(shard, key, member.offset_data, member.size, digest))
    except FileNotFoundError:
        raise UserError(f"caption data {shard} does not exist; check --data-path") from None
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"{shard} is not a readable uncompressed tar file ({_reason(exc)}); check the shard") from None
    except OSError as exc:
        raise UserError(f"cannot read shard {shard} ({exc.strerror or exc})") from None
    return items, refs, len(samples), skipped


def _load_webdataset(path: str, on_bad_image: str) -> CaptionData:
    bad = _BadImages(on_bad_image)
    items: list[CaptionItem] = []
    refs: list[_Ref] = []
    total = skipped = 0
    shards = _shards(path)
    for shard in shards:
        shard_items, shard_refs, seen, missing = _index_shard(shard, bad)
        items += shard_items
        refs += shard_refs
        total += seen
        skipped += missing
    if skipped:
        warnings.warn(
            f"skipped {skipped} of {total} samples in {len(shards)} shard(s) at {path} that lack an image or a "
            "caption (.txt, .caption, or .json with a caption or text field)",
            UserWarning,
            stacklevel=2,
        )
    bad.warn(total - skipped, path)
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if any(c in path for c in _GLOB_CHARS) else p.stem)
    return _finish(name, items, refs, path, "no sample with both an image and a caption")


# ---------------------------------------------------------------------------------------------------------------


def detect_format(path: str) -> str:
    """Which layout ``path`` holds: ``"folder"``, ``"jsonl"`` or ``"webdataset"``."""
    p = Path(path)
    if not p.exists():
        if any(c in path for c in _GLOB_CHARS):
            return "webdataset"
        raise UserError(f"caption data {path} does not exist; check --data-path")
    if p.is_file():
        if p.suffix.lower() == ".jsonl":
            return "jsonl"
        if p.suffix.lower() == ".tar":
            return "webdataset"
        raise UserError(
            f"caption data {path} is a file but neither .jsonl nor .tar; pass a folder of images with .txt captions, "
            "a .jsonl file, or WebDataset .tar shards"
        )
    if (p / "metadata.jsonl").is_file():
        return "jsonl"
    if any(c.suffix.lower() == ".tar" and c.is_file() for c in p.iterdir()):
        return "webdataset"
    return "folder"


def load_captions(path: str, format: CaptionFormat = "auto", on_bad_image: str = "skip") -> CaptionData:
    """Index image-caption pairs at ``path`` (see the module docstring for the layouts).

    Unreadable images are found now, not during training: skipped with one warning that counts them
    (``on_bad_image="skip"``) or refused (``"error"``). No pairs at all is always an error.
    """
    if format not in CAPTION_FORMATS:
        raise UserError(f"unknown caption format {format!r}; use one of {', '.join(CAPTION_FORMATS)}")
    if on_bad_image not in ("skip", "error"):
        raise UserError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
    path = str(path)
    if not os.path.exists(path) and not (format in ("auto", "webdataset") and any(c in path for c in _GLOB_CHARS)):
        raise UserError(f"caption data {path} does not exist; check --data-path")
    if format == "auto":
        format = detect_format(path)  # type: ignore[assignment]
    if format == "folder":
        return _load_folder(Path(path), on_bad_image)
    if format == "jsonl":
        return _load_jsonl(Path(path), on_bad_image)
    return _load_webdataset(path, on_bad_image)
