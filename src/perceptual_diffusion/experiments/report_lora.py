"""The report's LoRA section (``compare --lora-rank R``, issue 20): verdict sentences for the LoRA arm's pairs, found
by role (``rows.LORA_ROLES``) and by their typed rows, then the adapter, its learning-rate sweep and the guidance
baselines chosen for the MSE-continued LoRA. Rendering only: every number comes from ``results``
(``compare.run_compare``; ``lora_arm.lora_results`` for ``results["lora"]``).

The LoRA form of the paper's claim (arXiv 2401.00110, Sec. 5): self-perceptual fine-tuning, here as an adapter whose
frozen teacher is its own base, against MSE training continued as an adapter of the same rank for the same steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from perceptual_diffusion.experiments.report_sections import LABELS, fmt_diff, selection_section, significant
from perceptual_diffusion.experiments.rows import LORA_ROLES, Pair, Row


def _lora_pairs(results: dict[str, Any]) -> list[tuple[Pair, dict[str, Any]]]:
    pairs = [(Pair.from_dict(p), p["metrics"]) for p in results["pairs"]]
    return [(p, m) for p, m in pairs if p.role in LORA_ROLES]


def _find(pairs: list[tuple[Pair, dict[str, Any]]], role: str, a: Row | None = None) -> list[tuple[Pair, dict]]:
    return [(p, m) for p, m in pairs if p.role == role and (a is None or p.a == a)]


def _relation(d: dict[str, Any], higher: bool | None) -> str:
    """ "better" / "worse" for A − B (with "not significant" when the interval holds 0)."""
    word = "better" if (d["estimate"] > 0) == bool(higher) else "worse"
    return word if significant(d) else f"{word}, not significant"


def _headline(d: dict[str, Any], crit: str, adapter: str) -> str:
    label, higher = LABELS.get(crit, (crit, True))
    agree = sum(1 for v in d["per_seed"] if (v > 0) == (d["estimate"] > 0) and v != 0)
    spread = f"95% interval [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], {agree} of {len(d['per_seed'])} seeds agree"
    if significant(d):
        sp_better = (d["estimate"] > 0) == bool(higher)
        winner, loser = ("self-perceptual", "MSE continued") if sp_better else ("MSE continued", "self-perceptual")
        head = f"**As LoRA adapters ({adapter}), {winner} beats {loser} on {label} without guidance**"
    else:
        head = f"**As LoRA adapters ({adapter}), self-perceptual and MSE continued are not separated on {label}**"
    return f"{head}: self-perceptual LoRA − MSE-continued LoRA = {d['estimate']:+.4f} ({spread})."


def _others(metrics: dict[str, Any], crit: str) -> str:
    ranked = {
        m: x for m, x in metrics.items() if m != crit and significant(x) and LABELS.get(m, (m, None))[1] is not None
    }
    better = [LABELS[m][0] for m, x in ranked.items() if (x["estimate"] > 0) == LABELS[m][1]]
    worse = [LABELS[m][0] for m, x in ranked.items() if (x["estimate"] > 0) != LABELS[m][1]]
    return (
        f"Among the other metrics, self-perceptual LoRA is significantly better on {', '.join(better) or 'none'} and "
        f"worse on {', '.join(worse) or 'none'}."
    )


def lora_verdict(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the LoRA arm's pairs: its headline, against each guidance method's best setting,
    against full fine-tuning of the same branch, and whether its teacher was shared."""
    arm = results["lora"]
    crit = results["criterion"]["key"]
    label, higher = LABELS.get(crit, (crit, True))
    pairs = _lora_pairs(results)
    sp, mse = Row(arm["models"]["self-perceptual"]), Row(arm["models"]["mse-continued"])
    lora = arm["lora"]
    adapter = f"rank {lora['rank']}, alpha {lora['alpha']:g}"
    out = []
    for _, metrics in _find(pairs, "lora-headline"):
        if crit in metrics:
            out += [_headline(metrics[crit], crit, adapter), _others(metrics, crit)]
    selection = arm.get("guidance_selection", {})
    for pair, metrics in _find(pairs, "lora-vs-guidance"):
        if crit in metrics:
            where = ""
            if pair.selected and pair.method in selection:
                where = f" (its best setting on held-out seeds: {selection[pair.method]['position']})"
            out.append(
                f"Against MSE-continued LoRA + {pair.b.method_label}{where}, self-perceptual LoRA without guidance is "
                f"{_relation(metrics[crit], higher)} on {label}: {fmt_diff(metrics[crit])}."
            )
    full = []
    for row, lora_name, full_name in (
        (sp, "self-perceptual", "self-perceptual"),
        (mse, "MSE-continued", "MSE continued"),
    ):
        for _, metrics in _find(pairs, "lora-vs-full", row):
            if crit in metrics:
                d = metrics[crit]
                full.append(f"{lora_name} LoRA − full {full_name} {fmt_diff(d)} (LoRA {_relation(d, higher)})")
    if full:
        out.append(f"Against full fine-tuning of the same branch from the same teacher, on {label}: {'; '.join(full)}.")
    shared = arm.get("shared_teacher", {})
    if shared and all(shared.values()):
        out.append(
            "Every self-perceptual LoRA run's teacher was its own base (the adapter switched off): one copy of the "
            "base weights, as the objective's frozen starting model allows (arXiv 2401.00110, Sec. 3)."
        )
    elif shared:
        separate = ", ".join(f"seed {s}" for s, ok in shared.items() if not ok)
        out.append(f"**The self-perceptual LoRA teacher was a separate copy in {separate}** (its base differed).")
    return out


def lora_section(results: dict[str, Any]) -> list[str]:
    """The LoRA arm, verdict first: its sentences, the adapter, the learning rates chosen from ``lora_lrs`` and its
    guidance baselines' grids. Empty when the comparison ran no LoRA arm."""
    arm = results.get("lora")
    if not arm:
        return []
    lora = arm["lora"]
    crit = results["criterion"]["key"]
    share = arm["adapter_parameters"] / max(arm["base_parameters"], 1)
    lines = [
        f"## LoRA arms (rank {lora['rank']}): the same comparison with adapters",
        "",
        " ".join(lora_verdict(results)),
        "",
        f"Both branches train a LoRA adapter (PEFT) of rank {lora['rank']}, alpha {lora['alpha']:g}, dropout "
        f"{lora['dropout']:g} on {', '.join(arm['targets'])} ({arm['adapter_parameters']:,} trained parameters, "
        f"{share:.1%} of the base's {arm['base_parameters']:,}) over the same teacher weights, with the full "
        "fine-tune's schedule (steps, warm-up, EMA half-life, seed); only the learning rate differs, chosen per "
        "branch from the budget's LoRA sweep on held-out sampling seeds:",
        "",
    ]
    for branch, by_lr in arm.get("sweep", {}).items():
        cells = ", ".join(f"lr {lr}: {np.mean(v):.4f}" for lr, v in by_lr.items())
        chosen = arm["chosen_lrs"][branch]
        grid = sorted(float(lr) for lr in by_lr)
        edge = " (an end of the swept range)" if len(grid) > 1 and chosen in (grid[0], grid[-1]) else ""
        lines.append(f"- {branch}: {cells} → **{chosen:g}**{edge}")
    if not arm.get("sweep"):
        lines.append(f"- one learning rate for both: {', '.join(f'{lr:g}' for lr in arm['lrs'])}")
    lines.append("")
    crit_label = LABELS.get(crit, (crit,))[0]
    title = "### LoRA: guidance baselines of the MSE-continued LoRA at their best settings"
    lines += selection_section(results, crit_label, arm.get("guidance_selection") or {}, title)
    return lines
