"""All noise-schedule math in one place: betas, alpha_t / sigma_t, the forward process and the v / x0 / eps
conversions, and the sampler's timestep spacings.

Notation follows arXiv 2401.00110 (Sec. 3): x_t = alpha_t * x0 + sigma_t * eps with alpha_t = sqrt(alpha_bar_t) and
sigma_t = sqrt(1 - alpha_bar_t); v = alpha_t * eps - sigma_t * x0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from perceptual_diffusion.config import ScheduleConfig, Spacing

# Smallest alpha_t / sigma_t used as a divisor. Only the eps->x0 and x0->eps conversions divide; at zero terminal SNR
# alpha_T = 0 exactly, where x0 is not recoverable from eps, so the clamp keeps the value finite instead of inf/NaN.
_MIN_DIVISOR = 1e-8


def _betas(config: ScheduleConfig) -> np.ndarray:
    """Beta_t for t = 0..T-1 in float64, before any zero-SNR rescaling (the diffusers definitions)."""
    T = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return np.linspace(config.beta_start, config.beta_end, T, dtype=np.float64)
    if config.beta_schedule == "scaled_linear":
        # Stable Diffusion: linear in sqrt(beta).
        return np.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=np.float64) ** 2

    # cosine (Nichol & Dhariwal 2021): alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2), betas capped at 0.999.
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=np.float64)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023 (arXiv 2305.08891), Algorithm 1: shift and scale sqrt(alpha_bar) so that alpha_bar_T = 0."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """alpha_bar_t for t = 0..T-1 and the conversions between what a network predicts and (x0, eps)."""

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        betas = _betas(config)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alpha_bar = np.cumprod(1.0 - betas)
        if config.zero_terminal_snr:
            alpha_bar[-1] = 0.0  # exactly 0, not a rounding residue
        self.alphas_cumprod = torch.from_numpy(alpha_bar)  # float64, (T,)
        self.num_train_timesteps = config.num_train_timesteps
        self.prediction_type = config.prediction_type

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), shaped to broadcast against ``like``."""
        ab = self.alphas_cumprod.to(t.device)[t.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha = ab.sqrt().to(like.dtype).reshape(shape)
        sigma = (1.0 - ab).sqrt().to(like.dtype).reshape(shape)
        return alpha, sigma

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process: x_t = alpha_t * x0 + sigma_t * eps."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network should output: v = alpha_t * eps - sigma_t * x0, or eps, or x0."""
        if self.prediction_type == "eps":
            return eps
        if self.prediction_type == "x0":
            return x0
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * eps - sigma * x0

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network output -> (x0_hat, eps_hat). For v: x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        if self.prediction_type == "v":
            return alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
        if self.prediction_type == "eps":
            return (x_t - sigma * pred) / alpha.clamp_min(_MIN_DIVISOR), pred
        return pred, (x_t - alpha * pred) / sigma.clamp_min(_MIN_DIVISOR)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """(x0, eps) -> what a network of this prediction type outputs; the inverse of :meth:`to_x0_eps`."""
        return self.target(x0, eps, t)

    def alpha_bar_prev(self, t_prev: Tensor) -> Tensor:
        """alpha_bar at the previous sampler timestep; t_prev = -1 means the clean end (alpha_bar = 1)."""
        ab = self.alphas_cumprod.to(t_prev.device)
        return torch.where(t_prev >= 0, ab[t_prev.clamp_min(0)], torch.ones_like(ab[0]))


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing) -> list[int]:
    """Descending timesteps for a ``steps``-step sampler (Lin et al. 2023, Table 2; diffusers' definitions).

    ``trailing`` starts at t = T-1 (pure noise under zero terminal SNR), as the paper requires.
    """
    T = num_train_timesteps
    if steps > T:
        raise ValueError(f"cannot sample with {steps} steps from a {T}-step schedule")
    if spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64)
    else:
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    return [int(t) for t in ts]
