"""Speed options (gradient accumulation, channels_last, gradient checkpointing, bf16, torch.compile): each trains on
CPU, and none changes what a step computes beyond float rounding.

Gradient accumulation draws the whole global batch from the (seed, step) stream and then splits it, so 2
micro-batches of B/2 see exactly the samples, t and eps of one batch of B. Measured on CPU (6 steps, tiny preset):
losses agree to 1e-7 relative, weights to 1e-5 absolute; gradient checkpointing is bit-identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _runs import tiny_config

from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training.loop import train

LOSS_RTOL = 1e-5  # per-step loss, relative
WEIGHT_ATOL = 5e-4  # final weights after 6 AdamW steps at lr 1e-3, absolute


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_state(ckpt.list_states(run_dir)[-1])["model"]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 steps of batch 4 in fp32, no speed option: the reference every option is compared with."""
    run_dir = tmp_path_factory.mktemp("plain")
    train(tiny_config(batch_size=4), run_dir)
    return run_dir


def _assert_same_trajectory(run_dir: Path, reference: Path, loss_rtol: float, weight_atol: float) -> None:
    assert _losses(run_dir) == pytest.approx(_losses(reference), rel=loss_rtol)
    ours, theirs = _final(run_dir), _final(reference)
    assert set(ours) == set(theirs), "no '_orig_mod.' or 'module.' prefixes in checkpoints"
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=weight_atol, msg=key)


def test_gradient_accumulation_follows_the_same_trajectory(plain_run: Path, tmp_path: Path) -> None:
    train(tiny_config(batch_size=4, grad_accum=2), tmp_path)
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["images_seen"] == 6 * 4, "--batch-size is the global batch: accumulation does not change it"


def test_gradient_checkpointing_is_bit_identical_on_cpu(plain_run: Path, tmp_path: Path) -> None:
    train(tiny_config(batch_size=4, grad_checkpointing=True), tmp_path)
    _assert_same_trajectory(tmp_path, plain_run, 0, 0)


def test_channels_last_trains_to_the_same_weights_and_saves_plain_ones(plain_run: Path, tmp_path: Path) -> None:
    train(tiny_config(batch_size=4, channels_last=True), tmp_path)
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
    weights, _, _ = loading.read_weights(tmp_path)  # safetensors needs contiguous tensors: the EMA stays plain
    assert all(w.is_contiguous() for w in weights.values())


def test_bf16_autocast_trains_close_to_fp32(plain_run: Path, tmp_path: Path) -> None:
    train(tiny_config(batch_size=4, mixed_precision="bf16"), tmp_path)
    # bf16 keeps 8 bits of mantissa: the same run, but only to ~1e-2.
    assert _losses(tmp_path) == pytest.approx(_losses(plain_run), rel=5e-2)


def test_speed_options_may_change_when_a_run_is_resumed(plain_run: Path, tmp_path: Path) -> None:
    train(tiny_config(batch_size=4, steps=3), tmp_path)
    train(tiny_config(batch_size=4, steps=6, grad_accum=2, channels_last=True, grad_checkpointing=True), tmp_path)
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)


@pytest.mark.slow
def test_torch_compile_trains_and_checkpoints_unwrapped_weights(
    plain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inductor compiles C++ for minutes on this CPU; the eager backend still traces the model with dynamo and runs
    # the wrapped module through the loop, its checkpoints and unwrap. benchmarks/train_speed.py times the real one.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager", **kw))
    train(tiny_config(batch_size=4, compile=True), tmp_path)
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
