"""compare --lora-rank (issue 20, item 4): both stage-2 branches as LoRA adapters of one rank on the same teachers,
inside the full fine-tune's comparison folder; and settings of folders made before a budget field existed."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import LoraConfig, ScheduleConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.experiments import budgets, stages
from perceptual_diffusion.experiments import compare as experiment
from perceptual_diffusion.experiments.analysis import plan_pairs
from perceptual_diffusion.experiments.budgets import GuidanceGrid, PlateauSchedule
from perceptual_diffusion.experiments.lora_arm import LoraArm
from perceptual_diffusion.experiments.rows import Pair, Row
from perceptual_diffusion.experiments.workspace import check_settings

# One training seed, one full-fine-tune lr, a one-point CFG grid and two LoRA lrs: the tiniest compare that still
# sweeps the LoRA learning rate and chooses a guidance setting for the MSE-continued LoRA.
TINY = budgets.Budget(
    name="test",
    data=budgets.SHAPES,
    preset="tiny",
    batch_size=8,
    stage1=PlateauSchedule(lrs=(1e-3,), chunk_steps=2, max_chunks=2, min_chunks=2),
    finetune_steps=2,
    finetune_lrs=(1e-4,),
    sample_steps=2,
    eval_samples=12,
    curve_samples=12,
    training_seeds=1,
    unconditional=False,
    extras=False,
    bootstrap=20,
    loss_batch=16,
    guidance_grids=(GuidanceGrid("cfg", scales=(1.5,), rescales=(0.7,)),),
    grid_extensions=0,
    selection_samples=12,
    lora_lrs=(1e-3, 3e-4),
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))


def test_an_old_folders_settings_without_a_later_field_resume_as_its_default(tmp_path) -> None:
    settings = {"budget": TINY, "data": TINY.data}
    check_settings(tmp_path, settings)
    (tmp_path / "seed0").mkdir()
    stored = json.loads((tmp_path / "settings.json").read_text())
    # A folder made before these fields existed: a top-level field, a nested one, a whole nested config, a field
    # of the data config, and a field of each guidance grid.
    for name in ("lora_lrs", "schedule", "perceptual", "inception_samples"):
        del stored["budget"][name]
    del stored["budget"]["stage1"]["rule"]
    del stored["data"]["on_bad_image"]
    for grid in stored["budget"]["guidance_grids"]:
        del grid["guides"]
    (tmp_path / "settings.json").write_text(json.dumps(stored))
    check_settings(tmp_path, settings)  # every missing field held its declared default: resumes
    # A missing field compares as its *default*, not as whatever is asked now: the old folder ran the default.
    with pytest.raises(UserError, match=r"budget.stage1.rule: combined-se -> paired"):
        check_settings(tmp_path, {**settings, "budget": replace(TINY, stage1=replace(TINY.stage1, rule="paired"))})
    flow = replace(TINY, schedule=ScheduleConfig(family="flow"))
    with pytest.raises(UserError, match=r"budget.schedule.family: ddpm -> flow"):
        check_settings(tmp_path, {**settings, "budget": flow})
    # The LoRA arm's learning rates are the arm's own settings (lora_arm.check_arm), not the folder's.
    check_settings(tmp_path, {**settings, "budget": replace(TINY, lora_lrs=(1e-2,))})


def test_a_lora_arm_names_its_runs_rows_and_pairs_by_rank_and_gets_typed_roles() -> None:
    arm = LoraArm(LoraConfig(rank=4, base_sha256="x" * 64))
    assert (arm.mse, arm.sp) == ("lora4-mse-continued", "lora4-self-perceptual") and arm.lora.base_sha256 is None
    losses = arm.branches(TINY)
    assert losses[arm.mse].kind == "mse" and losses[arm.sp] == TINY.perceptual
    assert stages.swept(TINY, arm) == (losses, TINY.lora_lrs) and stages.swept(TINY)[1] == TINY.finetune_lrs
    rows = [Row(m) for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row("mse-continued", "cfg", 1.5, 0.7), *experiment.plan_rows(TINY, {}, arm)]
    rows.append(Row(arm.mse, "cfg", 1.2, 0.7))
    full = plan_pairs(rows, (), selected=True)
    pairs = plan_pairs(rows, (), selected=True, arm=arm)
    assert pairs[: len(full)] == full, "the full fine-tune's pairs come first, unchanged"
    lora = [(p.role, p.a.model, p.b.slug) for p in pairs[len(full) :]]
    assert lora == [
        ("lora-headline", arm.sp, f"{arm.mse}/none"),
        ("lora-vs-full", arm.sp, "self-perceptual/none"),
        ("lora-vs-full", arm.mse, "mse-continued/none"),
        ("lora-vs-guidance", arm.sp, f"{arm.mse}/cfg-w1.2-phi0.7"),
    ]
    assert [Pair.from_dict(json.loads(json.dumps(p.to_dict()))) for p in pairs] == pairs
    assert (
        pairs[-1].title
        == "LoRA: lora4-self-perceptual (no guidance) vs lora4-mse-continued, CFG w=1.2 φ=0.7, its best setting"
    )
    # v1 budgets (no grids): the fixed CFG rows, for the LoRA MSE branch too.
    v1 = experiment.plan_rows(replace(TINY, guidance_grids=(), cfg_scales=(2.0,)), {}, arm)
    assert f"{arm.mse}/cfg-w2-phi0.7" in {r.slug for r in v1}


@pytest.mark.slow
def test_compare_lora_rank_runs_both_branches_as_adapters_on_the_shared_teachers(tmp_path, monkeypatch) -> None:
    out = tmp_path / "cmp"
    results = experiment.run_compare(out, TINY, device="cpu", lora=LoraConfig(rank=2))
    seed = out / "seed0"
    teacher = (seed / "stage1-mse").resolve()
    for branch in ("mse-continued", "self-perceptual"):
        assert (seed / f"{branch}-lr0.0001" / "model.safetensors").is_file(), "the full fine-tune runs beside"
        for lr in ("0.001", "0.0003"):
            config = json.loads((seed / f"lora2-{branch}-lr{lr}" / "config.json").read_text())
            assert config["lora"]["rank"] == 2 and config["train"]["lr"] == float(lr)
            assert str(teacher) in config["train"]["init_from"], "the base of each adapter is the seed's teacher"
    sp = json.loads((seed / "lora2-self-perceptual-lr0.001" / "config.json").read_text())
    assert sp["loss"]["teacher_sha256"] == sp["lora"]["base_sha256"], "teacher = base: the shared teacher"
    full_sp = json.loads((seed / "self-perceptual-lr0.0001" / "config.json").read_text())
    assert {k: v for k, v in sp["train"].items() if k not in ("lr",)} == {
        k: v for k, v in full_sp["train"].items() if k not in ("lr",)
    }, "equal schedules: only the learning rate differs"
    evals = {p.name for p in (out / "eval" / "seed0").iterdir()}
    assert {"lora2-self-perceptual__none-rep0.json", "sweep-lora2-mse-continued-lr0.001.json"} <= evals
    assert {"self-perceptual__none-rep0.json", "select-lora2-mse-continued__cfg-w1.5-phi0.7.json"} <= evals

    lora = results["lora"]
    assert lora["shared_teacher"] == {"0": True} and set(lora["chosen_lrs"]) == {
        "lora2-mse-continued",
        "lora2-self-perceptual",
    }
    assert 0 < lora["adapter_parameters"] < lora["base_parameters"]
    # Two rates put the best at an end: the arm's own sweep is extended (Budget.lora_lr_extensions, default 2).
    assert all(len(by_lr) > len(TINY.lora_lrs) for by_lr in lora["sweep"].values()), lora["sweep"]
    assert json.loads((out / "lora2.json").read_text())["lora_lr_extensions"] == 2
    assert set(results["chosen_lrs"]) == {"mse-continued", "self-perceptual"}, "the full fine-tune's choice apart"
    roles = [(p["role"], p["a"]["model"]) for p in results["pairs"]]
    assert ("lora-headline", "lora2-self-perceptual") in roles and (
        "lora-vs-guidance",
        "lora2-self-perceptual",
    ) in roles
    assert "lora2-self-perceptual" in results["fixed_batch_losses"]["0"]
    report = (out / "report.md").read_text()
    assert report.splitlines()[2] == "## Verdict"
    section = report.split("## LoRA arms (rank 2)")[1].split("## Results")[0]
    assert "As LoRA adapters (rank 2, alpha 2)" in section and "its own base" in section
    assert "lora2-mse-continued: lr 0.001" in section and "### LoRA: guidance baselines" in section

    # The same rank with another adapter option is refused in one line: finished runs are never retrained.
    with pytest.raises(UserError, match=r"rank-2 arms trained with other options \(lora.alpha: 2.0 -> 4.0\)"):
        experiment.run_compare(out, TINY, device="cpu", lora=LoraConfig(rank=2, alpha=4.0))
    with pytest.raises(UserError, match=r"lora_lrs: \[0.001, 0.0003\] -> \[0.01\]"):
        experiment.run_compare(out, replace(TINY, lora_lrs=(1e-2,)), device="cpu", lora=LoraConfig(rank=2))

    # Another rank joins the same folder beside rank 2 (its own runs, rows and caches); nothing of stage 1, the
    # full fine-tune or rank 2 is trained again.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr("perceptual_diffusion.experiments.teacher.train", refuse)
    other = experiment.run_compare(out, replace(TINY, lora_lrs=(1e-3,)), device="cpu", lora=LoraConfig(rank=1))
    assert (seed / "lora1-self-perceptual-lr0.001" / "model.safetensors").is_file()
    assert other["evaluations"]["0"]["self-perceptual/none"] == results["evaluations"]["0"]["self-perceptual/none"]
    assert other["lora"]["prefix"] == "lora1" and "lora2-mse-continued/none" not in {r["key"] for r in other["rows"]}
    monkeypatch.setattr(stages, "train", refuse)
    again = experiment.run_compare(out, TINY, device="cpu", lora=LoraConfig(rank=2))
    assert again["evaluations"] == results["evaluations"] and again["lora"]["chosen_lrs"] == lora["chosen_lrs"]
    plain = experiment.run_compare(out, TINY, device="cpu")  # the full fine-tune alone still resumes the folder
    assert "lora" not in plain and "## LoRA arms" not in (out / "report.md").read_text()


def test_compare_cli_passes_the_lora_options(tmp_path, monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(experiment, "run_compare", lambda out, budget, **kw: seen.update(budget=budget, **kw))
    args = ["compare", "--out", str(tmp_path / "c"), "--lora-rank", "8", "--lora-alpha", "4", "--lora-lrs", "2e-3,5e-4"]
    assert main([*args, "--device", "cpu"]) == 0
    assert seen["lora"] == LoraConfig(rank=8, alpha=4.0) and seen["budget"].lora_lrs == (2e-3, 5e-4)
    assert main(["compare", "--out", str(tmp_path / "d"), "--device", "cpu"]) == 0
    assert seen["lora"] is None and seen["budget"].lora_lrs == budgets.Budget.lora_lrs
