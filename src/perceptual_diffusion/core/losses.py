"""Training objectives with one signature, so both stages run in the same loop:

    loss(model, x0, cond, generator) -> {"loss": Tensor[N], ...}   (per-sample values)

Each loss also has ``draw(shape, generator)``, the batch's randomness (t, eps, ...) with one row per sample, which
``loss(..., noise=rows)`` accepts instead of drawing: the training loop draws a global batch once and splits it
between processes and gradient-accumulation micro-batches.

``MSELoss`` is the ordinary v/eps/x0-prediction objective. ``SelfPerceptualLoss`` is Lin & Yang's objective (arXiv
2401.00110, Sec. 3 and Algorithm 1); its math is the pure function :func:`self_perceptual_loss`, kept apart from the
randomness so that tests can call it on fixed t, eps and t_prime. ``ExternalPerceptualLoss`` is its control: the
same online prediction x0_hat judged by a separately trained frozen image network instead of the diffusion model
(:func:`external_perceptual_loss`).

A loss never looks inside the model it trains (which may be wrapped for DDP or compiled): the noise schedule is
given to it (``MSELoss``) or is its frozen teacher's (``SelfPerceptualLoss``, whose teacher has the online model's
schedule: ``training`` checks both come from the same network). Models follow ``networks.DiffusionModel``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import LossConfig
from perceptual_diffusion.core.networks import DiffusionModel, block_taps
from perceptual_diffusion.core.schedule import NoiseSchedule
from perceptual_diffusion.errors import UserError


def draw_t_eps(
    schedule: NoiseSchedule, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """The training-time t (``schedule.train_time``: DDPM's U{0..T-1} by default) and eps ~ N(0, I) for a batch of
    ``shape``, in this order (resume and DDP rely on it)."""
    t = schedule.train_time(shape[0], generator)
    return {"t": t, "eps": torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)}


def drop_condition(labels: Tensor | None, p: float, null_label: int, generator: torch.Generator) -> Tensor | None:
    """Replace each label by the null label with probability p, so the same model also learns p(x) for CFG."""
    if labels is None or p == 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p
    return torch.where(drop, torch.full_like(labels, null_label), labels)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.flatten(1).mean(dim=1)


def mse_from_prediction(schedule: NoiseSchedule, pred: Tensor, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """Per-sample || pred - target ||^2 / D, target by the prediction type (v by default)."""
    target = schedule.target(x0, eps, t)
    return _per_sample_mean((pred.float() - target.float()) ** 2)


def mse_loss(
    model: DiffusionModel, schedule: NoiseSchedule, x0: Tensor, cond: Tensor | None, t: Tensor, eps: Tensor
) -> Tensor:
    """Per-sample MSE of f(x_t, t, c) against its target."""
    x_t = schedule.add_noise(x0, eps, t)
    return mse_from_prediction(schedule, model(x_t, t, cond), x0, t, eps)


class DrawsTimestepNoise:
    """What every loss that draws only (t, eps) shares: its randomness (``MSELoss``, the external and the latent
    perceptual losses), so that their batches draw exactly the same numbers."""

    schedule: NoiseSchedule

    def draw(
        self, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """The randomness of a batch of ``shape`` (t, eps), one row per sample: a batch can be drawn whole and split."""
        return draw_t_eps(self.schedule, shape, generator, dtype)


class MSELoss(DrawsTimestepNoise):
    """The plain diffusion objective: uniform t, Gaussian eps, mean squared error on the prediction target."""

    def __init__(self, config: LossConfig, schedule: NoiseSchedule) -> None:
        self.config = config
        self.schedule = schedule

    def __call__(
        self,
        model: DiffusionModel,
        x0: Tensor,
        cond: Tensor | None,
        generator: torch.Generator,
        noise: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if noise is None:
            noise = self.draw(x0.shape, generator, x0.dtype)
        mse = mse_loss(model, self.schedule, x0, cond, noise["t"], noise["eps"].to(x0.dtype))
        return {"loss": mse, "mse": mse.detach()}


def normalise_channels(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length over channels at every position (LPIPS, Zhang et al. 2018, Eq. 1)."""
    f = f.float()
    return f / (f.pow(2).sum(dim=1, keepdim=True) + eps).sqrt()


def feature_distance(a: Tensor, b: Tensor, distance: str, norm: str = "none") -> Tensor:
    """Per-sample mean squared (or absolute) difference between two feature maps (optionally channel-normalised)."""
    if norm == "channel":
        a, b = normalise_channels(a), normalise_channels(b)
    diff = a.float() - b.float()
    return _per_sample_mean(diff * diff if distance == "mse" else diff.abs())


def self_perceptual_loss(
    online: DiffusionModel,
    teacher: DiffusionModel,
    x0: Tensor,
    cond: Tensor | None,
    t: Tensor,
    eps: Tensor,
    t_prime: Tensor,
    *,
    feature_layer: str = "mid",
    feature_blocks: tuple[int, ...] = (),
    distance: str = "mse",
    predicted_noise: str = "predicted",
    feature_norm: str = "none",
) -> Tensor:
    """Per-sample self-perceptual loss (arXiv 2401.00110, Algorithm 1, lines 4-8; the teacher's schedule is used).

    x_t = alpha_t x0 + sigma_t eps;  v_hat = online(x_t, t, c) -> (x0_hat, eps_hat);
    x_t' = alpha_t' x0 + sigma_t' eps;  x_hat_t' = alpha_t' x0_hat + sigma_t' eps_hat;
    loss = || teacher_mid(x_hat_t', t', c) - teacher_mid(x_t', t', c) ||^2 / D.
    """
    x_t = teacher.schedule.add_noise(x0, eps, t)
    pred = online(x_t, t, cond)
    return perceptual_from_prediction(
        teacher,
        pred,
        x_t,
        x0,
        cond,
        t,
        eps,
        t_prime,
        feature_layer=feature_layer,
        feature_blocks=feature_blocks,
        distance=distance,
        predicted_noise=predicted_noise,
        feature_norm=feature_norm,
    )


def perceptual_from_prediction(
    teacher: DiffusionModel,
    pred: Tensor,
    x_t: Tensor,
    x0: Tensor,
    cond: Tensor | None,
    t: Tensor,
    eps: Tensor,
    t_prime: Tensor,
    *,
    feature_layer: str = "mid",
    feature_blocks: tuple[int, ...] = (),
    distance: str = "mse",
    predicted_noise: str = "predicted",
    feature_norm: str = "none",
) -> Tensor:
    """Steps 3-4 of the objective, given the online model's prediction ``pred`` at (x_t, t)."""
    schedule = teacher.schedule
    x0_hat, eps_hat = schedule.to_x0_eps(pred, x_t, t)
    noise_hat = eps_hat if predicted_noise == "predicted" else eps
    x_real = schedule.add_noise(x0, eps, t_prime)
    x_hat = schedule.add_noise(x0_hat, noise_hat, t_prime)

    taps = resolve_taps(teacher, feature_layer, feature_blocks)
    # Why two calls and not one batched call: the real branch needs no graph at all, and under no_grad it also
    # skips storing activations; batching both through one graph would make backward run over 2N samples.
    with torch.no_grad():
        f_real = teacher.features(x_real, t_prime, cond, taps)
    # The predicted branch keeps its graph: gradients flow *through* the frozen teacher into x_hat, and so into
    # the online model. The teacher's parameters have requires_grad False, so backward computes no weight grads.
    f_hat = teacher.features(x_hat, t_prime, cond, taps)
    return sum(feature_distance(f_hat[k], f_real[k], distance, feature_norm) for k in taps)


def resolve_taps(
    teacher: DiffusionModel, feature_layer: str = "mid", feature_blocks: tuple[int, ...] = ()
) -> tuple[str, ...]:
    """The teacher's taps the loss compares (their sum): a DiT's ``blockK`` for ``feature_blocks``, every tap for
    "all", the teacher's ``default_tap`` for "mid" (the paper's mid-block, arXiv 2401.00110, Sec. 3, or a
    transformer's middle block), else the one named tap."""
    if feature_blocks:
        return block_taps(feature_blocks)
    if feature_layer == "all":
        return teacher.taps
    return (teacher.default_tap,) if feature_layer == "mid" else (feature_layer,)


class SelfPerceptualLoss:
    """Draws t, eps and t_prime and applies :func:`self_perceptual_loss` with a frozen teacher.

    The teacher is held here, not in the model: it is never given to the optimiser, never wrapped in DDP, and never
    part of the student's state dict or checkpoints.
    """

    def __init__(self, config: LossConfig, teacher: DiffusionModel, schedule: NoiseSchedule | None = None) -> None:
        if any(p.requires_grad for p in teacher.parameters()) or teacher.training:
            raise ValueError("the teacher must be frozen: call .eval().requires_grad_(False) (networks.frozen_copy)")
        missing = [
            k for k in resolve_taps(teacher, config.feature_layer, config.feature_blocks) if k not in teacher.taps
        ]
        if missing:
            option = (
                f"--feature-blocks {','.join(map(str, config.feature_blocks))}"
                if config.feature_blocks
                else f"--feature-layer {config.feature_layer}"
            )
            raise UserError(f"{option} is not in this network (it has {', '.join(teacher.taps)})")
        self.config = config
        self.teacher = teacher
        # The run's schedule draws t (its training-time distribution may differ from the teacher's); the teacher's
        # converts and re-noises, and both mean the same process (training.loop checks ScheduleConfig.process).
        self.schedule = schedule or teacher.schedule

    def draw(
        self, shape: torch.Size, generator: torch.Generator, dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """The randomness of a batch of ``shape`` (t, eps, t'), one row per sample: a batch can be drawn whole and
        split (for gradient accumulation and DDP) without changing what any sample sees."""
        schedule = self.schedule
        noise = draw_t_eps(schedule, shape, generator, dtype)
        # t' must be drawn anew: with t' = t and predicted noise, x_hat_t' == x_t exactly and the loss vanishes.
        # Uniform over the lowest t_prime_max of the noise levels (the paper's U{1..T}, Algorithm 1, line 6; for
        # flow s' ~ U(0, t_prime_max)), or logit-normal as the schedule draws it.
        if self.config.t_prime == "same-as-t":
            return {**noise, "t_prime": noise["t"]}
        t_prime = schedule.draw_time(shape[0], generator, self.config.t_prime, self.config.t_prime_max)
        return {**noise, "t_prime": t_prime}

    def __call__(
        self,
        model: DiffusionModel,
        x0: Tensor,
        cond: Tensor | None,
        generator: torch.Generator,
        noise: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        schedule = self.schedule
        if noise is None:
            noise = self.draw(x0.shape, generator, x0.dtype)
        t, eps, t_prime = noise["t"], noise["eps"].to(x0.dtype), noise["t_prime"]
        x_t = schedule.add_noise(x0, eps, t)
        pred = model(x_t, t, cond)
        perceptual = perceptual_from_prediction(
            self.teacher,
            pred,
            x_t,
            x0,
            cond,
            t,
            eps,
            t_prime,
            feature_layer=self.config.feature_layer,
            feature_blocks=self.config.feature_blocks,
            distance=self.config.distance,
            predicted_noise=self.config.predicted_noise,
            feature_norm=self.config.feature_norm,
        )
        mse = mse_from_prediction(schedule, pred, x0, t, eps)  # free: pred is already computed
        loss = perceptual + self.config.mse_weight * mse if self.config.mse_weight > 0 else perceptual
        return {"loss": loss, "perceptual": perceptual.detach(), "mse": mse.detach()}


class PerceptualNetwork(Protocol):
    """A frozen image network with named layers (``models.classifier_net.DomainClassifier``): images in [-1, 1]."""

    training: bool

    def perceptual_features(self, x: Tensor, layer: str) -> Tensor: ...
    def parameters(self) -> Iterator[nn.Parameter]: ...


def external_from_prediction(
    schedule: NoiseSchedule,
    net: PerceptualNetwork,
    pred: Tensor,
    x_t: Tensor,
    x0: Tensor,
    t: Tensor,
    *,
    layer: str = "block2",
    distance: str = "mse",
    feature_norm: str = "none",
) -> Tensor:
    """Per-sample || net_layer(x0_hat) - net_layer(x0) ||^2 / D, x0_hat from the online prediction at (x_t, t)."""
    x0_hat, _ = schedule.to_x0_eps(pred, x_t, t)
    # Both enter as images, as into an LPIPS-style loss, and x0_hat unclipped: clamping it to [-1, 1] would cut the
    # gradient of every pixel outside the data range.
    with torch.no_grad():  # the real branch needs no graph
        f_real = net.perceptual_features(x0, layer)
    # The predicted branch keeps its graph: gradients flow through the frozen network into x0_hat and so into the
    # online model; the network's parameters have requires_grad False, so backward computes no weight gradients.
    f_hat = net.perceptual_features(x0_hat, layer)
    return feature_distance(f_hat, f_real, distance, feature_norm)


def external_perceptual_loss(
    online: DiffusionModel,
    schedule: NoiseSchedule,
    net: PerceptualNetwork,
    x0: Tensor,
    cond: Tensor | None,
    t: Tensor,
    eps: Tensor,
    *,
    layer: str = "block2",
    distance: str = "mse",
    feature_norm: str = "none",
) -> Tensor:
    """Per-sample external-perceptual loss: x_t = alpha_t x0 + sigma_t eps; v_hat = online(x_t, t, c) -> x0_hat;
    loss = || net_layer(x0_hat) - net_layer(x0) ||^2 / D (a perceptual feature loss, Johnson et al. 2016, arXiv
    1603.08155, Sec. 3.2, on the online model's x0 prediction)."""
    x_t = schedule.add_noise(x0, eps, t)
    pred = online(x_t, t, cond)
    return external_from_prediction(
        schedule, net, pred, x_t, x0, t, layer=layer, distance=distance, feature_norm=feature_norm
    )


class ExternalPerceptualLoss(DrawsTimestepNoise):
    """The control for the paper's premise that the diffusion model is itself a good perceptual network (arXiv
    2401.00110, abstract and Sec. 3): t and eps drawn as for MSE, the distance measured by a separately trained
    frozen network, never the one that computes the headline metric.

    The network is held here, as the teacher is by ``SelfPerceptualLoss``: never given to the optimiser, never
    wrapped in DDP, never part of the online model's state dict or checkpoints.
    """

    def __init__(self, config: LossConfig, schedule: NoiseSchedule, net: PerceptualNetwork) -> None:
        if any(p.requires_grad for p in net.parameters()) or net.training:
            raise ValueError("the perceptual network must be frozen: call .eval().requires_grad_(False)")
        self.config = config
        self.schedule = schedule
        self.net = net

    def __call__(
        self,
        model: DiffusionModel,
        x0: Tensor,
        cond: Tensor | None,
        generator: torch.Generator,
        noise: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if noise is None:
            noise = self.draw(x0.shape, generator, x0.dtype)
        t, eps = noise["t"], noise["eps"].to(x0.dtype)
        x_t = self.schedule.add_noise(x0, eps, t)
        pred = model(x_t, t, cond)
        cfg = self.config
        perceptual = external_from_prediction(
            self.schedule,
            self.net,
            pred,
            x_t,
            x0,
            t,
            layer=cfg.perceptual_layer,
            distance=cfg.distance,
            feature_norm=cfg.feature_norm,
        )
        mse = mse_from_prediction(self.schedule, pred, x0, t, eps)  # free: pred is already computed
        loss = perceptual + cfg.mse_weight * mse if cfg.mse_weight > 0 else perceptual
        return {"loss": loss, "perceptual": perceptual.detach(), "mse": mse.detach()}


Loss = MSELoss | SelfPerceptualLoss | ExternalPerceptualLoss


def build_loss(
    config: LossConfig,
    schedule: NoiseSchedule,
    teacher: DiffusionModel | None = None,
    perceptual_net: PerceptualNetwork | None = None,
) -> Loss:
    """The loss object a config names, for a model trained under ``schedule`` (with its frozen network, if any)."""
    if config.kind == "mse":
        return MSELoss(config, schedule)
    if config.kind == "latent-perceptual":
        raise ValueError("the latent perceptual loss needs the VAE: training.latent.LatentTask.build_loss builds it")
    if config.kind == "external-perceptual":
        if perceptual_net is None:
            raise ValueError("the external-perceptual loss needs its frozen perceptual network")
        return ExternalPerceptualLoss(config, schedule, perceptual_net)
    if teacher is None:
        raise ValueError("the self-perceptual loss needs a teacher network")
    return SelfPerceptualLoss(config, teacher, schedule)
