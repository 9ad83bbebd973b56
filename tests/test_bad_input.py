"""Bad input gets a one-line ``error:`` message and exit code 2, never a traceback.

One parametrised table, ``CASES``, runs every bad input through ``cli.main`` in-process: data folders (missing,
empty, corrupt files), impossible options, teacher and weights files (missing, not a checkpoint, other
architecture or image size), resuming with another configuration, a missing Fashion-MNIST package. The tests
after it check what must *work*: mixed image modes read with the right pixel values, skipped files counted.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from _runs import CLI_TINY, image_folder, save_png, tiny_config, write_weights
from PIL import Image
from safetensors.torch import save_file

from perceptual_diffusion import cli
from perceptual_diffusion.config import DataConfig, ModelConfig
from perceptual_diffusion.data.datasets import load_folder, load_image
from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run made by the CLI with ``CLI_TINY`` options (2 steps): teacher, model and resume target."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "2"]) == 0
    return run_dir


@dataclass
class Ctx:
    tmp: Path
    trained: Path

    def run(self) -> str:
        return str(self.tmp / "run")

    def file(self, name: str, data: bytes) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def copy_of_trained(self) -> str:
        shutil.copytree(self.trained, self.tmp / "copy")
        return str(self.tmp / "copy")

    def folder(self, *bad: tuple[str, bytes], good: int = 2) -> str:
        root = image_folder(self.tmp / "data", n=good)
        root.mkdir(parents=True, exist_ok=True)
        for name, data in bad:
            (root / name).write_bytes(data)
        return str(root)


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


PNG = _encoded(np.full((10, 10, 3), 90, dtype=np.uint8), "PNG")
BAD_FILES = {
    "zero-byte": ("empty.png", b""),
    "truncated-png": ("truncated.png", PNG[: len(PNG) // 2]),
    "bad-crc-png": ("crc.png", PNG[:40] + bytes([PNG[40] ^ 0xFF]) + PNG[41:]),
    "truncated-jpeg": (
        "cut.jpg",
        _encoded(np.random.default_rng(1).integers(0, 255, (32, 32, 3), np.uint8), "JPEG")[:300],
    ),
    "text-as-png": ("notes.png", b"just some text, not an image\n"),
    "html-as-jpeg": ("page.jpeg", b"<!doctype html><html><body>404</body></html>"),
    "random-bytes-as-gif": ("noise.gif", bytes(range(256)) * 4),
}


def _train(ctx: Ctx, *extra: str) -> list[str]:
    return ["train", "--run-dir", ctx.run(), *CLI_TINY, "--steps", "1", *extra]


def _sample(model: str, *extra: str, ctx: Ctx | None = None) -> list[str]:
    out = str(ctx.tmp / "s.png") if ctx else "unused.png"
    return ["sample", model, "-n", "2", "--steps", "2", "--device", "cpu", "--out", out, *extra]


def _idx(data: bytes, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + data


def _fashion_dir(ctx: Ctx, images: bytes, labels: bytes) -> str:
    root = ctx.tmp / "fmnist"
    root.mkdir()
    (root / "train-images-idx3-ubyte.gz").write_bytes(images)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(labels)
    return str(root)


# (argv builder, fragment the one-line message must contain)
CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    # --- data folders
    "data-folder-missing": (
        lambda c: _train(c, "--data", "folder", "--data-path", str(c.tmp / "nope")),
        "does not exist",
    ),
    "data-folder-empty": (lambda c: _train(c, "--data", "folder", "--data-path", c.folder(good=0)), "no images"),
    "data-folder-only-other-files": (
        lambda c: _train(c, "--data", "folder", "--data-path", c.folder(("a.txt", b"x"), ("b.csv", b"1"), good=0)),
        "no images",
    ),
    "data-path-is-a-file": (lambda c: _train(c, "--data", "folder", "--data-path", c.file("x.png", PNG)), "is a file"),
    "data-folder-without-path": (lambda c: _train(c, "--data", "folder"), "needs --data-path"),
    "data-folder-all-unreadable": (
        lambda c: _train(c, "--data", "folder", "--data-path", c.folder(*BAD_FILES.values(), good=0)),
        f"none of the {len(BAD_FILES)} image files",
    ),
    **{
        f"on-bad-image-error-{kind}": (
            lambda c, f=file: _train(c, "--data", "folder", "--data-path", c.folder(f), "--on-bad-image", "error"),
            f"data/{file[0]}: ",
        )
        for kind, file in BAD_FILES.items()
    },
    # --- impossible options
    "feature-blocks-with-a-unet": (lambda c: _train(c, "--feature-blocks", "2"), "taps transformer blocks"),
    "feature-blocks-deeper-than-the-dit": (
        lambda c: _train(c, "--arch", "dit", "--feature-blocks", "5"),
        "DiT preset 'tiny' has 4 blocks; choose taps in 1..4",
    ),
    "feature-blocks-not-numbers": (
        lambda c: _train(c, "--arch", "dit", "--feature-blocks", "a,b"),
        "expected block numbers",
    ),
    "dit-patch-does-not-divide-the-image": (
        lambda c: _train(c, "--arch", "dit", "--image-size", "9"),
        "its patch size 2 must divide it",
    ),
    "dit-unknown-preset": (lambda c: _train(c, "--arch", "dit", "--preset", "medium"), "unknown dit preset"),
    "dit-with-a-unet-tap": (lambda c: _train(c, "--arch", "dit", "--feature-layer", "down0"), "is a U-Net tap"),
    "lr-negative": (lambda c: _train(c, "--lr", "-0.001"), "--lr must be > 0"),
    "lr-negative-exponent": (lambda c: _train(c, "--lr=-1e-3"), "--lr must be > 0"),
    "lr-zero": (lambda c: _train(c, "--lr", "0"), "--lr must be > 0"),
    "lr-nan": (lambda c: _train(c, "--lr", "nan"), "--lr must be a finite number"),
    "lr-inf": (lambda c: _train(c, "--lr", "inf"), "--lr must be a finite number"),
    "lr-not-a-number": (lambda c: _train(c, "--lr", "fast"), "invalid float value"),
    "batch-size-zero": (lambda c: _train(c, "--batch-size", "0"), "--batch-size must be >= 1"),
    "batch-size-negative": (lambda c: _train(c, "--batch-size", "-3"), "--batch-size must be >= 1"),
    "batch-size-fraction": (lambda c: _train(c, "--batch-size", "2.5"), "invalid int value"),
    "steps-zero": (lambda c: _train(c, "--steps", "0"), "--steps must be >= 1"),
    "seed-negative": (lambda c: _train(c, "--seed", "-1"), "--seed must be >= 0"),
    "keep-checkpoints-zero": (lambda c: _train(c, "--keep-checkpoints", "0"), "--keep-checkpoints must be >= 1"),
    "checkpoint-every-zero": (lambda c: _train(c, "--checkpoint-every", "0"), "--checkpoint-every must be >= 1"),
    "warmup-negative": (lambda c: _train(c, "--warmup-images", "-5"), "--warmup-images must be >= 0"),
    "cond-dropout-one": (lambda c: _train(c, "--cond-dropout", "1"), "condition dropout must be in [0, 1)"),
    "mse-weight-negative": (lambda c: _train(c, "--mse-weight", "-1"), "--mse-weight must be >= 0"),
    "cfg-scale-negative-train": (lambda c: _train(c, "--cfg-scale", "-1"), "CFG scale must be >= 0"),
    "cfg-scale-negative-sample": (lambda c: _sample(str(c.trained), "--cfg-scale", "-0.5", ctx=c), "CFG scale"),
    "guidance-rescale-above-one": (lambda c: _train(c, "--guidance-rescale", "2"), "guidance rescale must be in"),
    "eta-negative": (lambda c: _sample(str(c.trained), "--eta", "-1", ctx=c), "eta must be >= 0"),
    "sample-steps-above-train-steps-train": (
        lambda c: _train(c, "--sample-steps", "1001"),
        "sampling steps (1001) cannot exceed training timesteps (1000)",
    ),
    "sample-steps-above-train-steps-sample": (
        lambda c: _sample(str(c.trained), "--steps", "5000", ctx=c),
        "--steps 5000 exceeds the model's 1000 timesteps",
    ),
    "sample-steps-zero": (lambda c: _sample(str(c.trained), "--steps", "0", ctx=c), "sampling steps must be >= 1"),
    "image-size-unet-cannot-take": (lambda c: _train(c, "--preset", "small", "--image-size", "10"), "multiple of 4"),
    "image-size-odd-tiny": (lambda c: _train(c, "--image-size", "9"), "multiple of 2"),
    "image-size-negative": (lambda c: _train(c, "--image-size", "-8"), "image size must be in"),
    "image-size-huge": (lambda c: _train(c, "--image-size", "1000000"), "image size must be in"),
    "image-size-too-small-for-shapes": (lambda c: _train(c, "--image-size", "4"), "shapes data needs --image-size"),
    "eps-with-zero-snr": (lambda c: _train(c, "--prediction-type", "eps"), "eps-prediction cannot reach zero"),
    "unknown-preset": (lambda c: _train(c, "--preset", "gigantic"), "invalid choice"),
    "unknown-option": (lambda c: _train(c, "--learning-rate", "1"), "unrecognized arguments"),
    "device-unknown": (lambda c: _train(c, "--device", "tpu9"), "unknown --device"),
    "device-cuda-without-gpu": (lambda c: _train(c, "--device", "cuda"), "no CUDA GPU"),
    "run-dir-missing": (lambda c: ["train", *CLI_TINY], "required: --run-dir"),
    "no-subcommand": (lambda c: [], "required: COMMAND"),
    # --- teacher, init and model files
    "self-perceptual-without-teacher": (lambda c: _train(c, "--loss", "self-perceptual"), "needs --teacher"),
    "teacher-missing": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", str(c.tmp / "none")),
        "does not exist",
    ),
    "teacher-not-a-checkpoint": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", c.file("t.safetensors", b"hello")),
        "not a safetensors weights file",
    ),
    "teacher-random-bytes": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", c.file("t.bin", bytes(range(256)) * 8)),
        "not a safetensors weights file",
    ),
    "teacher-dir-without-weights": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", str(c.tmp)),
        "has no model.safetensors",
    ),
    "teacher-other-architecture": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", str(write_weights(c.tmp / "w.st", "small"))),
        "model.preset: 'small' -> 'tiny'",
    ),
    "teacher-other-image-size": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", str(write_weights(c.tmp / "w.st", "tiny", 16))),
        "model.image_size: 16 -> 8",
    ),
    "teacher-training-state-not-weights": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", str(ckpt.list_states(c.trained)[-1])),
        "not a safetensors weights file",
    ),
    "teacher-safetensors-without-config": (
        lambda c: _train(c, "--loss", "self-perceptual", "--teacher", _plain_safetensors(c)),
        "not perceptual-diffusion weights",
    ),
    "init-from-missing": (lambda c: _train(c, "--init-from", str(c.tmp / "none")), "does not exist"),
    "init-from-other-image-size": (
        lambda c: _train(c, "--init-from", str(write_weights(c.tmp / "w.st", "tiny", 16))),
        "model.image_size: 16 -> 8",
    ),
    "init-from-other-architecture": (
        lambda c: _train(c, "--init-from", str(write_weights(c.tmp / "w.st", "small"))),
        "model.preset: 'small' -> 'tiny'",
    ),
    "sample-model-missing": (lambda c: _sample(str(c.tmp / "none"), ctx=c), "does not exist"),
    "sample-model-not-a-checkpoint": (lambda c: _sample(c.file("m.safetensors", b"\x00" * 64), ctx=c), "not a"),
    "sample-model-dir-without-weights": (lambda c: _sample(str(c.tmp), ctx=c), "has no model.safetensors"),
    "sample-model-is-training-state": (
        lambda c: _sample(str(ckpt.list_states(c.trained)[-1]), ctx=c),
        "not a safetensors weights file",
    ),
    "sample-weights-disagree-with-their-config": (
        lambda c: _sample(_mislabelled_weights(c), ctx=c),
        "does not fit this model",
    ),
    "sample-n-zero": (lambda c: _sample(str(c.trained), "-n", "0", ctx=c), "-n must be >= 1"),
    "sample-label-out-of-range": (lambda c: _sample(str(c.trained), "--label", "9", ctx=c), "out of range"),
    "sample-label-garbage": (lambda c: _sample(str(c.trained), "--label", "cats", ctx=c), "--label must be"),
    "sample-nrow-zero": (lambda c: _sample(str(c.trained), "--nrow", "0", ctx=c), "--nrow must be >= 1"),
    "sample-seed-negative": (lambda c: _sample(str(c.trained), "--seed", "-1", ctx=c), "--seed must be in"),
    "sample-out-is-a-folder": (
        lambda c: [*_sample(str(c.trained), ctx=c)[:-2], "--out", str(c.tmp)],
        "is a folder",
    ),
    "sample-uncond-with-cfg": (
        lambda c: _sample(str(c.trained), "--label", "none", "--cfg-scale", "3", ctx=c),
        "cannot use CFG",
    ),
    # --- resuming a run directory with another configuration
    "resume-other-lr": (
        lambda c: ["train", "--run-dir", c.copy_of_trained(), *CLI_TINY, "--steps", "2", "--lr", "0.002"],
        "train.lr: 0.001 -> 0.002",
    ),
    "resume-other-preset-and-seed": (
        lambda c: ["train", "--run-dir", c.copy_of_trained(), *CLI_TINY, "--preset", "small", "--seed", "4"],
        "model.preset: 'tiny' -> 'small'; train.seed: 0 -> 4",
    ),
    "resume-corrupt-config-json": (
        lambda c: ["train", "--run-dir", _with_file(c.copy_of_trained(), "config.json", b"{oops"), *CLI_TINY],
        "config.json is not valid JSON",
    ),
    "resume-config-json-not-an-object": (
        lambda c: ["train", "--run-dir", _with_file(c.copy_of_trained(), "config.json", b"[1, 2]"), *CLI_TINY],
        "does not hold a configuration",
    ),
    "run-dir-is-a-file": (lambda c: ["train", "--run-dir", c.file("f", b"x"), *CLI_TINY, "--steps", "1"], "is a file"),
    "resume-with-changed-data": (lambda c: _changed_data(c), "the training data changed"),
    # --- damaged run directories
    "resume-all-checkpoints-damaged": (
        lambda c: ["train", "--run-dir", _damage_states(c.copy_of_trained(), b"PK\x03\x04cut"), *CLI_TINY],
        "none of the 1 checkpoints",
    ),
    "resume-checkpoint-of-other-content": (
        lambda c: ["train", "--run-dir", _replace_state(c.copy_of_trained(), {"weights": torch.ones(2)}), *CLI_TINY],
        "none of the 1 checkpoints",
    ),
    "resume-checkpoint-with-wrong-tensors": (
        lambda c: ["train", "--run-dir", _replace_state(c.copy_of_trained(), _wrong_state()), *CLI_TINY],
        "does not fit this model",
    ),
    "log-is-a-folder": (
        lambda c: ["train", "--run-dir", _log_folder(c.copy_of_trained()), *CLI_TINY, "--steps", "2"],
        "cannot read the log",
    ),
    "samples-folder-is-a-file": (
        lambda c: ["train", "--run-dir", _samples_file(c.copy_of_trained()), *CLI_TINY, "--steps", "3"],
        "samples is a file, not the folder of the run's sample grids",
    ),
    "checkpoints-folder-is-a-file": (
        lambda c: ["train", "--run-dir", _in_the_way(c.copy_of_trained(), "checkpoints"), *CLI_TINY, "--steps", "3"],
        "checkpoints is a file, not the folder of the run's checkpoints",
    ),
    "resume-config-json-nested-100000-deep": (
        lambda c: [
            "train",
            "--run-dir",
            _with_file(c.copy_of_trained(), "config.json", b'{"a": ' * 100_000 + b"1" + b"}" * 100_000),
            *CLI_TINY,
        ],
        "config.json is not valid JSON",
    ),
    # --- huge counts: bounded before anything is allocated
    "sample-n-huge": (lambda c: _sample(str(c.trained), "-n", "1000000000000", ctx=c), "-n must be in [1, 10000000]"),
    "latent-sample-n-huge": (
        lambda c: ["latent", "sample", str(c.trained), "--prompt", "a", "-n", "1000000000000", "--device", "cpu"],
        "must be in [1, 10000000]",
    ),
    "evaluate-n-huge": (lambda c: _evaluate(c, "-n", "1000000000000"), "-n must be in [1, 10000000]"),
    "evaluate-seed-negative": (lambda c: _evaluate(c, "--seed", "-1"), "--seed must be in"),
    "evaluate-max-features-1": (
        lambda c: _evaluate(c, "--max-features", "1"),
        "--max-features must be an integer >= 4",
    ),
    "evaluate-reference-n-0": (
        lambda c: _evaluate(c, "--reference-n", "0"),
        "reference images (--reference-n) must be >= 10",
    ),
    "evaluate-reference-n-below-the-is-splits": (
        lambda c: _evaluate(c, "--reference-n", "4"),
        "reference images (--reference-n) must be >= 10",
    ),
    # --- output paths: checked before the work, never over the model's own files
    "evaluate-json-is-a-folder": (lambda c: _evaluate(c, "--json", str(c.tmp)), "is a folder"),
    "evaluate-json-under-a-file": (
        lambda c: _evaluate(c, "--json", c.file("plain", b"x") + "/eval.json"),
        "is a file, not a folder",
    ),
    "evaluate-json-over-the-weights": (
        lambda c: _evaluate(c, "--json", c.copy_of_trained() + "/model.safetensors", model=str(c.tmp / "copy")),
        "would replace a file of the model",
    ),
    "sample-out-over-the-weights": (
        lambda c: [*_sample(c.copy_of_trained(), ctx=c), "--out", str(c.tmp / "copy" / "model.safetensors")],
        "would replace a file of the model",
    ),
    "sample-npz-over-a-checkpoint": (
        lambda c: [*_sample(c.copy_of_trained(), ctx=c), "--npz", str(ckpt.list_states(c.tmp / "copy")[-1])],
        "would replace a file of the model",
    ),
    "sample-out-under-a-file": (
        lambda c: [*_sample(str(c.trained), ctx=c), "--out", c.file("plain", b"x") + "/grid.png"],
        "is a file, not a folder",
    ),
    # --- weights with NaN (a foreign or hand-edited file)
    "sample-nan-weights": (lambda c: _sample(_nan_weights(c), ctx=c), "produces non-finite samples"),
    "evaluate-nan-weights": (lambda c: _evaluate(c, model=_nan_weights(c)), "produces non-finite samples"),
    "export-nan-weights": (
        lambda c: ["export", _nan_weights(c), "--out", str(c.tmp / "exported")],
        "produces non-finite samples",
    ),
    "export-force-over-a-folder-that-is-not-an-export": (
        lambda c: ["export", str(c.trained), "--out", c.folder(good=1), "--force"],
        "is not an earlier export",
    ),
    "run-dir-empty-string": (lambda c: ["train", "--run-dir", "", *CLI_TINY], "--run-dir must name a folder"),
    # --- numbers that were clamped, read as "not given" or failed late (issue 21): refused where they are typed
    "image-size-zero-is-not-the-default": (lambda c: _train(c, "--image-size", "0"), "image size must be in"),
    "shapes-image-size-whose-data-cannot-fit": (
        lambda c: _train(c, "--image-size", "1024"),
        "the shapes data needs --image-size <= 64",
    ),
    "batch-size-huge": (lambda c: _train(c, "--batch-size", str(10**12)), "--batch-size must be at most"),
    "lr-huge": (lambda c: _train(c, "--lr", "1e300"), "--lr must be at most 1"),
    "seed-above-64-bits": (lambda c: _train(c, "--seed", str(2**63)), "--seed must be at most 2**63 - 1"),
    "eta-above-one-train": (lambda c: _train(c, "--eta", "2"), "--eta must be at most 1"),
    "eta-huge-sample": (lambda c: _sample(str(c.trained), "--eta", "1e300", ctx=c), "--eta must be at most 1"),
    "apg-threshold-nan-names-the-option-typed": (
        lambda c: _sample(str(c.trained), "--apg-threshold", "nan", ctx=c),
        "--apg-threshold must be a finite number",
    ),
    "guidance-interval-nan-names-the-option-typed": (
        lambda c: _sample(str(c.trained), "--guidance-interval", "nan", "1", ctx=c),
        "--guidance-interval SIGMA_LO must be a finite number",
    ),
    "data-path-with-the-built-in-shapes": (
        lambda c: _train(c, "--data-path", str(c.tmp)),
        "--data-path is for --data folder or fashion-mnist",
    ),
    "data-path-empty-string": (
        lambda c: _train(c, "--data", "folder", "--data-path", ""),
        "--data-path '' names no folder",
    ),
    "evaluate-data-path-of-a-shapes-model": (
        lambda c: _evaluate(c, "--data-path", str(c.tmp)),
        "--data-path is for --data folder or fashion-mnist",
    ),
    "evaluate-json-empty-string": (lambda c: _evaluate(c, "--json", ""), "--json '' names no file"),
    "sample-nrow-beyond-n": (
        lambda c: _sample(str(c.trained), "--nrow", str(10**12), ctx=c),
        "--nrow must be >= 1 and at most -n (2)",
    ),
    "sample-nothing-to-write": (
        lambda c: [*_sample(str(c.trained), ctx=c)[:-2], "--out", ""],
        "nothing to write",
    ),
    "latent-tiny-seed-negative": (
        lambda c: ["latent", "tiny", "--out", str(c.tmp / "t"), "--seed", "-1"],
        "--seed must be >= 0 and at most 2**63 - 1",
    ),
    "latent-tiny-seed-above-64-bits": (
        lambda c: ["latent", "tiny", "--out", str(c.tmp / "t"), "--seed", str(10**20)],
        "--seed must be >= 0 and at most 2**63 - 1",
    ),
    "shapes-captions-image-size-huge": (
        lambda c: ["latent", "shapes-captions", "--out", str(c.tmp / "caps"), "--image-size", "100000"],
        "--image-size must be >= 8 and at most 64",
    ),
    "train-classifier-seed-above-64-bits": (
        lambda c: [
            "train-classifier",
            "--data",
            "shapes",
            "--out",
            str(c.tmp / "c.safetensors"),
            "--seed",
            str(10**20),
        ],
        "--seed must be >= 0 and at most 2**63 - 1",
    ),
    "latent-cache-dir-empty-string": (
        lambda c: ["latent", "cache", "--pretrained", "p", "--data-path", "d", "--cache-dir", ""],
        "--cache-dir '' names no folder",
    ),
    "latent-cache-dir-unused-without-the-cache": (
        lambda c: [
            *["latent", "train", "--run-dir", c.run(), "--pretrained", "p", "--data-path", "d"],
            *["--no-cache-latents", "--cache-dir", str(c.tmp / "cache")],
        ],
        "which --no-cache-latents does not use",
    ),
    # --- arguments that are not UTF-8 (safetensors and tokenizers take nothing else): refused, not half-run
    "run-dir-not-utf8": (
        lambda c: ["train", "--run-dir", os.fsdecode(bytes(c.tmp) + b"/run\xe9"), *CLI_TINY],
        "is not valid UTF-8",
    ),
    "prompt-not-utf8": (
        lambda c: ["latent", "sample", str(c.trained), "--prompt", os.fsdecode(b"caf\xe9"), "--device", "cpu"],
        "--prompt 'caf\\udce9' is not valid UTF-8",
    ),
    # --- output files: never over or into what another command made (another run, an export, a marked folder)
    "sample-out-over-another-runs-weights": (
        lambda c: [*_sample(str(c.trained), ctx=c), "--out", c.copy_of_trained() + "/model.safetensors"],
        "would replace a file of the run",
    ),
    "sample-npz-into-another-runs-checkpoints": (
        lambda c: [*_sample(str(c.trained), ctx=c), "--npz", c.copy_of_trained() + "/checkpoints/s.npz"],
        "would write into the run",
    ),
    "evaluate-json-over-another-runs-config": (
        lambda c: _evaluate(c, "--json", c.copy_of_trained() + "/config.json"),
        "would replace a file of the run",
    ),
    "sample-out-over-a-comparisons-report": (
        lambda c: [*_sample(str(c.trained), ctx=c), "--out", _marked(c, "experiment", "compare", "report.md")],
        "which `perceptual-diffusion compare` made",
    ),
    "sample-out-into-a-captions-folder": (
        lambda c: [*_sample(str(c.trained), ctx=c), "--out", _marked(c, "shapes-captions", "x", None) + "/new.png"],
        "would write into",
    ),
    "train-run-dir-inside-another-runs-checkpoints": (
        lambda c: ["train", "--run-dir", c.copy_of_trained() + "/checkpoints/run", *CLI_TINY],
        "lies inside the run",
    ),
    "export-out-inside-a-diffusers-folder": (
        lambda c: [
            "export",
            str(c.trained),
            "--out",
            c.file("pipe/model_index.json", b"{}")[: -len("model_index.json")] + "x",
        ],
        "lies inside the diffusers export",
    ),
    "shapes-captions-out-inside-a-runs-snapshots": (
        lambda c: ["latent", "shapes-captions", "--out", c.copy_of_trained() + "/snapshots/caps"],
        "lies inside the run",
    ),
    "export-out-not-utf8": (
        lambda c: ["export", str(c.trained), "--out", os.fsdecode(bytes(c.tmp) + b"/exp\xe9")],
        "is not valid UTF-8",
    ),
    "export-under-a-file": (
        lambda c: ["export", str(c.trained), "--out", c.file("plain", b"x") + "/export"],
        "is a file, not a folder",
    ),
    # --- Fashion-MNIST
    "fashion-mnist-package-missing": (
        lambda c: _train(c, "--data", "fashion-mnist", "--data-path", str(c.tmp / "no-such-dir")),
        "apt-get install dataset-fashion-mnist",
    ),
    "fashion-mnist-empty-dir": (
        lambda c: _train(c, "--data", "fashion-mnist", "--data-path", str(c.tmp)),
        "Fashion-MNIST not found",
    ),
    "fashion-mnist-corrupt-gzip": (
        lambda c: _train(c, "--data", "fashion-mnist", "--data-path", _fashion_dir(c, b"garbage", b"junk")),
        "reinstall",
    ),
    "fashion-mnist-truncated": (
        lambda c: _train(
            c,
            "--data",
            "fashion-mnist",
            "--data-path",
            _fashion_dir(c, gzip.compress(_idx(b"\x00" * 100, (10, 28, 28))), gzip.compress(_idx(b"\x00" * 10, (10,)))),
        ),
        "is truncated",
    ),
    "fashion-mnist-no-images": (
        lambda c: _train(
            c,
            "--data",
            "fashion-mnist",
            "--data-path",
            _fashion_dir(c, gzip.compress(_idx(b"", (0, 28, 28))), gzip.compress(_idx(b"", (0,)))),
        ),
        "has no images",
    ),
}


def _marked(c: Ctx, kind: str, command: str, name: str | None) -> str:
    """A folder that ``command`` made (its ownership marker), holding ``name``; returns the file's path (or the
    folder's when ``name`` is None)."""
    from perceptual_diffusion.runtime.ownership import claim_dir

    folder = claim_dir(c.tmp / f"made-by-{kind}", kind, command=command, files=None if name else ["000000.png"])
    if name is None:
        return str(folder)
    (folder / name).write_text("made by the command")
    return str(folder / name)


def _mislabelled_weights(c: Ctx) -> str:
    """Tiny-preset tensors whose metadata claims the small preset."""
    tensors, _, _ = loading.read_weights(c.trained)
    path = c.tmp / "mislabelled.safetensors"
    small = loading.read_weights(write_weights(c.tmp / "small.safetensors", "small"))[1]
    ckpt.save_weights(path, tensors, small, 2)
    return str(path)


def _damage_states(run_dir: str, data: bytes) -> str:
    for path in ckpt.list_states(Path(run_dir)):
        path.write_bytes(data)
    return run_dir


def _replace_state(run_dir: str, state: dict) -> str:
    for path in ckpt.list_states(Path(run_dir)):
        torch.save(state, path)
    return run_dir


def _wrong_state() -> dict:
    """Plain tensors in the right containers, but not this model's: loads under weights_only, must not fit."""
    return {"step": 2, "model": {"conv.weight": torch.ones(3)}, "ema": {}, "optimizer": {}}


def _log_folder(run_dir: str) -> str:
    (Path(run_dir) / "log.jsonl").unlink()
    (Path(run_dir) / "log.jsonl").mkdir()
    return run_dir


def _samples_file(run_dir: str) -> str:
    shutil.rmtree(Path(run_dir) / "samples")
    (Path(run_dir) / "samples").write_text("in the way")
    return run_dir


def _in_the_way(run_dir: str, name: str) -> str:
    """Replace a folder of the run by a file of that name."""
    shutil.rmtree(Path(run_dir) / name)
    (Path(run_dir) / name).write_text("in the way")
    return run_dir


def _evaluate(c: Ctx, *extra: str, model: str | None = None) -> list[str]:
    return ["evaluate", model or str(c.trained), "-n", "12", "--steps", "1", "--device", "cpu", "--no-progress", *extra]


def _nan_weights(c: Ctx) -> str:
    """The trained weights with one tensor set to NaN, its config and step kept: a hand-edited file."""
    tensors, config, step = loading.read_weights(c.trained)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    path = c.tmp / "nan.safetensors"
    ckpt.save_weights(path, tensors, config, step)
    return str(path)


def _plain_safetensors(c: Ctx) -> str:
    save_file({"w": torch.zeros(2)}, str(c.tmp / "plain.safetensors"))
    return str(c.tmp / "plain.safetensors")


def _with_file(run_dir: str, name: str, data: bytes) -> str:
    (Path(run_dir) / name).write_bytes(data)
    return run_dir


def _changed_data(c: Ctx) -> list[str]:
    """A folder run that checkpointed, then an image is replaced: the batches a resume draws would differ."""
    data = c.folder(good=3)
    argv = ["train", "--run-dir", c.run(), *CLI_TINY, "--data", "folder", "--data-path", data, "--unconditional"]
    assert cli.main([*argv, "--steps", "1", "--sample-every", "100"]) == 0
    save_png(Path(data) / "img0.png", np.zeros((10, 10, 3), dtype=np.uint8))
    return [*argv, "--steps", "2", "--sample-every", "100"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case: str, trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-fashion-mnist"))
    build, fragment = CASES[case]
    argv = build(Ctx(tmp_path, trained))
    capsys.readouterr()
    rc = cli.main(argv)
    captured = capsys.readouterr()
    err = captured.err
    assert "Traceback" not in err + captured.out
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("force", [True, False], ids=["force", "no-force"])
@pytest.mark.parametrize(
    ("source", "out"),
    [
        ("run", "run"),  # the run itself
        ("run", "."),  # the folder that holds it
        ("run", "run/checkpoints"),  # inside it
        ("run", "run/export"),
        ("run/model.safetensors", "run"),  # a weights file stands for its whole run
        ("run/model.safetensors", "."),
        ("run/model.safetensors", "run/checkpoints"),
    ],
)
def test_export_never_replaces_holds_or_enters_what_it_reads(
    source: str, out: str, force: bool, trained: Path, tmp_path: Path, capsys
) -> None:
    """Data loss: `export RUN --out RUN --force` once replaced the run with the export. Refused with one line, and the
    run is untouched, byte for byte."""
    shutil.copytree(trained, tmp_path / "run")
    before = _tree(tmp_path / "run")
    argv = ["export", str(tmp_path / source), "--out", str(tmp_path / out), *(["--force"] if force else [])]
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "which this export reads" in err, err
    assert _tree(tmp_path / "run") == before
    assert not list(tmp_path.glob(f".*{ckpt.TMP_SUFFIX}"))


def test_sample_beyond_memory_is_refused_before_sampling(trained: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from perceptual_diffusion.cli import checks as cli_checks

    monkeypatch.setattr(cli_checks, "available_memory", lambda: 1 << 20)
    capsys.readouterr()
    assert cli.main(_sample(str(trained), "-n", "100000", ctx=Ctx(tmp_path, trained))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "-n 100000 needs about" in err and "GiB available" in err


def test_rerunning_a_finished_run_says_so_not_nan_images_per_second(trained: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for steps, expected in (
        ("2", f"{run} was already trained to step 2: nothing left to train"),
        ("1", f"{run} is already at step 2, past the requested --steps 1: nothing was trained"),
    ):
        capsys.readouterr()
        assert cli.main(["train", "--run-dir", str(run), *CLI_TINY, "--steps", steps]) == 0
        out = capsys.readouterr().out
        assert expected in out and "nan" not in out, out
    assert ckpt.weights_step(run / "model.safetensors") == 2 and ckpt.latest_state(run)["step"] == 2


@pytest.mark.parametrize("how", ["a-file", "read-only"])
def test_unusable_cache_dir_costs_a_warning_not_the_statistics(how: str, tmp_path: Path, monkeypatch) -> None:
    """$PD_CACHE_DIR that is a file or read-only: the reference statistics just computed are used, not thrown away."""
    import errno

    from perceptual_diffusion.evaluation import reference
    from perceptual_diffusion.evaluation.features import domain_extractor

    cache = tmp_path / "cache"
    if how == "a-file":
        cache.write_text("not a folder")
    else:  # as root a mode cannot make a folder read-only; a read-only filesystem answers every write with EROFS
        cache.mkdir()

        def read_only(path: Path, write) -> None:
            raise OSError(errno.EROFS, "Read-only file system", str(path))

        monkeypatch.setattr(reference, "atomic_write", read_only)
    monkeypatch.setenv("PD_CACHE_DIR", str(cache))
    monkeypatch.setattr(reference, "_REFERENCES", {})
    data = DataConfig(source="shapes", image_size=16)
    with pytest.warns(UserWarning, match="evaluating without the cache") as caught:
        ref = reference.reference_stats(data, domain_extractor("shapes", 16), reference_n=64)
    assert ("it is a file" if how == "a-file" else "Read-only file system") in str(caught[0].message)
    assert ref.n == 64 and bool(torch.isfinite(ref.mu).all()) and ref.path == "not cached"
    assert cache.is_file() if how == "a-file" else not [p for p in cache.iterdir() if p.suffix != ".lock"]


def test_missing_fashion_mnist_package_default_path(tmp_path: Path, capsys, monkeypatch) -> None:
    """Without --data-path the default location (the Debian package) is named, with the command to install it."""
    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "absent"))
    assert cli.main(["train", "--run-dir", str(tmp_path / "r"), *CLI_TINY, "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "apt-get install dataset-fashion-mnist" in err


def test_resume_with_override_config_is_allowed(trained: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    argv = ["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "3", "--lr", "0.002"]
    assert cli.main(argv) == 2
    assert cli.main([*argv, "--override-config"]) == 0
    assert ckpt.weights_step(run_dir / "model.safetensors") == 3


def test_bad_files_are_skipped_with_a_count(tmp_path: Path, capsys) -> None:
    data = image_folder(tmp_path / "data", n=3)
    for name, content in BAD_FILES.values():
        (data / name).write_bytes(content)
    (data / "readme.txt").write_text("not counted: not an image suffix")
    argv = ["train", "--run-dir", str(tmp_path / "run"), *CLI_TINY, "--steps", "1", "--sample-every", "100"]
    assert cli.main([*argv, "--data", "folder", "--data-path", str(data), "--unconditional"]) == 0
    warnings_ = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings_) == 1, warnings_
    assert f"skipped {len(BAD_FILES)} of {len(BAD_FILES) + 3} image files" in warnings_[0]


# ---------------------------------------------------------------------------------------------------------------
# Mixed image modes: pixel values come out right.


def _png16_rgb(path: Path, rgb: tuple[int, int, int]) -> Path:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write these), one colour."""
    h = w = 8
    row = b"\x00" + struct.pack(">HHH", *rgb) * w
    raw = zlib.compress(row * h)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def _palette(path: Path, transparent: bool = False) -> Path:
    img = Image.fromarray(np.array([[0, 1] * 4] * 8, dtype=np.uint8), mode="P")
    img.putpalette([200, 10, 30, 5, 100, 250] + [0] * 762)
    if transparent:
        img.info["transparency"] = 1
        img.save(path, transparency=1)
    else:
        img.save(path)
    return path


MODES = {
    # name: (writer, grayscale, expected (H, W, C) pixel at [0, 0] and [0, 1])
    "grey-8bit": (lambda p: save_png(p, np.full((8, 8), 77, np.uint8)), False, [[77, 77, 77], [77, 77, 77]]),
    "grey-16bit-white": (lambda p: save_png(p, np.full((8, 8), 65535, np.uint16)), False, [[255] * 3, [255] * 3]),
    "grey-16bit-mid": (lambda p: save_png(p, np.full((8, 8), 32896, np.uint16)), True, [[128], [128]]),
    "grey-16bit-black": (lambda p: save_png(p, np.zeros((8, 8), np.uint16)), True, [[0], [0]]),
    "rgb-16bit": (lambda p: _png16_rgb(p, (65535, 32896, 0)), False, [[255, 128, 0], [255, 128, 0]]),
    "palette": (_palette, False, [[200, 10, 30], [5, 100, 250]]),
    "palette-transparent-index-over-white": (lambda p: _palette(p, True), False, [[200, 10, 30], [255, 255, 255]]),
    "rgba-opaque-and-clear": (
        lambda p: save_png(p, np.tile(np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], np.uint8), (8, 4, 1))),
        False,
        [[10, 20, 30], [255, 255, 255]],
    ),
    "rgba-half-alpha": (
        lambda p: save_png(p, np.full((8, 8, 4), [0, 0, 0, 128], np.uint8)),
        False,
        [[127, 127, 127], [127, 127, 127]],
    ),
    "grey-alpha": (
        lambda p: save_png(p, np.tile(np.array([[[50, 255], [50, 0]]], np.uint8), (8, 4, 1))),
        True,
        [[50], [255]],
    ),
    "bilevel": (
        lambda p: Image.fromarray(np.tile(np.array([[True, False]]), (8, 4))).save(p),
        False,
        [[255, 255, 255], [0, 0, 0]],
    ),
    "float-tiff-unit-range": (
        lambda p: Image.fromarray(np.full((8, 8), 1.0, np.float32), mode="F").save(p.with_suffix(".tif")),
        True,
        [[255], [255]],
    ),
    "rgb-as-grey": (lambda p: save_png(p, np.full((8, 8, 3), [255, 0, 0], np.uint8)), True, [[76], [76]]),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_image_modes_read_with_right_values(mode: str, tmp_path: Path) -> None:
    write, grayscale, expected = MODES[mode]
    path = tmp_path / "img.png"
    write(path)
    if not path.exists():
        path = path.with_suffix(".tif")
    arr = load_image(path, 8, grayscale)
    assert arr.dtype == np.uint8 and arr.shape == (8, 8, 1 if grayscale else 3)
    np.testing.assert_allclose(arr[0, :2].astype(int), np.array(expected), atol=1)


def test_folder_of_mixed_modes_loads_together(tmp_path: Path) -> None:
    for i, (write, _, _) in enumerate(MODES.values()):
        p = tmp_path / "data" / f"{i:02d}.png"
        p.parent.mkdir(exist_ok=True)
        write(p)
    for grayscale, channels in ((False, 3), (True, 1)):
        ds = load_folder(str(tmp_path / "data"), 8, grayscale)
        assert len(ds) == len(MODES) and ds.channels == channels
        assert ds.images.min() >= -1 and ds.images.max() <= 1


def test_training_on_mixed_modes_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    for i, (write, _, _) in enumerate(list(MODES.values())[:6]):
        write(tmp_path / "data" / f"{i}.png")
    config = replace(
        tiny_config(steps=1),
        data=DataConfig(source="folder", path=str(tmp_path / "data"), image_size=8),
        model=ModelConfig(preset="tiny", image_size=8, channels=3, num_classes=0),
    )
    assert training.train(config, tmp_path / "run").step == 1


# ---------------------------------------------------------------------------------------------------------------
# Numbers of the experiment commands: refused in one line before any work (no clamp, no failure after stage 1).


def _self_perceptual_weights(c: Ctx) -> str:
    """Weights whose config records the self-perceptual loss: not the MSE teacher --teacher-from asks for."""
    tensors, config, step = loading.read_weights(c.trained)
    loss = replace(config.loss, kind="self-perceptual", teacher=str(c.trained))
    path = c.tmp / "sp.safetensors"
    ckpt.save_weights(path, tensors, replace(config, loss=loss), step)
    return str(path)


EXPERIMENT_CASES: dict[str, tuple[Callable[[Ctx], list[str]], str]] = {
    "demo-steps-negative": (lambda c: ["demo", "--out", str(c.tmp / "d"), "--steps", "-5"], "--steps must be >= 1"),
    "demo-steps-zero": (lambda c: ["demo", "--out", str(c.tmp / "d"), "--steps", "0"], "--steps must be >= 1"),
    "demo-steps-not-whole-chunks": (lambda c: ["demo", "--steps", "801"], "must be a multiple of 2"),
    "demo-finetune-steps-zero": (
        lambda c: ["demo", "--out", str(c.tmp / "d"), "--finetune-steps", "0"],
        "--finetune-steps must be >= 1",
    ),
    "demo-finetune-steps-negative": (lambda c: ["demo", "--finetune-steps", "-1"], "--finetune-steps must be >= 1"),
    "compare-steps-zero": (lambda c: ["compare", "--out", str(c.tmp), "--steps", "0"], "--steps must be >= 1"),
    "compare-training-seeds-zero": (
        lambda c: ["compare", "--out", str(c.tmp), "--training-seeds", "0"],
        "--training-seeds must be >= 1",
    ),
    "compare-bootstrap-negative": (
        lambda c: ["compare", "--out", str(c.tmp), "--bootstrap", "-1"],
        "--bootstrap must be >= 1",
    ),
    "compare-seeds-empty": (lambda c: ["compare", "--out", str(c.tmp), "--seeds", ""], "--seeds must be"),
    "compare-seeds-only-commas": (lambda c: ["compare", "--out", str(c.tmp), "--seeds", ","], "--seeds must be"),
    "compare-seeds-repeated": (lambda c: ["compare", "--out", str(c.tmp), "--seeds", "0,0"], "distinct"),
    "compare-seeds-negative": (lambda c: ["compare", "--out", str(c.tmp), "--seeds", "-1"], ">= 0"),
    "ablate-seeds-empty": (lambda c: ["ablate", "--out", str(c.tmp), "--seeds", ""], "--seeds must be"),
    "compare-lora-rank-zero": (
        lambda c: ["compare", "--out", str(c.tmp), "--lora-rank", "0"],
        "--lora-rank must be >= 1",
    ),
    "compare-lora-alpha-without-rank": (
        lambda c: ["compare", "--out", str(c.tmp), "--lora-alpha", "2"],
        "give --lora-rank R too",
    ),
    "compare-lora-lrs-without-rank": (
        lambda c: ["compare", "--out", str(c.tmp), "--lora-lrs", "1e-3"],
        "--lora-lrs sets the learning rates of the LoRA arm: give --lora-rank R too",
    ),
    "compare-lora-lrs-not-numbers": (
        lambda c: ["compare", "--out", str(c.tmp), "--lora-rank", "4", "--lora-lrs", "1e-3,x"],
        "--lora-lrs must be comma-separated numbers",
    ),
    "compare-lora-lrs-zero": (
        lambda c: ["compare", "--out", str(c.tmp), "--lora-rank", "4", "--lora-lrs", "0"],
        "at least one LoRA learning rate, all > 0",
    ),
    "compare-teacher-from-self-perceptual": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--teacher-from", _self_perceptual_weights(c)],
        "was trained with the self-perceptual loss, not mse",
    ),
    "compare-teacher-from-empty": (lambda c: ["compare", "--out", str(c.tmp), "--teacher-from", ""], "names no model"),
    "compare-teacher-from-missing": (
        lambda c: ["compare", "--out", str(c.tmp), "--teacher-from", str(c.tmp / "none")],
        "does not exist",
    ),
    "compare-image-size-zero-without-data": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--image-size", "0"],
        "image size must be in",
    ),
    "compare-data-path-on-the-shapes-budget": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--data-path", str(c.tmp)],
        "--data-path is for --data folder or fashion-mnist",
    ),
    "compare-image-size-the-preset-cannot-take": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--image-size", "9"],
        "does not fit preset 'small'",
    ),
    "compare-batch-size-no-run-takes": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--batch-size", str(10**12)],
        "--batch-size must be at most",
    ),
    "compare-steps-not-whole-chunks": (
        lambda c: ["compare", "--out", str(c.tmp / "c"), "--steps", "801"],
        "--steps 801 must be at most the budget's chunk of 400 steps or a multiple of it",
    ),
    "ablate-variants-empty": (lambda c: ["ablate", "--out", str(c.tmp), "--variants", ""], "unknown --variants ['']"),
}


@pytest.fixture
def no_experiment_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The experiments' entry points fail the test if reached: every case must be refused before any work."""
    from perceptual_diffusion.experiments import ablation, compare

    def started(*args, **kwargs) -> None:  # noqa: ARG001
        raise AssertionError("the work started")

    monkeypatch.setattr(compare, "run_compare", started)
    monkeypatch.setattr(ablation, "run_ablation", started)


@pytest.mark.parametrize("case", list(EXPERIMENT_CASES))
def test_experiment_numbers_are_refused_before_any_work(
    case: str, trained: Path, tmp_path: Path, capsys, no_experiment_work
) -> None:
    build, fragment = EXPERIMENT_CASES[case]
    argv = build(Ctx(tmp_path, trained))
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err


def test_reference_n_beyond_the_data_is_refused_before_sampling_not_clamped(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`evaluate --reference-n 10**12` once used the 1,600 shapes silently: a number that cannot be is refused."""
    from perceptual_diffusion.evaluation import evaluate

    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    run, options = tmp_path / "run16", list(CLI_TINY)
    options[options.index("--image-size") + 1] = "16"  # the shipped domain classifier's size
    assert cli.main(["train", "--run-dir", str(run), *options, "--steps", "1"]) == 0
    sampled, real = [], evaluate.sample_batches
    monkeypatch.setattr(evaluate, "sample_batches", lambda *a, **k: sampled.append(1) or real(*a, **k))
    argv = ["evaluate", str(run), "-n", "12", "--steps", "1", "--device", "cpu", "--no-progress"]
    capsys.readouterr()
    assert cli.main([*argv, "--reference-n", str(10**12), "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reference-n 1000000000000 is more than the 1600 train images" in err, err
    assert not sampled and not (tmp_path / "e.json").exists()
    assert cli.main([*argv, "--reference-n", "1600", "--json", str(tmp_path / "e.json")]) == 0 and sampled


def test_a_data_folder_in_another_encoding_still_trains(tmp_path: Path) -> None:
    """Only paths that safetensors, diffusers or a tokenizer must read are refused when not UTF-8: a data folder (and
    its image names) in Latin-1 is read byte for byte, as before."""
    data = Path(os.fsdecode(bytes(tmp_path) + b"/donn\xe9es"))
    for i in range(2):
        save_png(data / os.fsdecode(b"im\xe9%d.png" % i), np.full((10, 10, 3), 80 * i, np.uint8))
    argv = ["train", "--run-dir", str(tmp_path / "run"), *CLI_TINY, "--steps", "1", "--sample-every", "100"]
    assert cli.main([*argv, "--data", "folder", "--data-path", str(data), "--unconditional"]) == 0


def test_data_options_without_data_change_the_budgets_data(tmp_path: Path, monkeypatch) -> None:
    """`compare --image-size 8` (no --data) once ran the budget's 16 px shapes: the option was silently unused."""
    from perceptual_diffusion.experiments import compare

    seen = []
    monkeypatch.setattr(compare, "run_compare", lambda out, budget, **kwargs: seen.append(budget))
    argv = ["compare", "--out", str(tmp_path / "c"), "--image-size", "8", "--grayscale", "--on-bad-image", "error"]
    assert cli.main(argv) == 0
    assert seen[0].data == DataConfig(source="shapes", image_size=8, grayscale=True, on_bad_image="error")


def test_values_where_0_means_something_stay_accepted(trained: Path, tmp_path: Path, no_experiment_work) -> None:
    """--seeds 0 (the first training seed) and an MSE --teacher-from reach the work (the stub)."""
    for extra in (["--seeds", "0"], ["--teacher-from", str(trained)], ["--seeds", "0", "--steps", "1"]):
        with pytest.raises(AssertionError, match="the work started"):
            cli.main(["compare", "--out", str(tmp_path / "c"), *extra])
    with pytest.raises(AssertionError, match="the work started"):
        cli.main(["demo", "--out", str(tmp_path / "d"), "--steps", "1", "--finetune-steps", "1"])
    assert (
        cli.main(
            [*_sample(str(trained), "--seed", "0", "--eta", "0", "--guidance-rescale", "0", ctx=Ctx(tmp_path, trained))]
        )
        == 0
    )
