"""Beyond the paper: variants of the self-perceptual objective that the perceptual-loss literature motivates, and its
control.

Each is a :class:`LossConfig`; ``compare`` trains the ones a budget names (``Budget.variants``) as extra stage-2 arms
under the same protocol as the paper's objective (same teacher, schedule, warm-up, EMA, steps and learning rate as the
self-perceptual branch) and pairs them against MSE continued training.
"""

from __future__ import annotations

from dataclasses import replace

from perceptual_diffusion.config import LossConfig

PAPER = LossConfig(kind="self-perceptual", teacher="<stage1>")

VARIANTS: dict[str, LossConfig] = {
    # LPIPS (Zhang et al. 2018) unit-normalises each position's channel vector before the distance, so that a few
    # high-magnitude channels do not dominate the loss.
    "sp-channel-norm": replace(PAPER, feature_norm="channel"),
    # At high noise levels t' the re-noised images are mostly noise and their features carry little detail: draw
    # t' from the lower half of the noise levels only.
    "sp-low-noise": replace(PAPER, t_prime_max=0.5),
    # The control for the paper's premise that the diffusion model is itself a good perceptual network (arXiv
    # 2401.00110, Sec. 3): the same fine-tuning from the teacher's weights, but x0_hat is judged by the block2
    # features of a separately trained classifier (the asset shipped for the data, e.g. fashion-mnist-perceptual;
    # never the classifier that computes the domain FID). Self-perceptual beating it supports the premise; losing
    # to it says any good perceptual network would do. It runs at self-perceptual's chosen learning rate (Adam
    # normalises the gradient's scale, so the losses' different magnitudes matter little).
    "external-perceptual": LossConfig(kind="external-perceptual"),
}
