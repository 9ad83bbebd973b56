"""The latent perceptual loss (Berrada et al., arXiv 2411.04873) on the tiny random SD components of ``testing``.

The maths against a reference written here from the paper's equations (features from hooks on a full
``vae.decode``, quantiles by ``torch.quantile``, the morphology on the outlier map rather than the inlier map), the
SNR gate, the truncated decoder, the outlier mask on hand-made maps, and the gradient contract (the frozen VAE gets
none, the U-Net gets the LPL's).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from perceptual_diffusion import testing
from perceptual_diffusion.config import (
    CaptionDataConfig,
    LatentModelConfig,
    LatentRunConfig,
    LossConfig,
    ScheduleConfig,
)
from perceptual_diffusion.core.losses import MSELoss
from perceptual_diffusion.core.schedule import build_schedule
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import latent
from perceptual_diffusion.models import latent_perceptual as lp


@dataclass(frozen=True)
class LPLFields:
    """Stand-in for the LossConfig fields the loss reads (names as proposed; defaults the proposed ones)."""

    lpl_weight: float = 3.0
    lpl_snr_min: float = 3.0
    lpl_up_blocks: int | None = None
    lpl_outlier_quantile: float = 0.02
    lpl_norm: str = "position"
    lpl_layer_weights: str = "uniform"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.make_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def parts(tiny_sd: Path) -> latent.FrozenParts:
    return latent.load_frozen_parts(tiny_sd)


@pytest.fixture(scope="module")
def vae(parts: latent.FrozenParts) -> torch.nn.Module:
    """The tiny VAE with a non-zero shift factor, so that the unscaling z / scale + shift is checked in full."""
    shifted = copy.deepcopy(parts.vae)
    shifted.register_to_config(shift_factor=0.25)
    return shifted


def unet(tiny_sd: Path, parts: latent.FrozenParts, seed: int = 0) -> latent.TextConditionedUNet:
    """The tiny U-Net with every weight perturbed (diffusers zero-initialises output layers), in train mode."""
    config = LatentRunConfig(model=LatentModelConfig(str(tiny_sd), 16), data=CaptionDataConfig(path="unused"))
    with torch.random.fork_rng(devices=[]):  # seeded, so two calls build the same network
        torch.manual_seed(seed)
        model = latent.build_model(config, parts.encode_text([""]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def spiky_latents(n: int, side: int, seed: int) -> torch.Tensor:
    """Latents with a bright 2x2 patch: the decoder maps get a few localised outliers for the mask to find."""
    z = 0.5 * torch.randn(n, 4, side, side, generator=torch.Generator().manual_seed(seed))
    z[:, :, 5:7, 9:11] += 20.0
    return z


# ---------------------------------------------------------------------------------------------------------------
# The reference: the paper's equations written out again, with independent feature taps, quantiles and morphology.


def reference_features(vae: torch.nn.Module, latents: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of the mid block and every up block during a full ``vae.decode`` of the unscaled latents."""
    seen: list[torch.Tensor] = []
    blocks = [vae.decoder.mid_block, *vae.decoder.up_blocks]
    handles = [b.register_forward_hook(lambda _m, _i, out: seen.append(out)) for b in blocks]
    try:
        with torch.no_grad():
            vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor)
    finally:
        for h in handles:
            h.remove()
    return seen


def reference_mask(f: torch.Tensor, q: float, factor: int) -> torch.Tensor:
    """rho: outliers beyond the q / 1-q quantiles by 2 std; the outlier map eroded by a small window (isolated
    detections dropped), then dilated by a larger one (kept regions widened), sizes by resolution."""
    flat = f.flatten(2)
    std = flat.std(dim=-1)
    low = (torch.quantile(flat, q, dim=-1) - 2 * std)[..., None, None]
    high = (torch.quantile(flat, 1 - q, dim=-1) + 2 * std)[..., None, None]
    outlier = (~((f > low) & (f < high))).float()
    erode, dilate = {1: (3, 5), 2: (1, 3)}[factor]
    outlier = -F.max_pool2d(-outlier, erode, stride=1, padding=erode // 2)
    outlier = F.max_pool2d(outlier, dilate, stride=1, padding=dilate // 2)
    return outlier < 0.5


def reference_lpl(vae, x0_hat, x0, q: float, norm: str, weighting: str) -> tuple[torch.Tensor, int]:
    """Per-sample LPL = 1/L sum_l omega_l 1/C sum_c mean_{kept hw} (phi~(x0_hat) - phi~(x0))^2, and how many
    entries the masks removed (so a test can insist the comparison covered the masking)."""
    hat, real = reference_features(vae, x0_hat), reference_features(vae, x0)
    out_side = x0.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
    total, removed = torch.zeros(x0.shape[0]), 0
    for layer, (a, b) in enumerate(zip(hat, real)):
        factor = out_side // b.shape[-1]
        rho = reference_mask(b, q, factor) if layer > 0 and factor <= 2 else torch.ones_like(b, dtype=torch.bool)
        removed += int((~rho).sum())
        a, b = a * rho, b * rho  # outliers take no part in the normalisation either
        if norm == "position":
            a = a / (a.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
            b = b / (b.pow(2).sum(1, keepdim=True) + 1e-10).sqrt()
        else:  # the prediction's mean and std over each channel's kept positions
            mean, std = torch.zeros(a.shape[:2] + (1, 1)), torch.zeros(a.shape[:2] + (1, 1))
            for n, c in torch.cartesian_prod(torch.arange(a.shape[0]), torch.arange(a.shape[1])).tolist():
                kept = a[n, c][rho[n, c]]
                mean[n, c], std[n, c] = kept.mean(), kept.std() + 1e-6
            a, b = (a - mean) / std, (b - mean) / std
        per_channel = ((a - b) ** 2 * rho).sum((2, 3)) / rho.sum((2, 3)).clamp_min(1)
        omega = 1.0 if weighting == "uniform" else 2.0 ** -min(layer, 3)
        total = total + omega * per_channel.mean(1)
    return total / len(hat), removed


# ---------------------------------------------------------------------------------------------------------------
# The maths.


@pytest.mark.parametrize(("norm", "weighting"), [("position", "uniform"), ("channel", "power-law")])
def test_objective_matches_the_papers_equations(vae: torch.nn.Module, norm: str, weighting: str) -> None:
    schedule = build_schedule(ScheduleConfig())
    x0 = spiky_latents(5, 32, seed=1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 60, 150, 400, 999])  # SNR >= 3 for t <= 192 on the zero-SNR SD schedule
    bias = 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    online = lambda x_t, t_, cond: 0.5 * x_t + bias  # noqa: E731 - a fixed, input-dependent "prediction"
    w, tau = 3.0, 3.0

    kw = {"up_blocks": None, "outlier_quantile": 0.02, "norm": norm, "weighting": weighting}
    out = lp.latent_perceptual_loss(online, schedule, vae, x0, None, t, eps, lpl_weight=w, snr_min=tau, **kw)

    alpha_bar = schedule.alphas_cumprod[t].float()[:, None, None, None]
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = alpha * x0 + sigma * eps
    v_hat = online(x_t, t, None)
    mse = ((v_hat - (alpha * eps - sigma * x0)) ** 2).mean((1, 2, 3))  # v-prediction (Salimans & Ho 2022)
    x0_hat = alpha * x_t - sigma * v_hat
    lpl, removed = reference_lpl(vae, x0_hat, x0, 0.02, norm, weighting)
    active = alpha_bar.flatten() / (1 - alpha_bar.flatten()) >= tau
    lpl = torch.where(active, lpl, torch.zeros(()))

    assert removed > 0, "the spikes should give the masks outliers to remove"
    assert active.tolist() == [True, True, True, False, False]
    torch.testing.assert_close(out["mse"], mse, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["lpl"], lpl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], mse + w * lpl, rtol=1e-4, atol=1e-6)
    assert (out["lpl"][:3] > 0).all() and (out["lpl"][3:] == 0).all()


def test_masking_changes_the_loss_and_identical_latents_cost_nothing(vae: torch.nn.Module) -> None:
    x0 = spiky_latents(2, 32, seed=4)
    x0_hat = x0 + 0.3 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    kw = {"up_blocks": None, "norm": "position", "weighting": "uniform"}
    masked = lp.lpl_distance(vae, x0_hat, x0, outlier_quantile=0.02, **kw)
    unmasked = lp.lpl_distance(vae, x0_hat, x0, outlier_quantile=0.0, **kw)
    assert not torch.allclose(masked, unmasked)
    torch.testing.assert_close(unmasked, reference_lpl_unmasked(vae, x0_hat, x0), rtol=1e-4, atol=1e-7)
    assert (lp.lpl_distance(vae, x0, x0, outlier_quantile=0.02, **kw) == 0).all()


def reference_lpl_unmasked(vae, x0_hat, x0) -> torch.Tensor:
    """Without masking, LPL is the mean over layers of the channel-normalised features' mean squared difference."""
    hat, real = reference_features(vae, x0_hat), reference_features(vae, x0)
    unit = lambda f: f / f.norm(dim=1, keepdim=True)  # noqa: E731
    return torch.stack([((unit(a) - unit(b)) ** 2).mean((1, 2, 3)) for a, b in zip(hat, real)]).mean(0)


def test_outlier_mask_drops_isolated_detections_and_widens_regions() -> None:
    f = 0.1 * torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    f[0, 0, 10:13, 10:13] = 100.0  # a 3x3 artefact
    f[0, 0, 24, 24] = 100.0  # one isolated extreme value
    full = ~lp.outlier_mask(f, 0.02, factor=1)[0, 0]
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[9:14, 9:14] = True  # survives the 3x3 erosion at its centre, widened to 5x5; the lone one is dropped
    assert torch.equal(full, expected)

    half = ~lp.outlier_mask(f, 0.02, factor=2)[0, 0]  # windows 1 and 3 at half resolution
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[9:14, 9:14] = True
    expected[23:26, 23:26] = True
    assert torch.equal(half, expected)
    torch.testing.assert_close(lp.last_dim_quantile(f.flatten(2), 0.02), torch.quantile(f.flatten(2), 0.02, dim=-1))


def test_layer_weights_are_uniform_or_the_released_power_law() -> None:
    assert lp.layer_weights(5, "uniform") == [1.0] * 5
    assert lp.layer_weights(5, "power-law") == [1.0, 0.5, 0.25, 0.125, 0.125]  # mid, up0 .. up3 of SD's VAE
    with pytest.raises(ValueError, match="layer weighting"):
        lp.layer_weights(3, "depth")


def test_snr_gate_is_exact_at_the_threshold(vae: torch.nn.Module) -> None:
    schedule = build_schedule(ScheduleConfig())
    snr = lp.snr(schedule, torch.arange(schedule.num_train_timesteps))
    edge = int((snr >= 3.0).nonzero().max())
    tau = float(snr[edge])  # exactly SNR(edge): the gate is SNR >= tau, so t = edge is in and edge + 1 is out
    t = torch.tensor([edge, edge + 1])
    x0 = spiky_latents(2, 8, seed=6)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    online = lambda x_t, t_, cond: torch.zeros_like(x_t)  # noqa: E731
    kw = {"up_blocks": None, "outlier_quantile": 0.02, "norm": "position", "weighting": "uniform"}
    out = lp.latent_perceptual_loss(online, schedule, vae, x0, None, t, eps, lpl_weight=3.0, snr_min=tau, **kw)
    assert out["lpl"][0] > 0 and out["lpl"][1] == 0
    assert out["loss"][1] == out["mse"][1]
    everywhere = lp.latent_perceptual_loss(online, schedule, vae, x0, None, t, eps, lpl_weight=3.0, snr_min=0, **kw)
    assert (everywhere["lpl"] > 0).all()


# ---------------------------------------------------------------------------------------------------------------
# The decoder: the right maps, and nothing deeper than the deepest tap.


def test_decoder_stops_at_the_deepest_tap(vae: torch.nn.Module) -> None:
    z = spiky_latents(2, 8, seed=8)
    decoder = vae.decoder
    ran: list[str] = []
    watched = {"up0": decoder.up_blocks[0], "up1": decoder.up_blocks[1], "norm_out": decoder.conv_norm_out}
    watched["conv_out"] = decoder.conv_out
    handles = [m.register_forward_hook(lambda *_a, n=name: ran.append(n)) for name, m in watched.items()]
    try:
        shallow = lp.decoder_features(vae, z, up_blocks=1)
        assert ran == ["up0"]
        ran.clear()
        every = lp.decoder_features(vae, z)
        assert ran == ["up0", "up1"]
    finally:
        for h in handles:
            h.remove()
    assert lp.decoder_taps(vae) == ("mid", "up0", "up1") and lp.decoder_taps(vae, 1) == ("mid", "up0")
    reference = reference_features(vae, z)
    assert len(shallow) == 2 and len(every) == 3
    for mine, theirs in zip(every, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shallow[1], reference[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The loss object: gradients, randomness, and what it refuses.


def test_gradients_reach_the_unet_and_never_the_vae(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    vae = parts.vae
    x0 = spiky_latents(3, 8, seed=9)
    cond = parts.encode_text(["a red disc", "a blue cross", ""])
    noise = {
        "t": torch.tensor([10, 100, 150]),
        "eps": torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)),
    }
    grad_mode: list[bool] = []
    hook = vae.decoder.mid_block.register_forward_hook(lambda *_a: grad_mode.append(torch.is_grad_enabled()))

    def grads(weight: float, checkpoint: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        model = unet(tiny_sd, parts)
        loss = lp.LatentPerceptualLoss(LPLFields(lpl_weight=weight), model.schedule, vae, checkpoint=checkpoint)
        out = loss(model, x0, cond, torch.Generator(), noise)
        out["loss"].mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}, out

    try:
        with_lpl, out = grads(3.0, checkpoint=False)
        assert grad_mode == [False, True], "the real branch runs without a graph, the x0_hat branch with one"
        checkpointed, out_ckpt = grads(3.0, checkpoint=True)
        without, _ = grads(0.0, checkpoint=False)
    finally:
        hook.remove()
    assert all(p.grad is None for p in vae.parameters())
    assert all(g.abs().sum() > 0 for n, g in with_lpl.items() if "conv_out" in n or "conv_in" in n)
    difference = sum(float((with_lpl[n] - without[n]).abs().sum()) for n in with_lpl)
    assert difference > 0, "the LPL term must send a gradient into the U-Net"
    torch.testing.assert_close(out_ckpt["loss"], out["loss"])
    for n in with_lpl:
        torch.testing.assert_close(checkpointed[n], with_lpl[n], rtol=1e-4, atol=1e-7)


def test_draws_like_mse_and_its_mse_term_is_mse(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    model = unet(tiny_sd, parts).eval()
    x0 = spiky_latents(4, 8, seed=10)
    lpl = lp.LatentPerceptualLoss(LPLFields(), model.schedule, parts.vae)
    mse = MSELoss(LossConfig(), model.schedule)
    drawn = lpl.draw(x0.shape, torch.Generator().manual_seed(3))
    reference = mse.draw(x0.shape, torch.Generator().manual_seed(3))
    assert drawn.keys() == reference.keys() and all(torch.equal(drawn[k], reference[k]) for k in drawn)
    with torch.no_grad():
        implicit = lpl(model, x0, None, torch.Generator().manual_seed(3))
        explicit = lpl(model, x0, None, torch.Generator(), drawn)
        plain = mse(model, x0, None, torch.Generator(), drawn)
    assert list(implicit) == ["loss", "mse", "lpl"]
    for k in implicit:
        torch.testing.assert_close(implicit[k], explicit[k])
    torch.testing.assert_close(explicit["mse"], plain["mse"])


def test_refuses_an_unfrozen_vae_and_taps_it_does_not_have(parts: latent.FrozenParts) -> None:
    schedule = build_schedule(ScheduleConfig())
    trainable = copy.deepcopy(parts.vae).requires_grad_(True)
    with pytest.raises(ValueError, match="frozen"):
        lp.LatentPerceptualLoss(LPLFields(), schedule, trainable)
    with pytest.raises(UserError, match="2 up blocks"):
        lp.LatentPerceptualLoss(replace(LPLFields(), lpl_up_blocks=3), schedule, parts.vae)
    with pytest.raises(ValueError, match="normalisation"):
        lp.LatentPerceptualLoss(replace(LPLFields(), lpl_norm="lpips"), schedule, parts.vae)
