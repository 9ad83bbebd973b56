"""Golden numbers: seeded runs whose values are pinned, so that a refactor is proven to change no number.

Each value below was recorded from the code as it stood before the orchestration redesign (issue 12) and must come
out the same after it: three seeded training steps of MSE and of self-perceptual fine-tuning (pixel and latent), the
EMA weights they leave, the two losses on a fixed batch, DDIM samples with and without guidance, and the numbers of a
``compare`` run on a tiny budget. The tolerance (1e-5 relative) only absorbs the last bits that differ between CPU
instruction sets; any change to the maths, the seeding or the order of random draws moves these numbers by far more.
To re-record after an intended change of behaviour, run ``python tests/test_golden.py`` and say why in the commit.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceptual_diffusion import testing
from perceptual_diffusion.config import LossConfig, SampleConfig
from perceptual_diffusion.core.losses import mse_loss, self_perceptual_loss
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.experiments import budgets
from perceptual_diffusion.experiments import compare as experiment
from perceptual_diffusion.experiments.budgets import PlateauSchedule
from perceptual_diffusion.experiments.report import pair_by_role
from perceptual_diffusion.models import latent
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.training import latent as latent_training
from perceptual_diffusion.training.loop import train

sys.path.insert(0, str(Path(__file__).parent))
from _runs import tiny_config  # noqa: E402

RTOL = 1e-5

GOLDEN: dict[str, list[float]] = {
    "losses/mse": [1.10210574, 1.07101893, 0.617635429, 0.538530946],
    "losses/sp": [0.645246208, 0.23219648, 0.0272829495, 0.417890966],
    "pixel/mse/losses": [0.736789823, 0.794261694, 0.818250418],
    "pixel/mse/ema": [536.785855, 6762.52289],
    "pixel/sp/losses": [0.059403006, 0.00087081606, 0.0262213405],
    "pixel/sp/ema": [536.816402, 6762.91191],
    "pixel/sample/plain": [36.2572988, 444.906977],
    "pixel/sample/cfg": [22.7744599, 470.152696],
    "latent/mse/losses": [0.637216866, 0.432414591, 0.541257262],
    "latent/sp/losses": [0.0889644921, 0.142455399, 0.118479744],
    "latent/sp/ema": [1698.91778, 27981.2632],
    "latent/sample": [-66.6855804, 424.957546],
    "compare/mse-continued/cfg-w2-phi0.7": [0.0, 0.222908209, 1105.88588, 0.0, 0.0],
    "compare/mse-continued/none": [0.0, 0.219184421, 1094.85207, 0.0, 0.0],
    "compare/self-perceptual/none": [0.0, 0.221963518, 1103.42418, 0.0, 0.0],
    "compare/stage1-mse/none": [0.0, 0.222780571, 1103.04809, 0.0, 0.0],
    "compare/paired": [0.0032600445, 8.57211211, 0.0, 0.0],
    "compare/fixed-batch": [0.989373624, 0.0716636032, 1.01185858, 0.0711934119, 1.02260208, 0.0722024292],
}

BUDGET = budgets.Budget(
    name="golden",
    data=budgets.SHAPES,
    preset="tiny",
    batch_size=8,
    stage1=PlateauSchedule(lrs=(1e-3,), chunk_steps=2, max_chunks=2, min_chunks=2),
    finetune_steps=2,
    finetune_lrs=(1e-4,),
    sample_steps=2,
    eval_samples=16,
    curve_samples=12,
    training_seeds=1,
    cfg_scales=(2.0,),
    guidance_rescales=(0.7,),
    unconditional=False,
    extras=False,
    bootstrap=20,
    loss_batch=16,
)
ROW_METRICS = ("structure_precision", "noise_rms", "fid", "precision", "recall")


def _weights_sums(path: Path) -> list[float]:
    tensors = load_file(str(path))
    return [
        math.fsum(float(t.double().sum()) for t in tensors.values()),
        math.fsum(float(t.double().abs().sum()) for t in tensors.values()),
    ]


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def pixel_runs(tmp: Path) -> dict[str, list[float]]:
    """Three steps of MSE on 8x8 shapes, then three self-perceptual steps against it, and samples of the first."""
    mse_dir, sp_dir = tmp / "mse", tmp / "sp"
    train(tiny_config(steps=3), mse_dir)
    sp = LossConfig(kind="self-perceptual", teacher=str(mse_dir))
    train(replace(tiny_config(steps=3, init_from=str(mse_dir)), loss=sp), sp_dir)
    model = load_model(mse_dir)[0]
    labels = torch.tensor([0, 1, 2, 3])
    plain = sample(model, [0, 1, 2, 3], labels, SampleConfig(steps=5))
    guided = sample(model, [0, 1, 2, 3], labels, SampleConfig(steps=5, cfg_scale=3.0, guidance_rescale=0.7))
    return {
        "pixel/mse/losses": _losses(mse_dir),
        "pixel/mse/ema": _weights_sums(mse_dir / "model.safetensors"),
        "pixel/sp/losses": _losses(sp_dir),
        "pixel/sp/ema": _weights_sums(sp_dir / "model.safetensors"),
        "pixel/sample/plain": [float(plain.double().sum()), float(plain.double().abs().sum())],
        "pixel/sample/cfg": [float(guided.double().sum()), float(guided.double().abs().sum())],
    }


def fixed_batch_losses() -> dict[str, list[float]]:
    """Both objectives of one model against a frozen teacher on a fixed batch (x0, label, t, eps, t')."""
    from perceptual_diffusion.config import ModelConfig, ScheduleConfig
    from perceptual_diffusion.core.networks import DiffusionUNet

    def model(seed: int) -> DiffusionUNet:
        torch.manual_seed(seed)
        m = DiffusionUNet(ModelConfig(preset="tiny", image_size=8, channels=3, num_classes=3), ScheduleConfig())
        with torch.no_grad():  # diffusers zero-initialises output layers: perturb so that every term is non-zero
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        return m

    online, teacher = model(1), frozen_copy(model(2))
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    cond = torch.tensor([0, 1, 2, 0])
    t, t2 = torch.tensor([10, 300, 700, 999]), torch.tensor([500, 50, 999, 200])
    eps = torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        return {
            "losses/mse": mse_loss(online, teacher.schedule, x0, cond, t, eps).tolist(),
            "losses/sp": self_perceptual_loss(online, teacher, x0, cond, t, eps, t2).tolist(),
        }


def latent_runs(tmp: Path) -> dict[str, list[float]]:
    """The latent text-to-image path on the seeded tiny pipeline: MSE, self-perceptual, and decoded samples."""
    from perceptual_diffusion.config import CaptionDataConfig, LatentModelConfig, LatentRunConfig, TrainConfig

    sd = testing.make_tiny_pipeline(tmp / "tiny-sd")
    captions = testing.write_shapes_captions(tmp / "captions", every=40)

    def config(**train: object) -> LatentRunConfig:
        tc = {"steps": 3, "batch_size": 4, "log_every": 1, "sample_every": 100, "checkpoint_every": 100}
        tc |= {"device": "cpu", "progress": False, "warmup_images": 4, "lr": 1e-3} | train
        return LatentRunConfig(
            model=LatentModelConfig(str(sd), 16),
            data=CaptionDataConfig(path=str(captions), cache_dir=str(tmp / "cache")),
            train=TrainConfig(**tc),
            sample=SampleConfig(steps=2, clip_x0=False),
        )

    latent_training.train_latent(config(), tmp / "mse")
    sp = replace(config(init_from=str(tmp / "mse")), loss=LossConfig(kind="self-perceptual", teacher=str(tmp / "mse")))
    latent_training.train_latent(sp, tmp / "sp")
    model, parts, _, _ = latent.load_latent_model(tmp / "mse")
    images = latent.sample_latent(
        model, parts, ["a red disc", "a blue cross"], [0, 1], SampleConfig(steps=3, cfg_scale=2.0)
    )
    return {
        "latent/mse/losses": _losses(tmp / "mse"),
        "latent/sp/losses": _losses(tmp / "sp"),
        "latent/sp/ema": _weights_sums(tmp / "sp" / "model.safetensors"),
        "latent/sample": [float(images.double().sum()), float(images.double().abs().sum())],
    }


def compare_numbers(tmp: Path) -> dict[str, list[float]]:
    """The headline rows of ``compare`` on a tiny budget: each row's metrics, and the paired difference."""
    results = experiment.run_compare(tmp / "cmp", BUDGET, device="cpu")
    rows = results["evaluations"]["0"]
    out = {f"compare/{key}": [float(rows[key][0][m]) for m in ROW_METRICS] for key in sorted(rows)}
    head = pair_by_role(results, "headline")
    out["compare/paired"] = [float(head[m]["estimate"]) for m in ("noise_rms", "fid", "precision", "coverage")]
    losses = results["fixed_batch_losses"]["0"]
    out["compare/fixed-batch"] = [float(losses[k][m]) for k in sorted(losses) for m in ("mse", "self_perceptual")]
    return out


def _check(measured: dict[str, list[float]]) -> None:
    for key, values in measured.items():
        assert key in GOLDEN, f"{key} has no golden value: record it (python tests/test_golden.py)"
        assert len(values) == len(GOLDEN[key]), key
        for got, want in zip(values, GOLDEN[key]):
            assert got == pytest.approx(want, rel=RTOL, abs=1e-7), f"{key}: {values} != {GOLDEN[key]}"


def test_pixel_training_and_sampling_are_pinned(tmp_path) -> None:
    _check(pixel_runs(tmp_path))


def test_fixed_batch_losses_are_pinned() -> None:
    _check(fixed_batch_losses())


def test_latent_training_and_sampling_are_pinned(tmp_path) -> None:
    _check(latent_runs(tmp_path))


@pytest.mark.slow
def test_compare_numbers_are_pinned(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    _check(compare_numbers(tmp_path))


if __name__ == "__main__":  # print the measured values, to paste into GOLDEN after an intended change
    import os
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        os.environ["PD_CACHE_DIR"] = str(Path(d) / "cache")
        found = fixed_batch_losses() | pixel_runs(Path(d) / "p") | latent_runs(Path(d) / "l")
        found |= compare_numbers(Path(d) / "c")
    for k, v in found.items():
        print(f"    {k!r}: {[float(f'{x:.9g}') for x in v]},")
