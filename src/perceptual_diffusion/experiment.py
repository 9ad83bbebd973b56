"""The paper's comparison as one resumable workflow (``compare``; ``demo`` is its CPU-sized default).

Stage 1 trains a class-conditional MSE model (with condition dropout, so it also samples unconditionally and with
CFG). Stage 2 starts two runs from its EMA weights for the same number of steps: self-perceptual fine-tuning with
the stage-1 model as frozen teacher, and plain MSE continued training (the fair baseline). Then every model is
evaluated without guidance, the MSE models with CFG at several scales, all unconditionally, over several sampling
seeds; ``report.write_report`` turns the rows into report.md, results.json, plots and grids.

Every stage writes its output into its own folder and is skipped when the command is repeated after it finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_write_text
from .config import DataConfig, LossConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig, TrainConfig
from .data import data_shape
from .grid import save_grid
from .networks import DiffusionUNet
from .sampling import sample
from .training import is_finished, load_model, resolve_device, train


@dataclass(frozen=True)
class Budget:
    """How much work a comparison does; presets below are sized by measurement (README, 'Budgets')."""

    name: str
    data: DataConfig
    preset: str
    batch_size: int
    stage1_steps: int
    stage1_lr: float
    finetune_steps: int
    finetune_lr: float
    sample_steps: int
    eval_samples: int
    eval_repeats: int
    training_seeds: int = 1
    cfg_scales: tuple[float, ...] = (1.5, 2.0, 3.0, 5.0, 7.5)
    guidance_rescales: tuple[float, ...] = (0.0, 0.7)
    perceptual: LossConfig = field(default_factory=lambda: LossConfig(kind="self-perceptual", teacher="<stage1>"))
    extras: bool = True  # beyond the paper: self-perceptual + CFG, and autoguidance by the stage-1 model


SHAPES = DataConfig(source="shapes", image_size=16)
FASHION = DataConfig(source="fashion-mnist", image_size=28)

BUDGETS: dict[str, Budget] = {
    # Under 10 minutes on 2 CPU cores: the demo (timed in the README).
    "cpu-demo": Budget(
        "cpu-demo",
        SHAPES,
        "small",
        64,
        800,
        2e-3,
        250,
        2e-4,
        25,  # DDIM steps: half the paper's 50, for the CPU budget
        300,
        2,
        cfg_scales=(1.5, 3.0, 7.5),
        guidance_rescales=(0.0,),
        extras=False,
    ),
    # About an hour on 2 idle CPU cores, estimated from benchmarks/throughput.py (not yet timed end to end):
    # 2 x (2000 + 2 x 500) training steps, then 17 rows x 2 repeats x 2 seeds x 1,000 samples of 25 DDIM steps.
    "cpu-full": Budget(
        "cpu-full",
        SHAPES,
        "small",
        64,
        2000,
        2e-3,
        500,
        2e-4,
        25,
        1000,
        2,
        training_seeds=2,
        cfg_scales=(1.5, 3.0, 7.5),
    ),
    # One GPU: Fashion-MNIST with the base U-Net, the paper's 50 DDIM steps. Sized by estimate for ~10 minutes on
    # an H100; not yet run (no GPU was available to this project so far).
    "gpu": Budget("gpu", FASHION, "base", 256, 4000, 5e-4, 1000, 5e-5, 50, 2000, 2, training_seeds=1),
}


def _run_config(
    budget: Budget,
    data: DataConfig,
    loss: LossConfig,
    steps: int,
    lr: float,
    seed: int,
    init_from: str | None,
    device: str,
) -> RunConfig:
    channels, num_classes = data_shape(data)
    return RunConfig(
        schedule=ScheduleConfig(),
        model=ModelConfig(preset=budget.preset, image_size=data.image_size, channels=channels, num_classes=num_classes),
        data=data,
        loss=loss,
        train=TrainConfig(
            steps=steps,
            batch_size=budget.batch_size,
            lr=lr,
            seed=seed,
            init_from=init_from,
            device=device,
            progress=True,
            log_every=25,
            checkpoint_every=max(steps // 4, 1),
            sample_every=steps,
            warmup_images=0 if init_from else TrainConfig.warmup_images,
            ema_halflife_images=min(TrainConfig.ema_halflife_images, steps * budget.batch_size // 8),
        ),
        sample=SampleConfig(steps=budget.sample_steps),
    )


@dataclass(frozen=True)
class Stage:
    """One training run of the comparison."""

    name: str
    run_dir: Path
    config: RunConfig


def plan_stages(out: Path, budget: Budget, data: DataConfig, device: str) -> list[Stage]:
    """Stage 1 and the two stage-2 branches, for each training seed."""
    stages = []
    for seed in range(budget.training_seeds):
        root = out / f"seed{seed}"
        s1 = root / "stage1-mse"
        stages.append(
            Stage(
                f"seed{seed}/stage1-mse",
                s1,
                _run_config(
                    budget, data, LossConfig(kind="mse"), budget.stage1_steps, budget.stage1_lr, seed, None, device
                ),
            )
        )
        perceptual = replace(budget.perceptual, teacher=str(s1))
        stages.append(
            Stage(
                f"seed{seed}/self-perceptual",
                root / "self-perceptual",
                _run_config(budget, data, perceptual, budget.finetune_steps, budget.finetune_lr, seed, str(s1), device),
            )
        )
        stages.append(
            Stage(
                f"seed{seed}/mse-continued",
                root / "mse-continued",
                _run_config(
                    budget,
                    data,
                    LossConfig(kind="mse"),
                    budget.finetune_steps,
                    budget.finetune_lr,
                    seed,
                    str(s1),
                    device,
                ),
            )
        )
    return stages


@dataclass(frozen=True)
class Row:
    """One evaluated (model, guidance) combination."""

    model: str  # stage name within a seed: stage1-mse, self-perceptual, mse-continued
    guidance: str  # "none", "cfg", "uncond", "autoguidance"
    cfg_scale: float = 1.0
    guidance_rescale: float = 0.0

    @property
    def key(self) -> str:
        if self.guidance in ("none", "uncond"):
            return f"{self.model}/{self.guidance}"
        return f"{self.model}/{self.guidance}-w{self.cfg_scale:g}-phi{self.guidance_rescale:g}"


def plan_rows(budget: Budget) -> list[Row]:
    """The table's rows: no guidance for every model, CFG for the MSE baseline, unconditional for both branches."""
    rows = [Row(m, "none") for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row("mse-continued", "cfg", w, phi) for phi in budget.guidance_rescales for w in budget.cfg_scales]
    rows += [Row(m, "uncond") for m in ("mse-continued", "self-perceptual")]
    if budget.extras:
        rows += [Row("self-perceptual", "cfg", w, 0.0) for w in budget.cfg_scales[:3]]
        rows += [Row("mse-continued", "autoguidance", w, 0.0) for w in budget.cfg_scales[:3]]
    return rows


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def train_stages(stages: list[Stage]) -> None:
    """Train each stage that has not finished; print which stage runs and an estimate of how long it takes."""
    speed: float | None = None
    for i, stage in enumerate(stages, 1):
        tc = stage.config.train
        if is_finished(stage.run_dir, tc.steps):
            _log(f"stage {i}/{len(stages)} {stage.name}: finished earlier, skipped")
            continue
        eta = f", about {tc.steps * tc.batch_size / speed:.0f} s" if speed else ""
        _log(f"stage {i}/{len(stages)} {stage.name}: {tc.steps} steps of {stage.config.loss.kind}{eta}")
        result = train(stage.config, stage.run_dir)
        speed = speed or result.images_per_second


def write_grids(out: Path, budget: Budget, device: torch.device, seed: int = 0, n_per_class: int = 4) -> list[Path]:
    """Side-by-side grids under the same seeds: one row per class, per model and guidance."""
    root = out / f"seed{seed}"
    paths = []
    models: dict[str, DiffusionUNet] = {
        m: load_model(root / m, device)[0] for m in ("stage1-mse", "mse-continued", "self-perceptual")
    }
    k = models["stage1-mse"].num_classes
    seeds = list(range(10_000, 10_000 + k * n_per_class))
    labels = torch.arange(k).repeat_interleave(n_per_class)
    mid_scale = budget.cfg_scales[len(budget.cfg_scales) // 2]
    for name, model in models.items():
        for tag, scale, lab in (
            ("no-guidance", 1.0, labels),
            (f"cfg{mid_scale:g}", mid_scale, labels),
            ("uncond", 1.0, None),
        ):
            cfg = SampleConfig(steps=budget.sample_steps, cfg_scale=scale)
            images = sample(model, seeds, lab, cfg, device=device)
            paths.append(save_grid(images, out / "grids" / f"{name}-{tag}.png", nrow=n_per_class))
    return paths


def run_compare(
    out: str | Path, budget: Budget, data: DataConfig | None = None, device: str = "auto", evaluate: bool = True
) -> dict[str, Any]:
    """Run (or resume) the whole comparison into ``out``; returns the results dictionary."""
    out = Path(out)
    data = data or budget.data
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "budget.json", json.dumps(asdict(budget), indent=2, default=str))
    t0 = time.perf_counter()
    stages = plan_stages(out, budget, data, device)
    train_stages(stages)
    dev = resolve_device(device)
    _log("writing sample grids")
    grids = write_grids(out, budget, dev)
    results: dict[str, Any] = {
        "budget": asdict(budget),
        "stages": {s.name: s.config.to_dict() for s in stages},
        "grids": [str(p.relative_to(out)) for p in grids],
        "rows": [],
    }
    if evaluate:
        from .report import evaluate_rows, write_report

        results["rows"] = evaluate_rows(out, budget, data, plan_rows(budget), dev, _log)
        results["seconds"] = time.perf_counter() - t0
        write_report(out, results)
        _log(f"report: {out / 'report.md'}")
    return results


def run_demo(out: Path, steps: int | None = None, finetune_steps: int | None = None, device: str = "auto") -> None:
    """The main job: the cpu-demo budget on the built-in shapes data."""
    budget = BUDGETS["cpu-demo"]
    if steps is not None or finetune_steps is not None:
        budget = replace(
            budget, stage1_steps=steps or budget.stage1_steps, finetune_steps=finetune_steps or budget.finetune_steps
        )
    run_compare(out, budget, device=device)
