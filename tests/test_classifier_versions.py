"""Versioned domain classifiers: the shipped assets by name, v2's early stopping on a validation split carved from
the training images, and extractors whose name, key and description change with the version."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_classifier_folder import make_folder

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import DataConfig
from perceptual_diffusion.data.datasets import Dataset, load_dataset
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation import classifier
from perceptual_diffusion.evaluation.classifier import (
    LOSS_MIN_GAIN,
    LR,
    LR_DROP,
    Plateau,
    folder_split,
    train_classifier,
    validation_split,
)
from perceptual_diffusion.evaluation.features import auto_extractor, domain_extractor
from perceptual_diffusion.models.classifier_net import ALIASES, ASSETS, asset_path, load_classifier

SIZE = 16


def _result(name: str) -> dict:
    with safe_open(str(asset_path(name)), framework="pt") as fh:
        return json.loads(fh.metadata()["result"])


def test_every_asset_ships_and_loads_with_its_recorded_data() -> None:
    for name, asset in ASSETS.items():
        net, result = load_classifier(asset_path(name))
        assert (net.config.data, net.config.image_size) == (asset.data, asset.image_size), name
        assert result["command"].startswith("perceptual-diffusion train-classifier"), name
    assert all(name in ASSETS for name in ALIASES.values())
    assert asset_path("fashion-mnist") == asset_path("fashion-mnist-v2")


def test_the_v2_fashion_mnist_classifier_records_its_recipe_and_reaches_091() -> None:
    result = _result("fashion-mnist-v2")
    assert result["recipe"] == "v2" and result["test_accuracy"] >= 0.91 and result["test_images"] == 10_000
    assert result["validation_images"] == 6000 and result["fit_images"] == 54_000  # carved from the 60,000
    assert result["validation_accuracy"] >= 0.91 and result["epochs"] > result["best_epoch"] > 0
    assert result["command"].startswith("perceptual-diffusion train-classifier --data fashion-mnist")
    assert "--recipe v2" in result["command"] and "--seed 0" in result["command"]
    assert _result("fashion-mnist-v1")["test_accuracy"] == 0.843  # the old file, unchanged


def test_extractors_name_their_version_and_v1_keeps_its_committed_name_and_key() -> None:
    v1 = domain_extractor("fashion-mnist", 28, classifier="fashion-mnist-v1")
    v2 = domain_extractor("fashion-mnist", 28)
    assert v1.name == "domain-fashion-mnist28" and v2.name == "domain-fashion-mnist28-v2"
    assert v1.key == "0dd2be819e2228e5"  # the key the committed results' reference caches were made under
    assert v2.key != v1.key and "fashion-mnist-v2" in v2.description and "fashion-mnist-v1" in v1.description
    assert v1.accuracy == 0.843 and v2.accuracy is not None and v2.accuracy >= 0.91
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    assert not torch.allclose(v1(images)["features"], v2(images)["features"])
    perceptual = domain_extractor("fashion-mnist", 28, classifier="fashion-mnist-perceptual")
    assert "not the metric's classifier" in perceptual.description and perceptual.key != v2.key
    assert domain_extractor("fashion-mnist", 28, classifier="v1").key == v1.key  # a budget names the version
    auto = auto_extractor(DataConfig(source="fashion-mnist", image_size=28), "unused", classifier="v1")
    assert (auto.name, auto.key) == (v1.name, v1.key)
    with pytest.raises(UserError, match="no shipped classifier is named 'fashion-mnist-v9'"):
        domain_extractor("fashion-mnist", 28, classifier="v9")
    with pytest.raises(UserError, match="trained on shapes at 16px, not fashion-mnist at 28px"):
        domain_extractor("fashion-mnist", 28, classifier="shapes-v1")


def test_plateau_drops_the_learning_rate_and_stops_at_the_third_plateau() -> None:
    rule = Plateau()
    # Better, better, then PATIENCE rounds without a gain: the first plateau; a gain resets the count.
    assert [rule.update(a, 1.0) for a in (0.5, 0.6, 0.6, 0.55)] == [True, True, False, False]
    assert rule.plateaus == 1 and rule.lr == pytest.approx(LR * LR_DROP) and not rule.done
    assert rule.update(0.7, 1.0) and rule.since_best == 0
    # At equal accuracy a lower loss is better only by more than LOSS_MIN_GAIN.
    assert rule.update(0.7, 1.0 - 2 * LOSS_MIN_GAIN) and not rule.update(0.7, 0.98 * (1 - LOSS_MIN_GAIN / 2))
    assert not rule.update(0.7, 0.5 * 0.98 + 0.5)  # a worse loss at the same accuracy: the second plateau
    assert rule.plateaus == 2 and not rule.done
    assert not rule.update(0.1, 9.0) and not rule.update(0.7, 0.98)
    assert rule.done and rule.lr == pytest.approx(LR * LR_DROP**3) and rule.best_accuracy == 0.7


def test_the_validation_split_is_a_seeded_stratified_tenth_of_the_training_images() -> None:
    labels = torch.arange(10).repeat_interleave(50)
    ds = Dataset(torch.arange(500).float().view(-1, 1, 1, 1), labels, tuple("abcdefghij"), "x")
    fit, val = validation_split(ds, seed=0)
    assert torch.bincount(val.labels).tolist() == [5] * 10 and len(fit) == 450
    assert not set(fit.images.flatten().tolist()) & set(val.images.flatten().tolist())
    assert torch.equal(validation_split(ds, seed=0)[1].images, val.images)
    assert not torch.equal(validation_split(ds, seed=1)[1].images, val.images)  # the perceptual net's seed
    two = Dataset(torch.zeros(2, 1, 1, 1), torch.tensor([0, 1]), ("a", "b"), "x")
    assert validation_split(two, seed=0) == (two, None)  # nothing to hold out: no early stopping


def test_a_folder_classifier_stops_at_a_plateau_and_keeps_its_best_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(classifier, "ROUND_MIN_IMAGES", 4 * 72)  # 4 steps of the 72 training images per round
    monkeypatch.setattr(classifier, "FOLDER_IMAGES_SEEN", 400 * 72)
    data = DataConfig(source="folder", path=str(make_folder(tmp_path / "data")), image_size=SIZE)
    result = train_classifier(data, tmp_path / "c.safetensors", seed=0)
    assert result["stopped"] == "plateau" and result["steps"] < 400 and result["recipe"] == "v2"
    assert result["validation_images"] == 6 and result["fit_images"] == 66 and result["test_images"] == 18
    best = next(h for h in result["history"] if h[0] == result["best_step"])
    assert result["validation_accuracy"] == best[1] == max(h[1] for h in result["history"])

    net, _ = load_classifier(tmp_path / "c.safetensors")  # the saved weights are the best round's
    _, val = validation_split(folder_split(load_dataset(data), 0)[0], 0)
    loss = torch.nn.functional.cross_entropy(net(val.images), val.labels)
    assert float(loss) == pytest.approx(best[2], abs=2e-6)
    assert net.config.pool == 4
    assert domain_extractor(data, path=tmp_path / "c.safetensors").accuracy == result["test_accuracy"]


def test_the_v1_recipe_is_kept_for_the_first_shipped_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(classifier, "FOLDER_IMAGES_SEEN", 720)
    data = DataConfig(source="folder", path=str(make_folder(tmp_path / "data")), image_size=SIZE)
    result = train_classifier(data, tmp_path / "c.safetensors", recipe="v1")
    assert result["recipe"] == "v1" and "validation_images" not in result and result["steps"] == 10
    assert load_classifier(tmp_path / "c.safetensors")[0].config.pool == 1
    with pytest.raises(UserError, match="--recipe must be one of v1, v2"):
        train_classifier(data, tmp_path / "d.safetensors", recipe="v3")


def test_train_classifier_cli_refuses_a_bad_recipe_and_width(tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "c.safetensors")
    assert main(["train-classifier", "--data", "shapes", "--out", out, "--recipe", "v3"]) == 2
    assert "invalid choice: 'v3'" in capsys.readouterr().err
    assert main(["train-classifier", "--data", "shapes", "--out", out, "--width", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width must be a positive multiple of 8" in err
