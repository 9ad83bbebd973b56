"""``train --report-to tensorboard``: the event file read back holds the log's numbers and the sample grids, and a
resumed run shows every step once. Skipped where the optional ``tensorboard`` package is not installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _runs import CLI_TINY

from perceptual_diffusion import cli
from perceptual_diffusion.runtime import tracking

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run: Path) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(run / tracking.TENSORBOARD_DIR), size_guidance={"images": 0})
    acc.Reload()
    return acc


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_tensorboard_mirrors_losses_lr_throughput_and_grids(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), *CLI_TINY, "--sample-every", "2", "--report-to", "tensorboard"]
    assert cli.main([*argv, "--steps", "3"]) == 0
    acc = _events(run)
    assert {"train/loss", "train/lr", "train/images_per_second"} <= set(acc.Tags()["scalars"])
    log = _log(run)
    for name in ("loss", "lr"):
        assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars(f"train/{name}")] == [
            (r["step"], r[name]) for r in log
        ]
    assert [e.step for e in acc.Images("samples")] == [2, 3]
    assert acc.Images("samples")[0].width > 8

    # Resumed (with the option, or after a run without it): each step once, the new ones appended.
    assert cli.main([*argv, "--steps", "5"]) == 0
    acc = _events(run)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert [e.step for e in acc.Images("samples")] == [2, 3, 4, 5]


def test_tensorboard_fills_in_a_run_trained_without_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    argv = ["train", "--run-dir", str(run), *CLI_TINY, "--sample-every", "100"]
    assert cli.main([*argv, "--steps", "2"]) == 0
    assert not (run / tracking.TENSORBOARD_DIR).exists(), "no events without --report-to"
    assert cli.main([*argv, "--steps", "3", "--report-to", "tensorboard"]) == 0
    assert [e.step for e in _events(run).Scalars("train/loss")] == [1, 2, 3]


def test_report_to_without_tensorboard_is_one_line_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "torch.utils.tensorboard":
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    run = tmp_path / "run"
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", str(run), *CLI_TINY, "--steps", "1", "--report-to", "tensorboard"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install tensorboard" in err
    assert not run.exists(), "nothing trained"
