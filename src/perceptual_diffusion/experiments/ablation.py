"""What decides whether self-perceptual fine-tuning helps: an ablation around the comparison's stage 2, under the
same fair protocol (``compare.py``).

Every variant fine-tunes from the same converged teacher as ``compare`` (trained to its plateau, or reused from a
``compare`` run in the same folder) with the stage-2 settings of ``stages.stage2_config``, at the learning rate
that ``compare``'s sweep chose for the self-perceptual branch, and changes one thing: the learning rate, the feature
tap (resolution and depth), adding lambda x MSE, the noise in the predicted branch, the number of steps, or the
teacher (an early snapshot of stage 1). Each is paired against MSE continued from the same teacher for the same
steps, on the same sampling seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from perceptual_diffusion.config import DIT_PRESETS, LossConfig, default_sampler
from perceptual_diffusion.experiments.ablation_report import row_key, write_ablation_report
from perceptual_diffusion.experiments.analysis import paired
from perceptual_diffusion.experiments.budgets import Budget
from perceptual_diffusion.experiments.stages import stage2_config, train_teacher
from perceptual_diffusion.experiments.workspace import (
    SHARED_FIELDS,
    Context,
    branch_dir,
    check_settings,
    log,
    make_context,
    make_out_dir,
    teacher_dir,
)
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.training.loop import train
from perceptual_diffusion.training.rundir import is_finished, snapshot_path

SP = LossConfig(kind="self-perceptual", teacher="<teacher>")
MSE = LossConfig(kind="mse")


@dataclass(frozen=True)
class Variant:
    """One stage-2 run: a loss, factors on the chosen learning rate and the steps, and a teacher."""

    name: str
    loss: LossConfig
    lr_factor: float = 1.0
    steps_factor: float = 1.0
    teacher: str = "converged"  # "converged": the plateaued stage 1; "early": its first EMA snapshot
    note: str = ""


def tap_variants(budget: Budget | None) -> list[Variant]:
    """The tap variants: a U-Net's first down block and the sum of all taps; a DiT's (issue 19) quarter and
    three-quarter depths beside its default middle block, and the sum over all blocks."""
    if budget is None or budget.arch == "unet":
        return [
            Variant("sp-down0", replace(SP, feature_layer="down0"), note="tap after the first down block"),
            Variant("sp-all", replace(SP, feature_layer="all"), note="sum over all taps"),
        ]
    n = DIT_PRESETS[budget.preset].num_layers
    depths = sorted({max(1, n // 4), max(1, 3 * n // 4)} - {n // 2})
    return [
        *(
            Variant(f"sp-block{k}", replace(SP, feature_blocks=(k,)), note=f"tap after block {k} of {n}")
            for k in depths
        ),
        Variant("sp-all", replace(SP, feature_layer="all"), note=f"sum over all {n} block taps"),
    ]


def t_prime_variants(budget: Budget | None) -> list[Variant]:
    """The t' distribution: the paper draws t' uniformly (arXiv 2401.00110, Sec. 3); a flow family trains t on the
    logit-normal of SD3 (issue 18), which weights the middle noise levels, so for flow budgets the ablation also
    draws t' from the budget's logit-normal (its mean and std)."""
    if budget is None or budget.schedule.family != "flow":
        return []
    return [
        Variant("sp-tprime-logit-normal", replace(SP, t_prime="logit-normal"), note="t' logit-normal (as flow's t)")
    ]


def default_variants(budget: Budget | None = None) -> list[Variant]:
    """The ablation grid: one change at a time from the paper's defaults (the taps by ``budget``'s architecture)."""
    return [
        Variant("mse-continued", MSE, note="baseline: MSE continued from the same weights"),
        Variant("self-perceptual", SP, note="paper defaults: mid block, uniform t', MSE distance, predicted noise"),
        Variant("sp-lr/10", SP, lr_factor=0.1, note="learning rate / 10"),
        Variant("sp-lr*5", SP, lr_factor=5.0, note="learning rate x 5"),
        *tap_variants(budget),
        Variant("sp+mse", replace(SP, mse_weight=1.0), note="self-perceptual + 1.0 x MSE"),
        Variant("sp-true-eps", replace(SP, predicted_noise="true"), note="true eps in the predicted branch"),
        Variant("sp-channel-norm", replace(SP, feature_norm="channel"), note="features unit-normalised (LPIPS)"),
        Variant("sp-low-noise", replace(SP, t_prime_max=0.5), note="t' from the lower half of noise levels"),
        *t_prime_variants(budget),
        Variant("mse-continued/early", MSE, teacher="early", note="baseline for the early teacher"),
        Variant("sp/early", SP, teacher="early", note="teacher = the first EMA snapshot of stage 1"),
        Variant("mse-continued-4x-steps", MSE, steps_factor=4.0, note="baseline for sp-4x-steps"),
        Variant("sp-4x-steps", SP, steps_factor=4.0, note="four times the fine-tuning steps"),
    ]


def baseline_of(variant: Variant) -> str | None:
    """The MSE run a self-perceptual variant is compared with: same teacher, same number of steps."""
    if variant.loss.kind == "mse":
        return None
    if variant.teacher == "early":
        return "mse-continued/early"
    if variant.steps_factor != 1.0:
        return f"mse-continued-{variant.steps_factor:g}x-steps"
    return "mse-continued"


def chosen_lrs(ctx: Context) -> dict[str, float]:
    """The stage-2 learning rates of a finished ``compare`` in the same folder, else the budget's first."""
    path = ctx.out / "results.json"
    if path.is_file():
        chosen = json.loads(path.read_text()).get("chosen_lrs")
        if chosen:
            return chosen
    return {"mse-continued": ctx.budget.finetune_lrs[0], "self-perceptual": ctx.budget.finetune_lrs[0]}


def _early_teacher(ctx: Context, seed: int) -> Path:
    first = ctx.budget.stage1.chunk_steps
    phase0 = ctx.root(seed) / ("stage1-phase0" if len(ctx.budget.stage1.lrs) > 1 else "stage1-mse")
    return snapshot_path(phase0, first)


def _run_variant(ctx: Context, seed: int, v: Variant, chosen: dict[str, float]) -> Path:
    base_lr = chosen["mse-continued" if v.loss.kind == "mse" else "self-perceptual"] * v.lr_factor
    teacher = _early_teacher(ctx, seed) if v.teacher == "early" else teacher_dir(ctx, seed)
    loss = replace(v.loss, teacher=str(teacher)) if v.loss.kind == "self-perceptual" else v.loss
    budget = replace(ctx.budget, finetune_steps=max(int(ctx.budget.finetune_steps * v.steps_factor), 1))
    cfg = stage2_config(budget, ctx.data, loss, base_lr, seed, str(teacher), ctx.device)
    run_dir = branch_dir(ctx.root(seed), v.name.replace("/", "@"), base_lr)
    if not is_finished(run_dir, cfg.train.steps):
        log(f"seed {seed}: {v.name} ({cfg.train.steps} steps, lr {base_lr:g})")
        train(cfg, run_dir)
    return run_dir


def run_ablation(
    out: str | Path,
    budget: Budget,
    variants: list[Variant] | None = None,
    device: str = "auto",
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Train and evaluate every variant for every training seed, write ablation.md and ablation.json.

    ``seeds`` restricts the work to some training seeds (to run seeds in parallel processes); the report is written
    only by a call that covers every seed, from the cached evaluations.
    """
    out = Path(out)
    variants = variants or default_variants(budget)
    make_out_dir(out, command="ablate")
    check_settings(out, {"budget": budget, "data": budget.data}, fields=SHARED_FIELDS)
    ctx = make_context(out, budget, budget.data, device)
    chosen = chosen_lrs(ctx)
    all_seeds = list(range(budget.training_seeds))
    t0 = time.perf_counter()
    n = budget.eval_samples
    evaluations: dict[str, dict[str, list[dict[str, float]]]] = {}
    for seed in seeds if seeds is not None else all_seeds:
        if budget.teacher is None:
            train_teacher(ctx, seed)
        per_seed: dict[str, list[dict[str, float]]] = {}
        models = {"teacher": teacher_dir(ctx, seed)}
        if any(v.teacher == "early" for v in variants):
            models["teacher/early"] = _early_teacher(ctx, seed)
        models.update({v.name: _run_variant(ctx, seed, v, chosen) for v in variants})
        for name, path in models.items():
            res = ctx.evaluate(
                f"{row_key(name)}-rep0",
                seed,
                lambda p=path: load_model(p, ctx.dev)[0],
                default_sampler(budget.schedule, steps=budget.sample_steps),
                list(range(n)),  # the headline rows' seeds: every variant paired on the same samples
            )
            per_seed[row_key(name)] = [res["metrics"]]
        evaluations[str(seed)] = per_seed
    if seeds is not None and set(seeds) != set(all_seeds):
        log("this process's seeds are done; rerun without --seeds to write ablation.md")
        return {}
    result = {
        "budget": asdict(budget),
        "chosen_lrs": chosen,
        "criterion": asdict(ctx.criterion),
        "variants": [asdict(v) for v in variants],
        "evaluations": evaluations,
        "paired": {},
    }
    for v in variants:
        base = baseline_of(v)
        if base is not None:
            result["paired"][v.name] = {
                "baseline": base,
                "metrics": paired(ctx, all_seeds, row_key(v.name), row_key(base), budget.bootstrap),
            }
    result["seconds"] = time.perf_counter() - t0
    write_ablation_report(out, result)
    return result
