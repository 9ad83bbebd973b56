"""Typed rows and pairs (a row is its own key; slugs and labels are derived), and the guidance grids that choose each
baseline's best setting on held-out seeds."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from perceptual_diffusion.evaluation.scoring import Criterion
from perceptual_diffusion.experiments import budgets
from perceptual_diffusion.experiments.analysis import plan_pairs
from perceptual_diffusion.experiments.budgets import GuidanceGrid
from perceptual_diffusion.experiments.guidance_sweep import extension, grid_rows, select_guidance
from perceptual_diffusion.experiments.rows import Pair, Row

ROOT = Path(__file__).resolve().parents[1]


def test_v1_rows_keep_their_v1_keys_and_new_settings_get_their_own() -> None:
    assert Row("self-perceptual").slug == "self-perceptual/none"
    assert Row("mse-continued", "null-label").slug == "mse-continued/null-label"
    assert Row("mse-continued", "cfg", 1.5, 0.7).slug == "mse-continued/cfg-w1.5-phi0.7"
    assert Row("mse-continued", "autoguidance", 3.0).slug == "mse-continued/autoguidance-w3-phi0"
    interval = Row("mse-continued", "cfg", 2.0, 0.0, 0.3, None)
    apg = Row("mse-continued", "apg", 2.0, apg_threshold=0.05)
    guided = Row("mse-continued", "autoguidance", 2.0, guide="stage1-chunk1")
    slugs = {r.slug for r in (interval, apg, guided, Row("mse-continued", "cfg", 2.0))}
    assert len(slugs) == 4, "every setting that changes the numbers changes the slug"
    assert interval.label == "mse-continued, CFG w=2 φ=0 σ∈[0.3, ∞]"
    assert apg.method_label == "APG w=2 r=0.05"
    assert not Row("uncond/mse-continued").use_labels and not Row("x", "null-label").use_labels
    for row in (interval, apg, guided):
        assert Row.from_dict(json.loads(json.dumps(row.to_dict()))) == row


def test_a_rows_fingerprint_changes_with_any_setting() -> None:
    row = Row("mse-continued", "cfg", 1.5, 0.7)
    base = row.fingerprint(sample={"steps": 25}, seeds=[0, 2000])
    assert base == row.fingerprint(sample={"steps": 25}, seeds=[0, 2000])
    assert base != row.fingerprint(sample={"steps": 50}, seeds=[0, 2000])
    assert base != row.fingerprint(sample={"steps": 25}, seeds=[0, 1000])
    assert base != replace(row, guidance_rescale=0.0).fingerprint(sample={"steps": 25}, seeds=[0, 2000])


def test_an_evaluations_key_does_not_depend_on_where_the_folder_is(tmp_path, monkeypatch) -> None:
    """A row's cache key names its model relative to the experiment's folder: the same for a relative and an
    absolute ``--out`` and for a folder moved elsewhere; a folder keyed by an older version (the model path as
    ``--out`` was spelled, or absolute) is still accepted in place, and other settings are still refused."""
    from perceptual_diffusion.errors import UserError
    from perceptual_diffusion.evaluation import scoring
    from perceptual_diffusion.experiments.compare import row_fingerprints

    monkeypatch.chdir(tmp_path)
    row, sample, seeds = Row("mse-continued", "cfg", 1.2), {"steps": 25}, list(range(100, 150))

    def keys(out: Path) -> list[str]:
        return row_fingerprints(out, row, sample, seeds, out / "seed1" / "m", out / "seed1" / "g", "x")

    here, there = keys(Path("runs/a")), keys(tmp_path / "runs" / "a")
    assert here[0] == there[0] == keys(tmp_path / "moved")[0]
    assert here[1] != there[1] and here[2] == there[1] == there[2]  # the old keys: the path as spelled / absolute
    assert len(set(here)) == 3
    other = row_fingerprints(Path("runs/a"), replace(row, cfg_scale=1.3), sample, seeds, Path("runs/a/m"), None, "x")

    cache = tmp_path / "runs" / "a" / "eval" / "row"
    cache.parent.mkdir(parents=True)
    cache.with_suffix(".npz").write_bytes(b"")
    for stored in here[1:]:  # written by an older version: reused, never re-evaluated
        cache.with_suffix(".json").write_text(json.dumps({"fingerprint": stored, "metrics": {"fid": 2.0}}))
        again = scoring.evaluate_cached(
            cache, None, None, None, None, seeds, None, fingerprint=here[0], legacy_fingerprints=tuple(here[1:])
        )
        assert again["metrics"] == {"fid": 2.0}
    with pytest.raises(UserError, match="made with other settings"):
        scoring.evaluate_cached(
            cache, None, None, None, None, seeds, None, fingerprint=other[0], legacy_fingerprints=tuple(other[1:])
        )


def test_pairs_have_roles_and_each_selected_guidance_method_gets_its_own_pair() -> None:
    rows = [Row(m) for m in ("stage1-mse", "mse-continued", "self-perceptual")]
    rows += [Row("mse-continued", "cfg", 1.2, 0.7), Row("mse-continued", "apg", 2.0)]
    rows += [Row("mse-continued", "cfg", 3.0, 0.0, 0.3, 5.0), Row("mse-continued", "autoguidance", 1.5, guide="g")]
    pairs = plan_pairs(rows, (), selected=True)
    assert [p.role for p in pairs[:3]] == ["headline", "vs-teacher", "teacher-residual"]
    methods = [p.method for p in pairs if p.role == "vs-guidance"]
    assert methods == ["cfg", "apg", "interval", "autoguidance"]
    assert all(p.a == Row("self-perceptual") for p in pairs if p.role == "vs-guidance")
    assert pairs[3].title == "self-perceptual (no guidance) vs MSE + CFG w=1.2 φ=0.7, its best setting"
    again = [Pair.from_dict(json.loads(json.dumps(p.to_dict()))) for p in pairs]
    assert again == pairs
    # v1: the first CFG row with rescale 0.7 (not a selected one), as the committed reports had it.
    v1 = plan_pairs([*rows[:3], Row("mse-continued", "cfg", 3.0, 0.7), Row("mse-continued", "cfg", 1.5, 0.7)], ())
    assert [p.b.cfg_scale for p in v1 if p.role == "vs-guidance"] == [1.5] and not v1[3].selected


def test_the_external_perceptual_control_is_paired_with_mse_continued_and_with_self_perceptual() -> None:
    rows = [Row(m) for m in ("stage1-mse", "mse-continued", "self-perceptual", "external-perceptual")]
    pairs = plan_pairs(rows, ("external-perceptual",), selected=True)
    by_role = {p.role: p for p in pairs if p.role in ("variant", "premise")}
    assert (by_role["variant"].a, by_role["variant"].b) == (Row("external-perceptual"), Row("mse-continued"))
    assert (by_role["premise"].a, by_role["premise"].b) == (Row("external-perceptual"), Row("self-perceptual"))
    assert "premise" in by_role["premise"].title
    assert not [p for p in plan_pairs(rows, ("sp-channel-norm",), selected=True) if p.role == "premise"]


def test_a_grid_is_extended_past_the_end_where_its_best_scale_sits() -> None:
    assert extension([1.1, 1.5, 3.0], 3.0) == 4.5
    assert extension([1.1, 1.5, 3.0], 1.1) == 1.05
    assert extension([1.1, 1.5, 3.0], 1.5) is None
    assert extension([1.0, 2.0], 1.0) is None, "below w = 1 is not guidance"


def _ctx(grids, extensions=2, seeds=2):
    budget = SimpleNamespace(guidance_grids=grids, grid_extensions=extensions, teacher=None, training_seeds=seeds)
    return SimpleNamespace(budget=budget, criterion=Criterion("fid", False))


def test_the_best_setting_is_chosen_by_the_mean_over_seeds_and_an_end_optimum_is_bracketed() -> None:
    grid = GuidanceGrid("cfg", scales=(1.1, 1.5, 2.0), rescales=(0.0, 0.7))
    # FID is lowest near w = 1.03 with rescale 0.7: the grid's lowest scale is best, so it extends towards 1.
    fid = lambda row, seed: (row.cfg_scale - 1.03) ** 2 + (0.0 if row.guidance_rescale else 0.01) + seed  # noqa: E731
    calls: list[tuple[str, int]] = []

    def evaluate(row, seed):
        calls.append((row.slug, seed))
        return fid(row, seed)

    sel = select_guidance(_ctx((grid,)), [0, 1], [0, 1], evaluate, lambda r, s: True)["cfg"]
    assert sel.scales == [1.1, 1.5, 2.0, 1.05, 1.025] and sel.extensions == 2
    assert sel.best == Row("mse-continued", "cfg", 1.025, 0.7)
    assert "lowest tried" in sel.position and "still an end after 2 extension(s)" in sel.position
    assert "φ=0.7 of 0, 0.7" in sel.position
    assert len(sel.points) == 10 and sel.points[sel.best.slug]["per_seed"] == [fid(sel.best, 0), fid(sel.best, 1)]
    inside = select_guidance(_ctx((grid,)), [0], [0], lambda r, s: (r.cfg_scale - 1.5) ** 2, lambda r, s: True)
    assert inside["cfg"].best.cfg_scale == 1.5 and inside["cfg"].extensions == 0
    assert "inside the tried range 1.1-2" in inside["cfg"].position


def test_selection_waits_for_other_processes_seeds() -> None:
    grid = GuidanceGrid("apg", scales=(1.5, 2.0))
    evaluated = []
    out = select_guidance(
        _ctx((grid,)), [0], [0, 1], lambda r, s: evaluated.append((r.slug, s)) or 1.0, lambda r, s: s == 0
    )
    assert out is None and {s for _, s in evaluated} == {0}, "this process's seed is evaluated, the other awaited"


def test_grid_rows_cover_every_combination_and_interval_is_cfg_with_bounds() -> None:
    rows = grid_rows(GuidanceGrid("interval", scales=(2.0, 3.0), intervals=((0.3, 5.0), (1.0, None))), [2.0, 3.0])
    assert len(rows) == 4 and all(r.guidance == "cfg" and r.interval for r in rows)
    auto = grid_rows(GuidanceGrid("autoguidance", scales=(1.5,), guides=("stage1-chunk1", "stage1-chunk2")), [1.5])
    assert [r.guide for r in auto] == ["stage1-chunk1", "stage1-chunk2"]
    with pytest.raises(ValueError, match="needs at least one guide"):
        GuidanceGrid("autoguidance", scales=(1.5,))
    assert budgets.GRIDS_V2[0].scales[0] < 1.5, "the CFG grid starts below 1.5, where small models' optimum lies"


def test_the_committed_v1_results_convert_without_changing_a_key_or_title() -> None:
    spec = importlib.util.spec_from_file_location("convert_v1", ROOT / "results" / "convert_v1.py")
    convert_v1 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert_v1)
    v1 = {
        "rows": [{"key": "mse-continued/none"}, {"key": "self-perceptual/none"}, {"key": "x/cfg-w1.5-phi0.7"}],
        "paired": {
            "self-perceptual vs MSE continued, no guidance (the paper's claim)": {
                "a": "self-perceptual/none",
                "b": "mse-continued/none",
                "metrics": {"fid": {}},
            }
        },
    }
    v2 = convert_v1.convert(v1)
    assert [r["key"] for r in v2["rows"]] == [r["key"] for r in v1["rows"]]
    assert v2["pairs"][0]["role"] == "headline" and v2["format"] == 2
    for folder in ("demo", "shapes-fair", "fmnist-fair"):
        committed = json.loads((ROOT / "results" / folder / "results.json").read_text())
        assert committed["format"] == 2 and all(Row.from_dict(r).slug == r["key"] for r in committed["rows"])


def test_the_committed_v2_report_is_what_its_results_render_and_its_verdict_follows_from_them(tmp_path) -> None:
    """results/fmnist-fair-v2: report.md re-rendered from results.json alone is the committed one (bar its timing
    line), and each verdict sentence quotes the pair it names, in the direction of that pair's numbers."""
    from perceptual_diffusion.experiments.report import pair_by_role, write_report

    folder = ROOT / "results" / "fmnist-fair-v2"
    results = json.loads((folder / "results.json").read_text())
    write_report(tmp_path, results)
    strip = lambda text: [line for line in text.splitlines() if not line.startswith("Wall time")]  # noqa: E731
    assert strip((tmp_path / "report.md").read_text()) == strip((folder / "report.md").read_text())
    verdict = (folder / "report.md").read_text().split("## Verdict")[1].split("**How to read this.**")[0]
    head = pair_by_role(results, "headline")["fid"]
    assert head["ci_low"] > 0, "self-perceptual's FID is higher than MSE continued's in every bootstrap bound"
    assert "MSE continued beats self-perceptual on FID" in verdict and f"{head['estimate']:+.4f}" in verdict
    premise = pair_by_role(results, "premise")["fid"]
    assert f"worse than self-perceptual ({premise['estimate']:+.4f}" in verdict
    for method in ("cfg", "apg", "interval", "autoguidance"):
        d = pair_by_role(results, "vs-guidance", method)["fid"]
        assert d["ci_low"] > 0 and f"{d['estimate']:+.4f}" in verdict
    assert "mse-continued 0.0002 (the highest of 2), self-perceptual 5e-05 (the lowest of 2)" in verdict
