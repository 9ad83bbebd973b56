"""Guidance methods against their papers' formulas, written out here; per-batch state; the interval's cost; options.

The formula tests use a stub denoiser with known random outputs (``_Stub``), so each reference below is the paper's
equation evaluated on plain tensors, never the code under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from perceptual_diffusion.cli import build_parser, main
from perceptual_diffusion.cli.sampling_options import describe_sampler, run_sample_config
from perceptual_diffusion.config import APG_NORM_THRESHOLD, FLOW_ONLY_GUIDANCE, RunConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.guidance import (
    GUIDANCE,
    AdaptiveProjectedGuidance,
    ClassifierFreeGuidance,
    build_guidance,
    noise_level,
)
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.core.sampling import ddim_sample, sample
from perceptual_diffusion.core.schedule import NoiseSchedule, build_schedule, sampling_timesteps
from perceptual_diffusion.errors import UserError

SHAPE = (3, 8, 8)
CLASSES = 3


class _Stub:
    """A denoiser with known outputs: pred(x_t, t, c) = a_c tanh(x_t) + b_c (1 + t / 1000), a and b random per class
    (the null label is class CLASSES); it records the batch size of every forward."""

    def __init__(self, schedule: NoiseSchedule, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.a = torch.randn(CLASSES + 1, *SHAPE, generator=g)
        self.b = torch.randn(CLASSES + 1, *SHAPE, generator=g)
        self.schedule, self.null_label, self.calls = schedule, CLASSES, []

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.null_label)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls.append(x_t.shape[0])
        return self.a[cond] * torch.tanh(x_t) + self.b[cond] * (1 + t.float() / 1000).view(-1, 1, 1, 1)


def _inputs(seed: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, *SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


def _x0_of(pred: torch.Tensor, x_t: torch.Tensor, alpha_bar: float, kind: str) -> torch.Tensor:
    """x0 from a network output (arXiv 2401.00110, Sec. 3): v = alpha eps - sigma x0, x_t = alpha x0 + sigma eps."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    if kind == "v":
        return alpha * x_t - sigma * pred
    if kind == "eps":
        return (x_t - sigma * pred) / alpha
    return pred


# ---------------------------------------------------------------------------------------------------------------
# CFG and autoguidance.


@pytest.mark.parametrize("w, phi", [(3.0, 0.0), (4.5, 0.7), (0.0, 0.0)])
def test_cfg_is_ho_salimans_with_lin_rescale(schedule: NoiseSchedule, w: float, phi: float) -> None:
    stub = _Stub(schedule, 0)
    x_t, cond = _inputs(1)
    t = torch.full((4,), 600)
    cfg = build_guidance(stub, SampleConfig(cfg_scale=w, guidance_rescale=phi))
    assert isinstance(cfg, ClassifierFreeGuidance)
    ours = cfg(x_t, t, cond)
    assert stub.calls == [8], "one batched forward over [cond; null]"
    cond_pred, uncond_pred = stub(x_t, t, cond), stub(x_t, t, stub.null_condition(cond))
    # Ho & Salimans 2022 (arXiv 2207.12598) with their w = our w - 1: (1 + w') eps_c - w' eps_u.
    guided = (1 + (w - 1)) * cond_pred - (w - 1) * uncond_pred
    for i in range(4):  # Lin et al. 2023, eq. 15-16, per sample
        rescaled = guided[i] * cond_pred[i].std() / guided[i].std()
        guided[i] = phi * rescaled + (1 - phi) * guided[i]
    torch.testing.assert_close(ours, guided, rtol=1e-5, atol=1e-5)
    guiders = pytest.importorskip("diffusers.guiders")
    theirs = guiders.ClassifierFreeGuidance(guidance_scale=w, guidance_rescale=phi).forward(cond_pred, uncond_pred).pred
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_scale_one_is_the_conditional_prediction_at_one_forward(schedule: NoiseSchedule) -> None:
    x_t, cond = _inputs(2)
    t = torch.full((4,), 300)
    for name in GUIDANCE:
        stub = _Stub(schedule, 0)
        ours = build_guidance(stub, SampleConfig(cfg_scale=1.0, guidance=name))(x_t, t, cond)
        assert stub.calls == [4], name
        torch.testing.assert_close(ours, stub(x_t, t, cond), rtol=0, atol=0)


def test_autoguidance_is_karras_with_the_guide_on_the_same_condition(schedule: NoiseSchedule) -> None:
    model, guide = _Stub(schedule, 0), _Stub(schedule, 7)
    x_t, cond = _inputs(3)
    t, w = torch.full((4,), 500), 2.5
    ours = build_guidance(model, SampleConfig(cfg_scale=w), guide)(x_t, t, cond)
    assert model.calls == [4] and guide.calls == [4]
    # Karras et al. 2024 (arXiv 2406.02507): D_w(x; sigma, c) = w D_1(x; sigma, c) + (1 - w) D_0(x; sigma, c).
    expected = w * model(x_t, t, cond) + (1 - w) * guide(x_t, t, cond)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert (ours - build_guidance(model, SampleConfig(cfg_scale=w))(x_t, t, cond)).abs().max() > 0.1  # not the null


def test_a_guide_of_another_schedule_is_refused(schedule: NoiseSchedule) -> None:
    other = build_schedule(ScheduleConfig(prediction_type="x0"))
    with pytest.raises(UserError, match="another noise schedule or prediction type"):
        build_guidance(_Stub(schedule, 0), SampleConfig(cfg_scale=2.0), _Stub(other, 1))


# ---------------------------------------------------------------------------------------------------------------
# APG.


def _apg_reference(d_conds, d_unconds, w, eta, beta, r):
    """Sadat et al. 2024 (arXiv 2410.02416) written out per sample in float64: delta = D_c - D_u; reverse momentum
    delta_bar = delta + beta delta_bar (from 0); delta = delta_bar min(1, r / ||delta_bar||) (r = 0: no clip);
    delta_par = (<delta, D_c> / <D_c, D_c>) D_c, delta_orth = delta - delta_par; D = D_c + (w - 1)(delta_orth +
    eta delta_par). Returns the guided D of each step and how many (step, sample) norms were clipped."""
    n = d_conds[0].shape[0]
    running, out, clipped = [np.zeros(d_conds[0][0].numel()) for _ in range(n)], [], 0
    for d_c, d_u in zip(d_conds, d_unconds):
        step = []
        for i in range(n):
            c, u = d_c[i].double().flatten().numpy(), d_u[i].double().flatten().numpy()
            running[i] = (c - u) + beta * running[i]
            delta = running[i]
            norm = np.linalg.norm(delta)
            if r > 0 and norm > r:
                delta, clipped = delta * (r / norm), clipped + 1
            par = (delta @ c) / (c @ c) * c
            step.append(torch.from_numpy(c + (w - 1) * ((delta - par) + eta * par)).reshape(SHAPE))
        out.append(torch.stack(step))
    return out, clipped


STEPS_T = (999, 800, 600, 400, 200, 20)


@pytest.mark.parametrize(
    "schedule_config",
    [
        ScheduleConfig(),
        ScheduleConfig(zero_terminal_snr=False, prediction_type="eps"),
        ScheduleConfig(prediction_type="x0"),
    ],
    ids=["v-zero-snr", "eps", "x0"],
)
@pytest.mark.parametrize("eta, beta", [(0.0, -0.5), (0.3, -0.75), (0.0, 0.0)])
def test_apg_is_sadat_in_x0_space(schedule_config: ScheduleConfig, eta: float, beta: float) -> None:
    sched = build_schedule(schedule_config)
    stub = _Stub(sched, 4)
    w, n_elements = 4.0, math.prod(SHAPE)
    x_ts = [_inputs(10 + k)[0] for k in range(len(STEPS_T))]
    cond = _inputs(0)[1]
    ab = [float(sched.alphas_cumprod[t]) for t in STEPS_T]
    d_conds = [
        _x0_of(stub(x, torch.full((4,), t), cond), x, a, sched.prediction_type) for x, t, a in zip(x_ts, STEPS_T, ab)
    ]
    null = stub.null_condition(cond)
    d_unconds = [
        _x0_of(stub(x, torch.full((4,), t), null), x, a, sched.prediction_type) for x, t, a in zip(x_ts, STEPS_T, ab)
    ]
    # A threshold that binds at some steps and not at others: a fraction of the first difference's RMS.
    rms = float((d_conds[0] - d_unconds[0]).square().mean().sqrt())
    config = SampleConfig(cfg_scale=w, guidance="apg", apg_eta=eta, apg_momentum=beta, apg_norm_threshold=0.8 * rms)
    apg = build_guidance(stub, config)
    assert isinstance(apg, AdaptiveProjectedGuidance)
    ours = [
        _x0_of(apg(x, torch.full((4,), t), cond), x, a, sched.prediction_type) for x, t, a in zip(x_ts, STEPS_T, ab)
    ]
    # The RMS threshold is the paper's L2 threshold over sqrt(C*H*W) elements.
    expected, clipped = _apg_reference(d_conds, d_unconds, w, eta, beta, 0.8 * rms * math.sqrt(n_elements))
    assert 0 < clipped < 4 * len(STEPS_T), "the test must exercise both clipped and unclipped norms"
    for k, (a, b) in enumerate(zip(ours, expected)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"step {k}")
    guiders = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
    buffer = guiders.MomentumBuffer(beta)
    for k, (d_c, d_u) in enumerate(zip(d_conds, d_unconds)):
        # diffusers' "original formulation" is the paper's D_c + (w - 1) update; its threshold is the L2 norm.
        r_l2 = 0.8 * rms * math.sqrt(n_elements)
        theirs = guiders.normalized_guidance(d_c, d_u, w - 1, buffer, eta, r_l2, use_original_formulation=True)
        torch.testing.assert_close(ours[k], theirs, rtol=1e-4, atol=1e-4, msg=f"diffusers, step {k}")


def test_apg_without_projection_clipping_and_momentum_is_cfg(schedule: NoiseSchedule) -> None:
    stub = _Stub(schedule, 5)
    x_t, cond = _inputs(6)
    t = torch.full((4,), 700)
    plain = SampleConfig(cfg_scale=3.0, guidance="apg", apg_eta=1.0, apg_momentum=0.0, apg_norm_threshold=0.0)
    cfg = build_guidance(stub, SampleConfig(cfg_scale=3.0))(x_t, t, cond)
    torch.testing.assert_close(build_guidance(stub, plain)(x_t, t, cond), cfg, rtol=1e-4, atol=1e-4)
    # The paper's default eta = 0 drops the parallel part: a different prediction.
    assert (build_guidance(stub, SampleConfig(cfg_scale=3.0, guidance="apg"))(x_t, t, cond) - cfg).abs().max() > 1e-2


def test_apg_defaults_are_the_papers_settings() -> None:
    config = SampleConfig(guidance="apg")
    assert (config.apg_eta, config.apg_momentum) == (0.0, -0.5)
    assert config.apg_norm_threshold == APG_NORM_THRESHOLD == 15 / math.sqrt(4 * 128 * 128)


# ---------------------------------------------------------------------------------------------------------------
# Per-batch state.


def test_a_batch_gives_the_images_it_gives_alone(tiny_model: DiffusionUNet) -> None:
    config = SampleConfig(steps=4, cfg_scale=4.0, guidance="apg", apg_momentum=-0.75, apg_norm_threshold=0.0)
    labels = torch.tensor([0, 1, 2, 0])
    a_then_b = sample(tiny_model, [0, 1, 2, 3], labels, config, batch_size=2)
    b_alone = sample(tiny_model, [2, 3], labels[2:], config, batch_size=2)
    torch.testing.assert_close(a_then_b[2:], b_alone, rtol=0, atol=0)
    # The check can fail: one APG object carried from batch A into batch B gives other images of B.
    shared = build_guidance(tiny_model, config)
    ddim_sample(shared, tiny_model.schedule, SHAPE, [0, 1], labels[:2], config)
    leaked = ddim_sample(shared, tiny_model.schedule, SHAPE, [2, 3], labels[2:], config)
    fresh = ddim_sample(build_guidance(tiny_model, config), tiny_model.schedule, SHAPE, [2, 3], labels[2:], config)
    torch.testing.assert_close(fresh, b_alone, rtol=0, atol=0)
    assert (leaked - fresh).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# The guidance interval.


def test_noise_level_is_sigma_over_alpha_and_infinite_at_zero_terminal_snr(schedule: NoiseSchedule) -> None:
    t = torch.tensor([0, 10, 500, 998, 999])
    ab = schedule.alphas_cumprod[t]
    sigma = noise_level(schedule, t)
    torch.testing.assert_close(sigma[:-1], ((1 - ab[:-1]) / ab[:-1]).sqrt(), rtol=1e-12, atol=0)
    assert sigma[-1] == math.inf
    assert math.isfinite(noise_level(build_schedule(ScheduleConfig(zero_terminal_snr=False)), t)[-1])


def _rows_per_forward(model: DiffusionUNet, config: SampleConfig) -> list[int]:
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        sample(model, [0, 1], torch.tensor([0, 1]), config)
    finally:
        handle.remove()
    return rows


@pytest.mark.parametrize("method", [m for m in GUIDANCE if m not in FLOW_ONLY_GUIDANCE])  # flow: test_flow.py
@pytest.mark.parametrize("steps", [10, 25])
def test_interval_guides_only_inside_and_costs_one_forward_outside(
    tiny_model: DiffusionUNet, steps: int, method: str
) -> None:
    low, high = 0.5, 3.0
    config = SampleConfig(steps=steps, cfg_scale=3.0, guidance=method, guidance_sigma_min=low, guidance_sigma_max=high)
    ab = tiny_model.schedule.alphas_cumprod
    sigmas = [
        math.sqrt((1 - ab[t]) / ab[t]) if ab[t] > 0 else math.inf for t in sampling_timesteps(1000, steps, "trailing")
    ]
    expected = [4 if low <= s <= high else 2 for s in sigmas]  # guided: one forward of [cond; null]; else cond only
    assert _rows_per_forward(tiny_model, config) == expected
    assert expected.count(4) == {10: 5, 25: 11}[steps]  # the interval is fixed in sigma, not in steps
    # No upper bound: the pure-noise first step (sigma = inf) is guided; any finite upper bound leaves it out.
    unbounded = _rows_per_forward(
        tiny_model, SampleConfig(steps=steps, cfg_scale=3.0, guidance=method, guidance_sigma_min=low)
    )
    assert unbounded[0] == 4 and expected[0] == 2


def test_outside_the_interval_a_row_gets_the_conditional_prediction(schedule: NoiseSchedule) -> None:
    stub = _Stub(schedule, 2)
    x_t, cond = _inputs(8, n=2)
    t = torch.tensor([999, 500])  # sigma inf (outside [0, 10]) and 1.77 (inside)
    guided = build_guidance(stub, SampleConfig(cfg_scale=3.0, guidance_sigma_max=10.0))(x_t, t, cond)
    everywhere = build_guidance(stub, SampleConfig(cfg_scale=3.0))(x_t, t, cond)
    torch.testing.assert_close(guided[0], stub(x_t, t, cond)[0], rtol=0, atol=0)
    torch.testing.assert_close(guided[1], everywhere[1], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Options.


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"guidance": "pag"}, "--guidance must be one of cfg, apg"),
        ({"guidance_sigma_min": -0.1}, "SIGMA_LO must be >= 0"),
        ({"guidance_sigma_min": 2.0, "guidance_sigma_max": 2.0}, "SIGMA_HI must be above SIGMA_LO"),
        ({"guidance_sigma_max": math.inf}, "--guidance-interval SIGMA_HI must be a finite number"),
        ({"apg_eta": -0.5}, "--apg-eta must be >= 0"),
        ({"apg_momentum": -1.0}, "--apg-momentum must be in (-1, 1)"),
        ({"apg_momentum": 1.0}, "--apg-momentum must be in (-1, 1)"),
        ({"apg_norm_threshold": -1e-3}, "--apg-threshold must be >= 0"),
    ],
)
def test_impossible_guidance_options_are_one_line_errors(options: dict, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        SampleConfig(**options)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_zero_stays_valid_where_it_means_something() -> None:
    SampleConfig(guidance="apg", apg_eta=0.0, apg_momentum=0.0, apg_norm_threshold=0.0, guidance_sigma_min=0.0)


def test_an_old_run_config_without_guidance_fields_loads_with_the_defaults() -> None:
    data = RunConfig().to_dict()
    for name in (
        "guidance",
        "guidance_sigma_min",
        "guidance_sigma_max",
        "apg_eta",
        "apg_momentum",
        "apg_norm_threshold",
    ):
        del data["sample"][name]
    assert RunConfig.from_dict(data).sample == SampleConfig()


def test_options_become_the_sample_config_and_the_description(tmp_path: Path) -> None:
    evaluate = next(a for a in build_parser()._actions if a.dest == "command").choices["evaluate"]
    args = evaluate.parse_args(
        ["run", "--guidance", "apg", "--guidance-interval", "0.3", "inf", "--apg-threshold", "0.1"]
    )
    cfg = run_sample_config(args, SampleConfig(steps=3), cfg_scale=2.0)
    assert cfg == SampleConfig(
        steps=3, cfg_scale=2.0, guidance="apg", guidance_sigma_min=0.3, guidance_sigma_max=None, apg_norm_threshold=0.1
    )
    assert describe_sampler(cfg) == (
        "DDIM 3 steps, trailing spacing, eta 0, clip x0 on, APG scale 2 (eta 0, momentum -0.5, threshold 0.1 RMS), "
        "guidance interval sigma in [0.3, inf]"
    )
    # The run's own guidance is the default; --guidance-interval 0 inf turns its interval off.
    run = SampleConfig(guidance="apg", guidance_sigma_min=1.0, guidance_sigma_max=5.0)
    assert run_sample_config(evaluate.parse_args(["run"]), run, cfg_scale=2.0).guidance_sigma_max == 5.0
    off = run_sample_config(evaluate.parse_args(["run", "--guidance-interval", "0", "inf"]), run, cfg_scale=2.0)
    assert (off.guidance, off.guidance_sigma_min, off.guidance_sigma_max) == ("apg", 0.0, None)
    assert describe_sampler(SampleConfig(cfg_scale=3), guide="weak/") == (
        "DDIM 50 steps, trailing spacing, eta 0, clip x0 on, CFG scale 3, autoguidance by weak/"
    )


def test_sample_command_with_apg_and_autoguidance(trained_mse_run: Path, tmp_path: Path, capsys) -> None:
    argv = ["sample", str(trained_mse_run), "-n", "4", "--steps", "2", "--device", "cpu", "--label", "random"]
    png = tmp_path / "apg.png"
    assert main([*argv, "--out", str(png), "--guidance", "apg", "--cfg-scale", "3"]) == 0
    assert png.is_file() and png.stat().st_size > 0
    assert "APG scale 3 (eta 0, momentum -0.5, threshold 0.05859 RMS)" in capsys.readouterr().out
    # Autoguidance by the model itself: D_w = w D + (1 - w) D = D, the unguided images exactly.
    npz = {name: tmp_path / f"{name}.npz" for name in ("self-guided", "plain")}
    assert (
        main(
            [*argv, "--out", "", "--npz", str(npz["self-guided"]), "--cfg-scale", "3", "--guide", str(trained_mse_run)]
        )
        == 0
    )
    assert main([*argv, "--out", "", "--npz", str(npz["plain"])]) == 0
    assert "autoguidance by" in capsys.readouterr().out
    images = {name: np.load(path)["images"] for name, path in npz.items()}
    np.testing.assert_array_equal(images["self-guided"], images["plain"])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--apg-momentum", "1.5"], "--apg-momentum must be in (-1, 1)"),
        (["--guidance", "pag"], "invalid choice: 'pag'"),
        (["--guidance-interval", "5", "1"], "SIGMA_HI must be above SIGMA_LO"),
    ],
)
def test_bad_guidance_option_is_one_error_line_and_exit_2(
    trained_mse_run: Path, tmp_path: Path, capsys, extra: list[str], fragment: str
) -> None:
    argv = [
        "sample",
        str(trained_mse_run),
        "-n",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "x.png"),
    ]
    capsys.readouterr()
    assert main([*argv, "--cfg-scale", "3", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_evaluate_command_records_the_method_and_the_guide(tmp_path: Path, capsys, monkeypatch, tiny_cli_train) -> None:
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    run, out = tmp_path / "run", tmp_path / "eval.json"
    options = [*tiny_cli_train, "--sample-steps", "3", "--image-size", "16", "--sample-every", "100"]
    assert main(["train", "--run-dir", str(run), *options, "--steps", "1"]) == 0
    capsys.readouterr()
    argv = ["evaluate", str(run), "-n", "12", "--device", "cpu", "--no-progress", "--json", str(out)]
    guidance = ["--guidance", "apg", "--guidance-interval", "0.5", "inf", "--guide", str(run), "--cfg-scale", "2"]
    assert main([*argv, *guidance]) == 0
    printed = capsys.readouterr().out
    assert "APG (eta 0, momentum -0.5, threshold 0.05859 RMS), autoguidance by" in printed, printed
    assert "(with the options given); APG scale per row" in printed
    (row,) = json.loads(out.read_text())
    assert row["guide"] == str(run)
    assert (row["sampling"]["guidance"], row["sampling"]["guidance_sigma_min"], row["sampling"]["cfg_scale"]) == (
        "apg",
        0.5,
        2.0,
    )
