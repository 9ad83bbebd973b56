"""Nothing lost: atomic checkpoint and snapshot writes, the last K checkpoints kept, a non-finite loss or gradient
stopping the run with the step named and the last good checkpoint kept."""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY, assert_same_run, tiny_config

from perceptual_diffusion import checkpoint as ckpt
from perceptual_diffusion import cli, training
from perceptual_diffusion.errors import TrainingDiverged, UserError


def _disk_full_after(nbytes: int):
    """A ``torch.save`` stand-in that writes ``nbytes`` of the real file, then fails like a full disk."""
    real_save = torch.save

    def save(obj, path):
        real_save(obj, path)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[:nbytes])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return save


def test_atomic_write_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    ckpt.atomic_write(target, lambda tmp: tmp.write_bytes(b"old"))

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        ckpt.atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "temporary file left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # the umask's permissions, not mkstemp's 0600


def test_save_state_failure_keeps_previous_checkpoint_loadable(tmp_path: Path, monkeypatch) -> None:
    state = {"step": 1, "model": {"w": torch.ones(3)}, "ema": {}, "optimizer": {}}
    ckpt.save_state(tmp_path, 1, state, keep=1)
    monkeypatch.setattr(ckpt.torch, "save", _disk_full_after(100))
    with pytest.raises(OSError):
        ckpt.save_state(tmp_path, 2, {**state, "step": 2}, keep=1)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["state-00000001.pt"], "old state pruned before new one"
    assert ckpt.latest_state(tmp_path)["step"] == 1
    assert not list(tmp_path.rglob(f"*{ckpt.TMP_SUFFIX}"))


def test_snapshot_write_failure_keeps_previous_snapshot(tmp_path: Path, monkeypatch) -> None:
    config = tiny_config()
    ckpt.save_weights(tmp_path / "model.safetensors", {"w": torch.ones(2)}, config, 1)

    def failing_save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 10)
        raise RuntimeError("simulated crash midway through the snapshot")

    monkeypatch.setattr(ckpt, "save_file", failing_save_file)
    with pytest.raises(RuntimeError):
        ckpt.save_weights(tmp_path / "model.safetensors", {"w": torch.zeros(2)}, config, 2)
    weights, _, step = ckpt.read_weights(tmp_path / "model.safetensors")
    assert step == 1 and torch.equal(weights["w"], torch.ones(2))


def test_full_disk_during_training_stops_cleanly_and_resume_matches(tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk at the 2nd checkpoint: one-line error naming the step and the intact checkpoint; rerun resumes."""
    argv = ["train", *CLI_TINY, "--steps", "5", "--checkpoint-every", "2", "--sample-every", "100", "--seed", "1"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "reference")]) == 0
    real_save, calls = torch.save, {"n": 0}

    def save_fails_second_time(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:
            return _disk_full_after(1000)(obj, path)
        return real_save(obj, path)

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        mp.setattr(ckpt.torch, "save", save_fails_second_time)
        capsys.readouterr()
        assert cli.main([*argv, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not write the checkpoint at step 4")
    assert "No space left on device" in err and "state-00000002.pt is intact" in err
    assert ckpt.latest_state(run)["step"] == 2
    assert ckpt.weights_step(run / "model.safetensors") == 2
    assert cli.main([*argv, "--run-dir", str(run)]) == 0
    assert_same_run(tmp_path / "reference", run)


def test_keeps_last_k_checkpoints(tmp_path: Path) -> None:
    training.train(tiny_config(steps=7, checkpoint_every=1, keep_checkpoints=3), tmp_path)
    assert [p.name for p in ckpt.list_states(tmp_path)] == [f"state-0000000{s}.pt" for s in (5, 6, 7)]
    assert ckpt.weights_step(tmp_path / "model.safetensors") == 7


def _poison(monkeypatch, at_call: int, how: str) -> None:
    """Wrap the loss so that its ``at_call``-th call (step ``at_call``) yields a NaN loss, NaN gradients or inf
    weights."""
    real_build = training.build_loss

    class NaNGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def build(config, teacher=None):
        loss_fn, calls = real_build(config, teacher), {"n": 0}

        def poisoned(model, x0, cond, gen):
            terms = loss_fn(model, x0, cond, gen)
            calls["n"] += 1
            if calls["n"] == at_call:
                if how == "loss":
                    terms = {**terms, "loss": terms["loss"] * float("nan")}
                elif how == "gradient":
                    terms = {**terms, "loss": NaNGradient.apply(terms["loss"])}
                else:  # the weights themselves: a finite loss and gradient, but an overflowing parameter
                    with torch.no_grad():
                        model.unet.conv_out.bias.fill_(float("inf"))
            return terms

        return poisoned

    monkeypatch.setattr(training, "build_loss", build)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("loss", "loss became nan at step 5"),
        ("gradient", "gradients became non-finite at step 5"),
        ("weights", "weights became non-finite by step 5"),
    ],
)
def test_non_finite_stops_with_step_and_keeps_last_good_checkpoint(tmp_path: Path, monkeypatch, how, message):
    _poison(monkeypatch, at_call=5, how=how)
    with pytest.raises(TrainingDiverged) as exc:
        training.train(tiny_config(steps=8, checkpoint_every=1, keep_checkpoints=2), tmp_path)
    assert message in str(exc.value)
    assert "state-00000004.pt" in str(exc.value)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["state-00000003.pt", "state-00000004.pt"]
    state = ckpt.latest_state(tmp_path)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for part in ("model", "ema") for t in state[part].values())
    weights, _, step = ckpt.read_weights(tmp_path)
    assert step == 4 and all(torch.isfinite(t).all() for t in weights.values())


def test_non_finite_loss_through_cli_is_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    _poison(monkeypatch, at_call=2, how="loss")
    rc = cli.main(["train", *CLI_TINY, "--steps", "3", "--checkpoint-every", "1", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "loss became nan at step 2" in err and "Traceback" not in err


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path: Path) -> None:
    """A newest state cut short (a copy interrupted, a disk error) is named in a warning; the previous one is used
    and the rerun ends bit-identical."""
    config = tiny_config(steps=6, checkpoint_every=2, keep_checkpoints=3, sample_every=2)
    training.train(config, tmp_path / "reference")
    training.train(tiny_config(steps=4, checkpoint_every=2, keep_checkpoints=3, sample_every=2), tmp_path / "run")
    newest = ckpt.state_path(tmp_path / "run", 4)
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.warns(UserWarning, match="skipping checkpoint state-00000004.pt"):
        training.train(config, tmp_path / "run")
    assert_same_run(tmp_path / "reference", tmp_path / "run")


def test_second_trainer_in_same_run_dir_is_refused(tmp_path: Path) -> None:
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another process is training"):
            training.train(tiny_config(steps=1), tmp_path)
