"""Report sections of the v2 comparison (issue 22): each guidance method's grid and where its chosen setting sits,
the headline rows in the standard Inception features, and the criterion against the guidance scale on the held-out
selection seeds. Rendering only: every number comes from ``results``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.experiments.rows import Pair, Row

# (key in evaluation metrics, label, True if higher is better; None: neither, a diagnostic)
TABLE_METRICS = (
    ("structure_precision", "structure precision", True),
    ("exact_precision", "exact precision", True),
    ("noise_rms", "noise RMS", False),
    ("class_accuracy", "class match", True),
    ("fid", "FID", False),
    ("kid", "KID", False),
    ("is", "IS", True),
    ("precision", "precision", True),
    ("recall", "recall", True),
    ("coverage", "coverage", True),
    ("nearest_train_rms", "nearest-train RMS", None),
    ("grid_excess_db", "grid excess (dB)", False),
)
LABELS = {k: (label, higher) for k, label, higher in TABLE_METRICS}


def significant(d: dict[str, Any]) -> bool:
    """A paired difference whose 95% interval excludes 0."""
    return d["ci_low"] > 0 or d["ci_high"] < 0


def fmt_diff(d: dict[str, Any]) -> str:
    return f"{d['estimate']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"


def seed_values(results: dict[str, Any], key: str, metric: str) -> list[float]:
    """One value per training seed (the mean over its sampling repeats)."""
    values = []
    for per_seed in results["evaluations"].values():
        runs = [r[metric] for r in per_seed.get(key, []) if metric in r]
        if runs:
            values.append(float(np.mean(runs)))
    return values


# The metrics the Inception section shows (the standard network has no class logits here, so no IS).
INCEPTION_METRICS = (("fid", "FID"), ("kid", "KID"), ("precision", "precision"), ("recall", "recall"),
                     ("coverage", "coverage"))  # fmt: skip


def selection_section(
    results: dict[str, Any],
    crit_label: str,
    selection: dict[str, Any] | None = None,
    title: str = "## Guidance baselines at their best settings",
) -> list[str]:
    """Each guidance method's grid on the held-out selection seeds, its chosen setting and where it sits
    (``selection``: another model's grids, e.g. the LoRA arm's; default the comparison's)."""
    selection = results.get("guidance_selection") if selection is None else selection
    if not selection:
        return []
    budget = results["budget"]
    n = budget.get("selection_samples") or budget["curve_samples"]
    lines = [
        title,
        "",
        f"Each method's grid was evaluated on {n} held-out sampling seeds (not the table's) for every training seed; "
        f"the setting with the best mean {crit_label} over training seeds is the one in the table, and a grid whose "
        "best scale sat at an end was extended past it.",
        "",
    ]
    for method, sel in selection.items():
        if sel.get("note"):
            lines += [f"- **{method}**: {sel['note']}.", ""]
            continue
        best = Row.from_dict(sel["best"])
        lines += [f"- **{method}**: chosen {best.method_label}; {sel['position']}.", ""]
        lines += ["  | setting | " + " | ".join(f"seed {i}" for i in range(_n_seeds(sel))) + " | mean |"]
        lines += ["  |---|" + "---|" * (_n_seeds(sel) + 1)]
        points = sorted(sel["points"].values(), key=lambda p: _sort_key(Row.from_dict(p["row"])))
        for p in points:
            row = Row.from_dict(p["row"])
            mark = " **(chosen)**" if row == best else ""
            cells = " | ".join(f"{v:.4g}" for v in p["per_seed"])
            lines.append(f"  | {row.method_label}{mark} | {cells} | {p['mean']:.4g} |")
        lines.append("")
    return lines


def _n_seeds(sel: dict[str, Any]) -> int:
    return max((len(p["per_seed"]) for p in sel["points"].values()), default=0)


def _sort_key(row: Row) -> tuple:
    return (row.guidance_rescale, row.sigma_min, row.apg_threshold or 0.0, row.guide or "", row.cfg_scale)


def inception_section(results: dict[str, Any], fmt_cell: Any, paired_table: Any) -> list[str]:
    """The headline rows and their pairs in the standard Inception-v3 pool3 features, at the same N and seeds."""
    inc = results.get("inception")
    if not inc:
        return []
    n = inc.get("n_samples", results["budget"]["eval_samples"])
    lines = [
        "## The same rows in standard Inception features",
        "",
        f"Extractor: {inc['extractor']}. {n} samples per row (the first sampling seeds of those above) against the "
        f"{results['reference_split']} split; FIDs compare only at equal N, and KID is unbiased.",
        "",
        "| model, guidance | " + " | ".join(label for _, label in INCEPTION_METRICS) + " |",
        "|---|" + "---|" * len(INCEPTION_METRICS),
    ]
    for r in inc["rows"]:
        row = Row.from_dict(r)
        cells = []
        for key, _ in INCEPTION_METRICS:
            values = [float(np.mean([e[key] for e in by_row[row.slug]])) for by_row in inc["evaluations"].values()]
            cells.append(fmt_cell(values))
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines.append("")
    for p in inc["pairs"]:
        pair = Pair.from_dict(p)
        lines += [f"### Inception features: {pair.title}", "", paired_table(p["metrics"]), ""]
    return lines


def plot_selection(results: dict[str, Any], path: Path, crit: str, crit_label: str) -> Path | None:
    """The criterion on the selection seeds against the guidance scale, one line per method and fixed setting; the
    branches without guidance (their learning-rate sweep on the same seeds) as horizontal lines."""
    selection = {m: s for m, s in (results.get("guidance_selection") or {}).items() if s.get("points")}
    if not selection:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, sel in selection.items():
        lines: dict[str, list[tuple[float, float]]] = {}
        for p in sel["points"].values():
            row = Row.from_dict(p["row"])
            rest = row.method_label.split(" ", 2)[2:]  # the setting without the method's name and scale
            lines.setdefault(f"{method} {' '.join(rest)}".strip(), []).append((row.cfg_scale, p["mean"]))
        for name, pts in lines.items():
            x, y = zip(*sorted(pts))
            ax.plot(x, y, marker="o", ms=3, label=name)
    same_n = results["budget"].get("selection_samples") in (0, None, results["budget"]["curve_samples"])
    for i, (branch, by_lr) in enumerate((results.get("sweep") or {}).items() if same_n else []):
        lr = f"{results['chosen_lrs'][branch]:g}"
        if lr in by_lr:
            ax.axhline(float(np.mean(by_lr[lr])), color=f"C{i + 6}", ls="--", label=f"{branch}, no guidance")
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(f"{crit_label} (held-out selection seeds)")
    if crit in ("fid", "kid"):
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
