"""End to end: the compare workflow (stages, rows, report) and the ablation, on a tiny budget."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from perceptual_diffusion import ablation, experiment, training
from perceptual_diffusion.cli import main
from perceptual_diffusion.config import LossConfig

TINY = experiment.Budget(
    name="test",
    data=experiment.SHAPES,
    preset="tiny",
    batch_size=8,
    stage1_steps=4,
    stage1_lr=1e-3,
    finetune_steps=2,
    finetune_lr=1e-4,
    sample_steps=3,
    eval_samples=16,
    eval_repeats=2,
    training_seeds=1,
    cfg_scales=(2.0, 4.0),
    guidance_rescales=(0.0, 0.7),
    extras=True,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))


@pytest.mark.slow
def test_compare_writes_every_row_and_resumes_without_recomputing(tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    results = experiment.run_compare(out, TINY, device="cpu")

    rows = {r["key"]: r for r in results["rows"]}
    assert set(rows) == {row.key for row in experiment.plan_rows(TINY)}
    # The paper's comparison: both stage-2 branches without guidance, MSE with CFG, both unconditional.
    for key in ("self-perceptual/none", "mse-continued/none", "mse-continued/cfg-w2-phi0.7", "self-perceptual/uncond"):
        assert key in rows
    for row in rows.values():
        assert len(row["runs"]) == TINY.eval_repeats * TINY.training_seeds
        assert row["fid"] >= 0 and 0 <= row["exact_precision"] <= 1
        assert row["fid_std"] >= 0  # two repeats: a standard deviation exists
    # Sampling repeats use disjoint seeds, so two repeats of one row are different draws.
    runs = rows["mse-continued/none"]["runs"]
    assert runs[0]["seeds"] != runs[1]["seeds"]

    report = (out / "report.md").read_text()
    assert "self-perceptual, no guidance" in report and "CFG w=2 phi=0.7" in report
    for name in ("fid_vs_cfg.png", "precision_recall.png", "results.json"):
        assert (out / name).is_file()
    assert len(list((out / "grids").glob("*.png"))) == 9  # 3 models x (no guidance, CFG, unconditional)
    stored = json.loads((out / "results.json").read_text())
    assert stored["budget"]["name"] == "test" and len(stored["rows"]) == len(rows)

    # Repeating the command recomputes nothing: no training, no evaluation.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished stage or evaluation was run again")

    monkeypatch.setattr(experiment, "train", refuse)
    monkeypatch.setattr("perceptual_diffusion.evaluate.evaluate_model", refuse)
    again = experiment.run_compare(out, TINY, device="cpu")
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in results["rows"]]


def test_stage_two_branches_start_from_stage_one_for_the_same_steps(tmp_path):
    stages = experiment.plan_stages(tmp_path, replace(TINY, training_seeds=2), TINY.data, "cpu")
    assert [s.name for s in stages][:3] == ["seed0/stage1-mse", "seed0/self-perceptual", "seed0/mse-continued"]
    stage1, sp, mse = stages[:3]
    assert sp.config.loss.kind == "self-perceptual" and sp.config.loss.teacher == str(stage1.run_dir)
    assert sp.config.train.init_from == mse.config.train.init_from == str(stage1.run_dir)
    assert sp.config.train.steps == mse.config.train.steps == TINY.finetune_steps
    assert sp.config.train.lr == mse.config.train.lr
    assert stages[3].config.train.seed == 1  # the second training seed really is another seed


@pytest.mark.slow
def test_ablation_reports_each_variant_against_its_baseline(tmp_path):
    variants = [
        ablation.Variant("mse-continued", LossConfig(kind="mse")),
        ablation.Variant("self-perceptual", ablation.SP),
        ablation.Variant("sp+mse", replace(ablation.SP, mse_weight=1.0)),
        ablation.Variant("mse-continued/early", LossConfig(kind="mse"), teacher="early"),
        ablation.Variant("sp/early", ablation.SP, teacher="early"),
    ]
    result = ablation.run_ablation(tmp_path / "abl", TINY, variants, device="cpu")
    assert [r["model"] for r in result.rows] == [v.name for v in variants]
    assert set(result.teachers) == {"seed0/converged", "seed0/early"}
    # The early teacher is stage 1 stopped at a quarter of its steps, and sp/early fine-tunes from it.
    early = json.loads((tmp_path / "abl" / "seed0" / "sp@early" / "config.json").read_text())
    assert early["loss"]["teacher"].endswith("stage1-mse-early/model.safetensors")
    assert training.load_model(tmp_path / "abl" / "seed0" / "stage1-mse-early")[2] == 1
    text = (tmp_path / "abl" / "ablation.md").read_text()
    assert "sp/early" in text and "exact precision" in text
    # Each self-perceptual variant is paired with the MSE run from the same teacher for the same steps.
    assert "| sp+mse - mse-continued |" in text and "| sp/early - mse-continued/early |" in text
    assert ablation.baseline_of(ablation.Variant("x", ablation.SP, steps_factor=4.0)) == "mse-continued-4x-steps"


@pytest.mark.slow
def test_compare_cli_accepts_budget_overrides(tmp_path, capsys):
    code = main(
        [
            "compare",
            "--out",
            str(tmp_path / "c"),
            "--budget",
            "cpu-demo",
            "--steps",
            "2",
            "--finetune-steps",
            "1",
            "--eval-samples",
            "12",
            "--eval-repeats",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "c" / "results.json").read_text())
    assert results["budget"]["stage1_steps"] == 2 and results["budget"]["eval_samples"] == 12
    assert main(["compare", "--out", str(tmp_path / "d"), "--eval-samples", "0"]) == 2
    assert "--eval-samples must be >= 1" in capsys.readouterr().err


def test_ablate_cli_refuses_unknown_variants_and_seeds(tmp_path, capsys):
    assert main(["ablate", "--out", str(tmp_path), "--variants", "self-perceptual,nope"]) == 2
    assert "unknown --variants ['nope']" in capsys.readouterr().err
    assert main(["ablate", "--out", str(tmp_path), "--seeds", "0,x"]) == 2
    assert "--seeds must be comma-separated integers" in capsys.readouterr().err
