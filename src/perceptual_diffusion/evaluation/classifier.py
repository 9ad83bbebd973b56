"""Training the small CNN domain classifier: features for FID/KID/PR and logits for IS in domain.

Inception-v3 was trained on 299x299 photographs; on 16x16 shapes or 28x28 grey clothes its features say little
and it costs ~0.2 s per image on a CPU. A classifier trained on the data itself gives features that know what
matters in this domain (shape class, position, colour). The network and its file format are
``models/classifier_net.py`` (the external-perceptual loss loads it too); weights for the built-in data ship in
``assets/``, with the command that made them and their accuracies in the safetensors metadata and in
``assets/classifiers.md``.

Two recipes. ``v1`` (the files first shipped): a fixed number of epochs under a one-cycle schedule, no validation.
``v2``: early stopping on a validation split carved from the training images (a seeded, stratified 10% of each
class; never the test set): the learning rate drops 5x when the validation accuracy has not improved for
``PATIENCE`` rounds, training stops at the third such plateau, and the best round's weights are kept.

Any labelled image folder (classes = sub-folders) gets the v2 recipe, so an experiment on such a folder can be
measured offline without Inception weights; its held-out test set is a seeded, stratified 20% of each class, and the
file's metadata records which data (and a hash of its pixels and labels) it was trained on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.data.datasets import Dataset, load_dataset, to_uint8
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.classifier_net import (
    ALIASES,
    ASSETS,
    FEATURE_DIM,
    ClassifierConfig,
    DomainClassifier,
    asset_path,
    classifier_data,
    load_classifier,
)
from perceptual_diffusion.runtime.checkpoint import atomic_write

__all__ = ["FEATURE_DIM", "ClassifierConfig", "DomainClassifier", "classifier_data", "load_classifier"]

SHIPPED = {data: ASSETS[name].file for data, name in ALIASES.items()}  # the current metric classifier per data
SHIPPED_SIZE = {"shapes": 16, "fashion-mnist": 28}  # the image size each shipped classifier was trained at
RECIPES = ("v1", "v2")
HELD_OUT_FRACTION = 0.2  # of each class of a folder: its test set
VALIDATION_FRACTION = 0.1  # of each class of the training split: v2's early-stopping set
# A folder's longest training, as images seen (early stopping usually ends it sooner): small folders need many
# epochs; this many images take ~2.5 min at 16 px and ~7 min at 32 px on one idle CPU core.
FOLDER_IMAGES_SEEN = 400_000
FOLDER_MIN_EPOCHS = 3  # large folders: at least this many passes, whatever FOLDER_IMAGES_SEEN says
MAX_EPOCHS = {"shapes": 200, "fashion-mnist": 40}  # v2's cap on the built-in data
ROUND_MIN_IMAGES = 8192  # v2 validates once per epoch, or per this many images when an epoch is shorter
PATIENCE = 2  # rounds without a better validation accuracy that make a plateau
# At the same validation accuracy (a small validation set that is all right), a round is better if its validation
# loss is this fraction lower: a loss that still creeps down by less is a plateau too.
LOSS_MIN_GAIN = 0.01
LR_DROP, MAX_PLATEAUS = 0.2, 3  # each plateau multiplies the learning rate by LR_DROP; the last one stops
LR, WEIGHT_DECAY = 2e-3, 1e-4
MAX_NOISE = 0.3  # training noise std, drawn per image from U(0, MAX_NOISE): generated samples are never clean


@dataclass(frozen=True)
class Augment:
    """v2's augmentations for one data source (v1 used the noise alone)."""

    shift: int  # random translation by up to this many pixels (edge pixels repeated)
    flip: bool  # random horizontal flips


# Clothes are left-right symmetric in class; the shapes touch the border and their test set is held-out positions;
# a user's folder may hold left-right asymmetric classes (digits, text), so it is not flipped.
AUGMENT = {"fashion-mnist": Augment(2, True), "shapes": Augment(0, False), "folder": Augment(2, False)}


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


def stratified_split(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded ``fraction`` of every class (rounded, at least 1 of a class with >= 2 images, never its last
    one), so each class is held out in proportion even when the data is small or unbalanced."""
    g = torch.Generator().manual_seed(seed)  # its own generator: the split must not shift the training batches
    held_out = torch.zeros(len(ds), dtype=torch.bool)
    for k in range(ds.num_classes):
        members = (ds.labels == k).nonzero().flatten()
        n = len(members)
        n_out = min(n - 1, max(1, round(fraction * n))) if n >= 2 else 0
        held_out[members[torch.randperm(n, generator=g)[:n_out]]] = True
    if not held_out.any():
        raise UserError(
            f"the data folder {ds.name} has no class with 2 or more images, so no image can be held out to test a "
            "domain classifier; add images"
        )
    return _pick(ds, ~held_out), _pick(ds, held_out)


def folder_split(ds: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """A folder's (train, test): a seeded, stratified 20% of every class is its test set."""
    return stratified_split(ds, HELD_OUT_FRACTION, seed)


def validation_split(train_set: Dataset, seed: int) -> tuple[Dataset, Dataset | None]:
    """(fit, validation) of a training split, with another seed's stream than a folder's test split; (all, None)
    when no class has the 2 training images that holding one out needs (a folder of 2 images per class)."""
    if int(torch.bincount(train_set.labels).max()) < 2:
        return train_set, None
    return stratified_split(train_set, VALIDATION_FRACTION, seed + 1)


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
    """A folder's epoch cap when none is given: about FOLDER_IMAGES_SEEN images seen, at least FOLDER_MIN_EPOCHS."""
    return max(FOLDER_MIN_EPOCHS, math.ceil(FOLDER_IMAGES_SEEN / max(1, train_images)))


def _noisy(x: Tensor, g: torch.Generator, max_sigma: float) -> Tensor:
    """Add Gaussian noise of a random per-image strength: generated samples are never pixel-perfect."""
    sigma = torch.rand(x.shape[0], 1, 1, 1, generator=g) * max_sigma
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _augmented(x: Tensor, g: torch.Generator, augment: Augment) -> Tensor:
    """Random flips and translations (edge pixels repeated), then the training noise."""
    n, c, h, w = x.shape
    if augment.flip:
        x = torch.where((torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1), x.flip(3), x)
    if augment.shift:
        s = augment.shift
        padded = F.pad(x, (s, s, s, s), mode="replicate")
        dy, dx = torch.randint(0, 2 * s + 1, (2, n), generator=g)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
        x = padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]
    return _noisy(x, g, MAX_NOISE)


@torch.no_grad()
def accuracy(model: DomainClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy over a labelled set."""
    return _evaluate(model, images, labels, batch_size)[0]


@torch.no_grad()
def _evaluate(model: DomainClassifier, images: Tensor, labels: Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """(top-1 accuracy, mean cross-entropy) over a labelled set."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, loss = 0, 0.0
    for i in range(0, len(images), batch_size):
        logits = model(images[i : i + batch_size].to(device)).float().cpu()
        target = labels[i : i + batch_size]
        correct += int((logits.argmax(1) == target).sum())
        loss += float(F.cross_entropy(logits, target, reduction="sum"))
    model.train(was_training)
    return correct / len(images), loss / len(images)


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
    recipe: str = "v2",
    width: int = 32,
    dataset: Dataset | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> dict[str, float | int | str]:
    """Train the domain classifier for ``data`` and write its safetensors (metadata: config, result, data).

    ``data`` is ``"shapes"`` (16x16) or ``"fashion-mnist"`` (28x28), or a :class:`DataConfig`: a folder with at least
    2 classes (sub-folders), at its image size and channels, or a built-in source at any size. ``epochs`` is v1's
    length and v2's cap. ``dataset`` is that config's already loaded data, to spare a large folder a second read;
    ``progress`` prints a line per validation round.
    Returns the training result, with the accuracy on the held-out test images (and v2's validation accuracy).
    """
    if recipe not in RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if epochs is not None and epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {epochs}")
    if width < 8 or width % 8:
        raise UserError(f"classifier width must be a positive multiple of 8 (GroupNorm groups), got {width}")
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
        batch_size = min(batch_size, len(train_set))  # small folders: one batch is the whole training set
    else:
        epochs = epochs or (MAX_EPOCHS[source] if recipe == "v2" else 60 if source == "shapes" else 2)
    description = describe_data(config_in, full)
    config = ClassifierConfig(
        data=source,
        image_size=full.image_size,
        channels=full.channels,
        num_classes=full.num_classes,
        width=width,
        data_hash=str(description["hash"]),
        pool=v2_pool(full.image_size) if recipe == "v2" else 1,
    )
    model = DomainClassifier(config).to(device)
    start = time.perf_counter()
    if recipe == "v1":
        steps = _steps(epochs, len(train_set), batch_size, source)
        _fit_v1(model, train_set, steps, batch_size, g, device)
        fitted: dict[str, object] = {"steps": steps, "epochs": epochs}
    else:
        fit_set, val_set = validation_split(train_set, seed)
        cap = _steps(epochs, len(fit_set), batch_size, source)
        fitted = _fit_early_stopping(model, fit_set, val_set, cap, batch_size, g, device, AUGMENT[source], progress)
    if isinstance(data, str):
        flags = "" if recipe == "v1" else f" --recipe {recipe}" + (f" --width {width}" if width != 32 else "")
        command = (
            f"perceptual-diffusion train-classifier --data {data} --epochs {epochs} --seed {seed}{flags} --out {out}"
        )
    else:
        command = (
            "perceptual_diffusion.evaluation.classifier."
            f"train_classifier({data!r}, {str(out)!r}, epochs={epochs}, seed={seed}, recipe={recipe!r})"
        )
    result = _scores(model, train_set, test_set, seed) | fitted
    result |= {"recipe": recipe, "seconds": round(time.perf_counter() - start, 1), "command": command}
    meta = {"config": json.dumps(asdict(config)), "result": json.dumps(result), "data": json.dumps(description)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(Path(out), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return result


def v2_pool(image_size: int) -> int:
    """v2's pooling grid: the whole last map (7x7 at 28 px, the 4x quarter-size map) up to 8x8. A global mean (v1)
    forgets where a feature was, and on Fashion-MNIST the layout (sleeves, collar, sole) is much of the class."""
    return min(8, math.ceil(math.ceil(image_size / 2) / 2))


def _steps(epochs: int, train_images: int, batch_size: int, source: str) -> int:
    """Optimiser steps of ``epochs`` passes (a folder's partial last batch counts: small folders are one batch)."""
    if source == "folder":
        return max(1, math.ceil(epochs * train_images / batch_size))
    return epochs * max(1, train_images // batch_size)


def _fit_v1(
    model: DomainClassifier, train_set: Dataset, steps: int, batch_size: int, g: torch.Generator, device
) -> None:
    """v1: AdamW with a one-cycle schedule on noisy images (noise std up to 0.3: the classifier reads samples)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps)
    model.train()
    for _ in range(steps):
        # Batches and noise come from the CPU generator on any device, so the seed fixes them everywhere.
        idx = torch.randint(len(train_set), (batch_size,), generator=g)
        x = _noisy(train_set.images[idx], g, MAX_NOISE).to(device)
        loss = F.cross_entropy(model(x), train_set.labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


@dataclass
class Plateau:
    """Reduce-on-plateau with early stopping, as a pure rule over validation results: ``update`` says whether a
    round is the best so far; ``PATIENCE`` rounds without one multiply ``lr`` by ``LR_DROP``, and the
    ``MAX_PLATEAUS``-th such plateau ends training (``done``)."""

    lr: float = LR
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    since_best: int = 0
    plateaus: int = 0

    @property
    def done(self) -> bool:
        return self.plateaus >= MAX_PLATEAUS

    def update(self, accuracy: float, loss: float) -> bool:
        """Record one round's validation accuracy and loss; True if it is the best round so far."""
        same = accuracy == self.best_accuracy
        if accuracy > self.best_accuracy or (same and loss < self.best_loss * (1 - LOSS_MIN_GAIN)):
            self.best_accuracy, self.best_loss, self.since_best = accuracy, loss, 0
            return True
        self.since_best += 1
        if self.since_best >= PATIENCE:
            self.plateaus, self.since_best, self.lr = self.plateaus + 1, 0, self.lr * LR_DROP
        return False


def _fit_early_stopping(
    model: DomainClassifier,
    fit_set: Dataset,
    val_set: Dataset | None,
    max_steps: int,
    batch_size: int,
    g: torch.Generator,
    device,
    augment: Augment,
    progress: bool = False,
) -> dict[str, object]:
    """v2: AdamW, linear warm-up over the first round, then :class:`Plateau` on the validation set; keeps the best
    round's weights. Without validation images, trains to ``max_steps``. Returns what it did, for the metadata."""
    round_steps = max(1, math.ceil(max(len(fit_set), ROUND_MIN_IMAGES) / batch_size))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    rule, step, best_step, history = Plateau(), 0, 0, []
    best_state = copy.deepcopy(model.state_dict())
    model.train()
    while step < max_steps and not rule.done:
        for _ in range(min(round_steps, max_steps - step)):
            for group in opt.param_groups:
                group["lr"] = rule.lr * min(1.0, (step + 1) / round_steps)
            # Batches, augmentations and noise come from the CPU generator on any device: the seed fixes them.
            idx = torch.randint(len(fit_set), (batch_size,), generator=g)
            x = _augmented(fit_set.images[idx], g, augment).to(device)
            loss = F.cross_entropy(model(x), fit_set.labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if val_set is None:
            best_state, best_step = model.state_dict(), step
            continue
        acc, val_loss = _evaluate(model, val_set.images, val_set.labels)
        history.append([step, round(acc, 6), round(val_loss, 6), rule.lr])
        if progress:
            epoch = step * batch_size / len(fit_set)
            print(
                f"epoch {epoch:.2f}: validation accuracy {acc:.4f}, loss {val_loss:.4f}, lr {rule.lr:.2g}", flush=True
            )
        if rule.update(acc, val_loss):
            best_state, best_step = copy.deepcopy(model.state_dict()), step
    model.load_state_dict(best_state)
    return {
        "steps": step,
        "epochs": round(step * batch_size / len(fit_set), 2),
        "best_step": best_step,
        "best_epoch": round(best_step * batch_size / len(fit_set), 2),
        "stopped": "plateau" if rule.done else "epoch cap",
        "validation_accuracy": rule.best_accuracy if val_set is not None else None,
        "validation_images": len(val_set) if val_set is not None else 0,
        "fit_images": len(fit_set),
        "history": history,  # [step, validation accuracy, validation loss, learning rate] per round
    }


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


def shipped_classifier_path(data: str) -> Path:
    """The file of a shipped classifier: the current one for a built-in data name, or any asset by its name."""
    if data not in SHIPPED and data not in ASSETS:
        raise UserError(f"no domain classifier ships for --data {data}; use --features inception or fid-helper")
    return asset_path(data)
