"""The rectified-flow schedule family (issue 18): the schedule against its closed forms and diffusers, the
self-perceptual objective in flow form against a reference written from the formulas, the Euler sampler against
diffusers' FlowMatchEulerDiscreteScheduler loop, CFG-Zero* against diffusers' guider, and export to DDPMPipeline.

The flow path: x_s = (1 - s) x0 + s eps, v = eps - x0, the network sees t = 1000 s. From v_hat,
x0_hat = x_s - s v_hat and eps_hat = x_s + (1 - s) v_hat; re-noised at s', the predicted branch is
x_s + (s' - s) v_hat and the real one x_s + (s' - s) v (arXiv 2401.00110, Algorithm 1, carried to this path).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, TINY_IMAGE, make_model
from diffusers import DDPMPipeline, FlowMatchEulerDiscreteScheduler

from perceptual_diffusion import cli
from perceptual_diffusion.config import LossConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.guidance import GUIDANCE, build_guidance
from perceptual_diffusion.core.losses import SelfPerceptualLoss, feature_distance, self_perceptual_loss
from perceptual_diffusion.core.networks import DiffusionUNet, frozen_copy
from perceptual_diffusion.core.sampling import ddim_step, sample
from perceptual_diffusion.core.schedule import FAMILIES, FlowSchedule, build_schedule, shift_sigmas
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.export import export_diffusers, import_diffusers
from perceptual_diffusion.training.loop import train

FLOW = ScheduleConfig(family="flow")
T = 1000


@pytest.fixture(scope="module")
def flow_models() -> tuple[DiffusionUNet, DiffusionUNet]:
    """(online, frozen teacher): two different perturbed tiny class-conditional flow U-Nets."""
    mc = ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=TINY_CLASSES)
    online = make_model(mc, FLOW, seed=0).train()
    teacher = frozen_copy(make_model(mc, FLOW, seed=1))
    return online, teacher


def _batch(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, 3, TINY_IMAGE, TINY_IMAGE, generator=g) * 2 - 1
    return x0, torch.randn(x0.shape, generator=g), torch.arange(n) % TINY_CLASSES


# ---------------------------------------------------------------------------------------------------------------
# The schedule.


def test_flow_path_velocity_and_conversions_are_the_closed_forms() -> None:
    schedule = build_schedule(FLOW)
    assert isinstance(schedule, FlowSchedule) and set(FAMILIES) == {"ddpm", "flow"}
    x0, eps, _ = _batch(5)
    s = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    t = s * T
    shape = (-1, 1, 1, 1)
    x_t = schedule.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t, (1 - s).reshape(shape) * x0 + s.reshape(shape) * eps)
    v = schedule.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    x0_hat, eps_hat = schedule.to_x0_eps(v, x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(eps_hat, eps, atol=1e-5, rtol=0)
    # x0 predictions convert too (APG works in x0 space): eps from x0 at x_t, wherever sigma > 0.
    torch.testing.assert_close(schedule.eps_from_x0(x0, x_t, t)[1:], eps[1:], atol=1e-5, rtol=0)
    assert schedule.snr(torch.tensor([0.0]))[0] == float("inf") and schedule.snr(torch.tensor([T * 1.0]))[0] == 0


def test_training_time_draws_are_continuous_shifted_and_validated() -> None:
    n = 20000
    uniform = build_schedule(FLOW).train_time(n, torch.Generator().manual_seed(0))
    assert uniform.dtype == torch.float32 and float(uniform.min()) >= 0 and float(uniform.max()) < T
    assert len(torch.unique(uniform)) > n * 0.99, "continuous time, not a 1000-step grid"
    assert abs(float(uniform.mean()) - T / 2) < 10
    logit = build_schedule(replace(FLOW, time_distribution="logit-normal")).train_time(
        n, torch.Generator().manual_seed(0)
    )
    assert abs(float(logit.median()) - T / 2) < 15 and float(logit.std()) < float(uniform.std())
    shifted = build_schedule(replace(FLOW, shift=3.0)).train_time(n, torch.Generator().manual_seed(0))
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shifted / T, shift_sigmas(u, 3.0), atol=1e-6, rtol=0)
    assert float(shifted.mean()) > float(uniform.mean()) + 100, "a shift > 1 moves training towards noise"
    for bad, fragment in [
        ({"shift": 0.0}, "--shift must be > 0"),
        ({"logit_std": 0.0}, "--logit-std must be > 0"),
        ({"beta_schedule": "linear"}, "--beta-schedule"),
        ({"zero_terminal_snr": False}, "--no-zero-snr"),
        ({"prediction_type": "x0"}, "velocity"),
        ({"time_distribution": "mode"}, "--time-distribution must be one of"),
    ]:
        with pytest.raises(UserError, match=fragment.replace("(", r"\(")) as info:
            replace(FLOW, **bad)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="--shift is an option of --schedule flow"):
        ScheduleConfig(shift=2.0)


def test_ddpm_logit_normal_draws_stay_on_the_discrete_grid() -> None:
    t = build_schedule(ScheduleConfig(time_distribution="logit-normal")).train_time(5000, torch.Generator())
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= T - 1
    assert abs(float(t.double().median()) - T / 2) < 20


# ---------------------------------------------------------------------------------------------------------------
# The objective.


def _reference_flow_loss(online, teacher, x0, cond, s, eps, s_prime, tap="mid"):
    """The self-perceptual loss written straight from the flow formulas (no project schedule code)."""
    r = lambda a: a.reshape(-1, 1, 1, 1)  # noqa: E731
    x_s = (1 - r(s)) * x0 + r(s) * eps
    v_hat = online(x_s, s * T, cond)
    x_hat = x_s + r(s_prime - s) * v_hat  # = (1 - s') x0_hat + s' eps_hat
    x_real = x_s + r(s_prime - s) * (eps - x0)  # = (1 - s') x0 + s' eps
    with torch.no_grad():
        f_real = teacher.features(x_real, s_prime * T, cond, (tap,))[tap]
    f_hat = teacher.features(x_hat, s_prime * T, cond, (tap,))[tap]
    return ((f_hat - f_real) ** 2).flatten(1).mean(1)


def test_explicit_renoise_is_the_closed_form_x_s_plus_ds_v_hat() -> None:
    schedule = build_schedule(FLOW)
    x0, eps, _ = _batch(6, seed=3)
    v_hat = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    s, s_prime = torch.rand(6, generator=torch.Generator().manual_seed(1)), torch.rand(6)
    x_s = schedule.add_noise(x0, eps, s * T)
    x0_hat, eps_hat = schedule.to_x0_eps(v_hat, x_s, s * T)
    renoised = schedule.add_noise(x0_hat, eps_hat, s_prime * T)
    torch.testing.assert_close(renoised, x_s + (s_prime - s).reshape(-1, 1, 1, 1) * v_hat, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def flow_dits() -> tuple[torch.nn.Module, torch.nn.Module]:
    """(online, frozen teacher): two different perturbed tiny class-conditional flow DiTs (issue 19)."""
    from perceptual_diffusion.models.architectures import build_model

    mc = ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=TINY_CLASSES, arch="dit")
    pair = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = build_model(mc, FLOW)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        pair.append(model)
    return pair[0].train(), frozen_copy(pair[1])


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_self_perceptual_loss_and_gradients_equal_the_flow_reference(arch: str, request) -> None:
    online, teacher = request.getfixturevalue("flow_models" if arch == "unet" else "flow_dits")
    x0, eps, cond = _batch(4, seed=5)
    s = torch.tensor([0.05, 0.3, 0.7, 0.99])
    s_prime = torch.tensor([0.9, 0.5, 0.1, 0.6])
    online.zero_grad()
    ours = self_perceptual_loss(online, teacher, x0, cond, s * T, eps, s_prime * T)
    ours.sum().backward()
    grads = {k: p.grad.clone() for k, p in online.named_parameters() if p.grad is not None}
    online.zero_grad()
    ref = _reference_flow_loss(online, teacher, x0, cond, s, eps, s_prime, teacher.default_tap)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    assert float(ours.detach().min()) > 0
    for k, p in online.named_parameters():
        if p.grad is not None:
            # float32 in another order (re-noise via x0_hat, eps_hat vs the closed form): compare in norm
            assert float((grads[k] - p.grad).norm()) <= 1e-4 * float(p.grad.norm()) + 1e-8, k
    assert all(p.grad is None for p in teacher.parameters()), "no gradient reaches the frozen teacher"
    assert len(grads) > 10


def test_the_loss_is_zero_at_s_prime_equal_s_with_predicted_noise(flow_models) -> None:
    online, teacher = flow_models
    x0, eps, cond = _batch(4, seed=6)
    t = torch.tensor([50.0, 300.0, 700.0, 990.0])
    with torch.no_grad():
        loss = self_perceptual_loss(online, teacher, x0, cond, t, eps, t)
    assert float(loss.abs().max()) < 1e-10
    with torch.no_grad():  # with the true eps the same t' is not degenerate
        assert float(self_perceptual_loss(online, teacher, x0, cond, t, eps, t, predicted_noise="true").min()) > 0


def test_the_loss_object_draws_s_prime_uniform_or_logit_normal_and_trains_only_the_online_model(flow_models) -> None:
    online, teacher = flow_models
    n = 4000
    shape = torch.Size([n, 3, TINY_IMAGE, TINY_IMAGE])
    uniform = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x"), teacher)
    drawn = uniform.draw(shape, torch.Generator().manual_seed(0))
    assert drawn["t"].dtype == drawn["t_prime"].dtype == torch.float32
    assert abs(float(drawn["t_prime"].mean()) - T / 2) < 20
    low = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", t_prime_max=0.25), teacher)
    assert float(low.draw(shape, torch.Generator().manual_seed(0))["t_prime"].max()) < 250
    logit = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", t_prime="logit-normal"), teacher)
    t_prime = logit.draw(shape, torch.Generator().manual_seed(0))["t_prime"]
    assert float(t_prime.std()) < float(drawn["t_prime"].std()) - 50
    x0, _, cond = _batch(4, seed=2)
    online.zero_grad()
    out = uniform(online, x0, cond, torch.Generator().manual_seed(4))
    out["loss"].mean().backward()
    assert set(out) == {"loss", "perceptual", "mse"} and float(out["perceptual"].min()) > 0
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in online.parameters())


def test_feature_distance_is_the_same_function_in_both_families() -> None:
    a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(feature_distance(a, b, "mse"), ((a - b) ** 2).flatten(1).mean(1))


# ---------------------------------------------------------------------------------------------------------------
# Sampling.


def test_a_ddim_step_in_alpha_sigma_is_euler_on_the_flow_ode() -> None:
    schedule = build_schedule(FLOW)
    x, v, _ = _batch(3, seed=8)
    for t, t_prev in [(1000.0, 750.0), (512.5, 100.0), (1.0, 0.0)]:
        x_prev, _ = ddim_step(schedule, v, x, t, t_prev)
        torch.testing.assert_close(x_prev, x + (t_prev - t) / T * v, atol=2e-6, rtol=0)


def test_the_time_grid_is_diffusers_own() -> None:
    times = build_schedule(FLOW).sampling_times(5, "trailing")
    torch.testing.assert_close(torch.tensor(times) / T, torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 0.001, 0.0]))
    shifted = build_schedule(replace(FLOW, shift=3.0)).sampling_times(5, "trailing")
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(5)
    assert shifted[:-1] == [float(t) for t in reference.timesteps]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_the_sampler_agrees_with_diffusers_flow_match_euler_loop(shift: float) -> None:
    schedule_config = replace(FLOW, shift=shift)
    mc = ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=0)
    model = make_model(mc, schedule_config, seed=2)
    seeds, steps = [3, 4, 5], 7
    ours = sample(model, seeds, None, SampleConfig(steps=steps, clip_x0=False))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    x = torch.stack([torch.randn(3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model.unet(x, t).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), atol=1e-4, rtol=0)
    assert float((ours - torch.randn_like(ours)).abs().mean()) > 0.1


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"eta": 0.5}, "--eta is DDIM's noise"),
        ({"clip_x0": True}, "x0 clipping is not defined"),
        ({"spacing": "leading"}, "--spacing leading"),
    ],
)
def test_a_flow_run_refuses_ddim_only_sampler_settings(options: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment) as info:
        RunConfig(schedule=FLOW, sample=SampleConfig(**{"clip_x0": False, **options}))
    assert "\n" not in str(info.value)


def test_cfg_zero_star_is_diffusers_guider_and_zero_init_holds_the_first_step() -> None:
    guiders = pytest.importorskip("diffusers.guiders.classifier_free_zero_star_guidance")
    model = make_model(
        ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=TINY_CLASSES), FLOW, seed=4
    )
    config = SampleConfig(steps=4, cfg_scale=2.5, guidance="cfg-zero-star", clip_x0=False, zero_init_steps=1)
    guided = build_guidance(model, config)
    reference = guiders.ClassifierFreeZeroStarGuidance(guidance_scale=2.5, zero_init_steps=1)
    x, _, cond = _batch(4, seed=11)
    times = build_schedule(FLOW).sampling_times(4, "trailing")[:-1]
    with torch.no_grad():
        for step, t in enumerate(times):
            tt = torch.full((4,), t)
            ours = guided(x, tt, cond)
            reference.set_state(step=step, num_inference_steps=4, timestep=tt)
            c, u = model(x, tt, cond), model(x, tt, model.null_condition(cond))
            theirs = reference.forward(pred_cond=c, pred_uncond=u).pred
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, msg=f"step {step}")
            if step == 0:
                assert float(ours.abs().max()) == 0, "zero-init: the first velocity is 0"
    with pytest.raises(UserError, match="cfg-zero-star is made for flow models"):
        RunConfig(sample=SampleConfig(guidance="cfg-zero-star"))


@pytest.mark.parametrize("method", list(GUIDANCE))
def test_every_guidance_method_samples_a_flow_model(method: str) -> None:
    model = make_model(
        ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=TINY_CLASSES), FLOW, seed=5
    )
    plain = sample(model, [0, 1], torch.tensor([0, 1]), SampleConfig(steps=3, clip_x0=False))
    guided = sample(
        model, [0, 1], torch.tensor([0, 1]), SampleConfig(steps=3, clip_x0=False, cfg_scale=2.0, guidance=method)
    )
    assert torch.isfinite(guided).all() and float((guided - plain).abs().max()) > 1e-4


# ---------------------------------------------------------------------------------------------------------------
# Training, interop and the command line.


def _flow_run(tiny_run_config, **train) -> RunConfig:
    config = tiny_run_config(**train)
    return replace(config, schedule=FLOW, sample=replace(config.sample, clip_x0=False))


def test_flow_run_resumes_bit_identically_and_records_its_family(tmp_path: Path, tiny_run_config) -> None:
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    train(_flow_run(tiny_run_config, steps=2), interrupted)
    train(_flow_run(tiny_run_config, steps=4), interrupted)
    train(_flow_run(tiny_run_config, steps=4), straight)
    from perceptual_diffusion.runtime import checkpoint as ckpt

    a, b = ckpt.load_state(ckpt.state_path(interrupted, 4)), ckpt.load_state(ckpt.state_path(straight, 4))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    saved = json.loads((straight / "config.json").read_text())
    assert saved["schedule"]["family"] == "flow" and saved["sample"]["clip_x0"] is False


@pytest.fixture(scope="module")
def flow_teacher_run(tmp_path_factory: pytest.TempPathFactory, tiny_run_config) -> Path:
    run_dir = tmp_path_factory.mktemp("flow-mse")
    train(_flow_run(tiny_run_config, steps=3), run_dir)
    return run_dir


def test_a_flow_teacher_trains_a_flow_student_and_a_ddpm_run_refuses_it(
    flow_teacher_run: Path, trained_mse_run: Path, tmp_path: Path, tiny_run_config
) -> None:
    sp = LossConfig(kind="self-perceptual", teacher=str(flow_teacher_run))
    student = replace(_flow_run(tiny_run_config, steps=2), loss=sp)
    assert train(student, tmp_path / "student").step == 2
    with pytest.raises(UserError, match="is a flow model and this run trains a ddpm model") as info:
        train(replace(tiny_run_config(steps=2), loss=sp), tmp_path / "ddpm-student")
    assert "\n" not in str(info.value)
    ddpm_teacher = LossConfig(kind="self-perceptual", teacher=str(trained_mse_run))
    with pytest.raises(UserError, match="is a ddpm model and this run trains a flow model"):
        train(replace(_flow_run(tiny_run_config, steps=2), loss=ddpm_teacher), tmp_path / "flow-student")
    # A different training-time draw of t is a choice of the run, not another process: accepted.
    logit = replace(student, schedule=replace(FLOW, time_distribution="logit-normal"))
    assert train(logit, tmp_path / "logit-student").step == 2


def test_export_is_a_ddpm_pipeline_with_the_flow_scheduler_that_gives_our_images(
    flow_teacher_run: Path, tmp_path: Path
) -> None:
    out = export_diffusers(flow_teacher_run, tmp_path / "export")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    seeds = [0, 1]
    theirs = pipe(
        batch_size=2,
        num_inference_steps=4,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="np",
    ).images
    model, config = import_diffusers(out)
    assert config.schedule.family == "flow"
    ours = sample(model, seeds, None, replace(config.sample, steps=4))
    ours_np = ((ours / 2 + 0.5).clamp(0, 1)).permute(0, 2, 3, 1).numpy()
    assert abs(ours_np - theirs).max() < 1e-4
    # A foreign folder (no perceptual-diffusion record) is read from its scheduler's class.
    (out / "perceptual_diffusion_config.json").unlink()
    _, foreign = import_diffusers(out)
    assert foreign.schedule.family == "flow" and foreign.sample.clip_x0 is False


def test_cli_schedule_flow_options_and_their_errors(tmp_path: Path, capsys) -> None:
    from _runs import CLI_TINY

    run = tmp_path / "run"
    assert cli.main(["train", "--run-dir", str(run), *CLI_TINY, "--steps", "2", "--schedule", "flow"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["schedule"]["family"] == "flow" and config["sample"]["clip_x0"] is False
    grid = tmp_path / "grid.png"
    assert cli.main(["sample", str(run), "-n", "2", "--steps", "2", "--out", str(grid)]) == 0
    assert grid.is_file() and "Euler 2 steps" in capsys.readouterr().out
    for args, fragment in [
        (["--schedule", "flow", "--beta-schedule", "linear"], "--beta-schedule: not an option of --schedule flow"),
        (["--schedule", "flow", "--no-zero-snr"], "--no-zero-snr: not an option of --schedule flow"),
        (["--shift", "2"], "--shift: not an option of --schedule ddpm"),
        (["--schedule", "flow", "--shift", "0"], "--shift must be > 0"),
        (["--schedule", "flow", "--logit-std", "-1"], "--logit-std must be > 0"),
        (["--schedule", "flow", "--eta", "0.5"], "--eta is DDIM's noise"),
    ]:
        assert cli.main(["train", "--run-dir", str(tmp_path / "bad"), *CLI_TINY, "--steps", "1", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and fragment in err[0], (args, err)
        assert not (tmp_path / "bad").exists()
    assert cli.main(["sample", str(run), "-n", "1", "--eta", "0.3", "--out", str(tmp_path / "x.png")]) == 2
    assert "--eta is DDIM's noise" in capsys.readouterr().err


def test_the_ablation_of_a_flow_budget_varies_the_t_prime_distribution() -> None:
    """Issue 18: uniform t' (the paper's, arXiv 2401.00110 Sec. 3) against the logit-normal that flow trains t with."""
    from perceptual_diffusion.experiments.ablation import baseline_of, default_variants
    from perceptual_diffusion.experiments.budgets import BUDGETS

    flow = {v.name: v for v in default_variants(BUDGETS["cpu-fair-fmnist-flow"])}
    variant = flow["sp-tprime-logit-normal"]
    assert variant.loss.t_prime == "logit-normal" and flow["self-perceptual"].loss.t_prime == "uniform"
    assert baseline_of(variant) == "mse-continued"
    assert "sp-tprime-logit-normal" not in {v.name for v in default_variants(BUDGETS["cpu-fair-fmnist"])}
