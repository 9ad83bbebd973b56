"""Nothing lost: atomic checkpoint and snapshot writes, the last K checkpoints kept, a non-finite loss or gradient
stopping the run with the step named and the last good checkpoint kept."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY, assert_same_run, tiny_config, torch_threads_env
from safetensors import SafetensorError

from perceptual_diffusion import cli
from perceptual_diffusion.errors import TrainingDiverged, UserError
from perceptual_diffusion.models import loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training


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
    weights, _, step = loading.read_weights(tmp_path / "model.safetensors")
    assert step == 1 and torch.equal(weights["w"], torch.ones(2))


def _torch_zip_writer_full(nbytes: int):
    """A ``torch.save`` stand-in failing as torch's zip writer does on a full disk: not an OSError but a RuntimeError
    ("unexpected pos"), after a partial file."""
    real_save = torch.save

    def save(obj, path):
        real_save(obj, path)
        Path(path).write_bytes(Path(path).read_bytes()[:nbytes])
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1000640 vs 1000528")

    return save


def _safetensors_full(tensors, filename, metadata=None):
    """A ``save_file`` stand-in failing as safetensors' Rust writer does on a full disk: a SafetensorError."""
    Path(filename).write_bytes(b"\x00" * 100)
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


class _NoSpaceLeft:
    """What ``os.statvfs`` says of a full filesystem."""

    f_bavail, f_frsize = 0, 4096


# how the disk fills: (what fails, on which call, the checkpoint the message names as intact, states and snapshot
# step left behind)
FULL_DISK = {
    "oserror-at-state": ("torch.save", 2, "state-00000002.pt is intact", 2, 2),
    "torch-zip-writer-at-state": ("torch-zip", 2, "state-00000002.pt is intact", 2, 2),
    "safetensors-at-snapshot": ("save_file", 2, "state-00000004.pt is intact", 4, 2),
    "torch-zip-writer-at-first-state": ("torch-zip", 1, "no checkpoint had been written yet", None, None),
}


@pytest.mark.parametrize("case", list(FULL_DISK))
def test_full_disk_during_training_stops_cleanly_and_resume_matches(case, tmp_path: Path, monkeypatch, capsys) -> None:
    """A full disk at a checkpoint, however the writer reports it (OSError, torch's RuntimeError, safetensors'
    SafetensorError): one-line error naming the step, that files stayed consistent and what is intact; a rerun
    resumes and ends bit-identical to an uninterrupted run."""
    what, at_call, intact, state_step, snapshot_step = FULL_DISK[case]
    argv = ["train", *CLI_TINY, "--steps", "5", "--checkpoint-every", "2", "--sample-every", "100", "--seed", "1"]
    assert cli.main([*argv, "--run-dir", str(tmp_path / "reference")]) == 0
    real = {"torch.save": torch.save, "torch-zip": torch.save, "save_file": ckpt.save_file}[what]
    failing = {"torch.save": _disk_full_after(1000), "torch-zip": _torch_zip_writer_full(1000)}.get(what)
    failing = failing or _safetensors_full
    calls = {"n": 0}

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        return (failing if calls["n"] == at_call else real)(*args, **kwargs)

    run = tmp_path / "run"
    with monkeypatch.context() as mp:
        if what == "save_file":
            mp.setattr(ckpt, "save_file", fails_once)
        else:
            mp.setattr(ckpt.torch, "save", fails_once)
            mp.setattr(ckpt.os, "statvfs", lambda path: _NoSpaceLeft())
        capsys.readouterr()
        assert cli.main([*argv, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    step = 2 * at_call
    assert err.count("\n") == 1 and err.startswith(f"error: could not write the checkpoint at step {step}"), err
    assert "No space left on device" in err and "files stayed consistent" in err and intact in err, err
    assert (ckpt.latest_state(run) or {}).get("step") == state_step
    assert ckpt.weights_step(run / "model.safetensors") == snapshot_step
    assert not list(run.rglob(f"*{ckpt.TMP_SUFFIX}")), "temporary files left behind"
    assert cli.main([*argv, "--run-dir", str(run)]) == 0
    assert_same_run(tmp_path / "reference", run)


_REAL_FULL_DISK = """
import contextlib, io, json, sys
from pathlib import Path
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion import cli
out = {}
for mount in sys.argv[1:]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = cli.main(["train", "--run-dir", mount + "/run", *%r, "--steps", "4", "--checkpoint-every", "1",
                       "--keep-checkpoints", "1", "--sample-every", "100"])
    run = Path(mount) / "run"
    out[mount] = {"rc": rc, "err": err.getvalue(), "states": [p.name for p in ckpt.list_states(run)],
                  "readable": [ckpt.load_state(p)["step"] for p in ckpt.list_states(run)],
                  "snapshot": ckpt.weights_step(run / "model.safetensors"),
                  "leftovers": [str(p) for p in run.rglob("*" + ckpt.TMP_SUFFIX)]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_real_full_disk_during_checkpoint_is_one_line_and_keeps_files_consistent(tmp_path: Path) -> None:
    """On real, small tmpfs filesystems (mounted in a user and mount namespace, so no root is needed; skipped where
    that is not allowed): torch's zip writer and safetensors fail as they do on a real full disk."""
    sizes = {"1m": "state", "3m": "snapshot", "5m": "second state"}  # where the tiny run's disk fills up
    mounts = [tmp_path / size for size in sizes]
    for m in mounts:
        m.mkdir()
    mount_all = " && ".join(f"mount -t tmpfs -o size={m.name} none {m}" for m in mounts)
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", mount_all],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {probe.stderr.strip()[:200]}")
    script = _REAL_FULL_DISK % (CLI_TINY,)
    command = f"{mount_all} && exec {shlex.quote(sys.executable)} -c {shlex.quote(script)} " + " ".join(
        map(str, mounts)
    )
    done = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
        capture_output=True,
        text=True,
        timeout=300,
        env=torch_threads_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for mount in mounts:
        r = results[str(mount)]
        lines = [line for line in r["err"].splitlines() if not line.startswith("warning: ")]
        assert r["rc"] == 2 and len(lines) == 1, r["err"]
        assert lines[0].startswith("error: could not write the checkpoint at step"), r["err"]
        assert "No space left on device" in lines[0] and "files stayed consistent" in lines[0], r["err"]
        assert r["readable"] == [int(s[6:14]) for s in r["states"]], "a checkpoint left behind is not readable"
        assert not r["leftovers"], r["leftovers"]
    assert (
        results[str(mounts[0])]["states"] == []
        and "no checkpoint had been written yet" in results[str(mounts[0])]["err"]
    )
    for mount in mounts[1:]:  # the first checkpoint fitted: it is named, intact, and the snapshot is never newer
        r = results[str(mount)]
        assert r["states"] == ["state-00000001.pt"] and "state-00000001.pt is intact" in r["err"], r
        assert r["snapshot"] in (None, 1)


def test_keeps_last_k_checkpoints(tmp_path: Path) -> None:
    training.train(tiny_config(steps=7, checkpoint_every=1, keep_checkpoints=3), tmp_path)
    assert [p.name for p in ckpt.list_states(tmp_path)] == [f"state-0000000{s}.pt" for s in (5, 6, 7)]
    assert ckpt.weights_step(tmp_path / "model.safetensors") == 7


def test_a_kill_between_a_states_rename_and_the_pruning_is_pruned_on_resume(tmp_path: Path) -> None:
    """SIGKILL after the newest state is renamed into place but before the old ones are deleted leaves one state too
    many; the rerun (nothing left to train) prunes it, so the folder ends as an uninterrupted run's."""
    config = tiny_config(steps=4, checkpoint_every=1, keep_checkpoints=2)
    training.train(config, tmp_path)
    extra = ckpt.state_path(tmp_path, 2)
    shutil.copy(ckpt.state_path(tmp_path, 3), extra)  # what the kill leaves: an old state not yet deleted
    assert len(ckpt.list_states(tmp_path)) == 3
    training.train(config, tmp_path)
    assert [p.name for p in ckpt.list_states(tmp_path)] == ["state-00000003.pt", "state-00000004.pt"]


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

    def build(config, schedule, teacher=None, perceptual_net=None):
        loss_fn, calls = real_build(config, schedule, teacher, perceptual_net), {"n": 0}

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
    weights, _, step = loading.read_weights(tmp_path)
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
