"""Every guidance baseline at its best setting: each method's grid (``budgets.GuidanceGrid``) is evaluated on the
held-out selection seeds for every training seed, the setting with the best criterion averaged over training seeds
is chosen (as stage 2's learning rate is), and a grid whose best scale sits at an end is extended past that end
(towards w = 1 below, x1.5 above) up to ``Budget.grid_extensions`` times. The report says where each chosen setting
sits in its grid, so a reader can see that the optimum was bracketed or that it was not.

The paper (arXiv 2401.00110, Sec. 5) compares the self-perceptual model without guidance against MSE with CFG; a fair
version of that comparison needs CFG (and the guidance methods people use now) at their own best settings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.experiments.budgets import GuidanceGrid
from perceptual_diffusion.experiments.rows import Row
from perceptual_diffusion.experiments.workspace import Context, log

BASELINE = "mse-continued"  # the model every guidance method is applied to: MSE training continued


def grid_rows(grid: GuidanceGrid, scales: list[float], model: str = BASELINE) -> list[Row]:
    """Every setting of ``grid`` at ``scales`` as a row of ``model``."""
    rows = []
    for w, phi, r, (lo, hi), guide in itertools.product(
        scales, grid.rescales, grid.apg_thresholds, grid.intervals, grid.guides or (None,)
    ):
        kind = {"interval": "cfg"}.get(grid.method, grid.method)
        rows.append(Row(model, kind, w, phi, lo, hi, r, guide))  # type: ignore[arg-type]
    return rows


def extension(scales: list[float], best: float) -> float | None:
    """The next scale to try when ``best`` is at an end of ``scales``: half way to 1 below, x1.5 above."""
    if best == max(scales):
        return round(best * 1.5, 4)
    if best == min(scales) and best > 1.0:
        step = round(1.0 + (best - 1.0) / 2, 4)
        return step if step > 1.0 else None
    return None


@dataclass
class Selection:
    """One method's grid, evaluated: every setting's mean criterion over training seeds, and the best."""

    method: str
    scales: list[float]
    points: dict[str, dict[str, Any]] = field(default_factory=dict)  # slug -> {"row", "per_seed", "mean"}
    best: Row | None = None
    extensions: int = 0
    position: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "scales": self.scales,
            "points": self.points,
            "best": self.best.to_dict() if self.best else None,
            "extensions": self.extensions,
            "position": self.position,
            "note": self.note,
        }


def _position(grid: GuidanceGrid, scales: list[float], best: Row, extensions: int, limit: int) -> str:
    """Where the chosen setting sits in its grid, in words."""
    w, ordered = best.cfg_scale, sorted(scales)
    if w not in (ordered[0], ordered[-1]):
        where = f"w={w:g} is inside the tried range {ordered[0]:g}-{ordered[-1]:g}"
    else:
        end = "lowest" if w == ordered[0] else "highest"
        where = f"w={w:g} is the {end} tried ({ordered[0]:g}-{ordered[-1]:g})"
        if extensions >= limit and not (end == "lowest" and extension(ordered, w) is None):
            where += f", still an end after {extensions} extension(s): a setting beyond it might do better"
        elif end == "lowest" and extension(ordered, w) is None:
            where += ", next to no guidance"
    if extensions and "still an end" not in where:
        where += f" (after {extensions} extension(s) of the grid)"
    others = []
    if len(grid.rescales) > 1:
        others.append(f"φ={best.guidance_rescale:g} of {', '.join(f'{x:g}' for x in grid.rescales)}")
    if len(grid.apg_thresholds) > 1:
        names = ", ".join("default" if x is None else f"{x:g}" for x in grid.apg_thresholds)
        others.append(f"r={'default' if best.apg_threshold is None else f'{best.apg_threshold:g}'} of {names}")
    if len(grid.intervals) > 1:
        hi = "∞" if best.sigma_max is None else f"{best.sigma_max:g}"
        others.append(f"σ∈[{best.sigma_min:g}, {hi}] of {len(grid.intervals)} intervals")
    if len(grid.guides) > 1:
        others.append(f"guide {best.guide} of {', '.join(grid.guides)}")
    return where + (f"; {'; '.join(others)}" if others else "")


def select_guidance(
    ctx: Context,
    my_seeds: list[int],
    all_seeds: list[int],
    evaluate: Callable[[Row, int], float],
    done: Callable[[Row, int], bool],
    model: str = BASELINE,
) -> dict[str, Selection] | None:
    """Each grid's best setting applied to ``model`` (MSE continued, or its LoRA form), or None while other
    processes still have grid points to evaluate.

    ``evaluate(row, seed)`` returns the criterion of ``row`` on the selection seeds (cached); ``done(row, seed)``
    says whether that evaluation exists (for the seeds of other processes)."""
    budget, crit = ctx.budget, ctx.criterion
    sign = 1.0 if crit.higher_is_better else -1.0
    out: dict[str, Selection] = {}
    waiting = False
    for grid in budget.guidance_grids:
        if grid.method == "autoguidance" and budget.teacher is not None:
            note = "skipped: a teacher brought by the user has no stage-1 snapshots to serve as weaker guides"
            out[grid.method] = Selection(grid.method, list(grid.scales), note=note)
            continue
        sel = Selection(grid.method, list(grid.scales))
        while True:
            rows = grid_rows(grid, sel.scales, model)
            for seed in my_seeds:
                for row in rows:
                    evaluate(row, seed)
            missing = [s for s in all_seeds if s not in my_seeds and not all(done(r, s) for r in rows)]
            if missing:
                waiting = True
                break
            for row in rows:
                values = [evaluate(row, s) for s in all_seeds]
                sel.points[row.slug] = {"row": row.to_dict(), "per_seed": values, "mean": float(np.mean(values))}
            best = max(rows, key=lambda r: sign * sel.points[r.slug]["mean"])
            nxt = extension(sel.scales, best.cfg_scale) if sel.extensions < budget.grid_extensions else None
            if nxt is None or nxt in sel.scales:
                sel.best = best
                sel.position = _position(grid, sel.scales, best, sel.extensions, budget.grid_extensions)
                break
            sel.scales.append(nxt)
            sel.extensions += 1
            log(f"guidance grid {grid.method} of {model}: best w={best.cfg_scale:g} at an end, extending to w={nxt:g}")
        out[grid.method] = sel
    if waiting:
        log("other seeds have guidance-grid points left: rerun without --seeds (or with theirs) to continue")
        return None
    return out


def guide_path(ctx: Context, seed: int, guide: str | None, teacher: Path) -> Path:
    """The weaker model of autoguidance: ``stage1-chunkK`` is stage 1's first-phase EMA snapshot after K chunks
    (trained for less time, as Karras et al. 2024, arXiv 2406.02507, Sec. 3, guide with); None is the teacher (v1)."""
    from perceptual_diffusion.experiments.teacher import phase_dir
    from perceptual_diffusion.training.rundir import snapshot_path

    if guide is None:
        return teacher
    steps = int(guide.removeprefix("stage1-chunk")) * ctx.budget.stage1.chunk_steps
    return snapshot_path(phase_dir(ctx.root(seed), 0, len(ctx.budget.stage1.lrs)), steps)
