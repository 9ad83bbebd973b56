"""The comparison report's plots: the teacher's curve with its per-chunk gains and the training losses, and the
metric against the CFG scale of the v1 rows. Rendering only: every number comes from ``results``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.experiments.report_sections import LABELS, seed_values


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """Left: the teacher's criterion vs images (each seed), stage 2 starting at the last point. Right: training MSE
    loss vs images for stage 1 and both stage-2 branches of seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_gains = any(p.get("gain") for t in results["teachers"].values() for p in t["points"])
    fig, axes = plt.subplots(1, 3 if with_gains else 2, figsize=(16 if with_gains else 11, 4))
    ax, bx = axes[0], axes[-1]
    crit = results["criterion"]["key"]
    if with_gains:
        plot_gains(results, axes[1], LABELS.get(crit, (crit,))[0])
    for name, t in results["teachers"].items():
        pts = t["points"]
        if not pts:
            continue
        x = [p["images"] for p in pts]
        ax.errorbar(
            x, [p["value"] for p in pts], yerr=[2 * p["se"] for p in pts], marker="o", ms=3, capsize=2, label=name
        )
        ax.axvline(x[-1], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("images seen in stage 1")
    ax.set_ylabel(f"{LABELS.get(crit, (crit,))[0]} (± 2 SE)")
    ax.set_title("teacher curve; dotted: stage 2 starts")
    if ax.get_legend_handles_labels()[0]:  # a teacher brought by the user has no curve
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    series = results.get("training_losses", {})
    stage1 = series.get("stage1", [[], []])
    bx.plot(*stage1, color="C0", lw=0.8, label="stage 1 (MSE)")
    for i, branch in enumerate(("mse-continued", "self-perceptual")):
        if branch in series:
            bx.plot(*series[branch], color=f"C{i + 1}", lw=0.8, label=f"stage 2: {branch} (its MSE)")
    bx.set_yscale("log")
    bx.set_xlabel("images seen (seed 0)")
    bx.set_ylabel("training MSE loss (log)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gains(results: dict[str, Any], ax: Any, crit_label: str) -> None:
    """Each chunk's gain over the previous one with its interval (the plateau rule's evidence), per seed."""
    for i, (name, t) in enumerate(results["teachers"].items()):
        pts = [p for p in t["points"] if p.get("gain")]
        if not pts:
            continue
        x = [p["images"] + i * 0.004 * pts[-1]["images"] for p in pts]  # a small offset keeps seeds apart
        est = [p["gain"]["estimate"] for p in pts]
        err = [[e - p["gain"]["low"] for e, p in zip(est, pts)], [p["gain"]["high"] - e for e, p in zip(est, pts)]]
        ax.errorbar(x, est, yerr=err, fmt="o", ms=3, capsize=2, label=name)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("images seen in stage 1")
    ax.set_ylabel(f"gain in {crit_label} over the previous chunk")
    ax.set_title("per-chunk gain, 95% interval (a plateau: interval reaches 0)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def plot_cfg(results: dict[str, Any], path: Path, metric: str) -> Path | None:
    """The metric against the CFG scale for MSE continued (one line per rescale), self-perceptual as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r for r in results["rows"] if r["model"] == "mse-continued" and r["guidance"] == "cfg"]
    if not keys or not seed_values(results, "mse-continued/none", metric):
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    base = float(np.mean(seed_values(results, "mse-continued/none", metric)))
    for phi in sorted({r["guidance_rescale"] for r in keys}):
        pts = sorted(
            (r["cfg_scale"], float(np.mean(seed_values(results, r["key"], metric))))
            for r in keys
            if r["guidance_rescale"] == phi
        )
        x, y = zip(*([(1.0, base)] + pts))
        ax.plot(x, y, marker="o", label=f"MSE continued + CFG, rescale {phi:g}")
    sp = seed_values(results, "self-perceptual/none", metric)
    if sp:
        ax.axhline(float(np.mean(sp)), color="C3", label="self-perceptual, no guidance")
    ax.set_xscale("log")
    if metric in ("fid", "kid"):
        ax.set_yscale("log")
    ax.set_xlabel("CFG scale w (1 = no guidance)")
    ax.set_ylabel(LABELS.get(metric, (metric,))[0])
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
