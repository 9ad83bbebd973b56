"""The prepared GPU comparison script, run on the CPU with tiny sizes: it must finish and pack its report."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "schedule"), [("unet", "ddpm"), ("dit", "flow")])
def test_gpu_compare_script_runs_tiny_on_the_cpu_and_packs_the_report(tmp_path, arch: str, schedule: str) -> None:
    env = {
        **os.environ,
        "ARCH": arch,
        "SCHEDULE": schedule,
        "OUT": str(tmp_path / "out"),
        "RUN": str(tmp_path / "run"),
        "DATA": "shapes",
        "PRESET": "tiny",
        "BATCH": "8",
        "STEPS": "2",
        "FINETUNE": "1",
        "SAMPLES": "12",
        "CURVE": "12",
        "SEEDS": "1",
        "BOOTSTRAP": "20",
        "TIME_BOX": "1800",  # the CPU test is not timed; a GPU run keeps the 7-minute box
        # The script's plumbing, not the GPU budget's grids and Inception rows (3-4 images/s on this CPU).
        "EXTRA_ARGS": "--no-inception --no-guidance-grids",
        "DEVICE": "cpu",
        "PD_CACHE_DIR": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_compare.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    timing = (tmp_path / "out" / "timing.log").read_text()
    assert done.returncode == 0, timing + done.stderr[-2000:]
    assert "exit 0" in timing and "round 2 done" in timing
    with tarfile.open(tmp_path / "out" / "gpu-compare.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"./report.md", "./results.json", "./curves.png"} <= names
    assert not any(n.endswith(".safetensors") for n in names), "weights stay out of the archive"
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Self-perceptual vs MSE")


def test_without_cuda_the_script_says_why_in_one_line_and_starts_nothing(tmp_path) -> None:
    """It once started 7 processes that all failed and packed a tarball, with the reason only in their logs."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "RUN": str(tmp_path / "run"), "DEVICE": "cuda"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_compare.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ") and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists(), "nothing made, nothing packed"
