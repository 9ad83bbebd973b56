"""Beyond the paper: variants of the self-perceptual objective that the perceptual-loss literature motivates.

Each is a :class:`LossConfig`; ``compare`` trains them as extra stage-2 arms under the same protocol as the paper's
objective (same teacher, schedule, warm-up, EMA, steps and learning rate as the self-perceptual branch) and pairs
them against MSE continued training.
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
}
