"""All noise-schedule math in one place: the forward process of each schedule family, the conversions between what a
network predicts and (x0, eps), the training-time distribution of t, and the sampler's time grid.

Every family is a ``NoiseSchedule``: x_t = alpha_t x0 + sigma_t eps, with ``t`` what the network is given as its
timestep. The rest of the code uses only this interface, so a new family is one subclass here, one line in
``FAMILIES`` and its name in ``config.ScheduleFamily``, plus its diffusers scheduler in ``models/schedulers.py``
``SCHEDULERS`` (docs/architecture.md).

- ``DDPMSchedule``, the paper's (arXiv 2401.00110, Sec. 3-4): discrete t in {0..T-1}, alpha_t = sqrt(alpha_bar_t),
  sigma_t = sqrt(1 - alpha_bar_t), zero terminal SNR, v = alpha_t eps - sigma_t x0.
- ``FlowSchedule``, rectified flow as SD3 and diffusers define it (arXiv 2403.03206, Sec. 2): continuous s in [0, 1],
  alpha = 1 - s, sigma = s, the velocity v = eps - x0, and the network sees t = s T (diffusers' convention).

In both, "v" is the velocity of the path in its own time (d x / d phi on the DDPM circle, d x / d s on the flow
line), and the same (alpha, sigma) formulas convert any prediction: x0 = (alpha x_t - sigma v) / (alpha^2 + sigma^2)
reduces to each family's closed form, which is what is written below.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from perceptual_diffusion.config import ScheduleConfig, Spacing, TimeDistribution

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


def draw_unit(
    n: int,
    distribution: TimeDistribution,
    generator: torch.Generator,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> Tensor:
    """u in (0, 1) for n samples, float32 on the generator's device: uniform, or sigmoid(N(mean, std)) (arXiv
    2403.03206, Sec. 3.1), drawn by diffusers' ``compute_density_for_timestep_sampling``. That helper treats any
    unknown scheme name as uniform; names are validated in ``config.ScheduleConfig`` / ``LossConfig`` first."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = {"uniform": "uniform", "logit-normal": "logit_normal"}[distribution]
    u = compute_density_for_timestep_sampling(
        scheme, n, logit_mean=logit_mean, logit_std=logit_std, device=generator.device, generator=generator
    )
    return u.float()


class NoiseSchedule:
    """The interface of a schedule family: alpha_t / sigma_t, the target and its conversions, the training-time
    distribution of t and the sampler's time grid. ``t`` is always what the network is given as its timestep."""

    family: ClassVar[str]
    time_dtype: ClassVar[torch.dtype]

    def __init__(self, config: ScheduleConfig) -> None:
        self.config = config
        self.num_train_timesteps = config.num_train_timesteps
        self.prediction_type = config.prediction_type

    # --- the family's own maths -----------------------------------------------------------------------------------
    def alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) in float64, one per element of ``t``."""
        raise NotImplementedError

    def draw_time(
        self, n: int, generator: torch.Generator, distribution: TimeDistribution, max_fraction: float = 1.0
    ) -> Tensor:
        """n timesteps from ``distribution`` over the lowest ``max_fraction`` of the noise levels (t' of the loss,
        arXiv 2401.00110, Algorithm 1, line 6, and the training-time t), on the generator's device."""
        raise NotImplementedError

    def sampling_times(self, steps: int, spacing: Spacing) -> list[float]:
        """The sampler's descending timesteps for ``steps`` steps, then the clean end (:attr:`clean_time`)."""
        raise NotImplementedError

    clean_time: ClassVar[float]  # the time of x0 itself (alpha 1, sigma 0): the sampler's last target

    # --- shared by every family -----------------------------------------------------------------------------------
    def train_time(self, n: int, generator: torch.Generator) -> Tensor:
        """The training-time t of a batch (``config.time_distribution``)."""
        return self.draw_time(n, generator, self.config.time_distribution)

    def alpha_sigma(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_t, sigma_t) shaped to broadcast against ``like`` and in its dtype."""
        alpha, sigma = self.alpha_sigma64(t)
        shape = (-1,) + (1,) * (like.ndim - 1)
        return alpha.to(like.dtype).reshape(shape), sigma.to(like.dtype).reshape(shape)

    def alpha_sigma_at(self, t: float) -> tuple[float, float]:
        """(alpha_t, sigma_t) of one timestep as Python floats (the sampler's step coefficients)."""
        alpha, sigma = self.alpha_sigma64(torch.tensor([t], dtype=self.time_dtype))
        return float(alpha[0]), float(sigma[0])

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """Forward process: x_t = alpha_t * x0 + sigma_t * eps."""
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The family's v target (DDPM: alpha eps - sigma x0; flow: eps - x0)."""
        raise NotImplementedError

    def velocity_to_x0_eps(self, v: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from a velocity prediction at (x_t, t)."""
        raise NotImplementedError

    def target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """What the network should output: v, or eps, or x0 (``prediction_type``)."""
        if self.prediction_type == "eps":
            return eps
        if self.prediction_type == "x0":
            return x0
        return self.velocity(x0, eps, t)

    def to_x0_eps(self, pred: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Network output -> (x0_hat, eps_hat)."""
        if self.prediction_type == "v":
            return self.velocity_to_x0_eps(pred, x_t, t)
        alpha, sigma = self.alpha_sigma(t, x_t)
        if self.prediction_type == "eps":
            return (x_t - sigma * pred) / alpha.clamp_min(_MIN_DIVISOR), pred
        return pred, (x_t - alpha * pred) / sigma.clamp_min(_MIN_DIVISOR)

    def from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """(x0, eps) -> what a network of this prediction type outputs; the inverse of :meth:`to_x0_eps`."""
        return self.target(x0, eps, t)

    def eps_from_x0(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The eps_hat that goes with an x0_hat at x_t: (x_t - alpha_t x0) / sigma_t (guidance in x0 space)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return (x_t - alpha * x0) / sigma.clamp_min(_MIN_DIVISOR)

    def snr(self, t: Tensor) -> Tensor:
        """alpha_t^2 / sigma_t^2 in float64 (+inf where sigma_t = 0)."""
        alpha, sigma = self.alpha_sigma64(t)
        return alpha**2 / sigma**2

    def time_tensor(self, t: float, n: int, device: torch.device | str) -> Tensor:
        """One timestep for a batch of n, in the dtype the network is given (long for DDPM, float32 for flow)."""
        return torch.full((n,), t, dtype=self.time_dtype, device=device)


class DDPMSchedule(NoiseSchedule):
    """alpha_bar_t for t = 0..T-1 (the paper's discrete schedule, zero terminal SNR by default)."""

    family = "ddpm"
    time_dtype = torch.long
    clean_time = -1  # one step past t = 0: alpha_bar = 1

    def __init__(self, config: ScheduleConfig) -> None:
        super().__init__(config)
        betas = _betas(config)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alpha_bar = np.cumprod(1.0 - betas)
        if config.zero_terminal_snr:
            alpha_bar[-1] = 0.0  # exactly 0, not a rounding residue
        self.alphas_cumprod = torch.from_numpy(alpha_bar)  # float64, (T,)

    def alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        ab = self.alphas_cumprod.to(t.device)
        t = t.long()
        # t = -1 is the clean end after the last sampler step (alpha_bar = 1).
        ab_t = torch.where(t >= 0, ab[t.clamp_min(0)], torch.ones((), dtype=ab.dtype, device=ab.device))
        return ab_t.sqrt(), (1.0 - ab_t).sqrt()

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        alpha, sigma = self.alpha_sigma(t, x0)
        return alpha * eps - sigma * x0

    def velocity_to_x0_eps(self, v: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x0 = alpha x_t - sigma v, eps = sigma x_t + alpha v (alpha^2 + sigma^2 = 1)."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v

    def draw_time(
        self, n: int, generator: torch.Generator, distribution: TimeDistribution, max_fraction: float = 1.0
    ) -> Tensor:
        """t ~ U{0, ..., k-1} (the paper's U{1..T}, zero-indexed), k = max(int(max_fraction T), 1); logit-normal:
        t = floor(u k) for u from :func:`draw_unit`."""
        k = max(int(max_fraction * self.num_train_timesteps), 1)
        if distribution == "uniform":
            return torch.randint(0, k, (n,), generator=generator, device=generator.device)
        u = draw_unit(n, distribution, generator, self.config.logit_mean, self.config.logit_std)
        return (u.double() * k).floor().long().clamp(0, k - 1)

    def alpha_bar_prev(self, t_prev: Tensor) -> Tensor:
        """alpha_bar at the previous sampler timestep; t_prev = -1 means the clean end (alpha_bar = 1)."""
        ab = self.alphas_cumprod.to(t_prev.device)
        return torch.where(t_prev >= 0, ab[t_prev.clamp_min(0)], torch.ones_like(ab[0]))

    def sampling_times(self, steps: int, spacing: Spacing) -> list[float]:
        return [*sampling_timesteps(self.num_train_timesteps, steps, spacing), self.clean_time]


def shift_sigmas(u: Tensor, shift: float) -> Tensor:
    """s = shift u / (1 + (shift - 1) u) (arXiv 2403.03206, Sec. 5.3.2; diffusers' FlowMatchEuler ``shift``)."""
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


class FlowSchedule(NoiseSchedule):
    """Rectified flow: x_s = (1 - s) x0 + s eps, v = eps - x0, t = s T (arXiv 2403.03206, Sec. 2)."""

    family = "flow"
    time_dtype = torch.float32  # kept float32 under bf16 autocast: t is an input, never a cast activation
    clean_time = 0.0

    def alpha_sigma64(self, t: Tensor) -> tuple[Tensor, Tensor]:
        s = t.double() / self.num_train_timesteps
        return 1.0 - s, s

    def velocity(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        return eps - x0

    def velocity_to_x0_eps(self, v: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """x0 = x_s - s v, eps = x_s + (1 - s) v."""
        alpha, sigma = self.alpha_sigma(t, x_t)
        return x_t - sigma * v, x_t + alpha * v

    def draw_time(
        self, n: int, generator: torch.Generator, distribution: TimeDistribution, max_fraction: float = 1.0
    ) -> Tensor:
        """t = T * max_fraction * shift(u), u from :func:`draw_unit` (continuous, float32)."""
        u = draw_unit(n, distribution, generator, self.config.logit_mean, self.config.logit_std)
        s = shift_sigmas(u, self.config.shift) * max_fraction
        return (s * self.num_train_timesteps).float()

    def sampling_times(self, steps: int, spacing: Spacing) -> list[float]:
        """diffusers' own grid: ``FlowMatchEulerDiscreteScheduler.set_timesteps(steps)`` (at shift 1 and 5 steps,
        sigma = 1, .75, .5, .25, .001), then the clean end t = 0."""
        scheduler = self.diffusers_scheduler()
        scheduler.set_timesteps(steps)
        return [float(t) for t in scheduler.timesteps] + [self.clean_time]

    def diffusers_scheduler(self) -> Any:
        """diffusers' scheduler for this schedule, whose step loop samples as ``core.sampling`` does (export)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.config.shift)


# The families by name: a new one is a NoiseSchedule subclass, one line here and its name in config.ScheduleFamily.
FAMILIES: dict[str, type[NoiseSchedule]] = {"ddpm": DDPMSchedule, "flow": FlowSchedule}


def build_schedule(config: ScheduleConfig) -> NoiseSchedule:
    """The schedule a config names."""
    return FAMILIES[config.family](config)


def sampling_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing) -> list[int]:
    """Descending timesteps for a ``steps``-step DDPM sampler (Lin et al. 2023, Table 2; diffusers' definitions).

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
