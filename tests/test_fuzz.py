"""Property-based tests: random option values and random bytes fed to the image and checkpoint loaders; the only
outcomes allowed are success or the clean error (``UserError``, or through the CLI exit code 2 with one line)."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from _runs import tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from perceptual_diffusion import cli
from perceptual_diffusion.data.datasets import load_folder, load_image
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training

# PD_FUZZ_EXAMPLES raises the example count for a longer hunt (the default keeps the suite fast).
FUZZ = settings(
    max_examples=int(os.environ.get("PD_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("PNG", "P"), _encoded("PNG", "RGBA"), _encoded("JPEG"), _encoded("GIF", "P")]
SEEDS += [_encoded("BMP"), _encoded("TIFF"), _encoded("WEBP")]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A valid file with a few bytes flipped, a cut, or garbage appended: nearer the decoders' edge cases."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(data) - 1))
        data[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[: cut if draw(st.booleans()) else len(data)]) + draw(st.binary(max_size=16))


def _bytes_or_mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=512), mutated(seeds))


@FUZZ
@given(data=_bytes_or_mutated(SEEDS), suffix=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".tif", ".webp"]))
def test_load_image_random_bytes(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"x{suffix}"
        path.write_bytes(data)
        try:
            arr = load_image(path, 8, False)
        except UserError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc)
        else:
            assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8


@FUZZ
@given(files=st.lists(_bytes_or_mutated(SEEDS), min_size=1, max_size=4), on_bad=st.sampled_from(["skip", "error"]))
def test_load_folder_random_files(files: list[bytes], on_bad: str) -> None:
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, data in enumerate(files):
            (Path(d) / f"{i}.png").write_bytes(data)
        try:
            ds = load_folder(d, 8, grayscale=True, on_bad_image=on_bad)
        except UserError:
            return
        skipped = len(files) - len(ds)
        assert ds.images.shape[1:] == (1, 8, 8)
        messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
        assert (skipped > 0) == bool(messages)
        if skipped:
            assert f"skipped {skipped} of {len(files)}" in messages[0]


@pytest.fixture(scope="module")
def real_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    run_dir = tmp_path_factory.mktemp("run")
    training.train(tiny_config(steps=1), run_dir)
    return {
        "weights": (run_dir / ckpt.WEIGHTS_NAME).read_bytes(),
        "state": ckpt.list_states(run_dir)[-1].read_bytes(),
    }


def _check_read_weights(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        path.write_bytes(data)
        try:
            tensors, config, step = loading.read_weights(path)
        except UserError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(step, int) and all(isinstance(t, torch.Tensor) for t in tensors.values())


def _check_load_state(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "state-00000001.pt"
        path.write_bytes(data)
        try:
            state = ckpt.load_state(path)
        except UserError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(state["step"], int) and isinstance(state["model"], dict)


@FUZZ
@given(data=st.data())
def test_read_weights_random_bytes(real_files: dict[str, bytes], data: st.DataObject) -> None:
    _check_read_weights(data.draw(_bytes_or_mutated([real_files["weights"][:4096], real_files["weights"]])))


@FUZZ
@given(data=st.data())
def test_load_state_random_bytes(real_files: dict[str, bytes], data: st.DataObject) -> None:
    _check_load_state(data.draw(_bytes_or_mutated([real_files["state"], real_files["state"][:2048]])))


@FUZZ
@given(header=st.binary(max_size=200), meta=st.dictionaries(st.sampled_from(["format", "config", "step"]), st.text()))
def test_read_weights_crafted_headers(header: bytes, meta: dict[str, str]) -> None:
    """Valid safetensors framing around a random header, or our metadata keys with random values."""
    _check_read_weights(len(header).to_bytes(8, "little") + header)
    with tempfile.TemporaryDirectory() as d:
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, f"{d}/w.safetensors", metadata={"format": ckpt.FORMAT, **meta})
        _check_read_weights(Path(f"{d}/w.safetensors").read_bytes())


# ---------------------------------------------------------------------------------------------------------------
# Options: any values for the training and sampling options give a config or one error line with exit code 2.

NUMBER_TEXT = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "-inf", "1e309", "0x10", "1_000", " 3", "abc", "-", "--"]),
)
OPTIONS = {
    "--steps": NUMBER_TEXT,
    "--batch-size": NUMBER_TEXT,
    "--lr": NUMBER_TEXT,
    "--warmup-images": NUMBER_TEXT,
    "--weight-decay": NUMBER_TEXT,
    "--grad-clip": NUMBER_TEXT,
    "--ema-halflife-images": NUMBER_TEXT,
    "--seed": NUMBER_TEXT,
    "--image-size": NUMBER_TEXT,
    "--cond-dropout": NUMBER_TEXT,
    "--mse-weight": NUMBER_TEXT,
    "--log-every": NUMBER_TEXT,
    "--sample-every": NUMBER_TEXT,
    "--checkpoint-every": NUMBER_TEXT,
    "--keep-checkpoints": NUMBER_TEXT,
    "--sample-steps": NUMBER_TEXT,
    "--eta": NUMBER_TEXT,
    "--cfg-scale": NUMBER_TEXT,
    "--guidance-rescale": NUMBER_TEXT,
    "--preset": st.sampled_from(["tiny", "small", "medium", "base", "large", "huge", ""]),
    "--prediction-type": st.sampled_from(["v", "eps", "x0", "y"]),
    "--loss": st.sampled_from(["mse", "self-perceptual", "l2"]),
    "--spacing": st.sampled_from(["trailing", "leading", "linspace", "log"]),
    "--device": st.sampled_from(["cpu", "auto", "cuda", "cuda:7", "tpu", "cpu:0", "meta", ""]),
    "--data": st.sampled_from(["shapes", "folder"]),
}


@FUZZ
@given(
    options=st.lists(st.sampled_from(sorted(OPTIONS)), unique=True, max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})
    )
)
def test_train_options_give_a_config_or_one_error_line(options: dict[str, str]) -> None:
    argv = ["train", "--run-dir", os.devnull + "-unused"]
    for flag, value in options.items():
        argv.append(f"{flag}={value}")
    built = []

    def fake_train(config, run_dir, override_config=False):
        built.append(config)
        raise UserError("stop before training")  # the config was accepted; do not train

    err = io.StringIO()
    with mock.patch.object(training, "train", fake_train), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    lines = err.getvalue().splitlines()
    assert rc == 2, err.getvalue()
    assert len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    if built:
        config = built[0]
        assert config.train.lr > 0 and config.train.batch_size >= 1 and config.sample.cfg_scale >= 0
        assert config.sample.steps <= config.schedule.num_train_timesteps


@FUZZ
@given(
    tokens=st.lists(st.one_of(st.sampled_from(sorted(OPTIONS) + ["train", "sample", "-n"]), NUMBER_TEXT), max_size=8)
)
def test_arbitrary_argv_never_tracebacks(tokens: list[str]) -> None:
    err, out = io.StringIO(), io.StringIO()
    with (
        mock.patch.object(training, "train", side_effect=UserError("stop")),
        mock.patch.object(training, "load_model", side_effect=UserError("stop")),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
    ):
        try:
            rc = cli.main(tokens)
        except SystemExit as exc:  # only --help / --version style exits, which print usage to stdout
            rc = exc.code
    assert rc in (0, 2), err.getvalue()
    assert "Traceback" not in err.getvalue()
    if rc == 2:
        assert len(err.getvalue().splitlines()) == 1
