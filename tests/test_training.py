"""The training loop: pure schedules, exact resume, refused config changes, and the teacher's bookkeeping."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from perceptual_diffusion.config import LossConfig
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import loading
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training.loop import train
from perceptual_diffusion.training.step import ema_beta, learning_rate, step_seed


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------------
# Pure schedules of images seen (EDM2).


def test_learning_rate_warms_up_linearly_then_stays_constant() -> None:
    base, warmup = 1e-3, 1000
    lrs = [learning_rate(seen, base, warmup) for seen in range(0, 3000, 50)]
    assert 0 < lrs[0] < base * 0.01
    assert all(a <= b for a, b in zip(lrs, lrs[1:])), "warm-up must be monotone"
    assert learning_rate(499, base, warmup) == pytest.approx(base / 2)
    assert learning_rate(warmup, base, warmup) == base
    assert learning_rate(10**9, base, warmup) == base
    assert learning_rate(0, base, 0) == base, "no warm-up: the base rate from the first step"


def test_ema_beta_has_the_configured_half_life_in_images() -> None:
    batch, halflife = 64, 8192
    beta = ema_beta(10**9, batch, halflife, rampup=0.1)
    # After halflife / batch steps the old average keeps half its weight.
    assert beta ** (halflife / batch) == pytest.approx(0.5)
    assert ema_beta(10**9, batch, halflife, rampup=0.0) == beta
    # Ramp-up: early in a run the half-life is rampup * images_seen, so the EMA tracks the model closely.
    assert ema_beta(1000, batch, halflife, rampup=0.1) == pytest.approx(0.5 ** (batch / 100))
    assert ema_beta(0, batch, halflife, rampup=0.1) == 0.0, "first step: the EMA is a copy of the model"
    assert ema_beta(10**9, batch, 0, rampup=0.1) == 0.0, "half-life 0 disables the EMA (copies the model)"
    betas = [ema_beta(seen, batch, halflife, 0.1) for seen in range(0, 200_000, 1000)]
    assert all(0 <= b < 1 for b in betas) and all(a <= b for a, b in zip(betas, betas[1:]))


def test_step_seed_is_a_pure_function_of_seed_rank_and_step() -> None:
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(s, k, r) for s in range(3) for k in range(3) for r in range(2)}) == 18
    assert 0 <= step_seed(123, 10**9) < 2**63


# ---------------------------------------------------------------------------------------------------------------
# Resume.


def test_resumed_run_continues_from_its_checkpoint_and_replays_exactly(tmp_path: Path, tiny_run_config) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    first = train(tiny_run_config(steps=2), interrupted)
    assert first.step == 2 and _log_steps(interrupted) == [1, 2]
    # Same command with more steps (a resumable field) in the same directory: it continues, not restarts.
    second = train(tiny_run_config(steps=4), interrupted)
    assert second.step == 4
    assert _log_steps(interrupted) == [1, 2, 3, 4]
    assert [p.name for p in ckpt.list_states(interrupted)] == ["state-00000002.pt", "state-00000004.pt"]

    # Randomness is seeded by (seed, step): the interrupted run equals one that ran 4 steps straight.
    torch.randn(10)  # unrelated use of the global RNG must not matter: the initial weights come from --seed
    train(tiny_run_config(steps=4), straight)
    a, b = ckpt.load_state(ckpt.state_path(interrupted, 4)), ckpt.load_state(ckpt.state_path(straight, 4))
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=0, msg=key)
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0, msg=key)

    # Rerunning a finished run is a no-op that keeps the log as it is.
    assert train(tiny_run_config(steps=4), interrupted).step == 4
    assert _log_steps(interrupted) == [1, 2, 3, 4]


def test_resume_with_another_configuration_is_refused_naming_the_fields(tmp_path: Path, tiny_run_config) -> None:
    train(tiny_run_config(steps=1), tmp_path)
    changed = tiny_run_config(steps=2, lr=5e-4, seed=3)
    with pytest.raises(UserError) as info:
        train(changed, tmp_path)
    message = str(info.value)
    assert "train.lr" in message and "train.seed" in message
    assert "train.steps" not in message, "steps may change on resume: it is not a difference worth refusing"
    assert "--override-config" in message
    assert _log_steps(tmp_path) == [1], "a refused resume must not train"
    # The explicit override resumes.
    assert train(changed, tmp_path, override_config=True).step == 2


# ---------------------------------------------------------------------------------------------------------------
# Stage 2: the teacher.


@pytest.fixture(scope="module")
def stage2_run(trained_mse_run: Path, tmp_path_factory: pytest.TempPathFactory, tiny_run_config) -> Path:
    run_dir = tmp_path_factory.mktemp("self-perceptual")
    config = tiny_run_config(steps=2)
    config = replace(config, loss=LossConfig(kind="self-perceptual", teacher=str(trained_mse_run), cond_dropout=0.1))
    train(config, run_dir)
    return run_dir


def test_stage2_records_the_teacher_path_and_sha256(stage2_run: Path, trained_mse_run: Path) -> None:
    saved = json.loads((stage2_run / ckpt.CONFIG_NAME).read_text())
    weights = (trained_mse_run / ckpt.WEIGHTS_NAME).resolve()
    assert saved["loss"]["teacher"] == str(weights)
    assert saved["loss"]["teacher_sha256"] == ckpt.sha256_file(weights)
    # The online model starts from the teacher's weights (the paper's recipe).
    assert saved["train"]["init_from"] == str(weights)
    # The config travels inside the inference weights too.
    _, config, step = loading.read_weights(stage2_run)
    assert config.loss.teacher_sha256 == ckpt.sha256_file(weights) and step == 2


def test_teacher_weights_never_enter_the_student_checkpoint(stage2_run: Path) -> None:
    (state_file,) = ckpt.list_states(stage2_run)
    state = ckpt.load_state(state_file)
    # Whatever else a state holds (step, config, data fingerprint), its tensors are the student's and the EMA's.
    assert {"step", "model", "ema", "optimizer"} <= set(state)
    tensor_dicts = [k for k, v in state.items() if isinstance(v, dict) and k != "optimizer"]
    assert sorted(tensor_dicts) == ["ema", "model"], tensor_dicts
    student, config, _ = load_model(stage2_run)
    expected_keys = set(DiffusionUNet(config.model, config.schedule).state_dict())
    assert set(state["model"]) == expected_keys and set(state["ema"]) == expected_keys
    assert not any("teacher" in k for k in state["model"])
    # The optimiser holds state for the student's parameters only.
    assert len(state["optimizer"]["state"]) == sum(1 for _ in student.parameters())
    weights, _, _ = loading.read_weights(stage2_run)
    assert set(weights) == expected_keys


def test_stage2_trains_the_student_away_from_the_teacher(stage2_run: Path, trained_mse_run: Path) -> None:
    teacher_weights, _, _ = loading.read_weights(trained_mse_run)
    state = ckpt.load_state(ckpt.list_states(stage2_run)[-1])
    assert any(not torch.equal(state["model"][k], teacher_weights[k]) for k in teacher_weights)
    log = [json.loads(line) for line in (stage2_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert all({"loss", "perceptual", "mse"} <= set(r) for r in log)


def test_initial_weights_depend_on_the_seed_only(tmp_path: Path, tiny_run_config) -> None:
    train(tiny_run_config(steps=1), tmp_path / "a")
    torch.randn(10)  # any unrelated use of the global RNG in between
    train(tiny_run_config(steps=1), tmp_path / "b")
    a, b = loading.read_weights(tmp_path / "a")[0], loading.read_weights(tmp_path / "b")[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ...and --seed is what decides them.
    train(tiny_run_config(steps=1, seed=1), tmp_path / "c")
    c = loading.read_weights(tmp_path / "c")[0]
    assert any(not torch.equal(a[k], c[k]) for k in a)
