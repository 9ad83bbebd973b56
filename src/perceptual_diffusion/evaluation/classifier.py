"""A small CNN domain classifier: features for FID/KID/PR and logits for IS in domain.

Inception-v3 was trained on 299x299 photographs; on 16x16 shapes or 28x28 grey clothes its features say little
and it costs ~0.2 s per image on a CPU. A classifier trained on the data itself gives features that know what
matters in this domain (shape class, position, colour). Weights for the built-in data sets ship in ``assets/``; the
command that made them and their test accuracy sit in the safetensors metadata and in ``assets/classifiers.md``.

Any labelled image folder (classes = sub-folders) gets the same network trained on it, so an experiment on such a
folder can be measured offline without Inception weights; its held-out test set is a seeded, stratified 20% of
each class, and the file's metadata records which data (and a hash of its pixels and labels) it was trained on.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.data.datasets import Dataset, load_dataset, to_uint8
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime.checkpoint import atomic_write

FEATURE_DIM = 128  # width of the penultimate layer: the "domain features"
SHIPPED = {"shapes": "classifier-shapes16.safetensors", "fashion-mnist": "classifier-fashion-mnist28.safetensors"}
SHIPPED_SIZE = {"shapes": 16, "fashion-mnist": 28}  # the image size each shipped classifier was trained at
HELD_OUT_FRACTION = 0.2  # of each class of a folder
# Default training length for a folder, as images seen: small folders need many epochs to converge, and this many
# images take ~15 s at 16 px and ~45 s at 32 px on one idle CPU core (0.04 / 0.14 s per step of 128 images).
FOLDER_IMAGES_SEEN = 40_000
FOLDER_MIN_EPOCHS = 3  # large folders: at least this many passes, whatever FOLDER_IMAGES_SEEN says


@dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier file was trained on; stored in its metadata so the file alone rebuilds the network."""

    data: str
    image_size: int
    channels: int
    num_classes: int
    width: int = 32
    # sha256 prefix of the training data's uint8 pixels and labels (dataset_hash); "" in files made before it existed
    data_hash: str = ""


class DomainClassifier(nn.Module):
    """conv(w) -> conv(2w, /2) -> conv(4w, /2) -> global mean -> 128-d features -> logits; about 0.1 M parameters."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(config.channels, w, 3, padding=1),
            nn.GroupNorm(8, w),
            nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
        )
        self.embed = nn.Linear(4 * w, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, config.num_classes)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate-layer features (N, 128) and class logits (N, K) for images in [-1, 1]."""
        h = self.body(x).mean(dim=(2, 3))
        features = F.silu(self.embed(h))
        return features, self.head(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


def _split(ds: Dataset, data: str, test_set: Dataset | None, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Train/test split. Fashion-MNIST: its official test set. Shapes: the data *is* the valid set, so hold out every
    5th shape position (all colours and classes there): the test measures generalisation to unseen positions, not
    memorisation. A folder: a seeded, stratified 20% of each class (see :func:`folder_split`)."""
    if data == "fashion-mnist":
        assert test_set is not None
        return ds, test_set
    if data == "folder":
        return folder_split(ds, seed)
    side = ds.image_size - 6  # positions per axis (shapes are 7 px wide)
    index = torch.arange(len(ds))
    position = (index // 4) % (side * side)  # shapes_valid_set order: class, y, x, colour
    held_out = position % 5 == 0
    return _pick(ds, ~held_out), _pick(ds, held_out)


def _pick(ds: Dataset, mask: Tensor) -> Dataset:
    return Dataset(ds.images[mask], ds.labels[mask], ds.class_names, ds.name)


def folder_split(ds: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a seeded 20% of every class (rounded, at least 1 of a class with >= 2 images, never its last one),
    so each class is tested in proportion even when the folder is small or unbalanced."""
    g = torch.Generator().manual_seed(seed)  # its own generator: the split must not shift the training batches
    held_out = torch.zeros(len(ds), dtype=torch.bool)
    for k in range(ds.num_classes):
        members = (ds.labels == k).nonzero().flatten()
        n = len(members)
        n_test = min(n - 1, max(1, round(HELD_OUT_FRACTION * n))) if n >= 2 else 0
        held_out[members[torch.randperm(n, generator=g)[:n_test]]] = True
    if not held_out.any():
        raise UserError(
            f"the data folder {ds.name} has no class with 2 or more images, so no image can be held out to test a "
            "domain classifier; add images"
        )
    return _pick(ds, ~held_out), _pick(ds, held_out)


def dataset_hash(ds: Dataset) -> str:
    """sha256 prefix of a data set's uint8 pixels and labels (as evaluate.py hashes data for its reference cache):
    the same images always give the same hash, any changed pixel or label another."""
    h = hashlib.sha256(to_uint8(ds.images).tobytes())
    h.update(ds.labels.numpy().tobytes())
    return h.hexdigest()[:16]


def describe_data(config: DataConfig, ds: Dataset) -> dict[str, object]:
    """What a classifier was trained on, as recorded in its metadata."""
    counts = torch.bincount(ds.labels, minlength=ds.num_classes).tolist()
    return {
        "source": config.source,
        "path": config.path,
        "image_size": config.image_size,
        "grayscale": config.grayscale,
        "name": ds.name,
        "channels": ds.channels,
        "images": len(ds),
        "classes": dict(zip(ds.class_names, counts)),
        "hash": dataset_hash(ds),
    }


def default_folder_epochs(train_images: int) -> int:
    """Epochs for a folder when none are given: about FOLDER_IMAGES_SEEN images seen, at least FOLDER_MIN_EPOCHS."""
    return max(FOLDER_MIN_EPOCHS, math.ceil(FOLDER_IMAGES_SEEN / max(1, train_images)))


def _noisy(x: Tensor, g: torch.Generator, max_sigma: float) -> Tensor:
    """Add Gaussian noise of a random per-image strength: generated samples are never pixel-perfect."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=g) * max_sigma
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy over a labelled set."""
    model.eval()
    device = next(model.parameters()).device
    correct = sum(
        int((model(images[i : i + batch_size].to(device)).argmax(1).cpu() == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def _as_config(data: str | DataConfig) -> DataConfig:
    if isinstance(data, DataConfig):
        return data
    if data not in SHIPPED:
        raise UserError(f"domain classifiers exist for {', '.join(SHIPPED)} or a DataConfig folder, not {data!r}")
    return DataConfig(source=data, image_size=SHIPPED_SIZE[data])


def train_classifier(
    data: str | DataConfig,
    out: str | Path,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    *,
    dataset: Dataset | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float | int | str]:
    """Train the domain classifier for ``data`` and write its safetensors (metadata: config, result, data).

    ``data`` is ``"shapes"`` (16x16) or ``"fashion-mnist"`` (28x28), or a :class:`DataConfig`: a folder with at least
    2 classes (sub-folders), at its image size and channels, or a built-in source at any size. ``dataset`` is that
    config's already loaded data, to spare a large folder a second read. Returns the training result, with the
    accuracy on the held-out test images.
    """
    config_in = _as_config(data)
    source = config_in.source
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    full = dataset if dataset is not None else load_dataset(config_in)
    if source == "folder" and full.num_classes < 2:
        raise UserError(
            f"the data folder {config_in.path} has no class sub-folders (it needs 2 or more), so no domain classifier "
            "can be trained on it"
        )
    test_full = None
    if source == "fashion-mnist":
        test_full = load_dataset(DataConfig(source=source, path=config_in.path, image_size=full.image_size), "test")
    train_set, test_set = _split(full, source, test_full, seed)
    if source == "folder":
        epochs = epochs or default_folder_epochs(len(train_set))
        # Small folders: one batch is the whole training set, and steps count passes over it.
        batch_size = min(batch_size, len(train_set))
        steps = max(1, math.ceil(epochs * len(train_set) / batch_size))
    else:
        epochs = epochs or (60 if source == "shapes" else 2)
        steps = epochs * max(1, len(train_set) // batch_size)
    description = describe_data(config_in, full)
    config = ClassifierConfig(
        source, full.image_size, full.channels, full.num_classes, data_hash=str(description["hash"])
    )
    model = DomainClassifier(config).to(device)
    start = time.perf_counter()
    _fit(model, train_set, steps, batch_size, g, device)
    if isinstance(data, str):
        command = f"perceptual-diffusion train-classifier --data {data} --epochs {epochs} --seed {seed} --out {out}"
    else:
        command = (
            "perceptual_diffusion.evaluation.classifier."
            f"train_classifier({data!r}, {str(out)!r}, epochs={epochs}, seed={seed})"
        )
    result = _scores(model, train_set, test_set, seed) | {
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "command": command,
    }
    meta = {"config": json.dumps(asdict(config)), "result": json.dumps(result), "data": json.dumps(description)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return result


def _fit(model: DomainClassifier, train_set: Dataset, steps: int, batch_size: int, g: torch.Generator, device) -> None:
    """AdamW with a one-cycle schedule on noisy images (noise std 0.3: the classifier must read noisy samples)."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        # Batches and noise come from the CPU generator on any device, so the seed fixes them everywhere.
        idx = torch.randint(len(train_set), (batch_size,), generator=g)
        x = _noisy(train_set.images[idx], g, 0.3).to(device)
        loss = F.cross_entropy(model(x), train_set.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


def _scores(model: DomainClassifier, train_set: Dataset, test_set: Dataset, seed: int) -> dict[str, float | int]:
    g_test = torch.Generator().manual_seed(seed + 1)
    noisy = (test_set.images + 0.2 * torch.randn(test_set.images.shape, generator=g_test)).clamp(-1, 1)
    return {
        "test_accuracy": accuracy(model, test_set.images, test_set.labels),
        "test_accuracy_noise_0.2": accuracy(model, noisy, test_set.labels),
        "train_accuracy": accuracy(model, train_set.images, train_set.labels),
        "test_images": len(test_set),
        "train_images": len(train_set),
    }


def load_classifier(path: str | Path) -> tuple[DomainClassifier, dict]:
    """A classifier and its recorded training result from a safetensors file written by :func:`train_classifier`."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        config = ClassifierConfig(**json.loads(meta["config"]))
    except (OSError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise UserError(f"{path} is not a domain-classifier file ({exc}); retrain it with train-classifier") from None
    model = DomainClassifier(config)
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), json.loads(meta.get("result", "{}"))


def classifier_data(path: str | Path) -> dict:
    """The data description (:func:`describe_data`) a classifier file records; {} for files made before it."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("data", "{}"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is not a domain-classifier file ({exc}); retrain it with train-classifier") from None


def shipped_classifier_path(data: str) -> Path:
    """The classifier file shipped in the package for a built-in data set."""
    if data not in SHIPPED:
        raise UserError(f"no domain classifier ships for --data {data}; use --features inception or fid-helper")
    return Path(str(resources.files("perceptual_diffusion") / "assets" / SHIPPED[data]))
