"""Schedule math against diffusers (the reference implementation of Lin et al. 2023) and closed-form round trips."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from perceptual_diffusion.config import ScheduleConfig
from perceptual_diffusion.core.schedule import NoiseSchedule, build_schedule, sampling_timesteps

DIFFUSERS_NAME = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
# Many t, including both ends: t = T-1 is alpha = 0 under zero terminal SNR, t = 0 is almost clean.
MANY_T = torch.tensor([0, 1, 2, 10, 100, 250, 500, 750, 900, 990, 998, 999])


@pytest.mark.parametrize("zero_snr", [True, False])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_alphas_cumprod_match_diffusers_ddpm(beta_schedule: str, zero_snr: bool) -> None:
    ours = build_schedule(ScheduleConfig(beta_schedule=beta_schedule, zero_terminal_snr=zero_snr))
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule=DIFFUSERS_NAME[beta_schedule],
        rescale_betas_zero_snr=zero_snr,
    )
    assert ours.alphas_cumprod.shape == (1000,)
    # diffusers works in float32, we in float64: 1e-6 is the float32 round-off over a 1000-term cumulative product.
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear", "cosine"])
def test_zero_terminal_snr_makes_last_alpha_bar_exactly_zero(beta_schedule: str) -> None:
    ab = build_schedule(ScheduleConfig(beta_schedule=beta_schedule, zero_terminal_snr=True)).alphas_cumprod
    assert ab[-1].item() == 0.0
    assert (ab[:-1] > 0).all() and (ab.diff() < 0).all(), "alpha_bar must stay positive and strictly decreasing"
    without = build_schedule(ScheduleConfig(beta_schedule=beta_schedule, zero_terminal_snr=False)).alphas_cumprod
    assert without[-1].item() > 0.0
    # The rescale keeps alpha_bar_0 (Lin et al. 2023, Algorithm 1 shifts and scales with the first value fixed).
    assert ab[0].item() == pytest.approx(without[0].item(), rel=1e-12)


def test_alpha_sigma_satisfy_variance_preservation(schedule: NoiseSchedule) -> None:
    x = torch.zeros(len(MANY_T), 3, 4, 4)
    alpha, sigma = schedule.alpha_sigma(MANY_T, x)
    assert alpha.shape == (len(MANY_T), 1, 1, 1)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(alpha))
    assert alpha[-1].item() == 0.0 and sigma[-1].item() == 1.0


def _x0_eps(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        n, 3, 4, 4, generator=g, dtype=torch.float64
    )


@pytest.mark.parametrize("prediction_type", ["v", "x0"])
def test_prediction_round_trips_through_x0_eps_at_every_t(prediction_type: str) -> None:
    schedule = build_schedule(ScheduleConfig(prediction_type=prediction_type, zero_terminal_snr=True))
    x0, eps = _x0_eps(len(MANY_T))
    x_t = schedule.add_noise(x0, eps, MANY_T)
    pred = schedule.from_x0_eps(x0, eps, MANY_T)
    x0_hat, eps_hat = schedule.to_x0_eps(pred, x_t, MANY_T)
    # v and x0 predictions keep both x0 and eps recoverable at alpha = 0 (x0 is the prediction / eps = x_T).
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-10)
    if prediction_type == "x0":
        # eps = (x_t - alpha x0) / sigma needs sigma > 0; at t = 0 sigma is small but not zero.
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-8)
    else:
        torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-10)
    # And back: (x0, eps) -> prediction is the inverse.
    torch.testing.assert_close(schedule.from_x0_eps(x0_hat, eps_hat, MANY_T), pred, rtol=0, atol=1e-8)


def test_v_target_is_alpha_eps_minus_sigma_x0(schedule: NoiseSchedule) -> None:
    x0, eps = _x0_eps(len(MANY_T), seed=1)
    ab = schedule.alphas_cumprod[MANY_T].reshape(-1, 1, 1, 1)
    expected = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    torch.testing.assert_close(schedule.target(x0, eps, MANY_T), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(schedule.add_noise(x0, eps, MANY_T), ab.sqrt() * x0 + (1 - ab).sqrt() * eps)


def test_eps_prediction_round_trips_and_stays_finite_at_alpha_zero() -> None:
    # ScheduleConfig refuses eps + zero SNR, so build the schedule and switch the prediction type afterwards to test
    # the conversion's guard at alpha = 0 (a checkpoint or a bypassed config could still reach it).
    schedule = build_schedule(ScheduleConfig(prediction_type="v", zero_terminal_snr=True))
    schedule.prediction_type = "eps"
    x0, eps = _x0_eps(len(MANY_T), seed=2)
    x_t = schedule.add_noise(x0, eps, MANY_T)
    x0_hat, eps_hat = schedule.to_x0_eps(schedule.from_x0_eps(x0, eps, MANY_T), x_t, MANY_T)
    assert torch.isfinite(x0_hat).all() and torch.isfinite(eps_hat).all()
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=0)
    # At alpha = 0 x0 is unrecoverable from eps; everywhere else the round trip is exact.
    torch.testing.assert_close(x0_hat[:-1], x0[:-1], rtol=0, atol=1e-8)


def test_eps_prediction_with_zero_snr_is_refused_in_config() -> None:
    from perceptual_diffusion.errors import UserError

    with pytest.raises(UserError, match="zero terminal SNR"):
        ScheduleConfig(prediction_type="eps", zero_terminal_snr=True)


@pytest.mark.parametrize("steps", [1, 10, 50, 51, 999, 1000])
@pytest.mark.parametrize("spacing", ["trailing", "leading", "linspace"])
def test_sampling_timesteps_match_diffusers_ddim(spacing: str, steps: int) -> None:
    ref = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, rescale_betas_zero_snr=True)
    ref.set_timesteps(steps)
    ours = sampling_timesteps(1000, steps, spacing)
    assert ours == ref.timesteps.tolist()
    assert len(ours) == steps


def test_trailing_spacing_starts_at_pure_noise() -> None:
    assert sampling_timesteps(1000, 50, "trailing")[0] == 999
    with pytest.raises(ValueError, match="steps"):
        sampling_timesteps(1000, 1001, "trailing")


def test_alpha_bar_prev_is_one_at_the_clean_end(schedule: NoiseSchedule) -> None:
    t_prev = torch.tensor([-1, 0, 500])
    expected = torch.stack(
        [torch.tensor(1.0, dtype=torch.float64), schedule.alphas_cumprod[0], schedule.alphas_cumprod[500]]
    )
    torch.testing.assert_close(schedule.alpha_bar_prev(t_prev), expected)
