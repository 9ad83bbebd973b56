"""DDIM and classifier-free guidance against diffusers, plus the per-image seeding and cost contracts."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from perceptual_diffusion.config import SampleConfig
from perceptual_diffusion.core.guidance import build_guidance, rescale_guidance
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.core.sampling import ddim_sample, ddim_step, sample
from perceptual_diffusion.core.schedule import NoiseSchedule, sampling_timesteps

STEPS = 50


def _diffusers_ddim(clip_sample: bool, steps: int = STEPS) -> DDIMScheduler:
    """The paper's sampler as diffusers configures it (Lin et al. 2023 fixes: zero SNR, trailing, v-prediction)."""
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        prediction_type="v_prediction",
        clip_sample=clip_sample,
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("clip_x0", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("index", [0, STEPS // 2, STEPS - 1], ids=["first-t999", "middle", "last"])
def test_ddim_step_matches_diffusers(schedule: NoiseSchedule, index: int, eta: float, clip_x0: bool) -> None:
    scheduler = _diffusers_ddim(clip_x0)
    timesteps = sampling_timesteps(1000, STEPS, "trailing")
    t = timesteps[index]
    t_prev = timesteps[index + 1] if index + 1 < STEPS else -1
    assert t == int(scheduler.timesteps[index])
    g = torch.Generator().manual_seed(index)
    # Large enough values that clip_x0 actually clamps some x0_hat entries.
    x_t, pred, noise = (2 * torch.randn(3, 3, 8, 8, generator=g) for _ in range(3))
    ours, x0_hat = ddim_step(schedule, pred, x_t, t, t_prev, eta=eta, noise=noise, clip_x0=clip_x0)
    ref = scheduler.step(pred, t, x_t, eta=eta, variance_noise=noise)
    torch.testing.assert_close(ours, ref.prev_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(x0_hat, ref.pred_original_sample, rtol=0, atol=1e-5)
    if index == 0:
        # alpha_999 = 0: x0_hat = -v exactly (x_t carries no signal).
        expected = -pred.clamp(-1, 1) if clip_x0 else -pred
        torch.testing.assert_close(x0_hat, expected, rtol=0, atol=1e-6)


def test_ddim_step_with_eta_needs_noise(schedule: NoiseSchedule) -> None:
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(schedule, x, x, 999, 979, eta=1.0, noise=None)


def test_full_ddim_sample_matches_a_diffusers_loop(tiny_model: DiffusionUNet) -> None:
    steps, seeds = 5, [3, 4]
    cond = torch.tensor([0, 2])
    config = SampleConfig(steps=steps, clip_x0=True)
    ours = ddim_sample(tiny_model, tiny_model.schedule, (3, 8, 8), seeds, cond, config)
    scheduler = _diffusers_ddim(clip_sample=True, steps=steps)
    x = torch.stack([torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(tiny_model(x, t.expand(2), cond), t, x).prev_sample
    torch.testing.assert_close(ours, x.clamp(-1, 1), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_samples_do_not_depend_on_batch_size(tiny_model: DiffusionUNet, eta: float, cfg_scale: float) -> None:
    config = SampleConfig(steps=3, eta=eta, cfg_scale=cfg_scale)
    seeds, labels = [11, 12, 13], torch.tensor([0, 1, 2])
    one_by_one = sample(tiny_model, seeds, labels, config, batch_size=1)
    together = sample(tiny_model, seeds, labels, config, batch_size=3)
    assert one_by_one.shape == (3, 3, 8, 8)
    # Convolutions may pick other kernels for other batch sizes: equal up to float32 round-off, not bit for bit.
    torch.testing.assert_close(one_by_one, together, rtol=0, atol=1e-5)
    # And the seed, not the position, decides the image: a different seed gives a different image.
    other = sample(tiny_model, [99], labels[:1], config, batch_size=1)
    assert (other - one_by_one[:1]).abs().max() > 1e-2


def _count_forwards(model: torch.nn.Module) -> tuple[list[int], object]:
    rows: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, handle


def test_cfg_scale_one_costs_one_forward_per_step(tiny_model: DiffusionUNet) -> None:
    rows, handle = _count_forwards(tiny_model)
    try:
        sample(tiny_model, [0, 1], torch.tensor([0, 1]), SampleConfig(steps=4, cfg_scale=1.0))
    finally:
        handle.remove()
    assert rows == [2] * 4


def test_cfg_runs_one_batched_forward_of_2n_per_step(tiny_model: DiffusionUNet) -> None:
    rows, handle = _count_forwards(tiny_model)
    try:
        sample(tiny_model, [0, 1], torch.tensor([0, 1]), SampleConfig(steps=4, cfg_scale=5.0))
    finally:
        handle.remove()
    assert rows == [4] * 4


def _reference_rescale(guided: torch.Tensor, cond_pred: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, eq. 15-16, written out: x_rescaled = x_cfg * std(x_pos) / std(x_cfg), then blend by phi."""
    out = torch.empty_like(guided)
    for i in range(guided.shape[0]):
        rescaled = guided[i] * (cond_pred[i].std() / guided[i].std())
        out[i] = phi * rescaled + (1 - phi) * guided[i]
    return out


@pytest.mark.parametrize("phi", [0.0, 0.7, 1.0])
def test_guidance_rescale_matches_lin_et_al_and_diffusers(phi: float) -> None:
    g = torch.Generator().manual_seed(0)
    guided, cond_pred = 3 * torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    ours = rescale_guidance(guided, cond_pred, phi)
    torch.testing.assert_close(ours, _reference_rescale(guided, cond_pred, phi), rtol=1e-6, atol=1e-6)
    try:
        from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
    except ImportError:
        return
    torch.testing.assert_close(ours, rescale_noise_cfg(guided, cond_pred, guidance_rescale=phi), rtol=1e-6, atol=1e-6)
    if phi == 1.0:  # fully rescaled: the guided prediction has the conditional prediction's per-sample std
        torch.testing.assert_close(ours.flatten(1).std(1), cond_pred.flatten(1).std(1))


def test_cfg_guidance_is_cfg_formula_with_rescale(tiny_model: DiffusionUNet) -> None:
    g = torch.Generator().manual_seed(5)
    x_t, t, cond = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([999, 400]), torch.tensor([0, 2])
    w, phi = 4.0, 0.7
    with torch.no_grad():
        ours = build_guidance(tiny_model, SampleConfig(cfg_scale=w, guidance_rescale=phi))(x_t, t, cond)
        cond_pred = tiny_model(x_t, t, cond)
        uncond_pred = tiny_model(x_t, t, torch.full_like(cond, tiny_model.null_label))
    guided = uncond_pred + w * (cond_pred - uncond_pred)
    torch.testing.assert_close(ours, _reference_rescale(guided, cond_pred, phi), rtol=1e-5, atol=1e-5)


def test_unconditional_sampling_of_a_conditional_model_uses_the_null_label(tiny_model: DiffusionUNet) -> None:
    seen: list[torch.Tensor] = []
    handle = tiny_model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True
    )
    try:
        unconditional = sample(tiny_model, [0, 1], None, SampleConfig(steps=2))
    finally:
        handle.remove()
    assert len(seen) == 2 and all((labels == tiny_model.null_label).all() for labels in seen)
    null = torch.full((2,), tiny_model.null_label)
    torch.testing.assert_close(unconditional, sample(tiny_model, [0, 1], null, SampleConfig(steps=2)), rtol=0, atol=0)
    assert (unconditional - sample(tiny_model, [0, 1], torch.tensor([0, 0]), SampleConfig(steps=2))).abs().max() > 0


def test_cfg_is_refused_where_it_cannot_work(tiny_model: DiffusionUNet, tiny_uncond_model: DiffusionUNet) -> None:
    with pytest.raises(ValueError, match="class-conditional"):
        sample(tiny_uncond_model, [0], None, SampleConfig(steps=2, cfg_scale=2.0))
    with pytest.raises(ValueError, match="labels"):
        sample(tiny_model, [0], None, SampleConfig(steps=2, cfg_scale=2.0))
    with pytest.raises(ValueError, match="unconditional"):
        sample(tiny_uncond_model, [0], torch.tensor([0]), SampleConfig(steps=2))
