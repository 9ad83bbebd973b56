"""The comparison's report: a verdict computed from the numbers, then tables, paired differences, curves and grids.

Every number comes from the cached evaluations of ``compare.run_compare``. A table cell shows "mean ± sd" only
over at least 3 training seeds (``stats.summary``); differences between models are paired per training seed (same
teacher, same sampling seeds and labels) with a 95% hierarchical bootstrap interval (``stats.paired_bootstrap``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.evaluation import stats
from perceptual_diffusion.experiments.report_lora import lora_section
from perceptual_diffusion.experiments.report_plots import plot_cfg, plot_curves
from perceptual_diffusion.experiments.report_sections import (
    LABELS,
    TABLE_METRICS,
    fmt_diff,
    inception_section,
    plot_selection,
    seed_values,
    selection_section,
    significant,
)
from perceptual_diffusion.experiments.rows import Pair, Row
from perceptual_diffusion.runtime.checkpoint import atomic_write_text

REPOSITORY_BUDGETS = ("cpu-demo", "cpu-fair", "cpu-fair-fmnist", "cpu-fair-fmnist-v2", "gpu")
WEAK_EXTRACTOR = 0.9  # held-out accuracy below which the verdict warns about the domain features


def format_cell(values: list[float]) -> str:
    if not values:
        return "-"
    s = stats.summary(values)
    mean = f"{s['mean']:.3f}" if abs(s["mean"]) < 10 else f"{s['mean']:.4g}"
    return mean if s.get("std") is None else f"{mean} ± {s['std']:.3f}"


def results_table(results: dict[str, Any]) -> str:
    """Rows x metrics, mean over training seeds (± sd over seeds only with at least 3 of them)."""
    rows = [Row.from_dict(r) for r in results["rows"]]
    metrics = [(k, label) for k, label, _ in TABLE_METRICS if any(seed_values(results, r.slug, k) for r in rows)]
    lines = ["| model, guidance | " + " | ".join(label for _, label in metrics) + " |", "|---|" + "---|" * len(metrics)]
    for row in rows:
        cells = [format_cell(seed_values(results, row.slug, k)) for k, _ in metrics]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pairs_of(results: dict[str, Any]) -> list[tuple[Pair, dict[str, dict[str, Any]]]]:
    """The typed pairs of ``results`` with their paired differences by metric, in the report's order."""
    return [(Pair.from_dict(p), p["metrics"]) for p in results["pairs"]]


def pair_by_role(
    results: dict[str, Any], role: str, method: str | None = None, a: Row | None = None
) -> dict[str, dict[str, Any]] | None:
    """The paired differences of the pair with ``role`` (and guidance ``method``, and row A ``a``), or None when
    there is none."""
    return next(
        (
            m
            for p, m in pairs_of(results)
            if p.role == role and (method is None or p.method == method) and (a is None or p.a == a)
        ),
        None,
    )


def _judged(d: dict[str, Any], higher: bool) -> tuple[str, str]:
    """("better" or "worse" for row A, ", not significant" or "") of one paired difference."""
    return ("better" if (d["estimate"] > 0) == higher else "worse"), ("" if significant(d) else ", not significant")


# ---------------------------------------------------------------------------------------------------------------
# Paired differences.


def paired_table(diffs: dict[str, dict[str, Any]]) -> str:
    lines = ["| metric | A − B | 95% interval | per training seed | signs agree |", "|---|---|---|---|---|"]
    for metric, d in diffs.items():
        label, higher = LABELS.get(metric, (metric, True))
        arrow = {True: "↑ better", False: "↓ better", None: "diagnostic"}[higher]
        per_seed = ", ".join(f"{v:+.4f}" for v in d["per_seed"])
        lines.append(
            f"| {label} ({arrow}) | {d['estimate']:+.4f} | [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | "
            f"{per_seed} | {'yes' if d['signs_agree'] else 'no'} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The objective on a fixed batch.


def losses_table(results: dict[str, Any]) -> tuple[str, str]:
    """The fixed-batch table and one sentence on whether the objective optimised itself."""
    per_seed = results["fixed_batch_losses"]
    models = list(next(iter(per_seed.values())))
    lines = ["| model | self-perceptual loss | MSE loss |", "|---|---|---|"]
    for m in models:
        sp = format_cell([per_seed[s][m]["self_perceptual"] for s in per_seed])
        mse = format_cell([per_seed[s][m]["mse"] for s in per_seed])
        lines.append(f"| {m} | {sp} | {mse} |")
    sp_lower = [
        per_seed[s]["mse-continued"]["self_perceptual"] < per_seed[s]["self-perceptual"]["self_perceptual"]
        for s in per_seed
    ]
    if all(sp_lower):
        note = (
            "MSE continued reaches a *lower* self-perceptual loss than the self-perceptual model in every seed: "
            "the self-perceptual run did not optimise its own objective as well as MSE training did, so its result "
            "says more about optimisation than about the objective."
        )
    elif not any(sp_lower):
        note = "The self-perceptual model reaches a lower self-perceptual loss than MSE continued in every seed."
    else:
        note = (
            f"MSE continued reaches a lower self-perceptual loss than the self-perceptual model in "
            f"{sum(sp_lower)} of {len(sp_lower)} seeds."
        )
    return "\n".join(lines), note


# ---------------------------------------------------------------------------------------------------------------
# Verdict.


def verdict(results: dict[str, Any]) -> list[str]:
    """Sentences computed from the numbers: winner without guidance, teacher plateau, guidance, unconditional."""
    crit = results["criterion"]["key"]
    head = pair_by_role(results, "headline")
    teachers = {k: v for k, v in results["teachers"].items() if "uncond" not in k}
    return [
        *_headline(head, crit, results["budget"]["training_seeds"]),
        _teacher_sentence(results, teachers),
        *_residual_sentence(results, crit, teachers),
        *_baseline_sentences(results, crit),
        *_premise_sentences(results, crit),
        *_inception_sentences(results),
        *_lr_sentences(results),
        *_extractor_sentence(results),
    ]


def _premise_sentences(results: dict[str, Any], crit: str) -> list[str]:
    """The external-perceptual control: the same fine-tuning with a loss network trained for perception (a frozen
    classifier that is not the metric's), against MSE continued and against self-perceptual, where the budget ran it."""
    label, higher = LABELS.get(crit, (crit, True))
    premise = next(((p, m) for p, m in pairs_of(results) if p.role == "premise" and crit in m), None)
    if premise is None:
        return []
    pair, metrics = premise
    variant = (pair_by_role(results, "variant", a=pair.a) or {}).get(crit)
    rel, sig = _judged(metrics[crit], higher)
    text = f"The control for the paper's premise, {pair.a.model} (the same fine-tuning, its loss measured by a "
    text += "separately trained frozen classifier that is not the metric's), "
    if variant is not None:
        vrel, vsig = _judged(variant, higher)
        text += f"is {vrel} than MSE continued on {label} ({fmt_diff(variant)}{vsig}) and "
    text += f"{rel} than self-perceptual ({fmt_diff(metrics[crit])}{sig})"
    inc = results.get("inception") or {}
    inc_c = next((p["metrics"].get("fid") for p in inc.get("pairs", []) if p["role"] == "premise"), None)
    if inc_c:
        inc_rel, inc_sig = _judged(inc_c, LABELS["fid"][1])
        text += f"; in Inception features it is {inc_rel} than self-perceptual on FID ({fmt_diff(inc_c)}{inc_sig})"
    return [text + "."]


def _lr_sentences(results: dict[str, Any]) -> list[str]:
    """Where each branch's chosen learning rate sits in its sweep: at an end, a rate beyond it was not tried."""
    ends = []
    for branch, by_lr in results.get("sweep", {}).items():
        chosen = results["chosen_lrs"].get(branch)
        end = _sweep_end(by_lr, chosen)
        if end:
            ends.append(f"{branch} {chosen:g} (the {end} of {len(by_lr)})")
    if not ends:
        return []
    return [
        f"Learning rates at an end of their sweep: {', '.join(ends)}; a rate beyond the end was not tried, so that "
        "branch may not be at its best setting."
    ]


def _sweep_end(by_lr: dict[str, Any], chosen: float | None) -> str | None:
    """ "highest" or "lowest" when ``chosen`` sits at that end of a sweep of several rates, else None."""
    grid = sorted(float(lr) for lr in by_lr)
    if len(grid) < 2 or chosen not in (grid[0], grid[-1]):
        return None
    return "highest" if chosen == grid[-1] else "lowest"


def _inception_sentences(results: dict[str, Any]) -> list[str]:
    """The headline pair again in the standard Inception features (FID and KID), when the budget measured them."""
    inc = results.get("inception")
    head = next((p["metrics"] for p in (inc or {}).get("pairs", []) if p["role"] == "headline"), None)
    if not head or "fid" not in head:
        return []
    n = inc.get("n_samples", results["budget"]["eval_samples"])
    parts = []
    for metric in ("fid", "kid"):
        if metric in head:
            d = head[metric]
            sig = "" if significant(d) else ", not significant"
            parts.append(f"{LABELS[metric][0]} {fmt_diff(d)}{sig}")
    return [
        f"In the standard Inception-v3 features ({n} samples per row), self-perceptual − MSE continued without "
        f"guidance: {'; '.join(parts)} (lower is better)."
    ]


def _headline(head: dict[str, dict[str, Any]], crit: str, n_seeds: int) -> list[str]:
    label, higher = LABELS.get(crit, (crit, True))
    d = head[crit]
    sp_better = (d["estimate"] > 0) == higher
    agree = sum(1 for v in d["per_seed"] if (v > 0) == (d["estimate"] > 0) and v != 0)
    spread = f"95% interval [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}], {agree} of {len(d['per_seed'])} seeds agree"
    if significant(d):
        winner, loser = ("self-perceptual", "MSE continued") if sp_better else ("MSE continued", "self-perceptual")
        out = [
            f"**Without guidance, {winner} beats {loser} on {label}**: self-perceptual − MSE continued = "
            f"{d['estimate']:+.4f} ({spread})."
        ]
    else:
        out = [
            f"**Without guidance, self-perceptual and MSE continued are not separated on {label}**: difference "
            f"{d['estimate']:+.4f} ({spread})."
        ]
    # Diagnostics (direction None, e.g. the nearest-train distance) are neither better nor worse.
    ranked = {m: x for m, x in head.items() if m != crit and significant(x) and LABELS.get(m, (m, True))[1] is not None}
    better = [LABELS[m][0] for m, x in ranked.items() if (x["estimate"] > 0) == LABELS[m][1]]
    worse = [LABELS[m][0] for m, x in ranked.items() if (x["estimate"] > 0) != LABELS[m][1]]
    out.append(
        f"Among the other metrics, self-perceptual is significantly better on {', '.join(better) or 'none'} and "
        f"worse on {', '.join(worse) or 'none'} (paired over {n_seeds} training seed(s), same sampling seeds)."
    )
    return out


def _teacher_sentence(results: dict[str, Any], teachers: dict[str, Any]) -> str:
    if results["budget"].get("teacher"):
        return (
            f"The teacher was brought by the user ({results['budget']['teacher']}); its plateau was not measured here."
        )
    if all(t["at_plateau"] for t in teachers.values()):
        ends = "; ".join(f"{k}: {t['phase_ends'][-1]}" for k, t in teachers.items())
        return f"The teacher reached a measured plateau in every seed ({ends})."
    bad = [k for k, t in teachers.items() if not t["at_plateau"]]
    # Why, in words (results written before the reason was recorded: the v1 wording).
    reasons = "; ".join(f"{k}: {teachers[k]['reason']}" for k in bad if teachers[k].get("reason"))
    why = reasons or "stage 1 ended at its step cap"
    text = (
        f"**Warning: the teacher is NOT converged** in {', '.join(bad)} ({why}), "
        "so stage 2 partly measures further convergence, not the objective"
    )
    if results["budget"]["name"] in REPOSITORY_BUDGETS and results["data"]["source"] == "shapes":
        return text + "; the fair results are the `cpu-fair` runs in the repository's results/shapes-fair/report.md."
    return text + "; give the budget more stage-1 steps (or bring a converged teacher with --teacher-from)."


def _residual_sentence(results: dict[str, Any], crit: str, teachers: dict[str, Any]) -> list[str]:
    """Whether MSE continued still gains on a teacher the criterion called converged."""
    label, higher = LABELS.get(crit, (crit, True))
    residual = (pair_by_role(results, "teacher-residual") or {}).get(crit)
    converged = all(t["at_plateau"] for t in teachers.values()) and not results["budget"].get("teacher")
    if not (converged and residual is not None and significant(residual) and (residual["estimate"] > 0) == higher):
        return []
    vs_teacher = (pair_by_role(results, "vs-teacher") or {}).get(crit)
    return [
        f"MSE continued still gains on its teacher ({label} {fmt_diff(residual)}): the plateau criterion at "
        f"{results['budget']['curve_samples']} samples per point does not exclude gains of this size, so part of "
        "the headline difference may be further convergence"
        + (f"; against the same teacher, self-perceptual moves by {fmt_diff(vs_teacher)}." if vs_teacher else ".")
    ]


def _baseline_sentences(results: dict[str, Any], crit: str) -> list[str]:
    """Self-perceptual without guidance against each guidance row (each method's best setting where the budget
    chose them on held-out seeds), and the unconditional pair."""
    label, higher = LABELS.get(crit, (crit, True))
    out = []
    selection = results.get("guidance_selection", {})
    for pair, metrics in pairs_of(results):
        if pair.role != "vs-guidance" or crit not in metrics:
            continue
        c = metrics[crit]
        rel = "better than" if (c["estimate"] > 0) == higher else "worse than"
        sig = "" if significant(c) else " (not significant)"
        where = ""
        if pair.selected and pair.method in selection:
            where = f" (its best setting on held-out seeds: {selection[pair.method]['position']})"
        out.append(
            f"Against MSE + {pair.b.method_label}{where}, self-perceptual without guidance is {rel} it on {label}: "
            f"{fmt_diff(c)}{sig}."
        )
    for method, sel in selection.items():
        if sel.get("note"):
            out.append(f"{method}: {sel['note']}.")
    u = (pair_by_role(results, "unconditional") or {}).get(crit)
    if u:
        rel, sig = _judged(u, higher)
        out.append(f"Unconditionally, self-perceptual is {rel} than MSE continued on {label}: {fmt_diff(u)}{sig}.")
    return out


def _extractor_sentence(results: dict[str, Any]) -> list[str]:
    """A warning when the domain features come from a weak classifier (their FID then says little)."""
    accuracy = results.get("extractor_accuracy")
    if accuracy is None or accuracy >= WEAK_EXTRACTOR:
        return []
    return [
        f"**Warning: the domain feature extractor reaches only {accuracy:.3f} held-out accuracy**, so distances in "
        "its features may not track what a stronger network sees; read the Inception numbers, if present, beside them."
    ]


# ---------------------------------------------------------------------------------------------------------------
# Plots and the report file.


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """report.md (verdict first), results.json and the plots in the comparison's folder ``out``, from ``results``
    alone (``compare.run_compare`` computes every number in it, ``analysis.py`` the paired differences)."""
    seeds = sorted(int(s) for s in results["evaluations"])
    budget = results["budget"]
    crit = results["criterion"]["key"]
    # The criterion and FID against w, each once (the criterion may be FID).
    plots = [plot_curves(results, out / "curves.png")]
    plots += [plot_cfg(results, out / f"{m}_vs_cfg.png", m) for m in dict.fromkeys((crit, "fid"))]
    plots.append(plot_selection(results, out / "guidance_selection.png", crit, LABELS.get(crit, (crit,))[0]))
    loss_table, loss_note = losses_table(results)
    lines = [
        f"# Self-perceptual vs MSE vs CFG: `{budget['name']}` on {results['data']['source']}"
        + (", rectified flow" if (budget.get("schedule") or {}).get("family") == "flow" else ""),
        "",
        "## Verdict",
        "",
        " ".join(verdict(results)),
        "",
        *lora_section(results),
        _how_to_read(results, len(seeds)),
        "",
        f"Feature extractor: {results['extractor']}. Reference images: the {results['reference_split']} split.",
        "",
        "## Results",
        "",
        results_table(results),
        "",
    ]
    for pair, metrics in pairs_of(results):
        lines += [f"### {pair.title}", "", f"A = `{pair.a.slug}`, B = `{pair.b.slug}`.", "", paired_table(metrics), ""]
    lines += selection_section(results, LABELS.get(crit, (crit,))[0])
    lines += inception_section(results, format_cell, paired_table)
    lines += ["## Does the objective optimise itself?", "", loss_table, "", loss_note, ""]
    lines += _protocol_section(results)
    for plot in plots:
        if plot is not None:
            lines += [f"![{plot.stem}]({plot.name})", ""]
    if results.get("grids"):
        lines += [
            "## Samples of training seed 0 under the same sampling seeds",
            "",
            "Conditional grids: one class per row"
            + (
                "; unconditional grids (`uncond-*`): the same seeds, no labels."
                if any(Path(g).stem.startswith("uncond-") for g in results["grids"])
                else "."
            ),
            "",
        ]
        lines += [f"**{Path(g).stem}**\n\n![{Path(g).stem}]({g})\n" for g in results["grids"]]
    lines += _limits(results)
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str))
    return out / "report.md"


def _how_to_read(results: dict[str, Any], n_seeds: int) -> str:
    crit, n = results["criterion"]["key"], results["budget"]["eval_samples"]
    criterion = LABELS.get(crit, (crit,))[0]
    return (
        f"**How to read this.** Each row is sampled with the same {n} sampling seeds (and labels) in every training "
        f"seed; table cells are means over {n_seeds} training seed(s), with ± the standard deviation over seeds only "
        "when there are at least 3. Differences are paired per training seed (same teacher, same sampling seeds); "
        "intervals are 95% percentile intervals of a hierarchical bootstrap (training seeds, then samples within a "
        "seed). A difference whose interval contains 0 is within the noise of this experiment. KID is the unbiased "
        "estimator, so it is negative when two sets are closer than its sampling noise. The criterion that stopped "
        f"stage 1 and chose the stage-2 learning rates is {criterion}, measured on held-out sampling seeds, never on "
        "the seeds of this table."
    )


def _limits(results: dict[str, Any]) -> list[str]:
    budget = results["budget"]
    return [
        "## What this does not show",
        "",
        "The paper fine-tunes a converged 865 M-parameter latent text-to-image model on LAION for many thousands of "
        f"steps; this is a `{budget['preset']}` pixel-space {_arch_name(budget)} on {results['data']['source']} at "
        f"{results['data']['image_size']} px, whose tapped features are a small perceptual space. A result here "
        "says what the objective does at this scale, on this data, with these metrics; not what it does for large "
        f"latent models. {_standard_limit(results)}",
        "",
        f"Wall time of the call that wrote this report: {results['seconds'] / 60:.1f} minutes (finished stages and "
        "cached evaluations are not redone; see results/README.md for the times of the full runs).",
    ]


def _arch_name(budget: dict[str, Any]) -> str:
    return {"unet": "U-Net", "dit": "DiT"}.get(budget.get("arch", "unet"), str(budget.get("arch")))


def _plateau_rule(s1: dict[str, Any]) -> str:
    if s1.get("rule") == "paired":
        return (
            "the 95% paired-bootstrap interval of one chunk's gain (both snapshots sampled from the same seeds) "
            "does not lie beyond 0"
        )
    return f"the gain of one chunk is within {s1['noise_multiple']:g} combined standard errors"


def _standard_limit(results: dict[str, Any]) -> str:
    inc = results.get("inception")
    if not inc:
        return "Nothing here was measured with the standard Inception network unless the extractor line says so."
    guided = [Row.from_dict(r).label for r in inc["rows"] if r["guidance"] != "none"]
    return (
        f"The Inception rows are {inc['n_samples']} samples each (FID at that N is biased upwards and compares only "
        "at equal N), and among the guided rows only "
        + (", ".join(guided) if guided else "none")
        + " was measured in them."
    )


def _protocol_section(results: dict[str, Any]) -> list[str]:
    budget = results["budget"]
    s1 = budget["stage1"]
    lines = [
        "## Protocol",
        "",
        f"- **Stage 1** (`{budget['preset']}` {_arch_name(budget)}, batch {budget['batch_size']}): MSE with "
        f"condition dropout 0.1, reduce-on-plateau in phases of constant learning rate "
        f"{', '.join(f'{lr:g}' for lr in s1['lrs'])}, each evaluated every {s1['chunk_steps']} steps on "
        f"{budget['curve_samples']} held-out sampling seeds; a phase ends when {_plateau_rule(s1)}, or after "
        f"{s1['max_chunks'] * s1['chunk_steps']} steps.",
    ]
    for name, t in results["teachers"].items():
        lines.append(f"  - {name}: {t['steps']} steps, {t['images']:,} images; phases: {'; '.join(t['phase_ends'])}")
    lines.append(
        f"- **Stage 2**: both branches from the teacher's EMA weights, {budget['finetune_steps']} steps, warm-up over "
        f"{budget['finetune_warmup']:.0%} of the steps then constant, EMA half-life {budget['finetune_ema']:.0%} of "
        "the images, seed 1000 + training seed. Learning rates swept per branch; the best mean criterion over seeds "
        "(held-out sampling seeds) is compared:"
    )
    for branch, by_lr in results.get("sweep", {}).items():
        cells = ", ".join(f"lr {lr}: {np.mean(v):.4f}" for lr, v in by_lr.items())
        chosen = results["chosen_lrs"][branch]
        edge = (
            " (an end of the swept range: a learning rate beyond it might do better)"
            if _sweep_end(by_lr, chosen)
            else ""
        )
        lines.append(f"  - {branch}: {cells} → **{chosen:g}**{edge}")
    schedule = budget.get("schedule") or {"family": "ddpm"}  # results from before the families ran the DDPM one
    if schedule.get("family") == "flow":
        process = (
            f"Schedule: rectified flow (x_s = (1 - s) x0 + s eps, velocity eps - x0, shift {schedule.get('shift', 1)}, "
            f"training time {schedule.get('time_distribution', 'uniform')}); sampler: Euler {budget['sample_steps']} "
            "steps on diffusers' FlowMatchEuler grid."
        )
    else:
        process = (
            f"Schedule: the paper's zero-terminal-SNR DDPM, v-prediction; sampler: DDIM {budget['sample_steps']} "
            "steps, trailing spacing, eta 0."
        )
    lines += [
        f"- Variants and the unconditional pair use the chosen self-perceptual / branch learning rates. {process}",
        "",
    ]
    return lines
