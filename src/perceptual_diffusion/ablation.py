"""What decides whether self-perceptual fine-tuning helps: an ablation around the comparison's stage 2.

Each variant fine-tunes from a stage-1 MSE model for the same number of steps as the others and is evaluated without
guidance, once per training seed. Variants change one thing at a time against the default (the paper's choices):
the learning rate, the feature tap (resolution and depth), adding lambda x MSE, the noise in the predicted branch,
the number of steps, and how converged the teacher is. MSE continued training from the same weights is the baseline
for every teacher.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import atomic_write_text
from .config import LossConfig, SampleConfig
from .experiment import Budget, _run_config
from .report import _aggregate, flatten_metrics, markdown_table
from .training import is_finished, load_model, resolve_device, train


@dataclass(frozen=True)
class Variant:
    """One stage-2 run: a loss, a learning-rate factor and a step factor relative to the budget, and a teacher."""

    name: str
    loss: LossConfig
    lr_factor: float = 1.0
    steps_factor: float = 1.0
    teacher: str = "converged"  # "converged": the budget's stage 1; "early": stage 1 stopped at a quarter of it
    note: str = ""


SP = LossConfig(kind="self-perceptual", teacher="<teacher>")
MSE = LossConfig(kind="mse")


def default_variants() -> list[Variant]:
    """The ablation grid: one change at a time from the paper's defaults."""
    return [
        # The first two share their run directories with ``compare``'s stage 2 (same names, same configs).
        Variant("mse-continued", MSE, note="baseline: MSE continued from the same weights"),
        Variant(
            "self-perceptual",
            SP,
            note="paper defaults: mid block, uniform t', MSE distance, predicted noise, no MSE term",
        ),
        Variant("sp-lr/10", SP, lr_factor=0.1, note="learning rate / 10"),
        Variant("sp-lr*5", SP, lr_factor=5.0, note="learning rate x 5"),
        Variant(
            "sp-down0", replace(SP, feature_layer="down0"), note="tap after the first down block (higher resolution)"
        ),
        Variant("sp-all", replace(SP, feature_layer="all"), note="sum over all taps"),
        Variant("sp+mse", replace(SP, mse_weight=1.0), note="self-perceptual + 1.0 x MSE"),
        Variant("sp-true-eps", replace(SP, predicted_noise="true"), note="true eps in the predicted branch"),
        Variant("mse-continued/early", MSE, teacher="early", note="baseline for the early teacher"),
        Variant("sp/early", SP, teacher="early", note="teacher = stage 1 stopped at a quarter of its steps"),
        # Last, as the most expensive: four times the fine-tuning steps for both branches.
        Variant("mse-continued-4x-steps", MSE, steps_factor=4.0, note="baseline for sp-4x-steps"),
        Variant("sp-4x-steps", SP, steps_factor=4.0, note="four times the fine-tuning steps"),
    ]


@dataclass
class AblationResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)


def run_ablation(
    out: str | Path,
    budget: Budget,
    variants: list[Variant] | None = None,
    device: str = "auto",
    eval_samples: int | None = None,
    seeds: list[int] | None = None,
) -> AblationResult:
    """Train every variant for every training seed, evaluate without guidance, write ablation.md and .json.

    ``seeds`` restricts the work to some training seeds (to run seeds in parallel processes); the report is written
    from whatever evaluations exist, so a final call without ``seeds`` gathers them all from the cache.
    """
    from .evaluate import evaluate_model
    from .features import make_extractor

    out = Path(out)
    variants = variants or default_variants()
    data = budget.data
    dev = resolve_device(device)
    n = eval_samples or budget.eval_samples
    extractor = make_extractor("domain", data.source, data.image_size, device=dev)
    sample_cfg = SampleConfig(steps=budget.sample_steps)
    result = AblationResult()
    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in variants}
    for seed in seeds if seeds is not None else range(budget.training_seeds):
        root = out / f"seed{seed}"
        teachers = {
            "converged": (root / "stage1-mse", budget.stage1_steps),
            "early": (root / "stage1-mse-early", max(budget.stage1_steps // 4, 1)),
        }
        for tag, (run_dir, steps) in teachers.items():
            if any(v.teacher == tag for v in variants) and not is_finished(run_dir, steps):
                _log(f"seed {seed}: stage 1 ({tag}) for {steps} steps")
                cfg = _run_config(budget, data, MSE, steps, budget.stage1_lr, seed, None, device)
                train(cfg, run_dir)

        def evaluate_run(run_dir: Path, name: str, seed: int = seed) -> dict[str, Any]:
            # Every run is evaluated on the same seeds: paired comparisons, less noise between variants.
            cache = out / "eval" / f"seed{seed}" / f"{name.replace('/', '@')}.json"
            return _evaluate(evaluate_model, load_model(run_dir, dev)[0], sample_cfg, data, n, extractor, dev, cache)

        for tag, (run_dir, _) in teachers.items():
            if run_dir.is_dir():
                result.teachers[f"seed{seed}/{tag}"] = evaluate_run(run_dir, f"teacher-{tag}")
        for v in variants:
            teacher_dir = teachers[v.teacher][0]
            loss = replace(v.loss, teacher=str(teacher_dir)) if v.loss.kind == "self-perceptual" else v.loss
            steps = max(int(budget.finetune_steps * v.steps_factor), 1)
            run_dir = root / v.name.replace("/", "@")
            lr = budget.finetune_lr * v.lr_factor
            cfg = _run_config(budget, data, loss, steps, lr, seed, str(teacher_dir), device)
            if not is_finished(run_dir, steps):
                _log(f"seed {seed}: {v.name} ({steps} steps, lr {lr:g})")
                train(cfg, run_dir)
            metrics = evaluate_run(run_dir, v.name)
            runs[v.name].append(metrics)
    for v in variants:
        row = _aggregate(_AblationRow(v.name), runs[v.name])
        row.update(
            {
                "note": v.note,
                "lr_factor": v.lr_factor,
                "steps_factor": v.steps_factor,
                "teacher": v.teacher,
                "loss": asdict(v.loss),
            }
        )
        result.rows.append(row)
    _write(out, budget, result, n, time.perf_counter() - t0, {v.name: v for v in variants})
    return result


@dataclass(frozen=True)
class _AblationRow:
    model: str
    guidance: str = "none"
    cfg_scale: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def key(self) -> str:
        return self.model


def _evaluate(
    evaluate_model: Any, model: Any, cfg: SampleConfig, data: Any, n: int, extractor: Any, device: Any, cache: Path
) -> dict[str, Any]:
    if cache.is_file():
        return json.loads(cache.read_text())
    res = evaluate_model(model, cfg, data, n, extractor, seeds=list(range(n)), device=device)
    res["metrics"] = flatten_metrics(res)
    atomic_write_text(cache, json.dumps(res, indent=2, default=str))
    return res


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def baseline_of(variant: Variant) -> str | None:
    """The MSE run a self-perceptual variant is compared with: same teacher, same number of steps."""
    if variant.loss.kind == "mse":
        return None
    if variant.teacher == "early":
        return "mse-continued/early"
    if variant.steps_factor != 1.0:
        return f"mse-continued-{variant.steps_factor:g}x-steps"
    return "mse-continued"


PAIRED_METRICS = (
    ("exact_precision", "exact precision"),
    ("exact_recall", "exact recall"),
    ("fid", "FID"),
    ("precision", "precision"),
    ("coverage", "coverage"),
)


def _paired_section(rows: list[dict[str, Any]], variants: dict[str, Variant]) -> list[str]:
    """Per training seed, variant minus its MSE baseline: the teacher's seed-to-seed spread cancels in the pair."""
    by_name = {r["model"]: r for r in rows}
    head = "| variant - baseline | " + " | ".join(f"Δ {label}" for _, label in PAIRED_METRICS) + " |"
    out = [
        "## Paired differences against the MSE baseline",
        "",
        "Each self-perceptual variant minus the MSE run from the same teacher for the same steps, per training "
        "seed (same sampling seeds too), then mean ± std over seeds, with the per-seed values in brackets. "
        "Positive is better for all but FID.",
        "",
        head,
        "|---|" + "---|" * len(PAIRED_METRICS),
    ]
    for name, row in by_name.items():
        base = baseline_of(variants[name]) if name in variants else None
        if base is None or base not in by_name:
            continue
        cells = []
        for key, _ in PAIRED_METRICS:
            pairs = [(a["metrics"].get(key), b["metrics"].get(key)) for a, b in zip(row["runs"], by_name[base]["runs"])]
            diffs = np.array([a - b for a, b in pairs if a is not None and b is not None], dtype=float)
            if len(diffs) == 0:
                cells.append("-")
                continue
            spread = f" ± {diffs.std(ddof=1):.3f}" if len(diffs) > 1 else ""
            cells.append(f"{diffs.mean():+.3f}{spread} [{', '.join(f'{d:+.3f}' for d in diffs)}]")
        out.append(f"| {name} - {base} | " + " | ".join(cells) + " |")
    return out + [""]


def _write(
    out: Path, budget: Budget, result: AblationResult, n: int, seconds: float, variants_by_name: dict[str, Variant]
) -> None:
    lines = [
        f"# Ablation: what decides the self-perceptual outcome ({budget.name} budget, {budget.data.source})",
        "",
        f"Stage 1: {budget.stage1_steps} MSE steps (early teacher: {max(budget.stage1_steps // 4, 1)}), lr "
        f"{budget.stage1_lr:g}; stage 2: {budget.finetune_steps} steps at lr {budget.finetune_lr:g} unless the "
        f"variant says otherwise; batch {budget.batch_size}; {budget.training_seeds} training seed(s); {n} samples "
        f"per evaluation, DDIM {budget.sample_steps} steps, no guidance. ± is the standard deviation across "
        "training seeds.",
        "",
        "## Teachers (stage 1, no guidance)",
        "",
    ]
    teacher_rows = []
    for tag in ("converged", "early"):
        runs = [v for k, v in result.teachers.items() if k.endswith("/" + tag)]
        if runs:
            teacher_rows.append(_aggregate(_AblationRow(f"stage1 ({tag})"), runs))
    by_name = lambda r: r["model"]  # noqa: E731
    lines += [
        markdown_table(teacher_rows, by_name, "teacher"),
        "",
        "## Stage-2 variants",
        "",
        markdown_table(result.rows, by_name, "variant"),
        "",
    ]
    lines += _paired_section(result.rows, variants_by_name)
    lines += ["| variant | what changes |", "|---|---|"] + [f"| {r['model']} | {r['note']} |" for r in result.rows]
    lines += [
        "",
        f"Wall time of the call that wrote this file: {seconds / 60:.1f} minutes (finished runs and cached "
        "evaluations are not redone).",
    ]
    atomic_write_text(out / "ablation.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "ablation.json", json.dumps(asdict(result), indent=2, default=str))
