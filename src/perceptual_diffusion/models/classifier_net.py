"""The small CNN classifier of the built-in data and its shipped weights, loadable by asset name.

Two roles, two networks. Evaluation (``evaluation/features.py``) reads a classifier's 128-d penultimate features for
FID/KID/PR in domain and its logits for IS; the external-perceptual loss (``core/losses.py``) reads a middle layer of a
*separately trained* one, so that the network a model is trained against never computes its headline metric. The
training code is ``evaluation/classifier.py``; this module holds what both layers need: the network, its file format
and the registry of shipped assets.

Shipped files sit in ``perceptual_diffusion/assets`` (``classifiers.md`` there has each file's command and
accuracies). An asset keeps its name and bytes once results cite it: a better classifier is a new version beside it
(``fashion-mnist-v1`` -> ``fashion-mnist-v2``), and the plain data name points at the current one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from perceptual_diffusion.errors import UserError

FEATURE_DIM = 128  # width of the penultimate layer: the "domain features"
TAPS = ("block1", "block2", "block3", "features")  # config.PerceptualLayer: what perceptual_features returns


@dataclass(frozen=True)
class ClassifierConfig:
    """What a classifier file was trained on and its shape; stored in its metadata so the file alone rebuilds it."""

    data: str
    image_size: int
    channels: int
    num_classes: int
    width: int = 32
    # sha256 prefix of the training data's uint8 pixels and labels (dataset_hash); "" in files made before it existed
    data_hash: str = ""
    # Convolution levels: one at full resolution, then one per halving (the v1 files have 3).
    levels: int = 3
    # The last map is average-pooled to a pool x pool grid before the embedding: 1 (the v1 files) is a global mean;
    # the map's own side (7 at 28 px with 3 levels) keeps all of it, where it was.
    pool: int = 1

    def __post_init__(self) -> None:
        if not (self.width >= 8 and self.width % 8 == 0):
            raise UserError(f"classifier width must be a positive multiple of 8 (GroupNorm groups), got {self.width}")
        if not 3 <= self.levels <= 5:
            raise UserError(f"classifier levels must be 3, 4 or 5, got {self.levels}")
        if not 1 <= self.pool <= 8:
            raise UserError(f"classifier pool grid must be 1 to 8, got {self.pool}")
        if self.num_classes < 2 or self.channels not in (1, 3) or self.image_size < 1:
            raise UserError(f"a classifier needs 2+ classes, 1 or 3 channels and a positive size, got {self}")


def _level_widths(config: ClassifierConfig) -> list[int]:
    """Channels per level: w, 2w, 4w, then 4w again for any level beyond the third."""
    w = config.width
    return [w, 2 * w] + [4 * w] * (config.levels - 2)


class DomainClassifier(nn.Module):
    """conv(w) -> conv(2w, /2) -> conv(4w, /2) [-> conv(4w, /2)] -> mean over a pool x pool grid -> 128-d features
    -> logits; 0.11 M parameters at pool 1 (v1), 0.91 M at pool 7 (v2 at 28 px, nearly all in the embedding)."""

    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        c_in = config.channels
        for level, c_out in enumerate(_level_widths(config)):
            # Sequential indices stay those of the v1 files (body.0, body.3, body.6, ...), so they load unchanged.
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if level == 0 else 2, padding=1), nn.GroupNorm(8, c_out)]
            layers.append(nn.SiLU())
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in * config.pool**2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, config.num_classes)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Penultimate-layer features (N, 128) and class logits (N, K) for images in [-1, 1]."""
        h = self.body(x)
        h = h.mean(dim=(2, 3)) if self.config.pool == 1 else F.adaptive_avg_pool2d(h, self.config.pool).flatten(1)
        features = F.silu(self.embed(h))
        return features, self.head(features)

    def perceptual_features(self, x: Tensor, layer: str) -> Tensor:
        """The activation ``layer`` names (``blockK``: after the K-th conv level's SiLU; ``features``: the
        penultimate layer) for images in [-1, 1]; only the layers up to it are run."""
        if layer == "features":
            return self.features_and_logits(x)[0]
        if layer not in TAPS or int(layer.removeprefix("block")) > self.config.levels:
            raise UserError(f"the classifier has no layer {layer!r}; choose one of {', '.join(TAPS)}")
        return self.body[: 3 * int(layer.removeprefix("block"))](x)

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


# ---------------------------------------------------------------------------------------------------------------
# Shipped weights, by name.


@dataclass(frozen=True)
class Asset:
    """A shipped classifier file: what it was trained on and in which role."""

    file: str
    data: str
    image_size: int
    version: str
    role: str  # "metric": evaluation features; "perceptual": the external-perceptual loss's frozen network


ASSETS: dict[str, Asset] = {
    "shapes-v1": Asset("classifier-shapes16.safetensors", "shapes", 16, "v1", "metric"),
    "fashion-mnist-v1": Asset("classifier-fashion-mnist28.safetensors", "fashion-mnist", 28, "v1", "metric"),
    "fashion-mnist-v2": Asset("classifier-fashion-mnist28-v2.safetensors", "fashion-mnist", 28, "v2", "metric"),
    "shapes-perceptual": Asset("classifier-shapes16-perceptual.safetensors", "shapes", 16, "v2", "perceptual"),
    "fashion-mnist-perceptual": Asset(
        "classifier-fashion-mnist28-perceptual.safetensors", "fashion-mnist", 28, "v2", "perceptual"
    ),
}
# The plain data name is the current metric classifier; committed results name the version they used.
ALIASES: dict[str, str] = {"shapes": "shapes-v1", "fashion-mnist": "fashion-mnist-v2"}


def asset_name(name: str) -> str:
    """The versioned asset a name or alias refers to (``fashion-mnist`` -> ``fashion-mnist-v2``)."""
    name = ALIASES.get(name, name)
    if name not in ASSETS:
        known = ", ".join([*ALIASES, *ASSETS])
        raise UserError(f"no shipped classifier is named {name!r}; choose one of {known}, or give a weights file")
    return name


def asset_path(name: str) -> Path:
    """The file of a shipped classifier (by asset name or alias)."""
    return Path(str(resources.files("perceptual_diffusion") / "assets" / ASSETS[asset_name(name)].file))


def perceptual_asset_for(data: str) -> str:
    """The shipped external-perceptual network of a built-in data source (never its metric classifier)."""
    name = f"{data}-perceptual"
    if name not in ASSETS:
        raise UserError(
            f"no external-perceptual network ships for --data {data}; pass --perceptual-net WEIGHTS "
            "(a classifier file from train-classifier, trained apart from the evaluation's)"
        )
    return name


def resolve_classifier(name_or_path: str) -> Path:
    """A shipped asset's file for an asset name or alias, else the given path, which must exist."""
    if name_or_path in ASSETS or name_or_path in ALIASES:
        return asset_path(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        known = ", ".join([*ALIASES, *ASSETS])
        raise UserError(f"{name_or_path} is neither a shipped classifier ({known}) nor a classifier weights file")
    return path


def _read(path: str | Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, ValueError, RecursionError, SafetensorError) as exc:
        raise UserError(f"{path} is not a domain-classifier file ({exc}); retrain it with train-classifier") from None
    return meta, tensors


def load_classifier(path: str | Path) -> tuple[DomainClassifier, dict]:
    """A frozen classifier and its recorded training result from a safetensors file of ``train_classifier``."""
    meta, tensors = _read(path)
    try:
        config = ClassifierConfig(**json.loads(meta["config"]))
        model = DomainClassifier(config)
        model.load_state_dict(tensors)
    except (KeyError, ValueError, TypeError, RuntimeError, RecursionError, UserError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__  # one line
        raise UserError(
            f"{path} is not a domain-classifier file ({reason}); retrain it with train-classifier"
        ) from None
    return model.eval().requires_grad_(False), json.loads(meta.get("result", "{}"))


def classifier_data(path: str | Path) -> dict:
    """The data description (``classifier.describe_data``) a classifier file records; {} for files made before."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            return json.loads((fh.metadata() or {}).get("data", "{}"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise UserError(f"{path} is not a domain-classifier file ({exc}); retrain it with train-classifier") from None


def resolve_perceptual_net(name_or_path: str | None, data: str) -> tuple[str, Path]:
    """(the name a run records, the file) of an external-perceptual network: an asset name is kept as the name, a
    weights file becomes its absolute path, and None is the asset shipped for ``data``."""
    if name_or_path is None:
        name_or_path = perceptual_asset_for(data)
    if name_or_path in ASSETS or name_or_path in ALIASES:
        return name_or_path, asset_path(name_or_path)
    path = resolve_classifier(name_or_path).resolve()
    return str(path), path


def load_perceptual_net(path: str | Path, data: str, image_size: int, channels: int) -> DomainClassifier:
    """A frozen classifier for the external-perceptual loss, refused unless it reads this data's images."""
    net, _ = load_classifier(path)
    cfg = net.config
    if (cfg.data, cfg.image_size, cfg.channels) != (data, image_size, channels):
        raise UserError(
            f"the perceptual network {Path(path).name} was trained on {cfg.data} at {cfg.image_size}px with "
            f"{cfg.channels} channel(s), not on this run's {data} at {image_size}px with {channels}; pass a "
            "--perceptual-net trained on this data"
        )
    return net
