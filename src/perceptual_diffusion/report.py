"""Evaluate the comparison's rows and write report.md, results.json and the plots.

Rows are (model, guidance) pairs from ``experiment.plan_rows``; each is evaluated once per (training seed, sampling
repeat), each evaluation cached as JSON so a repeated command only computes what is missing. The table reports the
mean and, across all runs of a row, the standard deviation, so that a difference can be read against the noise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import atomic_write_text
from .config import DataConfig, SampleConfig
from .training import load_model

# Metrics shown in the table, in order, with the direction that is better.
TABLE_METRICS = (
    ("fid", "FID", "lower"),
    ("kid", "KID", "lower"),
    ("is", "IS", "higher"),
    ("precision", "precision", "higher"),
    ("recall", "recall", "higher"),
    ("density", "density", "higher"),
    ("coverage", "coverage", "higher"),
    ("exact_precision", "exact precision", "higher"),
    ("exact_recall", "exact recall", "higher"),
    ("class_accuracy", "class match", "higher"),
)


def _row_label(row: dict[str, Any]) -> str:
    g = row["guidance"]
    if g == "none":
        return f"{row['model']}, no guidance"
    if g == "uncond":
        return f"{row['model']}, unconditional"
    name = "CFG" if g == "cfg" else "autoguidance"
    return f"{row['model']}, {name} w={row['cfg_scale']:g} phi={row['guidance_rescale']:g}"


def flatten_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The table's numbers from one ``evaluate.evaluate_model`` result."""
    flat = {"fid": result["fid"], "kid": result["kid"]["mean"]}
    if result.get("inception_score"):
        flat["is"] = result["inception_score"]["mean"]
    flat.update({k: result["precision_recall"][k] for k in ("precision", "recall", "density", "coverage")})
    realism = result.get("realism")
    if realism:
        flat["exact_precision"] = realism["exact_precision"]
        flat["exact_recall"] = realism["exact_recall"]
        if realism.get("class_agreement") is not None:
            flat["class_accuracy"] = realism["class_agreement"]
    return {k: float(v) for k, v in flat.items()}


def evaluate_rows(
    out: Path, budget: Any, data: DataConfig, rows: list[Any], device: torch.device, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Evaluate every row for every training seed and sampling repeat; returns aggregated rows."""
    from .evaluate import evaluate_model
    from .features import make_extractor

    extractor = make_extractor("domain", data.source, data.image_size, device=device)
    aggregated = []
    total = len(rows) * budget.training_seeds * budget.eval_repeats
    done = 0
    for row in rows:
        runs = []
        for seed in range(budget.training_seeds):
            root = out / f"seed{seed}"
            model = load_model(root / row.model, device)[0]
            guide = load_model(root / "stage1-mse", device)[0] if row.guidance == "autoguidance" else None
            for rep in range(budget.eval_repeats):
                done += 1
                cache = out / "eval" / f"seed{seed}" / f"{row.key.replace('/', '__')}-rep{rep}.json"
                if cache.is_file():
                    runs.append(json.loads(cache.read_text()))
                    continue
                started = time.perf_counter()
                cfg = SampleConfig(
                    steps=budget.sample_steps, cfg_scale=row.cfg_scale, guidance_rescale=row.guidance_rescale
                )
                # Repeat r uses seeds [r*N, (r+1)*N): every repeat is an independent draw of the same size.
                seeds = list(range(rep * budget.eval_samples, (rep + 1) * budget.eval_samples))
                result = evaluate_model(
                    model,
                    cfg,
                    data,
                    budget.eval_samples,
                    extractor,
                    seeds=seeds,
                    device=device,
                    guide=guide,
                    use_labels=row.guidance != "uncond",
                )
                result["metrics"] = flatten_metrics(result)
                result["training_seed"], result["repeat"] = seed, rep
                atomic_write_text(cache, json.dumps(result, indent=2, default=str))
                runs.append(result)
                log(
                    f"evaluated {done}/{total}: seed{seed} {row.key} repeat {rep} "
                    f"({budget.eval_samples} samples, {time.perf_counter() - started:.0f} s)"
                )
        aggregated.append(_aggregate(row, runs))
    return aggregated


def _aggregate(row: Any, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of each numeric metric across runs (training seeds x repeats)."""
    out: dict[str, Any] = {
        "model": row.model,
        "guidance": row.guidance,
        "cfg_scale": row.cfg_scale,
        "guidance_rescale": row.guidance_rescale,
        "key": row.key,
        "runs": runs,
    }
    numeric = sorted({k for r in runs for k in r["metrics"]})
    for k in numeric:
        values = np.array([r["metrics"][k] for r in runs if k in r["metrics"]], dtype=float)
        out[k] = float(values.mean())
        out[f"{k}_std"] = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
    return out


def _number(x: float) -> str:
    """Three decimals for metrics in [0, 10]; four significant digits for unbounded ones (FID, KID in raw units)."""
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.4g}"


def _fmt(row: dict[str, Any], key: str) -> str:
    if key not in row:
        return "-"
    mean, std = row[key], row.get(f"{key}_std", float("nan"))
    return f"{_number(mean)} ± {_number(std)}" if not math.isnan(std) else _number(mean)


def markdown_table(
    rows: list[dict[str, Any]],
    label: Callable[[dict[str, Any]], str] | None = None,
    first_column: str = "model, guidance",
) -> str:
    """Rows: model x guidance; columns: every metric present in any row, mean ± std."""
    label = label or _row_label
    metrics = [(k, name) for k, name, _ in TABLE_METRICS if any(k in r for r in rows)]
    head = f"| {first_column} | " + " | ".join(name for _, name in metrics) + " |"
    sep = "|---|" + "---|" * len(metrics)
    body = ["| " + label(r) + " | " + " | ".join(_fmt(r, k) for k, _ in metrics) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def plot_fid_vs_cfg(rows: list[dict[str, Any]], path: Path, metric: str = "fid") -> Path | None:
    """FID against CFG scale for the MSE model (one line per rescale), self-perceptual without guidance as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg_rows = [r for r in rows if r["guidance"] == "cfg" and r["model"] == "mse-continued" and metric in r]
    if not cfg_rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    base = [r for r in rows if r["model"] == "mse-continued" and r["guidance"] == "none" and metric in r]
    for phi in sorted({r["guidance_rescale"] for r in cfg_rows}):
        pts = sorted(
            (r["cfg_scale"], r[metric], r.get(f"{metric}_std", 0.0)) for r in cfg_rows if r["guidance_rescale"] == phi
        )
        pts = [(1.0, base[0][metric], base[0].get(f"{metric}_std", 0.0))] + pts if base else pts
        x, y, e = (np.array(v) for v in zip(*pts))
        ax.errorbar(x, y, yerr=np.nan_to_num(e), marker="o", capsize=3, label=f"MSE + CFG, rescale {phi:g}")
    for r in rows:
        if r["model"] == "self-perceptual" and r["guidance"] == "none" and metric in r:
            std = np.nan_to_num(r.get(f"{metric}_std", 0.0))
            ax.axhline(r[metric], color="C3", label="self-perceptual, no guidance")
            ax.axhspan(r[metric] - std, r[metric] + std, color="C3", alpha=0.15)
    ax.set_xlabel("CFG scale w (1 = no guidance)")
    ax.set_ylabel(metric.upper() if metric == "fid" else metric.replace("_", " "))
    ax.set_xscale("log")
    import matplotlib.ticker

    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({1.0} | {float(v) for v in x}))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_precision_recall(rows: list[dict[str, Any]], path: Path, prefix: str = "") -> Path | None:
    """Precision against recall, one point per row (error bars: std across runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, r = f"{prefix}precision", f"{prefix}recall"
    pts = [row for row in rows if p in row and r in row]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    for i, row in enumerate(pts):
        ax.errorbar(
            row[r],
            row[p],
            xerr=np.nan_to_num(row.get(f"{r}_std", 0.0)),
            yerr=np.nan_to_num(row.get(f"{p}_std", 0.0)),
            marker="o",
            capsize=2,
            color=f"C{i % 10}",
            label=_row_label(row),
        )
    ax.set_xlabel(r.replace("_", " "))
    ax.set_ylabel(p.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md (table, plots, grids, settings) and results.json in ``out``."""
    rows = results["rows"]
    budget = results["budget"]
    extractor = next((r["runs"][0]["extractor"]["description"] for r in rows if r.get("runs")), "unknown")
    plots = [
        plot_fid_vs_cfg(rows, out / "fid_vs_cfg.png"),
        plot_fid_vs_cfg(rows, out / "exact_precision_vs_cfg.png", metric="exact_precision"),
        plot_precision_recall(rows, out / "precision_recall.png"),
        plot_precision_recall(rows, out / "exact_precision_recall.png", prefix="exact_"),
    ]
    lines = [
        f"# Self-perceptual vs MSE vs CFG: {budget['name']} budget on {budget['data']['source']}",
        "",
        f"Model preset `{budget['preset']}`, batch {budget['batch_size']}; stage 1: {budget['stage1_steps']} MSE steps "
        f"(lr {budget['stage1_lr']:g}); stage 2: {budget['finetune_steps']} steps each (lr {budget['finetune_lr']:g}) "
        f"of self-perceptual fine-tuning and of MSE continued training from the stage-1 EMA weights. "
        f"DDIM {budget['sample_steps']} steps, trailing spacing, eta 0. Each row: {budget['eval_samples']} samples x "
        f"{budget['eval_repeats']} sampling repeats x {budget['training_seeds']} training seed(s); ± is the standard "
        f"deviation across those runs. Feature extractor: `{extractor}`.",
        "",
        markdown_table(rows),
        "",
    ]
    realism = next((r["runs"][0].get("realism") for r in rows if r.get("runs") and r["runs"][0].get("realism")), None)
    if realism:
        lines += [
            f"Exact metrics (procedural shapes, {realism['valid_images']} valid images): *exact precision* is the "
            f"fraction of samples within RMS {realism['threshold_rms']:.4f} of a valid image; *exact recall* the "
            f"fraction of valid images hit; with {budget['eval_samples']} samples a perfect sampler's exact recall "
            f"would be {realism['ideal_recall']:.3f}. *Class match*: conditional samples whose nearest valid image has "
            "the requested class. FID, KID, IS, precision/recall/density/coverage use the extractor above.",
            "",
        ]
    for plot in plots:
        if plot is not None:
            lines += [f"![{plot.stem}]({plot.name})", ""]
    if results.get("grids"):
        lines += ["## Samples under the same seeds (rows: classes)", ""]
        lines += [f"**{Path(g).stem}**\n\n![{Path(g).stem}]({g})\n" for g in results["grids"]]
    if "seconds" in results:
        lines += [
            f"Wall time of the call that wrote this report: {results['seconds'] / 60:.1f} minutes (finished stages "
            "and cached evaluations are not redone)."
        ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return out / "report.md"
