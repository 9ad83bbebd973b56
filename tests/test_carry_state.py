"""results/carry_state.py: what a packed comparison folder keeps (so that it resumes on a fresh machine) and drops."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "results" / "carry_state.py"
spec = importlib.util.spec_from_file_location("carry_state", SCRIPT)
carry_state = importlib.util.module_from_spec(spec)
spec.loader.exec_module(carry_state)

BUDGET = {
    "stage1": {"lrs": [2e-3, 2e-4], "chunk_steps": 500},
    "finetune_steps": 1000,
    "guidance_grids": [{"method": "cfg", "guides": []}, {"method": "autoguidance", "guides": ["stage1-chunk1"]}],
}


def _touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _run(root: Path, name: str, states: list[int], snapshots: list[int] = ()) -> Path:
    run = root / name
    _touch(run / "config.json", "{}")
    _touch(run / "model.safetensors", "weights")
    for step in states:
        _touch(run / "checkpoints" / f"state-{step:08d}.pt", f"state {step}")
    for step in snapshots:
        _touch(run / "snapshots" / f"ema-{step:08d}.safetensors", f"ema {step}")
    return run


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "cmp"
    _touch(out / "budget.json", json.dumps(BUDGET))
    _touch(out / ".perceptual-diffusion.json", "{}")
    # seed 0: stage 1 done (both phases), its stage-2 sweep half done
    s0 = out / "seed0"
    _run(s0, "stage1-phase0", [1000, 1500], [500, 1000, 1500])
    _run(s0, "stage1-mse", [500, 1000], [500, 1000])
    _run(s0, "mse-continued-lr0.0002", [1000])
    _run(s0, "self-perceptual-lr0.0002", [500])
    _touch(s0 / "stage1-mse" / ".lock")
    # seed 1: still in stage 1's first phase; its last snapshot's curve point is not evaluated yet
    _run(out / "seed1", "stage1-phase0", [1000], [500, 1000])
    for seed, phase, step in [(0, 0, 500), (0, 0, 1000), (0, 0, 1500), (0, 1, 500), (0, 1, 1000), (1, 0, 500)]:
        for ext in (".json", ".npz"):
            _touch(out / "eval" / f"seed{seed}" / f"curve-phase{phase}-step{step:08d}{ext}")
    return out


def test_pack_keeps_what_resuming_reads_and_drops_the_rest(folder: Path, tmp_path: Path) -> None:
    packed = tmp_path / "packed"
    carry_state.pack(folder, packed)
    kept = {p.relative_to(packed).as_posix() for p in packed.rglob("*") if p.is_file()}
    # every small file, every cached evaluation, the marker; never a lock
    assert {"budget.json", ".perceptual-diffusion.json", "eval/seed1/curve-phase0-step00000500.npz"} <= kept
    assert "seed0/stage1-mse/.lock" not in kept
    # only the newest state of each run; closed runs keep a placeholder under its name, open ones the state itself
    placeholder = carry_state.PLACEHOLDER
    closed_runs = (
        "seed0/stage1-phase0/checkpoints/state-00001500.pt",
        "seed0/stage1-mse/checkpoints/state-00001000.pt",
        "seed0/mse-continued-lr0.0002/checkpoints/state-00001000.pt",
    )
    for closed in closed_runs:
        assert (packed / closed).read_text() == placeholder, closed
    for open_run in ("seed0/self-perceptual-lr0.0002/checkpoints/state-00000500.pt",
                     "seed1/stage1-phase0/checkpoints/state-00001000.pt"):  # fmt: skip
        assert (packed / open_run).read_text().startswith("state"), open_run
    assert "seed0/stage1-phase0/checkpoints/state-00001000.pt" not in kept
    # snapshots: autoguidance's guide (first phase, chunk 1 = step 500) and the uncached curve point only
    snapshots = sorted(k for k in kept if "/snapshots/" in k)
    assert snapshots == [
        "seed0/stage1-phase0/snapshots/ema-00000500.safetensors",
        "seed1/stage1-phase0/snapshots/ema-00000500.safetensors",
        "seed1/stage1-phase0/snapshots/ema-00001000.safetensors",
    ]


def test_unpack_restores_and_refuses_a_folder_that_holds_anything(folder: Path, tmp_path: Path) -> None:
    packed, restored = tmp_path / "packed", tmp_path / "restored"
    carry_state.pack(folder, packed)
    carry_state.unpack(packed, restored)
    assert (restored / "seed0" / "stage1-mse" / "model.safetensors").read_text() == "weights"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "unpack", str(packed), str(restored)], capture_output=True, text=True
    )
    assert done.returncode == 2 and done.stderr.count("error:") == 1 and "not empty" in done.stderr
    done = subprocess.run([sys.executable, str(SCRIPT), "pack", str(tmp_path / "none"), str(packed)], text=True,
                          capture_output=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error:")
