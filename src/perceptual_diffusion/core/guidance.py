"""Guidance as one strategy interface: a method is one :class:`Guidance` subclass plus one line in ``GUIDANCE``.

A guidance object is a denoiser ``guidance(x_t, t, cond) -> prediction`` (the model's own prediction type) built
for *one* sampling batch by :func:`build_guidance`: a method's state (APG's momentum) belongs to one trajectory, so
``sampling.sample_stream`` builds a fresh object for every batch and no state carries over from one batch to the next.

What every method shares lives in :class:`Guidance`: the guide prediction (the same model on the null condition,
classifier-free guidance; or a separate, weaker model on the same condition, autoguidance, Karras et al. 2024,
arXiv 2406.02507), the scale w (w = 1 is no guidance and costs one forward), the guidance interval (Kynkaanniemi
et al. 2024, arXiv 2404.07724) and the optional guidance rescale (Lin et al. 2023, arXiv 2305.08891, eq. 15-16).
A method only says how the conditional and the guide prediction combine (:meth:`Guidance.combine`).
"""

from __future__ import annotations

import math
import typing

import torch
from torch import Tensor

from perceptual_diffusion.config import GuidanceMethod, SampleConfig
from perceptual_diffusion.core.networks import DiffusionModel
from perceptual_diffusion.core.schedule import NoiseSchedule
from perceptual_diffusion.errors import UserError


def noise_level(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """The EDM noise level sigma = sigma_t / alpha_t of each timestep, float64 on the CPU (+inf at alpha_t = 0).

    x_t = alpha_t x0 + sigma_t eps is, divided by alpha_t, x0 + (sigma_t / alpha_t) eps: the variance-exploding
    form in which Karras et al. (arXiv 2206.00364, 2404.07724) state noise levels. It depends on t alone, never on
    the number of sampling steps. Under zero terminal SNR alpha_T = 0, so the first step of a trailing sampler is
    pure noise with sigma = +inf (1 / 0 in IEEE arithmetic): inside an interval without an upper bound, outside
    every interval with a finite upper bound.
    """
    alpha, sigma = schedule.alpha_sigma(t.detach().cpu(), torch.empty(0, dtype=torch.float64))
    return sigma / alpha


def rescale_guidance(guided: Tensor, cond_pred: Tensor, phi: float) -> Tensor:
    """Lin et al. 2023, eq. 15-16: rescale the guided prediction to the conditional per-sample std, blend by phi."""
    if phi == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (cond_pred.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def check_guide(model: DiffusionModel, guide: DiffusionModel) -> None:
    """Refuse an autoguidance guide whose predictions do not mean what the model's mean (another noise schedule or
    prediction type): the two are combined at the same x_t and t."""
    if guide.schedule.config.process() != model.schedule.config.process():
        raise UserError(
            "the guide model was trained with another noise schedule or prediction type than the model: "
            "autoguidance needs a weaker model of the same task and schedule"
        )


class Guidance:
    """One sampling batch's guided denoiser; subclasses implement :meth:`combine` (and may keep per-batch state).

    ``guide`` None: the guide prediction is ``model`` on its null condition, and both come from one batched forward
    over [cond; null] (the same work as two forwards, half the launches). ``guide`` a model: autoguidance, the guide
    is that weaker model called with the same condition.
    """

    def __init__(self, model: DiffusionModel, config: SampleConfig, guide: DiffusionModel | None = None) -> None:
        if guide is not None:
            check_guide(model, guide)
        self.model, self.guide, self.config = model, guide, config
        self.scale = config.cfg_scale
        self.sigma_min = config.guidance_sigma_min
        self.sigma_max = math.inf if config.guidance_sigma_max is None else config.guidance_sigma_max

    def guided_rows(self, t: Tensor) -> Tensor:
        """Which rows get guidance: those whose noise level lies in [sigma_min, sigma_max] (arXiv 2404.07724)."""
        if self.sigma_min == 0 and self.sigma_max == math.inf:
            return torch.ones(t.shape[0], dtype=torch.bool)  # no interval: every sigma in [0, inf], no device sync
        sigma = noise_level(self.model.schedule, t)
        return (sigma >= self.sigma_min) & (sigma <= self.sigma_max)

    def predictions(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor]:
        """(conditional prediction, guide prediction) at (x_t, t)."""
        if self.guide is not None:
            return self.model(x_t, t, cond), self.guide(x_t, t, cond)
        # One batched forward over [conditional; unconditional]: the same work, half the launches.
        null = self.model.null_condition(cond)
        both = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, null]))
        cond_pred, guide_pred = both.chunk(2)
        return cond_pred, guide_pred

    def combine(self, cond_pred: Tensor, guide_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The guided prediction from the conditional and the guide prediction (the method's own rule)."""
        raise NotImplementedError

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The guided prediction at (x_t, t); the conditional prediction alone (one forward) where guidance is off."""
        if self.scale == 1.0:
            return self.model(x_t, t, cond)
        inside = self.guided_rows(t)
        if not bool(inside.any()):
            return self.model(x_t, t, cond)
        cond_pred, guide_pred = self.predictions(x_t, t, cond)
        guided = rescale_guidance(self.combine(cond_pred, guide_pred, x_t, t), cond_pred, self.config.guidance_rescale)
        if bool(inside.all()):
            return guided
        # Rows at different noise levels (ddim_sample never mixes them): a method's state advances for all rows.
        mask = inside.to(guided.device).reshape((-1,) + (1,) * (guided.ndim - 1))
        return torch.where(mask, guided, cond_pred)


class ClassifierFreeGuidance(Guidance):
    """CFG (Ho & Salimans 2022, arXiv 2207.12598, with w here their 1 + w): pred = guide + w (cond - guide), in the
    model's own prediction space (the rule is affine with weights summing to 1, so every space gives the same x0)."""

    def combine(self, cond_pred: Tensor, guide_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """guide + w (cond - guide)."""
        return guide_pred + self.scale * (cond_pred - guide_pred)


def project(v: Tensor, onto: Tensor) -> tuple[Tensor, Tensor]:
    """(parallel, orthogonal) parts of each sample of ``v`` relative to the same sample of ``onto``, in float64
    (arXiv 2410.02416, Algorithm 1): parallel = <v, u> u with u = onto / ||onto|| over all non-batch dimensions."""
    dims = tuple(range(1, v.ndim))
    v64, unit = v.double(), torch.nn.functional.normalize(onto.double(), dim=dims)
    parallel = (v64 * unit).sum(dim=dims, keepdim=True) * unit
    return parallel.to(v.dtype), (v64 - parallel).to(v.dtype)


def clip_rms(diff: Tensor, threshold: float) -> Tensor:
    """Scale each sample of ``diff`` by min(1, threshold / RMS(diff)), the RMS over its C*H*W elements; 0: no clip.

    arXiv 2410.02416 (Algorithm 1) clips the L2 norm at r; an L2 norm over n elements is sqrt(n) times the RMS, so
    the RMS threshold r / sqrt(n) does the same at one image size and does not change with the image size.
    """
    if threshold <= 0:
        return diff
    rms = diff.square().mean(dim=tuple(range(1, diff.ndim)), keepdim=True).sqrt()
    return diff * torch.clamp(threshold / rms, max=1.0)  # diff = 0 gives threshold / 0 = inf, clamped to 1


class AdaptiveProjectedGuidance(Guidance):
    """APG (Sadat et al. 2024, arXiv 2410.02416, Algorithm 1), in the denoised space as the paper applies it.

    D = x0_hat of the conditional and of the guide prediction (``schedule.to_x0_eps``). diff = D_cond - D_guide;
    reverse momentum: running = diff + beta * running (beta < 0 in the paper; the running average starts at 0 for
    each sampling batch and advances only at guided steps), diff = running; norm clipping at the RMS threshold
    (:func:`clip_rms`); diff = diff_orth + eta * diff_par relative to D_cond (:func:`project`); D = D_cond + (w - 1)
    diff, converted back to the model's prediction type. eta = 1, no clipping, beta = 0 is CFG.
    """

    def __init__(self, model: DiffusionModel, config: SampleConfig, guide: DiffusionModel | None = None) -> None:
        super().__init__(model, config, guide)
        self.running: Tensor | None = None  # the momentum's running average of diff, fresh for each batch

    def combine(self, cond_pred: Tensor, guide_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The APG prediction; the update is computed on x0_hat and returned in the model's prediction type."""
        schedule = self.model.schedule
        d_cond, _ = schedule.to_x0_eps(cond_pred, x_t, t)
        d_guide, _ = schedule.to_x0_eps(guide_pred, x_t, t)
        diff = d_cond - d_guide
        if self.running is not None and self.running.shape != diff.shape:
            raise ValueError("an APG guidance object serves one sampling batch: build a new one per batch")
        self.running = diff if self.running is None else diff + self.config.apg_momentum * self.running
        diff = clip_rms(self.running, self.config.apg_norm_threshold)
        parallel, orthogonal = project(diff, d_cond)
        x0_hat = d_cond + (self.scale - 1) * (orthogonal + self.config.apg_eta * parallel)
        return schedule.from_x0_eps(x0_hat, schedule.eps_from_x0(x0_hat, x_t, t), t)


class CFGZeroStar(Guidance):
    """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886), made for flow models: the unconditional velocity is scaled by
    the per-sample least-squares s* = <v_cond, v_uncond> / ||v_uncond||^2 (their eq. 8, diffusers'
    ``cfg_zero_star_scale``), pred = s* v_uncond + w (v_cond - s* v_uncond), and the first ``zero_init_steps``
    sampler steps output v = 0 (their Sec. 4.2, "zero-init": on the flow path the sample stays where it is). Flow
    schedules only (``config.check_sampler``). At w = 1 it is off, zero-init included: the unguided sampler."""

    def __init__(self, model: DiffusionModel, config: SampleConfig, guide: DiffusionModel | None = None) -> None:
        super().__init__(model, config, guide)
        self.calls = 0  # sampler steps taken by this batch: the object serves one trajectory

    def __call__(self, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        step, self.calls = self.calls, self.calls + 1
        if self.scale != 1.0 and step < self.config.zero_init_steps:
            return torch.zeros_like(x_t)
        return super().__call__(x_t, t, cond)

    def combine(self, cond_pred: Tensor, guide_pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        from diffusers.guiders.classifier_free_zero_star_guidance import cfg_zero_star_scale

        scale = cfg_zero_star_scale(cond_pred.flatten(1), guide_pred.flatten(1))
        uncond = guide_pred * scale.reshape((-1,) + (1,) * (cond_pred.ndim - 1))
        return uncond + self.scale * (cond_pred - uncond)


# The methods by name: adding one is a Guidance subclass, one line here and its name in config.GuidanceMethod.
GUIDANCE: dict[str, type[Guidance]] = {
    "cfg": ClassifierFreeGuidance,
    "apg": AdaptiveProjectedGuidance,
    "cfg-zero-star": CFGZeroStar,
}
assert GUIDANCE.keys() == set(typing.get_args(GuidanceMethod))


def build_guidance(model: DiffusionModel, config: SampleConfig, guide: DiffusionModel | None = None) -> Guidance:
    """The guided denoiser ``config.guidance`` names, fresh (no state) for one sampling batch."""
    return GUIDANCE[config.guidance](model, config, guide)
