"""Training data that needs no download: procedural shapes, Fashion-MNIST from Debian's package, a folder of images.

Every source is loaded once into one uint8-derived float tensor in [-1, 1] of shape (N, C, H, W) plus int64 labels:
all three are small enough, and a resident tensor makes batch selection a pure function of (seed, step).
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Dataset:
    """Images in [-1, 1], (N, C, H, W) float32, with labels (N,) int64 in [0, num_classes)."""

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def __len__(self) -> int:
        return self.images.shape[0]


def to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding as image files store it."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def _from_uint8(array: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0).contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Procedural shapes: a finite, enumerable set of valid images, so realism and coverage can be measured exactly.

SHAPE_CLASSES = ("square", "disc", "triangle", "cross")
SHAPE_SIZE = 7  # each shape fits a 7x7 stencil
PALETTE = ((230, 60, 60), (60, 200, 90), (70, 110, 240), (240, 210, 50))
PALETTE_NAMES = ("red", "green", "blue", "yellow")
BACKGROUND = (20, 20, 20)


def _stencils() -> dict[str, np.ndarray]:
    s = SHAPE_SIZE
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    return {
        "square": np.ones((s, s), dtype=bool),
        "disc": (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2 - 0.5,
        "triangle": np.abs(xx - c) <= yy / 2 + 0.01,  # apex at the top row, base at the bottom row
        "cross": (np.abs(yy - c) <= 1) | (np.abs(xx - c) <= 1),
    }


def shapes_valid_set(image_size: int = 16) -> Dataset:
    """Every valid image: each shape class, at every integer position, in every palette colour.

    For 16x16 that is 4 classes x 10 x 10 positions x 4 colours = 1,600 images; the data set *is* its valid set.
    """
    if image_size < SHAPE_SIZE:
        raise UserError(f"the shapes data needs --image-size >= {SHAPE_SIZE}, got {image_size}")
    stencils = _stencils()
    positions = image_size - SHAPE_SIZE + 1
    n = len(SHAPE_CLASSES) * positions * positions * len(PALETTE)
    arrays = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty(n, dtype=np.int64)
    i = 0
    for label, name in enumerate(SHAPE_CLASSES):
        for y in range(positions):
            for x in range(positions):
                for colour in PALETTE:
                    img = np.empty((image_size, image_size, 3), dtype=np.uint8)
                    img[:] = BACKGROUND
                    img[y : y + SHAPE_SIZE, x : x + SHAPE_SIZE][stencils[name]] = colour
                    arrays[i], labels[i] = img, label
                    i += 1
    return Dataset(_from_uint8(arrays), torch.from_numpy(labels), SHAPE_CLASSES, f"shapes{image_size}")


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from the IDX files of Debian's dataset-fashion-mnist package.


def _read_idx(path: Path) -> np.ndarray:
    """Read a (gzipped) IDX file: magic 0x0000 08 ndim, big-endian int32 dims, then uint8 data."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise UserError(
            f"cannot read {path} ({exc}); reinstall with: apt-get install --reinstall dataset-fashion-mnist"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or len(raw) < 4 + 4 * raw[3]:
        raise UserError(
            f"{path} is not a uint8 IDX file; reinstall with: apt-get install --reinstall dataset-fashion-mnist"
        )
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != math.prod(dims):
        raise UserError(f"{path} is truncated ({data.size} of {math.prod(dims)} bytes); reinstall the package")
    return data.reshape(dims).copy()  # frombuffer is read-only; torch.from_numpy warns on read-only arrays


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise UserError(
        f"Fashion-MNIST not found in {root} (no {stem}[.gz]); install it with `apt-get install dataset-fashion-mnist` "
        "or point --data-path at a folder with the IDX files"
    )


def load_fashion_mnist(path: str | None = None, split: str = "train", image_size: int = 28) -> Dataset:
    """70,000 grey 28x28 images in 10 classes (60,000 train / 10,000 test), optionally resized."""
    root = Path(path or os.environ.get("FASHION_MNIST_DIR", FASHION_MNIST_DIR))
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape[0] != images.shape[0]:
        raise UserError(f"Fashion-MNIST files in {root} do not match: {images.shape} images, {labels.shape} labels")
    x = _from_uint8(images[..., None])
    if image_size != 28:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True)
    return Dataset(x, torch.from_numpy(labels.astype(np.int64)), FASHION_MNIST_CLASSES, f"fashion-mnist{image_size}")


# ---------------------------------------------------------------------------------------------------------------
# Any folder of images; class labels from sub-folders when there are any.


def to_8bit(img: Image.Image) -> Image.Image:
    """Any mode -> L, RGB or RGBA with 8 bits per channel, scaling deep images by their type's range, not clipping."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grey: 65535 is white in a 16-bit file; 32-bit files holding 8-bit values keep them.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "F":
        # float grey: [0, 1] by convention, [0, 255] if any value is above 1.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels have no colour of their own: composite over white, as a viewer shows them.
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def load_image(path: Path, image_size: int, grayscale: bool) -> np.ndarray:
    """One image file -> uint8 (H, W, C), any mode (grey, 16-bit, palette, RGBA) handled, centre-cropped and resized.

    Raises :class:`UserError` for a file that is not a readable image (corrupt, truncated, empty, another format).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's notes on damaged metadata: the pixels are what matter
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a huge image is refused, not loaded
            with Image.open(path) as img:
                img.load()
                img = to_8bit(img).convert("L" if grayscale else "RGB")
        w, h = img.size
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - image decoders fed arbitrary bytes raise many exception types
        reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
        raise UserError(f"cannot read image {path}: {reason}") from None
    return arr[..., None] if arr.ndim == 2 else arr


def load_folder(path: str, image_size: int, grayscale: bool = False, on_bad_image: str = "skip") -> Dataset:
    """Images under ``path``; if it has sub-folders with images, each sub-folder is a class.

    Unreadable files are skipped with one warning that counts them (``on_bad_image="skip"``) or stop the load
    (``"error"``); a folder with no readable image at all is always an error.
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"data folder {root} does not exist; check --data-path")
    if not root.is_dir():
        raise UserError(f"--data-path {root} is a file, not a folder of images")
    try:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as exc:
        raise UserError(f"cannot list the data folder {root} ({exc.strerror or exc})") from None
    if not files:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}; check --data-path")
    class_dirs = sorted({p.parent.relative_to(root).parts[0] for p in files if p.parent != root})
    if class_dirs and any(p.parent == root for p in files):
        class_dirs = []  # images both at the top and in sub-folders: no consistent labelling, treat as unlabelled
    arrays, labels, bad = [], [], []
    for p in files:
        try:
            arrays.append(load_image(p, image_size, grayscale))
        except UserError as exc:
            if on_bad_image == "error":
                raise UserError(f"{exc}; fix or remove it, or pass --on-bad-image skip") from None
            bad.append(p)
            continue
        labels.append(class_dirs.index(p.relative_to(root).parts[0]) if class_dirs else 0)
    if not arrays:
        raise UserError(
            f"none of the {len(files)} image files under {root} could be read (e.g. {bad[0]}); check --data-path"
        )
    if bad:
        warnings.warn(
            f"skipped {len(bad)} of {len(files)} image files under {root} that could not be read, e.g. {bad[0]} "
            "(pass --on-bad-image error to stop instead)",
            UserWarning,
            stacklevel=2,
        )
    names = tuple(class_dirs) if class_dirs else ("image",)
    return Dataset(_from_uint8(np.stack(arrays)), torch.tensor(labels, dtype=torch.long), names, root.name)


def load_dataset(config: DataConfig, split: str = "train") -> Dataset:
    """The data set a config names. ``split`` matters only for Fashion-MNIST (train / test)."""
    if config.source == "shapes":
        return shapes_valid_set(config.image_size)
    if config.source == "fashion-mnist":
        return load_fashion_mnist(config.path, split, config.image_size)
    return load_folder(config.path, config.image_size, config.grayscale, config.on_bad_image)


def data_shape(config: DataConfig) -> tuple[int, int]:
    """(channels, num_classes) of a data config, loading the data only for folders."""
    if config.source == "shapes":
        return 3, len(SHAPE_CLASSES)
    if config.source == "fashion-mnist":
        return 1, len(FASHION_MNIST_CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # training loads the folder again and warns about skipped files once, there
        ds = load_dataset(config)
    return ds.channels, (ds.num_classes if ds.num_classes > 1 else 0)
