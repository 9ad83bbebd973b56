"""ablation.md: the ablation's verdict, table and paired differences, rendered from ``ablation.run_ablation``'s
result (no evaluation runs here)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perceptual_diffusion.experiments.report import LABELS, format_cell
from perceptual_diffusion.runtime.checkpoint import atomic_write_text


def row_key(name: str) -> str:
    """The cache name of a variant's evaluation (distinct from ``compare``'s rows, same sampling seeds)."""
    return f"ablation-{name.replace('/', '@')}/none"


def ablation_verdict(result: dict[str, Any]) -> list[str]:
    """Sentences computed from the paired numbers: how many self-perceptual variants beat, tie or lose to MSE
    continued from the same teacher for the same steps on the criterion, the best one, and the paper's defaults."""
    crit = result["criterion"]["key"]
    label, higher = LABELS.get(crit, (crit, True))
    sign = 1 if higher else -1
    diffs = {name: p["metrics"][crit] for name, p in result["paired"].items() if crit in p["metrics"]}
    if not diffs:
        return ["No self-perceptual variant was paired with a baseline, so there is nothing to conclude."]
    better = [n for n, d in diffs.items() if (d["ci_low"] > 0 if higher else d["ci_high"] < 0)]
    worse = [n for n, d in diffs.items() if (d["ci_high"] < 0 if higher else d["ci_low"] > 0)]
    tied = [n for n in diffs if n not in better and n not in worse]
    best = max(diffs, key=lambda n: sign * diffs[n]["estimate"])
    n_seeds = len(next(iter(diffs.values()))["per_seed"])

    def cite(name: str) -> str:
        d = diffs[name]
        return f"{name} {d['estimate']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"

    out = [
        f"On {label}, paired against MSE continued from the same teacher for the same steps over {n_seeds} training "
        f"seed(s), {len(better)} of {len(diffs)} self-perceptual variants are better (95% interval above zero"
        f"{'' if higher else ', lower is better'}){': ' + ', '.join(better) if better else ''}, {len(worse)} are "
        f"worse{': ' + ', '.join(worse) if worse else ''}, and {len(tied)} are within the noise"
        f"{': ' + ', '.join(tied) if tied else ''}."
    ]
    out.append(f"The best variant is {cite(best)}" + (" and it is not better than MSE." if best not in better else "."))
    if "self-perceptual" in diffs:
        out.append(f"The paper's defaults: {cite('self-perceptual')}.")
    out.append(
        "A variant that is better only at a learning rate or step count MSE was not given is not evidence for the "
        "objective; every baseline here has the same steps and the same teacher as its variant."
    )
    return out


def write_ablation_report(out: Path, result: dict[str, Any]) -> Path:
    """ablation.md (verdict first) and ablation.json in ``out``, from ``ablation.run_ablation``'s result alone."""
    budget, variants = result["budget"], result["variants"]
    crit = result["criterion"]["key"]
    metrics = [m for m in (crit, "exact_precision", "noise_rms", "fid", "precision", "coverage") if m in LABELS]
    lrs = ", ".join(f"{k} {v:g}" for k, v in result["chosen_lrs"].items())
    lines = [
        f"# Ablation under the fair protocol ({budget['name']} budget, {budget['data']['source']})",
        "",
        "## Verdict",
        "",
        " ".join(ablation_verdict(result)),
        "",
        f"Teacher: stage 1 trained to its plateau (see report.md of `compare` in the same folder); stage 2: "
        f"{budget['finetune_steps']} steps unless the variant says otherwise, at the learning rates chosen by "
        f"`compare`'s sweep ({lrs}) times the variant's factor; {len(result['evaluations'])} training seed(s); "
        f"{budget['eval_samples']} samples per evaluation on the same sampling seeds as the comparison, DDIM "
        f"{budget['sample_steps']} steps, no guidance. ± is the standard deviation over at least 3 training seeds.",
        "",
        *_values_table(result, metrics),
        "",
        "## Paired differences against the MSE baseline",
        "",
        "Variant minus the MSE run from the same teacher for the same steps, per training seed (same sampling seeds), "
        "averaged over seeds, with the 95% hierarchical bootstrap interval and the per-seed values.",
        "",
        *_paired_table(result, metrics),
        "",
        "| variant | what changes |",
        "|---|---|",
        *[f"| {v['name']} | {v['note']} |" for v in variants],
        "",
        "## What this does not show",
        "",
        "Each variant changes one thing from the paper's defaults at this scale (the teacher, data, U-Net size and "
        "metrics of the comparison in the same folder); combinations of changes, other learning rates for MSE, and "
        "large latent models are not tested here.",
        "",
        f"Wall time of the call that wrote this file: {result['seconds'] / 60:.1f} minutes (cached work is "
        "not redone).",
    ]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "ablation.json", json.dumps(result, indent=2, default=str))
    return out / "ablation.md"


def _values_table(result: dict[str, Any], metrics: list[str]) -> list[str]:
    variants, seeds = result["variants"], list(result["evaluations"])
    names = ["teacher"] + (["teacher/early"] if any(v["teacher"] == "early" for v in variants) else [])
    names += [v["name"] for v in variants]
    lines = ["| model | " + " | ".join(LABELS[m][0] for m in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for name in names:
        rows = [result["evaluations"][s][row_key(name)][0] for s in seeds]
        cells = [format_cell([r[m] for r in rows if m in r]) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _paired_table(result: dict[str, Any], metrics: list[str]) -> list[str]:
    lines = [
        "| variant - baseline | " + " | ".join(f"Δ {LABELS[m][0]}" for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]
    for name, p in result["paired"].items():
        cells = []
        for m in metrics:
            d = p["metrics"].get(m)
            per_seed = ", ".join(f"{x:+.4f}" for x in d["per_seed"]) if d else ""
            cells.append(
                "-" if d is None else f"{d['estimate']:+.4f} [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] ({per_seed})"
            )
        lines.append(f"| {name} - {p['baseline']} | " + " | ".join(cells) + " |")
    return lines
