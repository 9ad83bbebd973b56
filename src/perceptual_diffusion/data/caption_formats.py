"""Reading the three caption layouts into ``captions.CaptionData``: a folder of images with same-stem ``.txt``
captions, a JSONL file of ``{"file_name": ..., "text": ...}`` lines (HuggingFace imagefolder's ``metadata.jsonl``),
and WebDataset ``.tar`` shards; ``load_captions`` picks the reader by what the path is.
"""

from __future__ import annotations

import glob
import json
import os
import posixpath
import tarfile
import warnings
from pathlib import Path

from perceptual_diffusion.config import CaptionFormat
from perceptual_diffusion.data.captions import (
    CAPTION_FORMATS,
    GLOB_CHARS,
    BadImages,
    CaptionData,
    CaptionItem,
    ItemRef,
    finish_index,
    reason,
)
from perceptual_diffusion.data.datasets import IMAGE_SUFFIXES
from perceptual_diffusion.errors import UserError


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
    bad = BadImages(on_bad_image)
    items, refs = [], []
    for p in files:
        txt = p.with_suffix(".txt")
        try:
            caption = txt.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read caption {txt} ({reason(exc)}); save it as UTF-8 text") from None
        digest = bad.ok_file(p)
        if digest is not None:
            items.append(CaptionItem(str(p), caption))
            refs.append(ItemRef(str(p), p.relative_to(root).as_posix(), digest=digest))
    bad.warn(len(files), str(root))
    return finish_index(root.name, items, refs, str(root), "every image was unreadable")


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
        raise UserError(f"cannot read {path} ({reason(exc)}); it should be UTF-8 JSON lines") from None
    bad = BadImages(on_bad_image)
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
            refs.append(ItemRef(str(image), Path(name).as_posix(), digest=digest))
    bad.warn(total, str(path))
    data_name = base.name if path.name == "metadata.jsonl" else path.stem
    return finish_index(data_name, items, refs, str(path), "no non-empty lines, or every image was unreadable")


def _shards(path: str) -> list[str]:
    if any(c in path for c in GLOB_CHARS) and not os.path.exists(path):
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


def _index_shard(shard: str, bad: BadImages) -> tuple[list[CaptionItem], list[ItemRef], int, int]:
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
                    refs.append(ItemRef(shard, key, member.offset_data, member.size, digest))
    except FileNotFoundError:
        raise UserError(f"caption data {shard} does not exist; check --data-path") from None
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"{shard} is not a readable uncompressed tar file ({reason(exc)}); check the shard") from None
    except OSError as exc:
        raise UserError(f"cannot read shard {shard} ({exc.strerror or exc})") from None
    return items, refs, len(samples), skipped


def _load_webdataset(path: str, on_bad_image: str) -> CaptionData:
    bad = BadImages(on_bad_image)
    items: list[CaptionItem] = []
    refs: list[ItemRef] = []
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
    name = p.name if p.is_dir() else (p.parent.name if any(c in path for c in GLOB_CHARS) else p.stem)
    return finish_index(name, items, refs, path, "no sample with both an image and a caption")


def detect_format(path: str) -> str:
    """Which layout ``path`` holds: ``"folder"``, ``"jsonl"`` or ``"webdataset"``."""
    p = Path(path)
    if not p.exists():
        if any(c in path for c in GLOB_CHARS):
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
    if not os.path.exists(path) and not (format in ("auto", "webdataset") and any(c in path for c in GLOB_CHARS)):
        raise UserError(f"caption data {path} does not exist; check --data-path")
    if format == "auto":
        format = detect_format(path)  # type: ignore[assignment]
    if format == "folder":
        return _load_folder(Path(path), on_bad_image)
    if format == "jsonl":
        return _load_jsonl(Path(path), on_bad_image)
    return _load_webdataset(path, on_bad_image)
