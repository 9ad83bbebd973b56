"""Stage 1 to a measured plateau: the decision rule, the phases, and the cosine learning rate."""

from __future__ import annotations

import math

import pytest

from perceptual_diffusion.evaluation.scoring import Criterion
from perceptual_diffusion.experiments import teacher
from perceptual_diffusion.experiments.budgets import PlateauSchedule
from perceptual_diffusion.experiments.teacher import CurvePoint, Gain, combined_se_gain, is_plateau, train_to_plateau
from perceptual_diffusion.training.step import learning_rate

UP = Criterion("structure_precision", True)
DOWN = Criterion("fid", False)


def point(value: float, se: float = 0.01) -> CurvePoint:
    return CurvePoint(0, 1e-3, 0, 0, value, se, {})


def test_a_gain_within_twice_the_combined_noise_is_a_plateau_in_either_direction() -> None:
    noise = 2 * math.sqrt(2) * 0.01  # 0.0283
    assert is_plateau([point(0.0), point(0.5), point(0.5 + noise * 0.9)], combined_se_gain(UP, 2.0), first_phase=True)
    assert not is_plateau(
        [point(0.0), point(0.5), point(0.5 + noise * 1.1)], combined_se_gain(UP, 2.0), first_phase=True
    )
    assert is_plateau([point(0.0), point(0.5), point(0.4)], combined_se_gain(UP, 2.0), first_phase=True), (
        "a drop ends the phase"
    )
    # Lower is better for FID: a fall of more than the noise is progress, not a plateau.
    assert not is_plateau([point(9.0), point(5.0), point(4.0)], combined_se_gain(DOWN, 2.0), first_phase=True)
    assert is_plateau([point(9.0), point(5.0), point(4.99)], combined_se_gain(DOWN, 2.0), first_phase=True)


def test_a_curve_still_at_its_floor_is_not_a_plateau_in_the_first_phase() -> None:
    floor = [point(0.0, 0.0), point(0.0, 0.0), point(0.0, 0.0)]
    assert not is_plateau(floor, combined_se_gain(UP, 2.0), first_phase=True)
    assert is_plateau(floor, combined_se_gain(UP, 2.0), first_phase=False), (
        "after a learning-rate drop, no gain is a plateau"
    )
    assert not is_plateau([point(0.3), point(0.3)], combined_se_gain(UP, 2.0), first_phase=True), (
        "two points cannot show a rise"
    )


def test_phases_stop_at_the_plateau_and_start_from_the_previous_phase(tmp_path, monkeypatch) -> None:
    trained: list[tuple[str, int, float, str | None]] = []
    finished: set[tuple[str, int]] = set()

    class Cfg:
        def __init__(self, steps: int, lr: float, init: str | None) -> None:
            self.steps, self.lr, self.init = steps, lr, init
            self.train = type("T", (), {"batch_size": 10})

    def fake_train(config, run_dir):
        trained.append((run_dir.name, config.steps, config.lr, config.init))
        finished.add((run_dir.name, config.steps))

    monkeypatch.setattr(teacher, "train", fake_train)
    monkeypatch.setattr(teacher, "is_finished", lambda run_dir, steps: (run_dir.name, steps) in finished)
    # Phase 0 rises, then flattens at its 4th chunk; phase 1 never gains beyond the noise.
    curve = {"phase0": [0.1, 0.3, 0.5, 0.51, 0.9], "phase1": [0.52, 0.52, 0.53]}

    def evaluate(weights, name):
        phase, step = name.split("-")
        return curve[phase][int(step.removeprefix("step")) // 100 - 1], 0.01, {"metrics": {}}

    schedule = PlateauSchedule(lrs=(1e-3, 1e-4), chunk_steps=100, max_chunks=5, min_chunks=2)
    result = train_to_plateau(
        tmp_path, schedule, lambda p, lr, steps, init: Cfg(steps, lr, init), evaluate, UP, lambda m: None
    )
    assert [t[:3] for t in trained] == [
        ("stage1-phase0", 100, 1e-3),
        ("stage1-phase0", 200, 1e-3),
        ("stage1-phase0", 300, 1e-3),
        ("stage1-phase0", 400, 1e-3),
        ("stage1-mse", 100, 1e-4),
        ("stage1-mse", 200, 1e-4),
    ]
    assert trained[4][3] == str(tmp_path / "stage1-phase0"), "phase 1 starts from phase 0's weights"
    assert result.run_dir == tmp_path / "stage1-mse" and result.at_plateau
    assert result.phase_ends == ["plateau at step 400", "plateau at step 200"]
    assert [p.images for p in result.points] == [1000, 2000, 3000, 4000, 5000, 6000]
    # A rerun trains nothing and makes the same decisions.
    trained.clear()
    again = train_to_plateau(
        tmp_path, schedule, lambda p, lr, steps, init: Cfg(steps, lr, init), evaluate, UP, lambda m: None
    )
    assert trained == [] and again.phase_ends == result.phase_ends


def test_a_phase_that_keeps_improving_ends_at_its_cap_and_the_teacher_is_not_at_a_plateau(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(teacher, "train", lambda config, run_dir: None)
    monkeypatch.setattr(teacher, "is_finished", lambda run_dir, steps: False)

    class Cfg:
        train = type("T", (), {"batch_size": 1})

    schedule = PlateauSchedule(lrs=(1e-3,), chunk_steps=10, max_chunks=3, min_chunks=2)
    rising = lambda weights, name: (int(name.split("step")[1]) / 100, 0.001, {})  # noqa: E731
    result = train_to_plateau(tmp_path, schedule, lambda *a: Cfg(), rising, UP, lambda m: None)
    assert not result.at_plateau and result.phase_ends == ["step cap 30"]
    assert "step cap of 30 steps while still gaining" in result.reason


def test_the_paired_rule_certifies_a_plateau_that_independent_errors_cannot(tmp_path, monkeypatch) -> None:
    """Two evaluations from the same sampling seeds: their difference is far less noisy than either value. With
    standard errors of 0.1 each, a gain of 0.05 per chunk is noise to the combined-SE rule; a paired interval of
    +-0.01 shows it is real, and only a gain whose interval reaches 0 ends the phase."""
    monkeypatch.setattr(teacher, "train", lambda config, run_dir: None)
    monkeypatch.setattr(teacher, "is_finished", lambda run_dir, steps: False)

    class Cfg:
        train = type("T", (), {"batch_size": 1})

    values = {10: 0.10, 20: 0.15, 30: 0.20, 40: 0.201, 50: 0.30}
    evaluate = lambda weights, name: (values[int(name.split("step")[1])], 0.1, {})  # noqa: E731
    paired = lambda a, b: Gain(b.value - a.value, b.value - a.value - 0.01, b.value - a.value + 0.01)  # noqa: E731
    schedule = PlateauSchedule(lrs=(1e-3,), chunk_steps=10, max_chunks=5, min_chunks=2)
    independent = train_to_plateau(tmp_path, schedule, lambda *a: Cfg(), evaluate, UP, lambda m: None)
    assert independent.phase_ends == ["step cap 50"] and not independent.at_plateau
    assert "never rose beyond noise from its first point" in independent.reason
    result = train_to_plateau(tmp_path, schedule, lambda *a: Cfg(), evaluate, UP, lambda m: None, paired)
    assert result.phase_ends == ["plateau at step 40"] and result.at_plateau
    assert result.points[-1].gain == {"estimate": pytest.approx(0.001), "low": pytest.approx(-0.009),
                                      "high": pytest.approx(0.011)}  # fmt: skip
    assert "ended at a plateau" in result.reason


def test_cosine_learning_rate_warms_up_then_decays_to_the_final_ratio() -> None:
    base, warm, total = 1e-3, 100, 1100
    lr = lambda seen, ratio=0.0: learning_rate(seen, base, warm, "cosine", total, ratio)  # noqa: E731
    assert lr(49) == pytest.approx(base / 2)
    assert lr(99) == pytest.approx(base)
    assert lr(600) == pytest.approx(base / 2), "half way through the decay: half the rate"
    assert lr(total) == pytest.approx(0.0, abs=1e-12)
    assert lr(total, 0.1) == pytest.approx(0.1 * base)
    values = [lr(s) for s in range(100, total, 50)]
    assert all(a >= b for a, b in zip(values, values[1:])), "monotone after warm-up"
    assert learning_rate(500, base, warm, "constant", total) == base
