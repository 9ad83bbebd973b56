"""DDIM sampling (Song et al. 2021), which on the flow path is Euler on the ODE, with guidance (``core/guidance.py``:
CFG, autoguidance, APG, CFG-Zero*, the interval).

Every sampler takes the same denoiser callable ``model(x_t, t, cond) -> prediction``. Every image gets its own seed:
its initial noise (and, for eta > 0, its per-step noise) comes from a generator seeded with that seed alone, so an
image does not depend on the batch it is drawn in, the batch size, or the number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

from perceptual_diffusion.config import SampleConfig, check_sampler
from perceptual_diffusion.core.guidance import build_guidance
from perceptual_diffusion.core.networks import DiffusionModel, PixelModel
from perceptual_diffusion.core.schedule import NoiseSchedule
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.runtime.progress import progress as progress_iter

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def ddim_step(
    schedule: NoiseSchedule,
    pred: Tensor,
    x_t: Tensor,
    t: float,
    t_prev: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip_x0: bool = False,
) -> tuple[Tensor, Tensor]:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12) in (alpha, sigma); returns (x_prev, x0_hat).

    x_prev = alpha_prev x0_hat + sqrt(sigma_prev^2 - s^2) eps_hat + s z,
    s = eta (sigma_prev / sigma_t) sqrt(1 - alpha_t^2 / alpha_prev^2); ``t_prev`` = ``schedule.clean_time`` is the
    clean end (alpha 1, sigma 0). No alpha^2 + sigma^2 = 1 is assumed: on the flow path (alpha = 1 - s, sigma = s)
    the eta = 0 update is exactly Euler on the ODE, x + (s_prev - s) v_hat (tests/test_flow.py). eta > 0 and
    clipping are the DDPM sampler's (``config.check_sampler`` refuses them for flow).
    """
    n = x_t.shape[0]
    tt = schedule.time_tensor(t, n, x_t.device)
    x0_hat, eps_hat = schedule.to_x0_eps(pred, x_t, tt)
    if clip_x0:
        x0_hat = x0_hat.clamp(-1.0, 1.0)
    alpha_t, sigma_t = schedule.alpha_sigma_at(t)
    alpha_prev, sigma_prev = schedule.alpha_sigma_at(t_prev)
    s = eta * (sigma_prev / sigma_t) * (1 - (alpha_t / alpha_prev) ** 2) ** 0.5 if eta > 0 else 0.0
    noise_coef = max(sigma_prev**2 - s**2, 0.0) ** 0.5 if s > 0 else sigma_prev
    x_prev = alpha_prev * x0_hat + noise_coef * eps_hat
    if s > 0:
        if noise is None:
            raise ValueError("eta > 0 needs per-step noise")
        x_prev = x_prev + s * noise
    return x_prev, x0_hat


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _randn_each(gens: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


@torch.inference_mode()
def ddim_sample(
    denoiser: Denoiser,
    schedule: NoiseSchedule,
    shape: tuple[int, int, int],
    seeds: Sequence[int],
    cond: Tensor | None,
    config: SampleConfig,
    device: torch.device | str = "cpu",
    clamp: bool = True,
) -> Tensor:
    """Sample one batch: one image per seed, shape (C, H, W) each; returns x0 on the CPU, clamped to [-1, 1] unless
    ``clamp`` is False (latents are not bounded). The time grid is the schedule's (DDPM: the spacing's timesteps;
    flow: diffusers' FlowMatchEuler grid)."""
    check_sampler(config, schedule.config)
    gens = _generators(seeds)
    x = _randn_each(gens, shape).to(device)
    cond = None if cond is None else cond.to(device)
    times = schedule.sampling_times(config.steps, config.spacing)
    for t, t_prev in zip(times[:-1], times[1:]):
        tt = schedule.time_tensor(t, x.shape[0], device)
        pred = denoiser(x, tt, cond).float()
        noise = _randn_each(gens, shape).to(device) if config.eta > 0 else None
        x, _ = ddim_step(schedule, pred, x.float(), t, t_prev, config.eta, noise, config.clip_x0)
    return (x.clamp(-1, 1) if clamp else x).cpu()


def sample_stream(
    model: DiffusionModel,
    shape: tuple[int, ...],
    seeds: Sequence[int],
    cond_of: Callable[[int, int], Tensor | None],
    config: SampleConfig,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: DiffusionModel | None = None,
    progress: bool = False,
    clamp: bool = True,
) -> Iterator[Tensor]:
    """The one sampling loop, for every model kind: DDIM with ``config.guidance`` (against the null label, or
    autoguidance against ``guide``) over batches of ``seeds``, each image of ``shape``; ``cond_of(start, end)`` is the
    condition of ``seeds[start:end]`` (class labels, a text encoder's hidden states, or None). Latent models decode
    what this yields (``latent.sample_latent``)."""
    starts = range(0, len(seeds), batch_size)
    for start in progress_iter(starts, desc="sampling", unit="batch", enabled=progress):
        end = min(start + batch_size, len(seeds))
        # A fresh guidance object per batch: a method's state (APG's momentum) belongs to one trajectory, never to
        # the next batch.
        denoiser = build_guidance(model, config, guide)
        yield ddim_sample(denoiser, model.schedule, shape, seeds[start:end], cond_of(start, end), config, device, clamp)


def sample_batches(
    model: PixelModel,
    seeds: Sequence[int],
    labels: Tensor | None,
    config: SampleConfig,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: PixelModel | None = None,
    progress: bool = False,
) -> Iterator[Tensor]:
    """Batches of samples of a pixel model for ``seeds`` (labels: one per seed, or None for unconditional)."""
    if labels is not None and model.num_classes == 0:
        raise ValueError("labels given, but the model is unconditional")
    if config.cfg_scale != 1.0 and model.num_classes == 0 and guide is None:
        raise ValueError("classifier-free guidance needs a class-conditional model (or a guide model)")
    if config.cfg_scale != 1.0 and labels is None and guide is None:
        raise ValueError("classifier-free guidance needs labels; unconditional samples use --cfg-scale 1")
    shape = model.sample_shape
    cond_of = (lambda start, end: None) if labels is None else (lambda start, end: labels[start:end])
    yield from sample_stream(model, shape, seeds, cond_of, config, batch_size, device, guide, progress)


def sample(
    model: PixelModel,
    seeds: Sequence[int],
    labels: Tensor | None,
    config: SampleConfig,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: PixelModel | None = None,
    progress: bool = False,
) -> Tensor:
    """All samples for ``seeds`` as one tensor (N, C, H, W) in [-1, 1]; use :func:`sample_batches` to stream."""
    batches = sample_batches(model, seeds, labels, config, batch_size, device, guide, progress)
    return torch.cat(list(batches))


def sample_sharded(
    model: PixelModel,
    seeds: Sequence[int],
    labels: Tensor | None,
    config: SampleConfig,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    guide: PixelModel | None = None,
) -> Tensor | None:
    """Under torchrun, each process samples seeds[rank::world] and rank 0 gets all samples in seed order (the
    others None); in a single process, the same as :func:`sample`. Per-image seeds make the split exact."""
    local_labels = None if labels is None else labels[distributed.rank() :: distributed.world_size()]
    local = sample(model, distributed.seed_shard(seeds), local_labels, config, batch_size, device, guide)
    return distributed.gather_seed_order(local)


def labels_for_seeds(seeds: Sequence[int], class_probs: Tensor) -> Tensor:
    """A label per image drawn from the data's class proportions, seeded by the image's own seed (offset so the
    label draw is independent of the image's noise draw)."""
    # One generator, reseeded per image: the same draws as a generator per seed, without holding n generators (each
    # keeps kilobytes of state) at once.
    gen = torch.Generator()
    labels = torch.empty(len(seeds), dtype=torch.long)
    for i, s in enumerate(seeds):
        labels[i] = torch.multinomial(class_probs, 1, generator=gen.manual_seed(int(s) + 0x5EED))[0]
    return labels
