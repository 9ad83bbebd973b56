"""Helpers shared by the reliability tests (resume, atomic writes, bad input, safe loading, fuzzing).

Not a conftest: these tests import it explicitly, so nothing here is an implicit fixture.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from perceptual_diffusion.config import (
    DataConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt

# A CLI training run small enough for tests: tiny U-Net on 8x8 shapes, 2 images per step, 2-step sample grids.
CLI_TINY = [
    "--preset",
    "tiny",
    "--image-size",
    "8",
    "--batch-size",
    "2",
    "--sample-steps",
    "2",
    "--warmup-images",
    "8",
    "--ema-halflife-images",
    "16",
    "--log-every",
    "1",
    "--device",
    "cpu",
    "--mixed-precision",
    "no",
    "--no-progress",
]


def tiny_config(**train: Any) -> RunConfig:
    """The RunConfig that ``CLI_TINY`` builds (shapes data, 4 classes), with training overrides."""
    base = TrainConfig(
        steps=6,
        batch_size=2,
        warmup_images=8,
        ema_halflife_images=16,
        log_every=1,
        sample_every=1000,
        checkpoint_every=1000,
        device="cpu",
        mixed_precision="no",
        progress=False,
    )
    return RunConfig(
        schedule=ScheduleConfig(),
        model=ModelConfig(preset="tiny", image_size=8, channels=3, num_classes=4),
        data=DataConfig(source="shapes", image_size=8),
        loss=LossConfig(),
        train=replace(base, **train),
        sample=SampleConfig(steps=2),
    )


def write_weights(path: Path, preset: str = "tiny", image_size: int = 8, num_classes: int = 4) -> Path:
    """Untrained weights of a given architecture, as ``save_weights`` writes them (for mismatch tests)."""
    config = tiny_config()
    config = replace(
        config,
        model=ModelConfig(preset=preset, image_size=image_size, channels=3, num_classes=num_classes),
        data=DataConfig(source="shapes", image_size=image_size),
    )
    model = DiffusionUNet(config.model, config.schedule)
    ckpt.save_weights(path, model.state_dict(), config, 0)
    return path


class WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: it creates a file, which proves code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def evil_pickles(folder: Path, marker: Path) -> dict[str, Path]:
    """Code-executing pickles in the formats a loader may meet: raw pickle (protocol 2 and 4) and a torch zip."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"step": 5, "model": WritesMarker(marker), "ema": {}, "optimizer": {}}
    out = {}
    for proto in (2, 4):
        out[f"raw-protocol{proto}"] = folder / f"evil-p{proto}.pt"
        out[f"raw-protocol{proto}"].write_bytes(pickle.dumps(payload, protocol=proto))
    out["torch-zip"] = folder / "evil-zip.pt"
    torch.save(payload, out["torch-zip"])
    assert not marker.exists(), "building the pickles must not run them"
    return out


def save_png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def image_folder(root: Path, n: int = 4, size: int = 10) -> Path:
    """A folder of ``n`` small RGB PNGs with distinct colours."""
    rng = np.random.default_rng(0)
    for i in range(n):
        save_png(root / f"img{i}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def _assert_equal_nested(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ"
        for k in a:
            _assert_equal_nested(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def log_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Bit-identical end state: full training state (model, EMA, optimiser, step), snapshot, grids, log values."""
    ref_states, res_states = ckpt.list_states(reference), ckpt.list_states(resumed)
    assert [p.name for p in res_states] == [p.name for p in ref_states], "kept checkpoints differ"
    for a, b in zip(ref_states, res_states):
        sa, sb = ckpt.load_state(a), ckpt.load_state(b)
        for key in ("step", "model", "ema", "optimizer", "data"):
            _assert_equal_nested(sa[key], sb[key], f"{b.name}:{key}")
    wa, ca, step_a = loading.read_weights(reference)
    wb, cb, step_b = loading.read_weights(resumed)
    assert (ca, step_a) == (cb, step_b)
    _assert_equal_nested(wa, wb, "model.safetensors")
    grids = sorted(p.name for p in (reference / "samples").glob("*.png"))
    assert sorted(p.name for p in (resumed / "samples").glob("*.png")) == grids
    for name in grids:
        assert (reference / "samples" / name).read_bytes() == (resumed / "samples" / name).read_bytes(), name
    drop = {"images_per_second"}
    ref_log = [{k: v for k, v in r.items() if k not in drop} for r in log_records(reference)]
    res_log = [{k: v for k, v in r.items() if k not in drop} for r in log_records(resumed)]
    assert [r["step"] for r in res_log] == [r["step"] for r in ref_log], "log has missing or duplicated steps"
    assert res_log == ref_log
    leftovers = [p for p in resumed.rglob(f"*{ckpt.TMP_SUFFIX}")]
    assert not leftovers, f"temporary files left: {leftovers}"


def torch_threads_env() -> dict[str, str]:
    """Environment for a training subprocess: one thread, so runs are reproducible and do not fight over 2 cores."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env
