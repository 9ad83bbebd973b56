"""Exact resume: a run killed at any point and resumed by rerunning its command ends bit-identical to an
uninterrupted run of the same length (data order, RNG, EMA, optimiser, LR schedule, snapshot, grids and log).

Two layers:
- real processes killed with SIGKILL at random points (while stepping, logging, writing grids or checkpoints);
- in-process runs stopped exactly at the fragile places (between the state and the snapshot write, inside a state
  write, inside a grid write, before the first checkpoint), with the debris a SIGKILL leaves (a half-written
  temporary file, a cut log line) added by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY, assert_same_run, log_records, tiny_config, torch_threads_env

from perceptual_diffusion import cli
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training
from perceptual_diffusion.training import step as trainstep

STEPS = 16
KILLS = 4  # random SIGKILL points per test run (the kill log below says where each landed)
CLI_RUN = [*CLI_TINY, "--steps", str(STEPS), "--checkpoint-every", "3", "--keep-checkpoints", "2"]
CLI_RUN += ["--sample-every", "4", "--seed", "7"]


def _command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "perceptual_diffusion.cli", "train", "--run-dir", str(run_dir), *CLI_RUN]


def _logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            steps.append(json.loads(line)["step"])
    return max(steps)


def _run_to_end(run_dir: Path) -> None:
    done = subprocess.run(_command(run_dir), env=torch_threads_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _debris(run_dir: Path) -> str:
    """Where the kill landed, as far as the files tell: inside a write (a temporary file is left) or between."""
    tmps = sorted(p.name.split(".")[1] for p in run_dir.rglob(f".*{ckpt.TMP_SUFFIX}"))
    return f"inside write of {tmps[0]}" if tmps else "between writes"


@pytest.mark.slow
def test_sigkill_at_random_points_then_rerun_is_bit_identical(tmp_path: Path) -> None:
    seed = int(os.environ.get("PD_KILL_SEED", "0"))
    rng = random.Random(seed)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    # The reference runs in this process (one thread, like the subprocesses): one interpreter start saved.
    assert cli.main(["train", "--run-dir", str(reference), *CLI_RUN]) == 0

    kills = []
    for i in range(KILLS):
        start = _logged_step(resumed)
        # The first kill lands before the first checkpoint (step 3): the rerun must restart from the same init.
        target = 1 if i == 0 else min(STEPS, start + rng.randint(1, 4))
        delay = rng.uniform(0.0, 0.08)  # a fraction of one step plus its bookkeeping: lands anywhere in it
        stderr = tmp_path / f"attempt{i}.err"
        with open(stderr, "wb") as err_file:
            proc = subprocess.Popen(
                _command(resumed), env=torch_threads_env(), stdout=subprocess.DEVNULL, stderr=err_file
            )
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and _logged_step(resumed) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(delay)
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        outcome = "finished first" if finished else f"killed at step {_logged_step(resumed)}, {_debris(resumed)}"
        kills.append((target, round(delay, 3), outcome))
        if finished:
            assert proc.returncode == 0, stderr.read_text()
            break
    print(f"kill points (target step, delay s, outcome): {kills}")
    assert sum(1 for k in kills if k[2].startswith("killed")) >= KILLS - 1, kills

    _run_to_end(resumed)
    assert_same_run(reference, resumed)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic kill points, in-process.


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the code under test catches it."""


def _kill_on_call(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, call: int, before=None) -> None:
    """Make the ``call``-th call of ``owner.name`` die (after ``before(args)`` runs, to leave debris)."""
    original = getattr(owner, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] == call:
            if before is not None:
                before(*args, **kwargs)
            raise Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


CONFIG = tiny_config(steps=7, checkpoint_every=2, keep_checkpoints=2, sample_every=3, seed=3)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference")
    training.train(CONFIG, run_dir)
    return run_dir


def _half_written_tmp(path: Path) -> None:
    """What SIGKILL leaves inside ``atomic_write``: a partial temporary file next to the target."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / f".{path.name}.killed{ckpt.TMP_SUFFIX}").write_bytes(b"\x80\x02partial")


def _cut_log_line(run_dir: Path) -> None:
    with open(run_dir / "log.jsonl", "a") as fh:
        fh.write('{"step": 99, "images_se')


def _kill_inside_final_snapshot(mp: pytest.MonkeyPatch) -> None:
    # Checkpoints at steps 2, 4, 6, 7: the 4th snapshot write is the final one, after state-00000007.pt.
    _kill_on_call(mp, ckpt, "save_weights", 4, before=lambda path, *a: _half_written_tmp(path))


def _kill_inside_state_write(mp: pytest.MonkeyPatch) -> None:
    _kill_on_call(
        mp, ckpt, "save_state", 3, before=lambda run_dir, step, *a: _half_written_tmp(ckpt.state_path(run_dir, step))
    )


def _kill_inside_grid_write(mp: pytest.MonkeyPatch) -> None:
    # Grids at steps 3 and 6; dying in the second leaves the log line of step 6 written, checkpoint 6 not.
    _kill_on_call(mp, training, "save_grid", 2, before=lambda images, path, **k: _half_written_tmp(path))


def _kill_before_first_checkpoint(mp: pytest.MonkeyPatch) -> None:
    _kill_on_call(mp, trainstep, "ema_update", 2)


KILL_POINTS = {
    "between-state-and-snapshot-at-final-step": _kill_inside_final_snapshot,
    "inside-state-write": _kill_inside_state_write,
    "inside-grid-write": _kill_inside_grid_write,
    "before-first-checkpoint": _kill_before_first_checkpoint,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_at_fragile_point_then_rerun_is_bit_identical(
    point: str, reference_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as mp:
        KILL_POINTS[point](mp)
        with pytest.raises(Killed):
            training.train(CONFIG, tmp_path)
    _cut_log_line(tmp_path)  # SIGKILL can also land mid log line
    training.train(CONFIG, tmp_path)
    assert_same_run(reference_run, tmp_path)


def test_rerunning_a_finished_run_changes_nothing(reference_run: Path, tmp_path: Path) -> None:
    training.train(CONFIG, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"}
    result = training.train(CONFIG, tmp_path)
    assert result.step == CONFIG.train.steps
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"} == before
    assert_same_run(reference_run, tmp_path)


def test_two_fresh_runs_start_from_the_same_weights(tmp_path: Path) -> None:
    """The initial weights are seeded by --seed: without it a run killed before its first checkpoint could not
    replay."""
    config = tiny_config(steps=1, seed=11)
    training.train(config, tmp_path / "a")
    torch.manual_seed(12345)  # global RNG state must not matter
    training.train(config, tmp_path / "b")
    assert_same_run(tmp_path / "a", tmp_path / "b")


def test_log_keeps_one_record_per_step_after_resume(reference_run: Path) -> None:
    assert [r["step"] for r in log_records(reference_run)] == list(range(1, CONFIG.train.steps + 1))


def test_images_per_second_counts_training_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow bookkeeping (here sample grids that take 0.3 s each) must not lower the reported speed."""
    original = training.save_grid

    def slow_grid(*args, **kwargs):
        time.sleep(0.3)
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "save_grid", slow_grid)
    start = time.perf_counter()
    result = training.train(tiny_config(steps=4, sample_every=1), tmp_path)
    wall = time.perf_counter() - start
    assert wall - result.seconds >= 4 * 0.3, "the grid writes were counted as training time"
    assert result.images_per_second == pytest.approx(4 * 2 / result.seconds)
    assert all(r["images_per_second"] > 0 for r in log_records(tmp_path))
