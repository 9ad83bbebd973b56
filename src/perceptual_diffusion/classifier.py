"""A small CNN domain classifier for the built-in data sets: features for FID/KID/PR and logits for IS in domain.

Inception-v3 was trained on 299x299 photographs; on 16x16 shapes or 28x28 grey clothes its features say little
and it costs ~0.2 s per image on a CPU. A classifier trained on the data itself gives features that know what
matters in this domain (shape class, position, colour). Its weights ship in ``assets/``; the command that made them
and their test accuracy sit in the safetensors metadata and in ``assets/classifiers.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .checkpoint import atomic_write
from .config import DataConfig
from .data import Dataset, load_dataset
from .errors import UserError

FEATURE_DIM = 128  # width of the penultimate layer: the "domain features"
SHIPPED = {"shapes": "classifier-shapes16.safetensors", "fashion-mnist": "classifier-fashion-mnist28.safetensors"}


@dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier file was trained on; stored in its metadata so the file alone rebuilds the network."""

    data: str
    image_size: int
    channels: int
    num_classes: int
    width: int = 32


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


def _split(ds: Dataset, data: str, test_set: Dataset | None) -> tuple[Dataset, Dataset]:
    """Train/test split. Shapes: the data *is* the valid set, so hold out every 5th shape position (all colours and
    classes there): the test measures generalisation to unseen positions, not memorisation."""
    if data == "fashion-mnist":
        assert test_set is not None
        return ds, test_set
    side = ds.image_size - 6  # positions per axis (shapes are 7 px wide)
    index = torch.arange(len(ds))
    position = (index // 4) % (side * side)  # shapes_valid_set order: class, y, x, colour
    held_out = position % 5 == 0
    pick = lambda mask: Dataset(ds.images[mask], ds.labels[mask], ds.class_names, ds.name)
    return pick(~held_out), pick(held_out)


def _noisy(x: Tensor, g: torch.Generator, max_sigma: float) -> Tensor:
    """Add Gaussian noise of a random per-image strength: generated samples are never pixel-perfect."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=g) * max_sigma
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy over a labelled set."""
    model.eval()
    correct = sum(
        int((model(images[i : i + batch_size]).argmax(1) == labels[i : i + batch_size]).sum())
        for i in range(0, len(images), batch_size)
    )
    return correct / len(images)


def train_classifier(
    data: str, out: str | Path, epochs: int | None = None, seed: int = 0, batch_size: int = 128
) -> dict[str, float | int | str]:
    """Train the domain classifier for ``shapes`` (16x16) or ``fashion-mnist`` (28x28) and write its safetensors."""
    if data not in SHIPPED:
        raise UserError(f"domain classifiers exist for {', '.join(SHIPPED)}, not {data!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    full = load_dataset(DataConfig(source=data, image_size=16 if data == "shapes" else 28))
    test_full = load_dataset(DataConfig(source=data, image_size=28), split="test") if data == "fashion-mnist" else None
    train_set, test_set = _split(full, data, test_full)
    epochs = epochs or (60 if data == "shapes" else 2)
    config = ClassifierConfig(data, full.image_size, full.channels, full.num_classes)
    model = DomainClassifier(config)
    steps = epochs * max(1, len(train_set) // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(train_set), (batch_size,), generator=g)
        x = _noisy(train_set.images[idx], g, 0.3)
        loss = F.cross_entropy(model(x), train_set.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    g_test = torch.Generator().manual_seed(seed + 1)
    result: dict[str, float | int | str] = {
        "test_accuracy": accuracy(model, test_set.images, test_set.labels),
        "test_accuracy_noise_0.2": accuracy(
            model,
            (test_set.images + 0.2 * torch.randn(test_set.images.shape, generator=g_test)).clamp(-1, 1),
            test_set.labels,
        ),
        "train_accuracy": accuracy(model, train_set.images, train_set.labels),
        "test_images": len(test_set),
        "train_images": len(train_set),
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 1),
        "command": f"perceptual-diffusion train-classifier --data {data} --epochs {epochs} --seed {seed} --out {out}",
    }
    meta = {"config": json.dumps(asdict(config)), "result": json.dumps(result)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return result


def load_classifier(path: str | Path) -> tuple[DomainClassifier, dict]:
    """A classifier and its recorded training result from a safetensors file written by :func:`train_classifier`."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        config = ClassifierConfig(**json.loads(meta["config"]))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise UserError(f"{path} is not a domain-classifier file ({exc}); retrain it with train-classifier") from None
    model = DomainClassifier(config)
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False), json.loads(meta.get("result", "{}"))


def shipped_classifier_path(data: str) -> Path:
    """The classifier file shipped in the package for a built-in data set."""
    if data not in SHIPPED:
        raise UserError(f"no domain classifier ships for --data {data}; use --features inception or fid-helper")
    return Path(str(resources.files("perceptual_diffusion") / "assets" / SHIPPED[data]))
