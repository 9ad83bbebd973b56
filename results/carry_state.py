"""Carry an unfinished comparison folder from one machine to the next through the repository.

A CPU comparison under the v2 protocol takes longer than one working session, and each session may start on a
fresh machine. ``pack`` copies what ``compare`` needs to resume a folder into a (committable) folder, and ``unpack``
restores it. What is kept, per run directory:

- every small file (configs, logs, ownership markers, ``model.safetensors``, grids), and every cached evaluation
  (``eval*/seed*/NAME.json`` + ``.npz``: a cached row is never sampled again);
- the newest training state (``checkpoints/state-*.pt``) of a run that may still train. A run that is *closed*
  (a stage-2 run at its final step; a stage-1 phase whose successor exists; the last stage-1 phase once a stage-2
  run of its seed exists) keeps only a placeholder under the state's name: ``rundir.is_finished`` reads the step
  from the file name and the step of ``model.safetensors``, and ``compare`` never loads the state of a finished
  run. A placeholder is plain text, so a resume that tried to load it as a state would fail loudly;
- the EMA snapshots that autoguidance uses as its weaker guides (stage 1's first phase after K chunks, the
  budget's ``stage1-chunkK`` names), and any snapshot whose learning-curve point is not cached yet; the others
  served the learning curve and are never read again.

Usage, from the repository root, venv active:

    python results/carry_state.py pack runs/fmnist-fair-v2 results/fmnist-fair-v2/state
    python results/carry_state.py unpack results/fmnist-fair-v2/state runs/fmnist-fair-v2

``unpack`` refuses a destination that exists and is not empty; ``pack`` replaces its destination.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

PLACEHOLDER = "packed by results/carry_state.py: this run was finished; its training state was not carried\n"
STATE = re.compile(r"state-(\d{8})\.pt")
SNAPSHOT = re.compile(r"ema-(\d{8})\.safetensors")


def _guide_steps(budget: dict) -> set[int]:
    """The stage-1 first-phase steps the budget's autoguidance grids use as weaker guides."""
    chunk = budget["stage1"]["chunk_steps"]
    steps = set()
    for grid in budget.get("guidance_grids", []) or []:
        for guide in grid.get("guides", []) or []:
            m = re.fullmatch(r"stage1-chunk(\d+)", guide)
            if m:
                steps.add(int(m.group(1)) * chunk)
    return steps


def _closed(run: Path, budget: dict) -> bool:
    """A run directory that never trains again (see the module docstring)."""
    root, name = run.parent, run.name
    if not name.startswith("stage1-"):
        states = sorted((run / "checkpoints").glob("state-*.pt"))
        return bool(states) and int(STATE.fullmatch(states[-1].name).group(1)) >= budget["finetune_steps"]
    branches = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("stage1-", "uncond"))]
    if name == "stage1-mse":
        return bool(branches)
    phase = int(name.removeprefix("stage1-phase"))
    return (root / f"stage1-phase{phase + 1}").is_dir() or (root / "stage1-mse").is_dir()


def _curve_cached(src: Path, run: Path, step: int, phases: int) -> bool:
    """Whether the learning-curve point of a stage-1 snapshot is cached (``teacher.train_to_plateau`` names it
    ``curve-phase{p}-step{N}``): then the snapshot is never read again. Other snapshots are kept."""
    if not run.name.startswith("stage1-"):
        return False
    phase = phases - 1 if run.name == "stage1-mse" else int(run.name.removeprefix("stage1-phase"))
    cache = src / "eval" / run.parent.name / f"curve-phase{phase}-step{step:08d}"
    return all((cache.parent / (cache.name + ext)).is_file() for ext in (".json", ".npz"))


def pack(src: Path, dest: Path) -> None:
    budget = json.loads((src / "budget.json").read_text())
    guides = _guide_steps(budget)
    if dest.exists():
        shutil.rmtree(dest)
    kept, placeholders, size = 0, 0, 0
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(src)
        target = dest / rel
        run = path.parent.parent
        if path.parent.name == "checkpoints" and STATE.fullmatch(path.name):
            newest = sorted(path.parent.glob("state-*.pt"))[-1]
            if path != newest:
                continue
            if _closed(run, budget):
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(PLACEHOLDER)
                placeholders += 1
                continue
        elif path.parent.name == "snapshots" and SNAPSHOT.fullmatch(path.name):
            step = int(SNAPSHOT.fullmatch(path.name).group(1))
            guide = run.name == "stage1-phase0" and step in guides
            if not guide and _curve_cached(src, run, step, len(budget["stage1"]["lrs"])):
                continue
        elif path.name.endswith((".lock", ".tmp")):
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        kept += 1
        size += path.stat().st_size
    print(f"packed {src} into {dest}: {kept} files ({size / 1e6:.1f} MB), {placeholders} finished-run placeholders")


def unpack(src: Path, dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        print(f"error: {dest} exists and is not empty; unpack into a new folder (or remove it first)", file=sys.stderr)
        raise SystemExit(2)
    shutil.copytree(src, dest, dirs_exist_ok=True)
    print(f"unpacked {src} into {dest}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("pack", "unpack"))
    p.add_argument("src", type=Path)
    p.add_argument("dest", type=Path)
    args = p.parse_args()
    if not args.src.is_dir():
        print(
            f"error: {args.src} is not a folder; give the comparison folder (pack) or the packed one (unpack)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    (pack if args.action == "pack" else unpack)(args.src, args.dest)


if __name__ == "__main__":
    main()
