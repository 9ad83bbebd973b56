"""Outputs before prints, and endings that read well: a closed stdout (``| head -n1``, ``| true``) costs no output file
and is no error; SIGTERM ends every command with one line saying whether a rerun resumes, and exit 143."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _runs import torch_threads_env

from perceptual_diffusion import cli
from perceptual_diffusion.cli import commands
from perceptual_diffusion.runtime import checkpoint as ckpt


class ClosedPipe(io.StringIO):
    """stdout whose reader has gone: every write and flush raises as a real pipe does."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_sample_into_a_closed_stdout_writes_the_grid_and_the_npz(
    trained_mse_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """`sample --out G --npz Z | true` once wrote G, then failed on the print with 'cannot write the samples'."""
    grid, npz = tmp_path / "g.png", tmp_path / "z.npz"
    argv = ["sample", str(trained_mse_run), "-n", "4", "--steps", "1", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main([*argv, "--out", str(grid), "--npz", str(npz)]) == 0
    assert grid.stat().st_size > 0 and npz.stat().st_size > 0
    assert "error" not in capsys.readouterr().err


def test_evaluate_into_a_closed_stdout_still_writes_its_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, tiny_cli_train: list[str]
) -> None:
    """`evaluate ... | head -n1`: the table print used to raise before the JSON was written."""
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    run, out = tmp_path / "run", tmp_path / "eval.json"
    options = [*tiny_cli_train, "--image-size", "16", "--sample-every", "100", "--steps", "1"]  # the domain features'
    assert cli.main(["train", "--run-dir", str(run), *options]) == 0
    argv = ["evaluate", str(run), "-n", "12", "--steps", "1", "--device", "cpu", "--no-progress"]
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main([*argv, "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["n_samples"] == 12
    assert "error" not in capsys.readouterr().err


def test_a_real_closed_pipe_ends_quietly_with_exit_0() -> None:
    """The interpreter's own flush at exit must not complain either ("Exception ignored ... BrokenPipeError")."""
    read, write = os.pipe()
    os.close(read)  # no reader at all: the first write gets EPIPE
    try:
        done = subprocess.run(
            [sys.executable, "-m", "perceptual_diffusion.cli", "--help"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def _terminating(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Replace a command by one that receives SIGTERM in the middle of its work."""

    def run(args) -> None:  # noqa: ANN001, ARG001
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not stop the command")

    monkeypatch.setattr(commands, name, run)


@pytest.mark.parametrize(
    ("argv", "command", "line"),
    [
        (["compare", "--out", "x"], "cmd_compare", "interrupted; rerun the same command to resume"),
        (["demo"], "cmd_demo", "interrupted; rerun the same command to resume"),
        (["ablate", "--out", "x"], "cmd_ablate", "interrupted; rerun the same command to resume"),
        (["evaluate", "run"], "cmd_evaluate", "interrupted; nothing was left half-written"),
        (["sample", "run"], "cmd_sample", "interrupted; nothing was left half-written"),
        (["train-classifier", "--data", "shapes", "--out", "c"], "cmd_train_classifier", "interrupted; nothing"),
    ],
    ids=["compare", "demo", "ablate", "evaluate", "sample", "train-classifier"],
)
def test_sigterm_ends_every_command_with_one_line_and_exit_143(
    argv: list[str], command: str, line: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _terminating(monkeypatch, command)
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(argv) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err
    assert signal.getsignal(signal.SIGTERM) is before, "main leaves the process's handler as it found it"


@pytest.mark.slow
def test_sigterm_stops_a_real_training_run_which_then_resumes(tmp_path: Path, tiny_cli_train: list[str]) -> None:
    run = tmp_path / "run"
    options = [o for o in tiny_cli_train if o != "--no-progress"] + ["--checkpoint-every", "2", "--image-size", "8"]
    argv = [sys.executable, "-m", "perceptual_diffusion.cli", "train", "--run-dir", str(run), *options]
    proc = subprocess.Popen([*argv, "--steps", "100000"], stderr=subprocess.PIPE, text=True, env=torch_threads_env())
    try:
        deadline = time.monotonic() + 120
        while not list((run / "checkpoints").glob("state-*.pt")) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.splitlines()[-1] == "interrupted; rerun the same command to resume" and "Traceback" not in err
    assert "\r" not in err, "stderr is not a terminal: plain progress lines, no bar"
    step = ckpt.load_state(ckpt.list_states(run)[-1])["step"]
    assert cli.main(["train", "--run-dir", str(run), *options, "--steps", str(step + 1)]) == 0, "lock freed: resumes"
    assert ckpt.weights_step(run / ckpt.WEIGHTS_NAME) == step + 1


def test_no_matplotlib_legend_warning_reaches_the_terminal(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A plot whose series have no labels (a teacher brought by the user has no curve) asked matplotlib for a legend,
    and "No artists with labels found to put in legend" reached the user's terminal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plots(args) -> None:  # noqa: ANN001, ARG001
        fig, ax = plt.subplots()
        ax.plot([0, 1], [0, 1])  # no label
        ax.legend()
        plt.close(fig)
        print("wrote the report")

    monkeypatch.setattr(commands, "cmd_compare", plots)
    assert cli.main(["compare", "--out", "x"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "wrote the report\n" and captured.err == "", captured.err


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to "
            "allocate 8000000000000 bytes. Error code 12 (Cannot allocate memory)"
        ),
        MemoryError("Unable to allocate 246. TiB for an array with shape (10, 9000000000001, 3) and data type uint8"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
    ids=["torch-cpu", "numpy", "cuda"],
)
def test_running_out_of_memory_is_one_line(error: Exception, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """A batch or grid too large for the machine was a traceback deep in torch or numpy."""

    def allocates(args) -> None:  # noqa: ANN001, ARG001
        raise error

    monkeypatch.setattr(commands, "cmd_sample", allocates)
    assert cli.main(["sample", "run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of memory (") and "--batch-size" in err, err


def test_other_runtime_errors_are_not_taken_for_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    def fails(args) -> None:  # noqa: ANN001, ARG001
        raise RuntimeError("a bug")

    monkeypatch.setattr(commands, "cmd_sample", fails)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["sample", "run"])
