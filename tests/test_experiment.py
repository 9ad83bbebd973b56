"""End to end: the fair compare workflow (plateaued teacher, stage-2 sweep, rows, paired report) and the ablation,
on a tiny budget."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import LossConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.scoring import Criterion
from perceptual_diffusion.experiments import ablation, budgets, stages
from perceptual_diffusion.experiments import compare as experiment
from perceptual_diffusion.experiments.ablation_report import ablation_verdict
from perceptual_diffusion.experiments.budgets import PlateauSchedule
from perceptual_diffusion.experiments.report import pair_by_role

TINY = budgets.Budget(
    name="test",
    data=budgets.SHAPES,
    preset="tiny",
    batch_size=8,
    stage1=PlateauSchedule(lrs=(1e-3, 1e-4), chunk_steps=2, max_chunks=2, min_chunks=2),
    finetune_steps=2,
    finetune_lrs=(1e-4, 3e-5),
    sample_steps=2,
    eval_samples=16,
    curve_samples=16,
    training_seeds=2,
    cfg_scales=(2.0,),
    guidance_rescales=(0.0, 0.7),
    extras=False,
    variants=("sp-channel-norm",),
    bootstrap=50,
    loss_batch=32,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))


def test_both_stage_two_branches_differ_only_in_the_loss(tmp_path) -> None:
    mse = stages.stage2_config(TINY, TINY.data, LossConfig(kind="mse"), 1e-4, 1, "T", "cpu")
    sp = stages.stage2_config(TINY, TINY.data, replace(TINY.perceptual, teacher="T"), 1e-4, 1, "T", "cpu")
    assert mse.train == sp.train and mse.model == sp.model and mse.sample == sp.sample
    assert mse.train.init_from == "T" and mse.train.warmup_images > 0, "stage 2 warms up: AdamW starts cold"
    assert mse.train.ema_halflife_images == int(0.1 * TINY.finetune_steps * TINY.batch_size)
    assert mse.train.seed == stages.STAGE2_SEED_OFFSET + 1, "stage 2 never replays stage 1's draws"
    s1 = stages.stage1_config(TINY, TINY.data, 0, 1e-3, 4, None, 1, "cpu")
    assert s1.train.seed != mse.train.seed and s1.train.snapshot_every == TINY.stage1.chunk_steps
    uncond = stages.stage2_config(TINY, TINY.data, LossConfig(kind="mse"), 1e-4, 1, "T", "cpu", True)
    assert uncond.model.num_classes == 0 and uncond.loss.cond_dropout == 0


def test_each_branch_gets_the_learning_rate_with_its_best_mean_criterion() -> None:
    points = {"mse-continued": {1e-4: [0.5, 0.7], 3e-5: [0.6, 0.5]}, "self-perceptual": {1e-4: [0.1], 3e-5: [0.2]}}
    assert stages.choose_lrs(Criterion("structure_precision", True), points) == {
        "mse-continued": 1e-4,
        "self-perceptual": 3e-5,
    }
    assert stages.choose_lrs(Criterion("fid", False), points)["mse-continued"] == 3e-5


def test_a_learning_rate_at_an_end_of_the_sweep_is_extended_by_the_sweeps_own_step() -> None:
    grid = {"mse-continued": (2e-4, 5e-5), "self-perceptual": (2e-4, 5e-5)}
    assert stages.extend_lrs(grid, {"mse-continued": 2e-4, "self-perceptual": 5e-5}) == {
        "mse-continued": 8e-4,
        "self-perceptual": 1.25e-5,
    }
    three = {"mse-continued": (2e-4, 5e-5, 8e-4)}
    assert stages.extend_lrs(three, {"mse-continued": 8e-4}) == {"mse-continued": 3.2e-3}, "the step stays x4"
    assert stages.extend_lrs(three, {"mse-continued": 2e-4}) == {}, "an inside optimum is bracketed"
    assert stages.extend_lrs({"mse-continued": (1e-4,)}, {"mse-continued": 1e-4}) == {}, "one rate: no sweep"
    with pytest.raises(UserError, match="learning-rate extensions"):
        replace(TINY, lr_extensions=-1)


@pytest.mark.slow
def test_parallel_seeds_extend_the_learning_rate_sweep_alike_and_a_rerun_replays_it(tmp_path, monkeypatch) -> None:
    """With two rates the best is always at an end: each branch gets one more rate, decided only once every seed's
    first sweep is evaluated, trained by each seed's own process, and chosen among all three."""
    budget = replace(TINY, lr_extensions=1, variants=(), unconditional=False, training_seeds=2)
    out = tmp_path / "x"
    assert experiment.run_compare(out, budget, device="cpu", seeds=[0], evaluate=False) == {"rows": []}
    assert not list((out / "seed0").glob("*-lr9e-06")) and not list((out / "seed0").glob("*-lr0.0003333")), (
        "no extension before every seed's first sweep is evaluated"
    )
    # Seed 1 finds seed 0's first sweep done: it decides the extension and trains its own extra runs.
    assert experiment.run_compare(out, budget, device="cpu", seeds=[1], evaluate=False) == {"rows": []}
    extra = {p.name for p in (out / "seed1").iterdir() if p.name.endswith(("-lr0.0003333", "-lr9e-06"))}
    assert len(extra) == 2, sorted(p.name for p in (out / "seed1").iterdir())
    results = experiment.run_compare(out, budget, device="cpu")
    for branch, by_lr in results["sweep"].items():
        assert len(by_lr) == 3 and all(len(v) == 2 for v in by_lr.values()), (branch, by_lr)
        assert results["chosen_lrs"][branch] in {float(lr) for lr in by_lr}
    monkeypatch.setattr(stages, "train", lambda *a, **k: pytest.fail("a finished stage-2 run was trained again"))
    assert experiment.run_compare(out, budget, device="cpu")["chosen_lrs"] == results["chosen_lrs"]


def test_rows_hold_the_papers_baselines_and_the_extras() -> None:
    keys = [r.slug for r in experiment.plan_rows(replace(TINY, extras=True, cfg_scales=(1.5, 3.0)))]
    assert keys[:3] == ["stage1-mse/none", "mse-continued/none", "self-perceptual/none"]
    assert "mse-continued/cfg-w3-phi0.7" in keys and "mse-continued/cfg-w3-phi0" in keys
    assert {"uncond/stage1-mse/none", "uncond/mse-continued/none", "uncond/self-perceptual/none"} <= set(keys)
    assert "mse-continued/autoguidance-w1.5-phi0" in keys and "self-perceptual/null-label" in keys
    assert "sp-channel-norm/none" in keys


@pytest.mark.slow
def test_compare_runs_seeds_in_parallel_calls_then_reports_a_verdict_and_resumes(tmp_path, monkeypatch) -> None:
    out = tmp_path / "cmp"
    # Round 1 of seed 0 cannot choose learning rates before seed 1's sweep exists: it stops without rows.
    assert experiment.run_compare(out, TINY, device="cpu", seeds=[0]) == {"rows": []}
    assert experiment.run_compare(out, TINY, device="cpu", seeds=[1]) == {"rows": []}
    results = experiment.run_compare(out, TINY, device="cpu")

    for seed in (0, 1):
        for branch in ("mse-continued", "self-perceptual"):
            for lr in TINY.finetune_lrs:  # every branch at every learning rate of the sweep
                assert (out / f"seed{seed}" / f"{branch}-lr{lr:g}" / "model.safetensors").is_file()
        assert (out / f"seed{seed}" / "uncond" / "stage1-mse" / "model.safetensors").is_file()
        snapshots = sorted((out / f"seed{seed}" / "stage1-phase0" / "snapshots").glob("*.safetensors"))
        assert len(snapshots) == 2, "an EMA snapshot at every chunk: the teacher's curve"
    evals = {p.name for p in (out / "eval" / "seed0").iterdir()}
    # Cache names keep their dots: a learning rate or a CFG scale is never cut at its decimal point.
    assert {"sweep-mse-continued-lr0.0001.json", "mse-continued__cfg-w2-phi0.7-rep0.npz"} <= evals
    assert set(results["chosen_lrs"]) == {"mse-continued", "self-perceptual"}
    assert set(results["chosen_lrs"].values()) <= set(TINY.finetune_lrs)
    assert set(results["evaluations"]) == {"0", "1"}
    assert len(results["teachers"]["seed0"]["points"]) == 4  # two phases x two chunks
    head = {"metrics": pair_by_role(results, "headline")}
    d = head["metrics"]["structure_precision"]
    assert len(d["per_seed"]) == 2 and d["ci_low"] <= d["estimate"] <= d["ci_high"]
    assert {"fid", "kid", "precision", "coverage", "noise_rms"} <= set(head["metrics"])
    losses = results["fixed_batch_losses"]["0"]
    assert {"stage1-mse", "mse-continued", "self-perceptual", "sp-channel-norm"} == set(losses)
    # The teacher's own prediction is not perfect, so even against itself the loss is positive.
    assert all(v["self_perceptual"] > 0 and v["mse"] > 0 for v in losses.values())

    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == "## Verdict", "the verdict opens the report"
    assert "NOT converged" in report, "a 4-step teacher cannot show a plateau, and the verdict says so"
    assert "±" not in report.split("## Results")[1].split("###")[0], "no ± over fewer than 3 seeds"
    for name in ("curves.png", "fid_vs_cfg.png", "results.json"):
        assert (out / name).is_file()
    images = re.findall(r"!\[[^]]*\]\(([^)]*)\)", report)
    assert images and len(images) == len(set(images)), "each plot and grid appears once"

    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage or evaluation was run again")

    monkeypatch.setattr(stages, "train", refuse)
    monkeypatch.setattr("perceptual_diffusion.experiments.teacher.train", refuse)
    monkeypatch.setattr("perceptual_diffusion.evaluation.evaluate.evaluate_model", refuse)
    again = experiment.run_compare(out, TINY, device="cpu")
    assert again["evaluations"] == results["evaluations"]


def test_require_plateau_stops_before_stage_two(tmp_path) -> None:
    budget = replace(
        TINY, training_seeds=1, stage1=PlateauSchedule(lrs=(1e-3,), chunk_steps=1, max_chunks=1, min_chunks=1)
    )
    with pytest.raises(UserError, match="did not reach a plateau"):
        experiment.run_compare(tmp_path / "c", budget, device="cpu", require_plateau=True)
    assert not any((tmp_path / "c" / "seed0").glob("mse-continued*"))


def test_ablation_verdict_counts_variants_by_their_intervals() -> None:
    def diff(estimate: float, low: float, high: float) -> dict:
        return {"estimate": estimate, "ci_low": low, "ci_high": high, "per_seed": [estimate] * 3}

    result = {
        "criterion": {"key": "structure_precision"},
        "paired": {
            "self-perceptual": {"metrics": {"structure_precision": diff(-0.01, -0.02, -0.004)}},
            "sp-lr/10": {"metrics": {"structure_precision": diff(0.001, -0.003, 0.005)}},
            "sp-all": {"metrics": {"structure_precision": diff(0.02, 0.01, 0.03)}},
        },
    }
    text = " ".join(ablation_verdict(result))
    assert "1 of 3 self-perceptual variants are better" in text and "sp-all" in text.split("better")[1]
    assert "1 are worse: self-perceptual" in text and "1 are within the noise: sp-lr/10" in text
    assert "The best variant is sp-all +0.0200" in text
    fid = {"criterion": {"key": "fid"}, "paired": {"a": {"metrics": {"fid": diff(-3.0, -4.0, -2.0)}}}}
    assert "1 of 1 self-perceptual variants are better" in " ".join(ablation_verdict(fid)), "lower FID is better"


@pytest.mark.slow
def test_ablation_pairs_each_variant_with_its_baseline_from_the_same_teacher(tmp_path) -> None:
    variants = [
        ablation.Variant("mse-continued", LossConfig(kind="mse")),
        ablation.Variant("self-perceptual", ablation.SP),
        ablation.Variant("sp+mse", replace(ablation.SP, mse_weight=1.0)),
        ablation.Variant("mse-continued/early", LossConfig(kind="mse"), teacher="early"),
        ablation.Variant("sp/early", ablation.SP, teacher="early"),
    ]
    budget = replace(TINY, training_seeds=1)
    result = ablation.run_ablation(tmp_path / "abl", budget, variants, device="cpu")
    early = json.loads((tmp_path / "abl" / "seed0" / "sp@early-lr0.0001" / "config.json").read_text())
    assert "stage1-phase0/snapshots/ema-00000002" in early["loss"]["teacher"], "the early teacher: the first snapshot"
    assert set(result["paired"]) == {"self-perceptual", "sp+mse", "sp/early"}
    assert result["paired"]["sp/early"]["baseline"] == "mse-continued/early"
    text = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| sp+mse - mse-continued |" in text and "| sp/early - mse-continued/early |" in text
    assert text.splitlines()[2] == "## Verdict", "the verdict opens the ablation report too"
    assert ablation.baseline_of(ablation.Variant("x", ablation.SP, steps_factor=4.0)) == "mse-continued-4x-steps"


@pytest.mark.slow
def test_compare_cli_accepts_budget_overrides(tmp_path, capsys, monkeypatch) -> None:
    # The CLI's plumbing on a tiny budget standing in for cpu-demo (the real one trains the small U-Net).
    monkeypatch.setitem(budgets.BUDGETS, "cpu-demo", replace(TINY, training_seeds=1, unconditional=False))
    args = ["compare", "--out", str(tmp_path / "c"), "--budget", "cpu-demo", "--steps", "4", "--finetune-steps", "1"]
    code = main(args + ["--eval-samples", "12", "--curve-samples", "12", "--device", "cpu"])
    assert code == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    stage1 = results["budget"]["stage1"]
    assert (stage1["chunk_steps"], stage1["max_chunks"]) == (2, 2), "a cap of 4 steps in whole chunks of 2"
    assert results["budget"]["eval_samples"] == 12 and results["budget"]["finetune_steps"] == 1
    assert main(["compare", "--out", str(tmp_path / "e"), "--budget", "cpu-demo", "--steps", "3"]) == 2
    assert "--steps 3 must be at most the budget's chunk of 2 steps" in capsys.readouterr().err, "never rounded up"
    assert main(["compare", "--out", str(tmp_path / "d"), "--eval-samples", "0"]) == 2
    assert "--eval-samples must be >= 1" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["compare", "--out", str(tmp_path / "f"), "--device", "cpu"]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_experiment_cli_refuses_bad_seeds_and_variants(tmp_path, capsys) -> None:
    assert main(["ablate", "--out", str(tmp_path), "--variants", "self-perceptual,nope"]) == 2
    assert "unknown --variants ['nope']" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path), "--seeds", "0,x"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
    assert main(["compare", "--out", str(tmp_path), "--seeds", "7", "--device", "cpu"]) == 2
    assert "outside the budget's training seeds" in capsys.readouterr().err


def test_a_comparison_folder_refuses_other_settings_naming_each_and_never_mixes(tmp_path) -> None:
    from dataclasses import asdict

    from perceptual_diffusion.experiments.workspace import SHARED_FIELDS, check_settings

    settings = {"budget": asdict(TINY), "data": asdict(TINY.data)}
    typo = {**settings, "data": {**settings["data"], "path": "no/such/folder"}}
    check_settings(tmp_path, typo)
    # No run or evaluation yet: a failed first attempt does not lock the folder to its mistaken settings.
    check_settings(tmp_path, settings)
    (tmp_path / "seed0").mkdir()  # the first run of the comparison
    check_settings(tmp_path, settings)  # the same settings resume
    # Fields the gathering call recomputes anyway (the bootstrap, the name) may change.
    check_settings(tmp_path, {**settings, "budget": asdict(replace(TINY, bootstrap=7, name="x"))})
    changed = {**settings, "budget": asdict(replace(TINY, eval_samples=32, finetune_steps=1))}
    with pytest.raises(UserError) as err:
        check_settings(tmp_path, changed)
    assert "budget.eval_samples: 16 -> 32" in str(err.value) and "budget.finetune_steps: 2 -> 1" in str(err.value)
    assert "new --out" in str(err.value)
    teacher = {**settings, "budget": asdict(replace(TINY, teacher="runs/mine"))}
    with pytest.raises(UserError, match="budget.teacher"):
        check_settings(tmp_path, teacher)
    # ablate shares only the runs and evaluations: other rows of compare's budget are its own business.
    check_settings(tmp_path, {**settings, "budget": asdict(replace(TINY, extras=True))}, fields=SHARED_FIELDS)
    with pytest.raises(UserError, match="eval_samples"):
        check_settings(tmp_path, changed, fields=SHARED_FIELDS)


@pytest.mark.slow
def test_compare_chooses_each_guidance_methods_best_setting_on_held_out_seeds(tmp_path, monkeypatch, capsys) -> None:
    from perceptual_diffusion.evaluation import features

    # The standard-features rows without the fid-helper wheel (CI has none): a second extractor under that name.
    standard = lambda device: replace(features.domain_extractor("shapes", 16, device=device), key="standard-x")  # noqa: E731
    monkeypatch.setattr(features, "fid_helper_available", lambda: True)
    monkeypatch.setattr(features, "fid_helper_extractor", standard)
    grids = (
        budgets.GuidanceGrid("cfg", scales=(1.5, 2.0), rescales=(0.0, 0.7)),
        budgets.GuidanceGrid("apg", scales=(2.0,)),
        budgets.GuidanceGrid("interval", scales=(2.0,), intervals=((0.5, None),)),
        budgets.GuidanceGrid("autoguidance", scales=(1.5,), guides=("stage1-chunk1",)),
    )
    budget = replace(
        TINY,
        training_seeds=1,
        variants=(),
        guidance_grids=grids,
        grid_extensions=1,
        selection_samples=12,
        inception=True,
    )
    results = experiment.run_compare(tmp_path / "g", budget, device="cpu")
    selection = results["guidance_selection"]
    assert set(selection) == {"cfg", "apg", "interval", "autoguidance"}
    cfg = selection["cfg"]
    assert len(cfg["points"]) == 2 * len(cfg["scales"]) and len(cfg["scales"]) == 3, "an end optimum is extended"
    means = {k: p["mean"] for k, p in cfg["points"].items()}
    assert cfg["best"]["key"] == min(means, key=means.get), "the best mean criterion on the selection seeds"
    guided = [r for r in results["rows"] if r["guidance"] not in ("none", "null-label")]
    assert [r["key"] for r in guided] == [s["best"]["key"] for s in selection.values()]
    evals = {p.name for p in (tmp_path / "g" / "eval" / "seed0").iterdir()}
    assert any(name.startswith("select-mse-continued__apg") for name in evals)
    printed = [line for line in capsys.readouterr().out.splitlines() if "guidance grid point" in line]
    assert len(printed) == len([n for n in evals if n.startswith("select-") and n.endswith(".json")]) > 8
    assert "seed 0: guidance grid point mse-continued, CFG w=1.5 φ=0: structure_precision " in printed[0], (
        "one line per point"
    )
    roles = [(p["role"], p["method"]) for p in results["pairs"]]
    assert roles[0] == ("headline", None) and ("vs-guidance", "autoguidance") in roles
    report = (tmp_path / "g" / "report.md").read_text()
    assert "## Guidance baselines at their best settings" in report and "(chosen)" in report
    assert "its best setting on held-out seeds" in report.split("## Results")[0]
    inc = results["inception"]
    assert [r["key"] for r in inc["rows"]] == [
        "stage1-mse/none",
        "mse-continued/none",
        "self-perceptual/none",
        selection["cfg"]["best"]["key"],
    ], "the models without guidance and MSE + CFG at its best setting"
    assert (tmp_path / "g" / "eval-inception" / "seed0" / "self-perceptual__none-rep0.json").is_file()
    assert inc["pairs"][0]["role"] == "headline" and "fid" in inc["pairs"][0]["metrics"]
    assert "## The same rows in standard Inception features" in report
    best = selection["cfg"]["best"]
    tag = f"cfg{best['cfg_scale']:g}-phi{best['guidance_rescale']:g}"
    assert f"grids/mse-continued-{tag}.png" in results["grids"], "the grids show CFG at its chosen setting"
