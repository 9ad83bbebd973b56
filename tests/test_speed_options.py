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
import torch.utils.checkpoint
from _runs import tiny_config

from perceptual_diffusion.core.networks import DiffusionUNet
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


def _spread_weights(module: torch.nn.Module) -> list[torch.Tensor]:
    """The 4-d weights whose channels_last layout differs from the standard one (C > 1 and a spatial kernel)."""
    return [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]


@pytest.fixture
def training_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """What every training forward of the online model saw: its batch, whether autocast to bf16 was on, and whether
    its conv weights were channels_last (sampling, under no_grad, is left out)."""
    calls: list[dict] = []
    forward = DiffusionUNet.forward

    def spy(self: DiffusionUNet, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            weights = _spread_weights(self)
            calls.append(
                {
                    "batch": x_t.shape[0],
                    "bf16": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16,
                    "channels_last": bool(weights)
                    and all(
                        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights
                    ),
                }
            )
        return forward(self, x_t, t, cond)

    monkeypatch.setattr(DiffusionUNet, "forward", spy)
    return calls


def _assert_same_trajectory(run_dir: Path, reference: Path, loss_rtol: float, weight_atol: float) -> None:
    assert _losses(run_dir) == pytest.approx(_losses(reference), rel=loss_rtol)
    ours, theirs = _final(run_dir), _final(reference)
    assert set(ours) == set(theirs), "no '_orig_mod.' or 'module.' prefixes in checkpoints"
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=weight_atol, msg=key)


def test_gradient_accumulation_follows_the_same_trajectory(
    plain_run: Path, tmp_path: Path, training_calls: list[dict]
) -> None:
    train(tiny_config(batch_size=4, grad_accum=2), tmp_path)
    assert [c["batch"] for c in training_calls] == [2] * (6 * 2), "6 steps of 2 micro-batches of 2"
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log[-1]["images_seen"] == 6 * 4, "--batch-size is the global batch: accumulation does not change it"


def test_gradient_checkpointing_is_bit_identical_on_cpu(
    plain_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # diffusers' blocks call torch.utils.checkpoint.checkpoint per resnet/attention when the flag is on.
    checkpointed: list[str] = []
    checkpoint = torch.utils.checkpoint.checkpoint

    def counting(function, *args, **kwargs):  # noqa: ANN001, ANN202 - torch's signature
        checkpointed.append(type(getattr(function, "__self__", function)).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    train(tiny_config(batch_size=4), tmp_path / "plain")
    assert checkpointed == [], "without the option nothing is checkpointed"
    train(tiny_config(batch_size=4, grad_checkpointing=True), tmp_path / "ckpt")
    assert len(checkpointed) >= 6 and "ResnetBlock2D" in checkpointed, checkpointed[:5]
    _assert_same_trajectory(tmp_path / "ckpt", plain_run, 0, 0)


def test_channels_last_trains_to_the_same_weights_and_saves_plain_ones(
    plain_run: Path, tmp_path: Path, training_calls: list[dict]
) -> None:
    train(tiny_config(batch_size=4, channels_last=True), tmp_path)
    assert len(training_calls) == 6 and all(c["channels_last"] for c in training_calls), training_calls
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
    weights, _, _ = loading.read_weights(tmp_path)  # safetensors needs contiguous tensors: the EMA stays plain
    assert all(w.is_contiguous() for w in weights.values())


def test_bf16_autocast_trains_close_to_fp32(plain_run: Path, tmp_path: Path, training_calls: list[dict]) -> None:
    train(tiny_config(batch_size=4, mixed_precision="bf16"), tmp_path)
    assert len(training_calls) == 6 and all(c["bf16"] for c in training_calls), training_calls
    assert _losses(tmp_path) != _losses(plain_run), "bf16 rounds differently: equal losses mean it did not run"
    # bf16 keeps 8 bits of mantissa: the same run, but only to ~1e-2.
    assert _losses(tmp_path) == pytest.approx(_losses(plain_run), rel=5e-2)


def test_the_spy_sees_a_plain_run_as_plain(tmp_path: Path, training_calls: list[dict]) -> None:
    """The checks above can fail: without the options, full batches in fp32 with standard-layout weights."""
    train(tiny_config(batch_size=4, steps=2), tmp_path)
    assert training_calls == [{"batch": 4, "bf16": False, "channels_last": False}] * 2


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
    # A counting backend (eager underneath) proves the compiled module is the one the loop calls: dynamo hands a
    # graph to the backend only when the compiled module runs.
    graphs: list[torch.fx.GraphModule] = []

    def eager_counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:  # noqa: ARG001 - dynamo's signature
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=eager_counting, **kw))
    train(tiny_config(batch_size=4, compile=True), tmp_path)
    assert graphs, "torch.compile was asked for, but no compiled graph ran"
    assert any(n.op == "call_module" or n.op == "call_function" for g in graphs for n in g.graph.nodes)
    _assert_same_trajectory(tmp_path, plain_run, LOSS_RTOL, WEIGHT_ATOL)
