"""The self-perceptual objective against a plain reference written out from the paper, and the loss contract.

The reference below deliberately shares no code with ``losses.py``: it indexes alpha_bar itself, runs the teacher's
*full* forward pass with gradients on, and captures features with forward hooks, exactly as a first implementation
from the paper (arXiv 2401.00110, Algorithm 1) would.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from torch import nn

from perceptual_diffusion.config import LossConfig, ModelConfig, ScheduleConfig
from perceptual_diffusion.core.losses import (
    MSELoss,
    SelfPerceptualLoss,
    build_loss,
    mse_loss,
    self_perceptual_loss,
)
from perceptual_diffusion.core.networks import DiffusionUNet, frozen_copy
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.dit import DiffusionDiT

T = 1000
N = 4


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (arXiv 2401.00110, Algorithm 1).


def _alpha_sigma(model: DiffusionUNet, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = model.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()


def _teacher_features_by_hooks(teacher: DiffusionUNet, x: torch.Tensor, t, cond) -> dict[str, torch.Tensor]:
    captured: dict[str, torch.Tensor] = {}
    if isinstance(teacher, DiffusionDiT):  # a transformer's taps: the output of each block
        handles = [
            block.register_forward_hook(lambda m, a, out, k=k: captured.__setitem__(f"block{k}", out))
            for k, block in enumerate(teacher.transformer.transformer_blocks, start=1)
        ]
    else:
        handles = [
            block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"down{i}", out[0]))
            for i, block in enumerate(teacher.unet.down_blocks)
        ]
        handles.append(teacher.unet.mid_block.register_forward_hook(lambda m, a, out: captured.__setitem__("mid", out)))
    try:
        teacher(x, t, cond)  # the full forward, decoder included, with autograd on
    finally:
        for h in handles:
            h.remove()
    return captured


def reference_self_perceptual(
    online,
    teacher,
    x0,
    cond,
    t,
    eps,
    t_prime,
    feature_layer="mid",
    distance="mse",
    predicted_noise="predicted",
    layers=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample perceptual loss, per-sample v-MSE) from the formulas, written out; ``layers``: the hooked taps
    to sum (default: ``feature_layer``, or every tap for "all")."""
    alpha_t, sigma_t = _alpha_sigma(teacher, t)
    x_t = alpha_t * x0 + sigma_t * eps
    v_hat = online(x_t, t, cond)
    x0_hat = alpha_t * x_t - sigma_t * v_hat
    eps_hat = sigma_t * x_t + alpha_t * v_hat
    alpha_p, sigma_p = _alpha_sigma(teacher, t_prime)
    x_real_tp = alpha_p * x0 + sigma_p * eps
    x_hat_tp = alpha_p * x0_hat + sigma_p * (eps_hat if predicted_noise == "predicted" else eps)
    f_real = _teacher_features_by_hooks(teacher, x_real_tp, t_prime, cond)
    f_hat = _teacher_features_by_hooks(teacher, x_hat_tp, t_prime, cond)
    if layers is None:
        layers = list(f_hat) if feature_layer == "all" else [feature_layer]
    loss = torch.zeros(x0.shape[0])
    for name in layers:
        diff = f_hat[name] - f_real[name]
        loss = loss + (diff**2 if distance == "mse" else diff.abs()).flatten(1).mean(1)
    v = alpha_t * eps - sigma_t * x0
    mse = ((v_hat - v) ** 2).flatten(1).mean(1)
    return loss, mse


# ---------------------------------------------------------------------------------------------------------------
# Fixtures: an online model that differs from its teacher, so features, losses and gradients are all non-trivial.


@pytest.fixture
def online(make_tiny_model) -> DiffusionUNet:
    return make_tiny_model(seed=0).train()


@pytest.fixture
def teacher(make_tiny_model) -> DiffusionUNet:
    return frozen_copy(make_tiny_model(seed=7))


def _batch(seed: int = 0, t=(0, 999, 250, 600), t_prime=(999, 0, 700, 40)):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(N, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(N, 3, 8, 8, generator=g)
    cond = torch.tensor([0, 1, 2, 3])  # 3 is the null label of the 3-class tiny model
    return x0, cond, torch.tensor(t), eps, torch.tensor(t_prime)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _assert_same_grads(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
    assert sum(g.abs().sum() for g in ref.values()) > 0, "vacuous: the reference gradient is zero"


OPTIONS = list(itertools.product(["mid", "down0", "down1", "all"], ["mse", "l1"], ["predicted", "true"]))


@pytest.mark.parametrize(("feature_layer", "distance", "predicted_noise"), OPTIONS)
def test_self_perceptual_loss_and_gradients_equal_reference(
    online, teacher, feature_layer: str, distance: str, predicted_noise: str
) -> None:
    x0, cond, t, eps, t_prime = _batch()
    options = {"feature_layer": feature_layer, "distance": distance, "predicted_noise": predicted_noise}

    loss = self_perceptual_loss(online, teacher, x0, cond, t, eps, t_prime, **options)
    loss.sum().backward()
    ours = _grads(online)
    online.zero_grad(set_to_none=True)

    ref_loss, _ = reference_self_perceptual(online, teacher, x0, cond, t, eps, t_prime, **options)
    ref_loss.sum().backward()

    assert loss.shape == (N,)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    # (At t' = T-1 with the true noise both branches are pure eps and agree: a genuine zero, so test the batch.)
    assert ref_loss.max() > 1e-3, "vacuous: the online model and teacher should disagree"
    _assert_same_grads(ours, _grads(online))


def _dit(seed: int) -> DiffusionDiT:
    """A perturbed tiny class-conditional DiT (4 blocks) on 8x8 RGB, 3 classes like the tiny U-Net."""
    torch.manual_seed(seed)
    model = DiffusionDiT(ModelConfig(preset="tiny", image_size=8, num_classes=3, arch="dit"), ScheduleConfig())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# (the project's tap options, the reference's hooked blocks): the default is the middle block, 2 of 4.
DIT_TAPS = [
    ({}, ["block2"]),
    ({"feature_blocks": (1, 3)}, ["block1", "block3"]),
    ({"feature_blocks": (4,)}, ["block4"]),
    ({"feature_layer": "all"}, ["block1", "block2", "block3", "block4"]),
]


@pytest.mark.parametrize(("taps", "layers"), DIT_TAPS, ids=["default", "1,3", "4", "all"])
@pytest.mark.parametrize("predicted_noise", ["predicted", "true"])
def test_self_perceptual_loss_and_gradients_equal_reference_with_a_dit(
    taps: dict, layers: list[str], predicted_noise: str
) -> None:
    # The same reference, with a DiT as online model and as frozen teacher (issue 19): hooks on the full forward.
    online, teacher = _dit(0).train(), frozen_copy(_dit(7))
    x0, cond, t, eps, t_prime = _batch()
    loss = self_perceptual_loss(online, teacher, x0, cond, t, eps, t_prime, predicted_noise=predicted_noise, **taps)
    loss.sum().backward()
    ours = _grads(online)
    online.zero_grad(set_to_none=True)
    ref_loss, _ = reference_self_perceptual(
        online, teacher, x0, cond, t, eps, t_prime, predicted_noise=predicted_noise, layers=layers
    )
    ref_loss.sum().backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert ref_loss.max() > 1e-3, "vacuous: the online model and teacher should disagree"
    _assert_same_grads(ours, _grads(online))
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize(
    "config",
    [
        LossConfig(kind="self-perceptual", teacher="x", mse_weight=0.5),
        LossConfig(kind="self-perceptual", teacher="x", mse_weight=2.0, feature_layer="all", distance="l1"),
        LossConfig(kind="self-perceptual", teacher="x", predicted_noise="true", feature_layer="down1"),
    ],
    ids=["mse-weight", "mse-weight-all-l1", "true-noise-down1"],
)
def test_self_perceptual_loss_object_equals_reference_with_the_same_draws(online, teacher, config) -> None:
    x0, cond, *_ = _batch(seed=3)
    terms = SelfPerceptualLoss(config, teacher)(online, x0, cond, torch.Generator().manual_seed(42))
    terms["loss"].sum().backward()
    ours = _grads(online)
    online.zero_grad(set_to_none=True)

    # The object's draws, in its order: t, eps, then an independent t'.
    g = torch.Generator().manual_seed(42)
    t = torch.randint(0, T, (N,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t_prime = torch.randint(0, T, (N,), generator=g)
    assert not torch.equal(t, t_prime)
    perceptual, mse = reference_self_perceptual(
        online,
        teacher,
        x0,
        cond,
        t,
        eps,
        t_prime,
        feature_layer=config.feature_layer,
        distance=config.distance,
        predicted_noise=config.predicted_noise,
    )
    ref_loss = perceptual + config.mse_weight * mse
    ref_loss.sum().backward()

    torch.testing.assert_close(terms["loss"], ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["perceptual"], perceptual.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(terms["mse"], mse.detach(), rtol=1e-5, atol=1e-5)
    _assert_same_grads(ours, _grads(online))


def test_teacher_gets_no_gradient_and_is_unchanged_by_an_optimiser_step(online, teacher) -> None:
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    optimizer = torch.optim.AdamW(online.parameters(), lr=1e-2)
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    loss_fn = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", feature_layer="all"), teacher)
    x0, cond, *_ = _batch()
    loss_fn(online, x0, cond, torch.Generator().manual_seed(0))["loss"].mean().backward()

    assert all(p.grad is None for p in teacher.parameters())
    with_grad = [n for n, p in online.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    # Every online parameter but the embeddings of classes absent from the batch must receive a gradient.
    assert len(with_grad) >= len(list(online.parameters())) - 1, sorted(
        set(dict(online.named_parameters())) - set(with_grad)
    )
    optimizer.step()
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, online_before[k]) for k, v in online.state_dict().items())


class OracleV(nn.Module):
    """An online model that knows the answer: it returns the true v for the x0 / eps of the batch."""

    def __init__(self, schedule, x0: torch.Tensor, eps: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.x0, self.eps = schedule, x0, eps
        self.anchor = nn.Parameter(torch.zeros(()))  # so that backward has a leaf to reach

    def forward(self, x_t, t, cond=None):
        return self.schedule.target(self.x0, self.eps, t) + 0 * self.anchor


EDGE_T = (0, 1, 500, 998, 999)


@pytest.mark.parametrize("distance", ["mse", "l1"])
@pytest.mark.parametrize("predicted_noise", ["predicted", "true"])
def test_oracle_online_model_has_zero_loss_for_every_t_and_t_prime(teacher, distance, predicted_noise) -> None:
    pairs = list(itertools.product(EDGE_T, EDGE_T))
    g = torch.Generator().manual_seed(1)
    n = len(pairs)
    x0 = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(n, 3, 8, 8, generator=g)
    t, t_prime = (torch.tensor(side) for side in zip(*pairs))
    cond = torch.arange(n) % 4
    oracle = OracleV(teacher.schedule, x0, eps)
    options = {"distance": distance, "predicted_noise": predicted_noise}
    loss = self_perceptual_loss(oracle, teacher, x0, cond, t, eps, t_prime, feature_layer="all", **options)
    # Float32 round-off only: x0_hat = (alpha^2 + sigma^2) x0 and eps_hat = eps up to ~1e-7.
    assert loss.abs().max() < (1e-10 if distance == "mse" else 1e-5), loss
    # Sanity: the same data with a wrong prediction does give a loss, so the bound above can fail.
    wrong = self_perceptual_loss(OracleV(teacher.schedule, -x0, -eps), teacher, x0, cond, t, eps, t_prime, **options)
    assert wrong.max() > 1e-2


def test_same_t_prime_with_predicted_noise_is_degenerate_zero(online, teacher) -> None:
    x0, cond, t, eps, _ = _batch()
    # x_hat_t = alpha (alpha x_t - sigma v) + sigma (sigma x_t + alpha v) = x_t whatever v is: the loss vanishes.
    degenerate = self_perceptual_loss(online, teacher, x0, cond, t, eps, t, feature_layer="all")
    assert degenerate.abs().max() < 1e-9
    # ...which is why t' must be drawn anew; reusing the true noise instead does not collapse.
    true_noise = self_perceptual_loss(online, teacher, x0, cond, t, eps, t, predicted_noise="true")
    assert true_noise[t < 999].min() > 1e-6
    config = LossConfig(kind="self-perceptual", teacher="x", t_prime="same-as-t", feature_layer="all")
    terms = SelfPerceptualLoss(config, teacher)(online, x0, cond, torch.Generator().manual_seed(0))
    assert terms["perceptual"].abs().max() < 1e-9


@pytest.mark.parametrize("feature_layer", ["mid", "all"])
def test_loss_and_gradients_are_finite_at_both_ends_of_time(online, teacher, feature_layer) -> None:
    ends = (0, 999)
    t, t_prime = (torch.tensor(side) for side in zip(*itertools.product(ends, ends)))
    x0, cond, _, eps, _ = _batch()
    loss = self_perceptual_loss(online, teacher, x0, cond, t, eps, t_prime, feature_layer=feature_layer)
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(p.grad).all() for p in online.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------------------------
# The MSE objective and the shared contract.


def test_mse_loss_is_zero_for_an_oracle_and_matches_the_hand_formula(online) -> None:
    x0, cond, t, eps, _ = _batch()
    assert mse_loss(OracleV(online.schedule, x0, eps), online.schedule, x0, cond, t, eps).abs().max() < 1e-12

    terms = MSELoss(LossConfig(), online.schedule)(online, x0, cond, torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    t = torch.randint(0, T, (N,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    alpha, sigma = _alpha_sigma(online, t)
    v_hat = online(alpha * x0 + sigma * eps, t, cond)
    expected = ((v_hat - (alpha * eps - sigma * x0)) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-6, atol=1e-7)


def _all_loss_objects(teacher: DiffusionUNet) -> list:
    sp = LossConfig(kind="self-perceptual", teacher="x")
    return [
        build_loss(LossConfig(), teacher.schedule),
        build_loss(sp, teacher.schedule, teacher),
        build_loss(replace(sp, feature_layer="all", distance="l1", mse_weight=1.0), teacher.schedule, teacher),
        build_loss(replace(sp, t_prime="same-as-t", predicted_noise="true"), teacher.schedule, teacher),
    ]


def test_every_loss_object_returns_per_sample_losses(online, teacher) -> None:
    x0, cond, *_ = _batch()
    for loss_fn in _all_loss_objects(teacher):
        terms = loss_fn(online, x0, cond, torch.Generator().manual_seed(0))
        assert "loss" in terms, type(loss_fn).__name__
        for name, value in terms.items():
            assert value.shape == (N,), (type(loss_fn).__name__, name, value.shape)
            assert torch.isfinite(value).all()
        assert terms["loss"].requires_grad
        assert all(not v.requires_grad for k, v in terms.items() if k != "loss"), "logged terms must be detached"
        # Unconditional batches (cond None) are part of the contract too.
        assert loss_fn(online, x0, None, torch.Generator().manual_seed(0))["loss"].shape == (N,)


def test_self_perceptual_loss_refuses_a_trainable_teacher_or_missing_tap(online, teacher) -> None:
    config = LossConfig(kind="self-perceptual", teacher="x")
    with pytest.raises(ValueError, match="frozen"):
        SelfPerceptualLoss(config, online)
    with pytest.raises(UserError, match="down3"):
        SelfPerceptualLoss(replace(config, feature_layer="down3"), teacher)
    with pytest.raises(ValueError, match="teacher"):
        build_loss(config, teacher.schedule, None)


def test_channel_normalised_features_have_unit_length_and_keep_the_oracle_at_zero(teacher) -> None:
    from perceptual_diffusion.core.losses import feature_distance, normalise_channels

    f = torch.randn(2, 8, 4, 4) * torch.linspace(0.1, 10, 8).view(1, 8, 1, 1)
    assert torch.allclose(normalise_channels(f).pow(2).sum(1), torch.ones(2, 4, 4), atol=1e-5)
    # Normalised, a feature map and a scaled copy of it are the same point; unnormalised they are far apart.
    assert feature_distance(f, 3 * f, "mse", "channel").max() < 1e-10
    assert feature_distance(f, 3 * f, "mse", "none").min() > 1
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t, t_prime, cond = torch.tensor([0, 300, 600, 999]), torch.tensor([999, 600, 300, 0]), torch.arange(4) % 3
    oracle = OracleV(teacher.schedule, x0, eps)
    loss = self_perceptual_loss(oracle, teacher, x0, cond, t, eps, t_prime, feature_norm="channel")
    assert loss.abs().max() < 1e-8


def test_t_prime_max_draws_t_prime_from_the_lower_noise_levels_only(teacher) -> None:
    low = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", t_prime_max=0.25), teacher)
    full = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x"), teacher)
    shape = torch.Size([4000, 3, 8, 8])
    drawn = low.draw(shape, torch.Generator().manual_seed(0))
    assert int(drawn["t_prime"].max()) < 250 and int(drawn["t_prime"].min()) == 0
    assert int(full.draw(shape, torch.Generator().manual_seed(0))["t_prime"].max()) > 900
    assert torch.equal(drawn["t"], full.draw(shape, torch.Generator().manual_seed(0))["t"]), "t is untouched"
    with pytest.raises(UserError, match="--t-prime-max"):
        LossConfig(kind="self-perceptual", teacher="x", t_prime_max=0.0)
