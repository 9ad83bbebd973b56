"""The latent perceptual loss (LPL) of Berrada et al., "Boosting Latent Diffusion with Perceptual Objectives"
(arXiv 2411.04873, ICLR 2025, Sec. 3), with the losses' one signature (``core/losses.py``):

    x_t = alpha_t x0 + sigma_t eps;  pred = f(x_t, t, c);  x0_hat from pred (the schedule's conversion);
    loss = || pred - target ||^2 / D  +  w_LPL * 1[SNR(t) >= tau] * LPL(x0_hat, x0)          (L_tot = L_Diff + w L_LPL)
    LPL(x0_hat, x0) = 1/L sum_l omega_l * 1/C_l sum_c  mean_{h,w in rho_l,c} (phi~_l,c(x0_hat) - phi~_l,c(x0))^2

phi_l are feature maps of the frozen VAE's *decoder* (not an image network): both latents are unscaled
(z / scaling_factor + shift_factor), go through ``post_quant_conv`` and ``conv_in``, and phi_l is the output of the
``mid_block`` (l = 0) and of ``up_blocks[0..K-1]`` (l = 1..K; all up blocks by default). The decoder runs only as deep
as the deepest tap: the remaining up blocks, ``conv_norm_out`` and ``conv_out`` never run. phi~ are the features
normalised per position over channels (``norm="position"``) or per channel over positions with the prediction's
statistics (``norm="channel"``); rho_l masks the real latent's outlier activations (:func:`outlier_mask`). The
loss is applied only at high SNR (the paper applies it where SNR(t) is above a threshold, in post-training after an
MSE stage, i.e. this project's stage 2); a sample below the threshold gets LPL 0 and its MSE term alone.

What follows the paper and what follows the authors' released code (diffusers ``examples/research_projects/lpl``,
"based on the reference implementation provided by Tariq Berrada") is said at each place.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as checkpoint_block

from perceptual_diffusion.core.losses import DrawsTimestepNoise, mse_from_prediction, normalise_channels
from perceptual_diffusion.core.networks import DiffusionModel
from perceptual_diffusion.core.schedule import NoiseSchedule
from perceptual_diffusion.errors import UserError

NORMS = ("position", "channel")
LAYER_WEIGHTS = ("uniform", "power-law")

# Outlier masking (the released code's constants): a channel's values beyond its 2% / 98% quantiles by more than
# two of its standard deviations are outliers; morphology windows are 3 (drop small detections) and 5 (widen kept
# regions) at the decoder's output resolution, scaled down with the map's resolution.
OUTLIER_MARGIN_STDS = 2.0
DROP_WINDOW = 3
WIDEN_WINDOW = 5
MASK_MAX_FACTOR = 2  # mask only up-block maps within 2x of the output resolution (SD's up_blocks 1-3)


class LatentPerceptualConfig(Protocol):
    """The LPL fields this loss reads: ``config.LossConfig`` has them once the loss is wired (any object will do)."""

    lpl_weight: float
    lpl_snr_min: float
    lpl_up_blocks: int | None
    lpl_outlier_quantile: float
    lpl_norm: str
    lpl_layer_weights: str


def decoder_taps(vae: Any, up_blocks: int | None = None) -> tuple[str, ...]:
    """The tap names, shallowest first: "mid", then "up0" .. "up{K-1}" (K = all the decoder's up blocks if None)."""
    depth = len(vae.decoder.up_blocks) if up_blocks is None else up_blocks
    return ("mid", *(f"up{i}" for i in range(depth)))


def unscale_latents(vae: Any, latents: Tensor) -> Tensor:
    """Diffusion-space latents -> the VAE's own: z / scaling_factor + shift_factor (diffusers' convention)."""
    shift = vae.config.get("shift_factor") or 0.0
    return latents / vae.config.scaling_factor + shift


def decoder_features(vae: Any, latents: Tensor, up_blocks: int | None = None, checkpoint: bool = False) -> list[Tensor]:
    """The decoder's hidden states at :func:`decoder_taps` for diffusion-space latents, running nothing deeper.

    Mirrors ``AutoencoderKL._decode`` and ``Decoder.forward`` (diffusers 0.3x-0.4x; a test checks the maps against
    hooks on a full ``vae.decode``). ``checkpoint`` recomputes each block in backward instead of storing its
    activations (the released code's default): the same numbers, less memory for the graph of the x0_hat branch.
    """
    decoder = vae.decoder
    depth = len(decoder.up_blocks) if up_blocks is None else up_blocks
    if not 0 <= depth <= len(decoder.up_blocks):
        raise ValueError(f"the decoder has {len(decoder.up_blocks)} up blocks; cannot tap {depth}")
    z = unscale_latents(vae, latents).to(vae.dtype)
    if getattr(vae, "post_quant_conv", None) is not None:
        z = vae.post_quant_conv(z)
    h = decoder.conv_in(z)
    features = []
    for block in (decoder.mid_block, *decoder.up_blocks[:depth]):
        # Why checkpoint only under grad: the real branch runs under no_grad, where there is no graph to save.
        use_checkpoint = checkpoint and torch.is_grad_enabled()
        h = checkpoint_block(block, h, None, use_reentrant=False) if use_checkpoint else block(h, None)
        features.append(h)
    return features


def last_dim_quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile(x, q, dim=-1) (linear interpolation) by two kthvalue selections instead of a sort: an SD
    decoder map at 512 px has 262,144 positions per channel, and older torch releases refuse quantile inputs of more
    than 2^24 elements."""
    n = x.shape[-1]
    pos = q * (n - 1)
    below = math.floor(pos)
    lo = x.kthvalue(below + 1, dim=-1).values
    hi = x.kthvalue(min(below + 2, n), dim=-1).values
    return lo + (pos - below) * (hi - lo)


def _odd_window(size: float, round_up: bool) -> int:
    """A window of ``ceil(size)`` pixels, made odd (a centred window needs one): even sizes go up or down by one."""
    k = math.ceil(size)
    return k if k % 2 else (k + 1 if round_up else k - 1)


@torch.no_grad()
def outlier_mask(features: Tensor, quantile: float, factor: int = 1) -> Tensor:
    """Inlier mask rho (True: kept) of a real latent's decoder map (N, C, H, W); ``factor``: output side / H.

    The paper masks the decoder features' outliers (high-magnitude activations in a few places) out of the
    distance. Its thresholds and morphology here are the released code's: per sample and channel, a value is an
    outlier below q_quantile - 2 std or above q_(1-quantile) + 2 std (over the H x W positions); then the outlier
    map loses detections smaller than a 3-pixel window (max-pooling the inlier map: an isolated extreme value is
    the distribution's tail, not an artefact) and what remains is widened by a 5-pixel window (min-pooling the
    inlier map: the artefact's surroundings go too). The released code names these two steps "closing" and
    "opening"; on the outlier map they are an erosion then a larger dilation. Windows shrink with the map's
    resolution (ceil(3 / factor) rounded down to odd, ceil(5 / factor) rounded up to odd: 1 and 3 at half size).
    """
    flat = features.flatten(2).float()
    margin = OUTLIER_MARGIN_STDS * flat.std(dim=-1)
    low = (last_dim_quantile(flat, quantile) - margin)[..., None, None]
    high = (last_dim_quantile(flat, 1.0 - quantile) + margin)[..., None, None]
    f = features.float()
    inlier = ((f > low) & (f < high)).float()
    drop = _odd_window(DROP_WINDOW / factor, round_up=False)
    widen = _odd_window(WIDEN_WINDOW / factor, round_up=True)
    inlier = F.max_pool2d(inlier, drop, stride=1, padding=drop // 2)
    inlier = -F.max_pool2d(-inlier, widen, stride=1, padding=widen // 2)
    return inlier > 0.5


def _normalise(f_hat: Tensor, f_real: Tensor, rho: Tensor, norm: str) -> tuple[Tensor, Tensor]:
    """phi~ of both branches (float32), from their kept entries only (``rho``). "position": each map unit length
    over channels at every position (LPIPS, Zhang et al. 2018, arXiv 1801.03924, Eq. 1; the released code's
    default). "channel": every channel standardised over its kept positions with the *prediction's* mean and std,
    both branches alike (the paper's cross-normalisation as secondary accounts describe it; gradients flow through
    those statistics too)."""
    keep = rho.float()
    # Why both branches are masked before normalising: an outlier entry left in one map would set that map's scale
    # at its position, and then even x0_hat = x0 would cost something. (The released code zeroes the target's only.)
    f_hat, f_real = f_hat.float() * keep, f_real.float() * keep
    if norm == "position":
        return normalise_channels(f_hat), normalise_channels(f_real)
    count = keep.sum(dim=(2, 3), keepdim=True).clamp_min(2)
    mean = f_hat.sum(dim=(2, 3), keepdim=True) / count
    std = (((f_hat - mean) * keep) ** 2).sum(dim=(2, 3), keepdim=True).div(count - 1).sqrt() + 1e-6
    return (f_hat - mean) / std, (f_real - mean) / std


def layer_weights(num_layers: int, weighting: str) -> list[float]:
    """omega_l for l = 0 (mid) .. L-1: all 1, or the released code's power law 2^-min(l, 3)."""
    if weighting not in LAYER_WEIGHTS:
        raise ValueError(f"layer weighting must be one of {LAYER_WEIGHTS}, got {weighting!r}")
    return [1.0 if weighting == "uniform" else 2.0 ** -min(layer, 3) for layer in range(num_layers)]


def lpl_distance(
    vae: Any,
    x0_hat: Tensor,
    x0: Tensor,
    *,
    up_blocks: int | None,
    outlier_quantile: float,
    norm: str,
    weighting: str,
    checkpoint: bool = False,
) -> Tensor:
    """Per-sample LPL(x0_hat, x0) between diffusion-space latents (the module docstring's equation; no SNR gate).

    Gradients flow through the frozen decoder into ``x0_hat`` only: the real branch runs under no_grad.
    """
    if norm not in NORMS:
        raise ValueError(f"LPL normalisation must be one of {NORMS}, got {norm!r}")
    if not 0.0 <= outlier_quantile < 0.5:
        raise ValueError(f"the outlier quantile must be in [0, 0.5), got {outlier_quantile}")
    # Why two calls and not one batched call: the real branch needs no graph, and under no_grad stores nothing.
    with torch.no_grad():
        f_real = decoder_features(vae, x0, up_blocks)
    f_hat = decoder_features(vae, x0_hat, up_blocks, checkpoint)
    out_side = x0.shape[-1] * 2 ** (len(vae.config.block_out_channels) - 1)
    weights = layer_weights(len(f_hat), weighting)
    total = x0_hat.new_zeros(x0_hat.shape[0], dtype=torch.float32)
    for layer, (a, b, omega) in enumerate(zip(f_hat, f_real, weights)):
        factor = out_side // b.shape[-1]
        if outlier_quantile > 0 and layer > 0 and factor <= MASK_MAX_FACTOR:
            rho = outlier_mask(b, outlier_quantile, factor)
        else:
            rho = torch.ones_like(b, dtype=torch.bool)
        a, b = _normalise(a, b, rho, norm)
        # mean over each channel's kept positions, then over channels (1/C_l sum_c ||rho (.)||^2 / |rho_c|)
        kept = rho.sum(dim=(2, 3)).clamp_min(1)
        per_channel = ((a - b) ** 2 * rho).sum(dim=(2, 3)) / kept
        total = total + omega * per_channel.mean(dim=1)
    return total / len(f_hat)


def snr(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """SNR(t) = alpha_t^2 / sigma_t^2 (0 at zero terminal SNR), float64, in any schedule family."""
    return schedule.snr(t.to("cpu")).to(t.device)


def latent_perceptual_loss(
    online: DiffusionModel,
    schedule: NoiseSchedule,
    vae: Any,
    x0: Tensor,
    cond: Tensor | None,
    t: Tensor,
    eps: Tensor,
    *,
    lpl_weight: float,
    snr_min: float,
    up_blocks: int | None,
    outlier_quantile: float,
    norm: str,
    weighting: str,
    checkpoint: bool = False,
) -> dict[str, Tensor]:
    """Per-sample L_Diff + w_LPL * 1[SNR(t) >= snr_min] * LPL(x0_hat, x0) (arXiv 2411.04873, Sec. 3), on fixed t, eps.

    Returns {"loss", "mse", "lpl"} (N,); the decoder runs only on the samples at or above the SNR threshold.
    """
    x_t = schedule.add_noise(x0, eps, t)
    pred = online(x_t, t, cond)
    mse = mse_from_prediction(schedule, pred, x0, t, eps)
    lpl = torch.zeros_like(mse)
    active = (snr(schedule, t) >= snr_min).nonzero().flatten().to(x0.device)
    if active.numel():
        x0_hat, _ = schedule.to_x0_eps(pred[active], x_t[active], t[active])
        per_sample = lpl_distance(
            vae,
            x0_hat,
            x0[active],
            up_blocks=up_blocks,
            outlier_quantile=outlier_quantile,
            norm=norm,
            weighting=weighting,
            checkpoint=checkpoint,
        )
        lpl = lpl.index_put((active,), per_sample)  # out of place: the graph reaches x0_hat through it
    return {"loss": mse + lpl_weight * lpl, "mse": mse.detach(), "lpl": lpl.detach()}


class LatentPerceptualLoss(DrawsTimestepNoise):
    """Draws t and eps as ``MSELoss`` does and applies :func:`latent_perceptual_loss` with the frozen VAE.

    The VAE is held here, as the teacher is by ``SelfPerceptualLoss``: never given to the optimiser, never wrapped
    in DDP, never part of the online model's state dict or checkpoints.
    """

    def __init__(
        self, config: LatentPerceptualConfig, schedule: NoiseSchedule, vae: nn.Module, checkpoint: bool = True
    ) -> None:
        if any(p.requires_grad for p in vae.parameters()) or vae.training:
            raise ValueError("the VAE must be frozen: call .eval().requires_grad_(False) (models.latent.FrozenParts)")
        depth, available = config.lpl_up_blocks, len(vae.decoder.up_blocks)
        if depth is not None and not 0 <= depth <= available:
            raise UserError(f"--lpl-up-blocks {depth}: this VAE's decoder has {available} up blocks (0 to {available})")
        if config.lpl_norm not in NORMS or config.lpl_layer_weights not in LAYER_WEIGHTS:
            raise ValueError(
                f"unknown LPL normalisation or layer weights: {config.lpl_norm}, {config.lpl_layer_weights}"
            )
        self.config = config
        self.schedule = schedule
        self.vae = vae
        self.checkpoint = checkpoint

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
        cfg = self.config
        return latent_perceptual_loss(
            model,
            self.schedule,
            self.vae,
            x0,
            cond,
            noise["t"],
            noise["eps"].to(x0.dtype),
            lpl_weight=cfg.lpl_weight,
            snr_min=cfg.lpl_snr_min,
            up_blocks=cfg.lpl_up_blocks,
            outlier_quantile=cfg.lpl_outlier_quantile,
            norm=cfg.lpl_norm,
            weighting=cfg.lpl_layer_weights,
            checkpoint=self.checkpoint,
        )
