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

Work for some training seeds can run in parallel processes (``seeds=[...]``); a final call without ``seeds``
gathers everything from the caches and writes the report.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .budgets import BUDGETS, Budget
from .checkpoint import atomic_write_text
from .config import DataConfig, LossConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig
from .data import data_shape
from .errors import UserError
from .grid import save_grid
from .sampling import sample
from .scoring import Criterion, criterion_for, evaluate_cached, is_cached, load_per_sample
from .teacher import TeacherResult, train_to_plateau
from .training import is_finished, load_model, resolve_device, train

STAGE2_SEED_OFFSET = 1000  # stage 2 of training seed s uses seed 1000 + s: it never replays stage 1's draws
SELECTION_SEED_BASE = 1_000_000  # sampling seeds of curves and lr selection: disjoint from the headline rows' seeds


# ---------------------------------------------------------------------------------------------------------------
# Run configurations.


def _model_config(budget: Budget, data: DataConfig, unconditional: bool) -> ModelConfig:
    channels, num_classes = data_shape(data)
    return ModelConfig(
        preset=budget.preset,
        image_size=data.image_size,
        channels=channels,
        num_classes=0 if unconditional else num_classes,
    )


def stage1_config(
    budget: Budget,
    data: DataConfig,
    phase: int,
    lr: float,
    steps: int,
    init_from: str | None,
    seed: int,
    device: str,
    unconditional: bool = False,
) -> RunConfig:
    """One stage-1 phase: constant lr after warm-up, a checkpoint and an EMA snapshot at every chunk."""
    chunk = budget.stage1.chunk_steps
    return RunConfig(
        schedule=ScheduleConfig(),
        model=_model_config(budget, data, unconditional),
        data=data,
        loss=LossConfig(kind="mse", cond_dropout=0.0 if unconditional else LossConfig.cond_dropout),
        train=TrainConfig(
            steps=steps,
            batch_size=budget.batch_size,
            lr=lr,
            # The first phase warms up from random weights; later ones restart AdamW, so they warm up briefly too.
            warmup_images=TrainConfig.warmup_images if phase == 0 else chunk * budget.batch_size // 10,
            seed=seed + 100 * phase,
            init_from=init_from,
            device=device,
            log_every=25,
            checkpoint_every=chunk,
            sample_every=chunk,
            snapshot_every=chunk,
        ),
        sample=SampleConfig(steps=budget.sample_steps),
    )


def stage2_config(
    budget: Budget,
    data: DataConfig,
    loss: LossConfig,
    lr: float,
    seed: int,
    teacher_dir: str,
    device: str,
    unconditional: bool = False,
) -> RunConfig:
    """One stage-2 branch; both branches get exactly this, apart from the loss."""
    images = budget.finetune_steps * budget.batch_size
    if unconditional:
        loss = replace(loss, cond_dropout=0.0)
    return RunConfig(
        schedule=ScheduleConfig(),
        model=_model_config(budget, data, unconditional),
        data=data,
        loss=loss,
        train=TrainConfig(
            steps=budget.finetune_steps,
            batch_size=budget.batch_size,
            lr=lr,
            warmup_images=int(budget.finetune_warmup * images),
            ema_halflife_images=max(int(budget.finetune_ema * images), 1),
            seed=STAGE2_SEED_OFFSET + seed,
            init_from=teacher_dir,
            device=device,
            log_every=25,
            checkpoint_every=max(budget.finetune_steps // 2, 1),
            sample_every=budget.finetune_steps,
        ),
        sample=SampleConfig(steps=budget.sample_steps),
    )


def branch_losses(budget: Budget) -> dict[str, LossConfig]:
    """The stage-2 branches that get the learning-rate sweep: MSE continued and self-perceptual."""
    return {"mse-continued": LossConfig(kind="mse"), "self-perceptual": budget.perceptual}


def branch_dir(root: Path, branch: str, lr: float) -> Path:
    return root / f"{branch}-lr{lr:g}"


# ---------------------------------------------------------------------------------------------------------------
# The workflow.


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Context:
    """What every step of one comparison needs."""

    out: Path
    budget: Budget
    data: DataConfig
    device: str
    dev: torch.device
    criterion: Criterion
    extractor: Any
    reference_split: str

    def cache(self, name: str, seed: int) -> Path:
        """Where the evaluation ``name`` of training seed ``seed`` is cached (``scoring.evaluate_cached`` adds the
        .json and .npz extensions)."""
        return self.out / "eval" / f"seed{seed}" / name.replace("/", "__")

    def root(self, seed: int, unconditional: bool = False) -> Path:
        """The folder of one training seed's runs (``uncond/`` inside it for the unconditional pair)."""
        return self.out / f"seed{seed}" / ("uncond" if unconditional else "")

    def evaluate(
        self,
        name: str,
        seed: int,
        model: Any,
        sample_config: SampleConfig,
        seeds: list[int],
        guide: Any = None,
        use_labels: bool = True,
    ) -> dict[str, Any]:
        return evaluate_cached(
            self.cache(name, seed),
            model,
            sample_config,
            self.data,
            self.extractor,
            seeds,
            self.dev,
            guide=guide,
            use_labels=use_labels,
            reference_split=self.reference_split,
        )

    def selection_point(self, name: str, seed: int, weights: Path) -> tuple[float, float, dict[str, Any]]:
        """The criterion of ``weights`` on the held-out selection seeds: (value, standard error, result)."""
        from .evaluate import reference_stats

        seeds = list(range(SELECTION_SEED_BASE, SELECTION_SEED_BASE + self.budget.curve_samples))
        res = self.evaluate(
            name, seed, lambda: load_model(weights, self.dev)[0], SampleConfig(steps=self.budget.sample_steps), seeds
        )
        per_sample = load_per_sample(self.cache(name, seed)) if self.criterion.key == "fid" else None
        reference = reference_stats(self.data, self.extractor, split=self.reference_split) if per_sample else None
        return self.criterion.value(res), self.criterion.standard_error(res, per_sample, reference), res


def make_out_dir(out: Path) -> None:
    """The experiment's folder, refused in one line when it cannot be one (a file, a folder under a file)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out} ({exc.strerror or exc}); choose another --out") from None


def make_context(out: Path, budget: Budget, data: DataConfig, device: str) -> Context:
    from .features import auto_extractor

    dev = resolve_device(device)
    split = "test" if data.source == "fashion-mnist" else "train"  # held out where the data has a split
    extractor = auto_extractor(data, out, device=dev)
    return Context(out, budget, data, device, dev, criterion_for(data), extractor, split)


def train_teacher(ctx: Context, seed: int, unconditional: bool = False) -> TeacherResult:
    """Stage 1 for one training seed (conditional, or the unconditional pair's teacher)."""
    root = ctx.root(seed, unconditional)
    prefix = "uncond/" if unconditional else ""

    def make_config(phase: int, lr: float, steps: int, init_from: str | None) -> RunConfig:
        return stage1_config(ctx.budget, ctx.data, phase, lr, steps, init_from, seed, ctx.device, unconditional)

    def evaluate_point(weights: Path, name: str) -> tuple[float, float, dict[str, Any]]:
        return ctx.selection_point(f"{prefix}curve-{name}", seed, weights)

    return train_to_plateau(root, ctx.budget.stage1, make_config, evaluate_point, ctx.criterion, _log)


def teacher_dir(ctx: Context, seed: int, unconditional: bool = False) -> Path:
    if ctx.budget.teacher is not None and not unconditional:
        return Path(ctx.budget.teacher)
    return ctx.root(seed, unconditional) / "stage1-mse"


def train_branches(ctx: Context, seed: int, lrs: dict[str, tuple[float, ...]], unconditional: bool = False) -> None:
    """Stage 2: every branch at every learning rate it is given, all from the same teacher weights."""
    from .variants import VARIANTS

    root = ctx.root(seed, unconditional)
    teacher = str(teacher_dir(ctx, seed, unconditional))
    losses = {**branch_losses(ctx.budget), **{v: VARIANTS[v] for v in ctx.budget.variants}}
    for branch, branch_lrs in lrs.items():
        loss = losses[branch]
        if loss.kind == "self-perceptual":
            loss = replace(loss, teacher=teacher)
        for lr in branch_lrs:
            cfg = stage2_config(ctx.budget, ctx.data, loss, lr, seed, teacher, ctx.device, unconditional)
            run_dir = branch_dir(root, branch, lr)
            if not is_finished(run_dir, cfg.train.steps):
                _log(f"seed {seed}: stage 2 {'unconditional ' if unconditional else ''}{branch} at lr {lr:g}")
                train(cfg, run_dir)


def sweep_points(ctx: Context, seeds: list[int]) -> dict[str, dict[float, list[float]]]:
    """Criterion of every (branch, lr) per seed on the selection seeds (evaluating what is missing)."""
    points: dict[str, dict[float, list[float]]] = {}
    for branch in branch_losses(ctx.budget):
        for lr in ctx.budget.finetune_lrs:
            for seed in seeds:
                run_dir = branch_dir(ctx.root(seed), branch, lr)
                value, _, _ = ctx.selection_point(f"sweep-{branch}-lr{lr:g}", seed, run_dir)
                points.setdefault(branch, {}).setdefault(lr, []).append(value)
    return points


def choose_lrs(criterion: Criterion, points: dict[str, dict[float, list[float]]]) -> dict[str, float]:
    """Per branch, the learning rate whose criterion, averaged over seeds, is best."""
    sign = 1.0 if criterion.higher_is_better else -1.0
    return {b: max(by_lr, key=lambda lr: sign * float(np.mean(by_lr[lr]))) for b, by_lr in points.items()}


@dataclass(frozen=True)
class Row:
    """One evaluated (model, guidance) combination; ``model`` names a model of the seed's folder."""

    model: str  # stage1-mse, mse-continued, self-perceptual, a variant, or uncond/<one of the first three>
    guidance: str = "none"  # "none", "cfg", "null-label", "autoguidance"
    cfg_scale: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def key(self) -> str:
        if self.guidance in ("none", "null-label"):
            return f"{self.model}/{self.guidance}"
        return f"{self.model}/{self.guidance}-w{self.cfg_scale:g}-phi{self.guidance_rescale:g}"


def plan_rows(budget: Budget) -> list[Row]:
    """The table's rows, the paper's first, then those beyond it."""
    rows = [Row(m) for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row("mse-continued", "cfg", w, phi) for phi in budget.guidance_rescales for w in budget.cfg_scales]
    if budget.unconditional:
        rows += [Row(f"uncond/{m}") for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row(v) for v in budget.variants]
    if budget.extras:
        rows += [Row("self-perceptual", "cfg", w, max(budget.guidance_rescales)) for w in budget.cfg_scales[:2]]
        rows += [Row("mse-continued", "autoguidance", w, 0.0) for w in budget.cfg_scales[:2]]
        rows += [Row(m, "null-label") for m in ("mse-continued", "self-perceptual")]
    return rows


def model_dir(ctx: Context, seed: int, model: str, chosen: dict[str, float]) -> Path:
    """The run directory a row's model name refers to, at the branch's chosen learning rate."""
    unconditional = model.startswith("uncond/")
    name = model.removeprefix("uncond/")
    root = ctx.root(seed, unconditional)
    if name == "stage1-mse":
        return teacher_dir(ctx, seed, unconditional)
    return branch_dir(root, name, chosen["self-perceptual" if name in ctx.budget.variants else name])


def evaluate_rows(ctx: Context, seed: int, rows: list[Row], chosen: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Every row for one training seed and every sampling repeat: ``{row key: [result per repeat]}``."""
    out: dict[str, Any] = {}
    n = ctx.budget.eval_samples
    for row in rows:
        path = model_dir(ctx, seed, row.model, chosen)
        guide = teacher_dir(ctx, seed) if row.guidance == "autoguidance" else None
        out[row.key] = []
        for rep in range(ctx.budget.eval_repeats):
            started = time.perf_counter()
            cfg = SampleConfig(
                steps=ctx.budget.sample_steps, cfg_scale=row.cfg_scale, guidance_rescale=row.guidance_rescale
            )
            res = ctx.evaluate(
                f"{row.key}-rep{rep}",
                seed,
                lambda p=path: load_model(p, ctx.dev)[0],
                cfg,
                list(range(rep * n, (rep + 1) * n)),  # the same seeds (and labels) for every row: paired
                guide=(lambda g=guide: load_model(g, ctx.dev)[0]) if guide else None,
                use_labels=row.guidance != "null-label" and not row.model.startswith("uncond/"),
            )
            if time.perf_counter() - started > 1:
                _log(f"seed {seed}: evaluated {row.key} repeat {rep} ({n} samples)")
            out[row.key].append(res)
    return out


def run_compare(
    out: str | Path,
    budget: Budget,
    data: DataConfig | None = None,
    device: str = "auto",
    evaluate: bool = True,
    seeds: list[int] | None = None,
    require_plateau: bool = False,
) -> dict[str, Any]:
    """Run (or resume) the whole comparison into ``out``; returns the results dictionary (empty rows when some
    seeds' work is left to other processes)."""
    out = Path(out)
    data = data or budget.data
    all_seeds = list(range(budget.training_seeds))
    my_seeds = all_seeds if seeds is None else seeds
    bad = sorted(set(my_seeds) - set(all_seeds))
    if bad:
        raise UserError(f"--seeds {bad} are outside the budget's training seeds 0..{budget.training_seeds - 1}")
    make_out_dir(out)
    atomic_write_text(out / "budget.json", json.dumps(asdict(budget), indent=2, default=str))
    t0 = time.perf_counter()
    ctx = make_context(out, budget, data, device)

    teachers = _stage1(ctx, my_seeds, require_plateau)
    sweep = {b: budget.finetune_lrs for b in branch_losses(budget)}
    for seed in my_seeds:
        train_branches(ctx, seed, sweep)
    if len(budget.finetune_lrs) > 1:
        for seed in my_seeds:
            sweep_points(ctx, [seed])
    waiting = [s for s in all_seeds if s not in my_seeds and not _sweep_done(ctx, s)]
    if waiting:
        _log(f"seeds {waiting} have not finished their sweep: rerun without --seeds (or with theirs) to continue")
        return {"rows": []}
    points = sweep_points(ctx, all_seeds) if len(budget.finetune_lrs) > 1 else {}
    chosen = choose_lrs(ctx.criterion, points) if points else {b: budget.finetune_lrs[0] for b in sweep}
    _log(f"stage-2 learning rates: {chosen}")
    rows = plan_rows(budget)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in my_seeds:
        extra = {v: (chosen["self-perceptual"],) for v in budget.variants}
        train_branches(ctx, seed, extra)
        if budget.unconditional:
            teachers[f"seed{seed}/uncond"] = _teacher_for(ctx, seed, unconditional=True)
            train_branches(ctx, seed, {b: (lr,) for b, lr in chosen.items()}, unconditional=True)
        if evaluate:
            per_seed[seed] = evaluate_rows(ctx, seed, rows, chosen)
    if seeds is not None:  # the report is the gathering call's: parallel processes never write it twice
        _log("this process's seeds are done; rerun without --seeds to gather the report")
        return {"rows": []}
    if not evaluate:
        return {"rows": []}
    from .report import losses_on_fixed_batch, write_report

    dev = ctx.dev
    _log("writing sample grids")
    grids = write_grids(ctx, chosen, dev)
    results: dict[str, Any] = {
        "budget": asdict(budget),
        "data": asdict(data),
        "criterion": asdict(ctx.criterion),
        "extractor": ctx.extractor.description,
        "reference_split": ctx.reference_split,
        "teachers": {k: asdict(v) for k, v in teachers.items()},
        "sweep": {b: {f"{lr:g}": v for lr, v in by_lr.items()} for b, by_lr in points.items()},
        "chosen_lrs": chosen,
        "rows": [asdict(r) | {"key": r.key} for r in rows],
        "evaluations": {str(s): {k: [r["metrics"] for r in v] for k, v in per_seed[s].items()} for s in all_seeds},
        "fixed_batch_losses": {
            str(s): losses_on_fixed_batch(
                ctx, s, chosen, [r.model for r in rows if r.guidance == "none"], budget.loss_batch
            )
            for s in all_seeds
        },
        "grids": [str(p.relative_to(out)) for p in grids],
        "seconds": time.perf_counter() - t0,
    }
    write_report(ctx, results)
    _log(f"report: {out / 'report.md'}")
    return results


def _sweep_done(ctx: Context, seed: int) -> bool:
    """Every stage-2 run of the sweep of this seed is trained (and, with several learning rates, evaluated)."""
    lrs = ctx.budget.finetune_lrs
    if len(lrs) == 1:
        return all(
            is_finished(branch_dir(ctx.root(seed), b, lrs[0]), ctx.budget.finetune_steps)
            for b in branch_losses(ctx.budget)
        )
    names = [f"sweep-{b}-lr{lr:g}" for b in branch_losses(ctx.budget) for lr in lrs]
    return all(is_cached(ctx.cache(n, seed)) for n in names)


def _teacher_for(ctx: Context, seed: int, unconditional: bool = False) -> TeacherResult:
    if ctx.budget.teacher is not None and not unconditional:
        return TeacherResult(run_dir=Path(ctx.budget.teacher), at_plateau=False, phase_ends=["brought by the user"])
    return train_teacher(ctx, seed, unconditional)


def _stage1(ctx: Context, seeds: list[int], require_plateau: bool) -> dict[str, TeacherResult]:
    teachers = {}
    for seed in seeds:
        result = _teacher_for(ctx, seed)
        teachers[f"seed{seed}"] = result
        if not result.at_plateau and ctx.budget.teacher is None:
            message = (
                f"seed {seed}: the teacher did not reach a plateau ({'; '.join(result.phase_ends)}): stage 2 would "
                "measure further convergence, not the objective"
            )
            if require_plateau:
                raise UserError(message + "; raise the budget's stage-1 step cap or drop --require-plateau")
            _log("WARNING: " + message)
    return teachers


def write_grids(ctx: Context, chosen: dict[str, float], device: torch.device, n_per_class: int = 4) -> list[Path]:
    """Side-by-side grids of training seed 0 under the same sampling seeds: one row per class."""
    paths = []
    models = {
        m: load_model(model_dir(ctx, 0, m, chosen), device)[0]
        for m in ("stage1-mse", "mse-continued", "self-perceptual")
    }
    k = max(models["stage1-mse"].num_classes, 1)
    seeds = list(range(10_000, 10_000 + k * n_per_class))
    labels = torch.arange(k).repeat_interleave(n_per_class) if models["stage1-mse"].num_classes else None
    mid_scale = ctx.budget.cfg_scales[len(ctx.budget.cfg_scales) // 2]
    phi = max(ctx.budget.guidance_rescales)
    for name, model in models.items():
        settings: list[tuple[str, float, Any]] = [("no-guidance", 1.0, labels)]
        if labels is not None:
            settings.append((f"cfg{mid_scale:g}-phi{phi:g}", mid_scale, labels))
        for tag, scale, lab in settings:
            cfg = SampleConfig(
                steps=ctx.budget.sample_steps, cfg_scale=scale, guidance_rescale=phi if scale != 1 else 0
            )
            images = sample(model, seeds, lab, cfg, device=device)
            paths.append(save_grid(images, ctx.out / "grids" / f"{name}-{tag}.png", nrow=n_per_class))
    if ctx.budget.unconditional:
        for name in ("stage1-mse", "mse-continued", "self-perceptual"):
            model = load_model(model_dir(ctx, 0, f"uncond/{name}", chosen), device)[0]
            images = sample(model, seeds, None, SampleConfig(steps=ctx.budget.sample_steps), device=device)
            paths.append(save_grid(images, ctx.out / "grids" / f"uncond-{name}.png", nrow=n_per_class))
    return paths


def run_demo(out: Path, steps: int | None = None, finetune_steps: int | None = None, device: str = "auto") -> None:
    """The main job: the cpu-demo budget on the built-in shapes data."""
    budget = BUDGETS["cpu-demo"]
    if steps is not None:
        budget = replace(budget, stage1=replace(budget.stage1, chunk_steps=max(steps // budget.stage1.max_chunks, 1)))
    if finetune_steps is not None:
        budget = replace(budget, finetune_steps=finetune_steps)
    run_compare(out, budget, device=device)
