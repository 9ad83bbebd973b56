"""Typed, frozen configuration: validated on construction, saved into every run directory and checkpoint.

Every option a user can set lives in one of these dataclasses. ``__post_init__`` rejects impossible values with a
:class:`UserError` naming the field, so a bad option fails before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from perceptual_diffusion.errors import UserError

BetaSchedule = Literal["scaled_linear", "linear", "cosine"]
PredictionType = Literal["v", "eps", "x0"]
Spacing = Literal["trailing", "leading", "linspace"]
DataSource = Literal["shapes", "fashion-mnist", "folder"]
LossKind = Literal["mse", "self-perceptual", "external-perceptual", "latent-perceptual"]
LPLNorm = Literal["position", "channel"]
LPLLayerWeights = Literal["uniform", "power-law"]
# The external-perceptual network's layers (models.classifier_net.TAPS): blockK, its K-th convolution level (at 28 px
# block1 28x28 x w, block2 14x14 x 2w, block3 7x7 x 4w); features, the 128-d penultimate layer.
PerceptualLayer = Literal["block1", "block2", "block3", "features"]
# The self-perceptual tap by name: "mid" is the paper's mid-block (arXiv 2401.00110, Sec. 3), on a transformer its
# analogue, the output of the middle block (n // 2 of n); "downK" a U-Net's K-th down block; "all" the sum over every
# tap. A DiT's taps by depth are LossConfig.feature_blocks.
FeatureLayer = Literal["mid", "down0", "down1", "down2", "down3", "all"]
# The denoiser's architecture (models/architectures.py ARCHITECTURES: one builder each; presets per architecture in
# PRESETS_OF): "unet" the paper's kind of network (diffusers UNet2DModel), "dit" a class-conditional pixel DiT
# (diffusers DiTTransformer2DModel, Peebles & Xie 2023, arXiv 2212.09748).
Architecture = Literal["unet", "dit"]
# t' of the self-perceptual loss: "uniform" is the paper's (Algorithm 1, line 6); "logit-normal" draws it as the
# family's training-time logit-normal (ScheduleConfig.logit_mean / logit_std) does.
TPrime = Literal["uniform", "same-as-t", "logit-normal"]
Distance = Literal["mse", "l1"]
PredictedNoise = Literal["predicted", "true"]
GuidanceMethod = Literal["cfg", "apg", "cfg-zero-star"]  # core/guidance.py GUIDANCE: one class each
FLOW_ONLY_GUIDANCE = ("cfg-zero-star",)  # methods defined on the flow path only (check_sampler)
# The forward process (core/schedule.py FAMILIES: one class each): "ddpm" is the paper's discrete zero-terminal-SNR
# DDPM (arXiv 2401.00110, Sec. 4); "flow" rectified flow as SD3 and diffusers define it (arXiv 2403.03206, Sec. 2).
ScheduleFamily = Literal["ddpm", "flow"]
# The training-time distribution of t (for flow, of s = t / T before the shift; arXiv 2403.03206, Sec. 3.1).
TimeDistribution = Literal["uniform", "logit-normal"]


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise UserError(message)


MAX_IMAGE_SIZE = 4096  # a pixel-space U-Net beyond this would not fit any GPU; larger values are typos
# The shapes data is its whole valid set, 16 x (size - 6)^2 images of size^2 pixels: 53,824 images (3 GB as floats)
# at 64 px, and it grows as size^4.
MAX_SHAPES_SIZE = 64
MAX_BATCH = 1 << 20  # a global batch beyond a million images is a typo (large GPU runs use a few thousand)
MAX_LR = 1.0  # AdamW moves every weight by about lr per step: above 1 a step outweighs the weights themselves
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds; a seed is never negative here


# Fields whose command-line option is not named like them (the others are ``--field-name``).
_OPTION_OF = {
    "apg_norm_threshold": "--apg-threshold",
    "guidance_sigma_min": "--guidance-interval SIGMA_LO",
    "guidance_sigma_max": "--guidance-interval SIGMA_HI",
    "rank": "--lora-rank",
    "alpha": "--lora-alpha",
    "dropout": "--lora-dropout",
    "targets": "--lora-targets",
    "t5": "--no-t5 (model.t5)",
}


def _flag(name: str) -> str:
    return _OPTION_OF.get(name, f"--{name.replace('_', '-')}")


def _check_types(obj: Any) -> None:
    """Reject a field of the wrong type (a config read back from JSON can hold anything) or a non-finite float."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint, value = hints[f.name], getattr(obj, f.name)
        if typing.get_origin(hint) is Literal:
            continue  # checked against its choices by _check_choice
        optional = type(None) in typing.get_args(hint)
        if optional and value is None:
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
        if typing.get_origin(base) is tuple:  # tuple[int, ...] or tuple[str, ...] (a list once read from JSON)
            item = typing.get_args(base)[0]
            ok = isinstance(value, tuple) and all(isinstance(v, item) and not isinstance(v, bool) for v in value)
            kind = "a list of integers" if item is int else "a list of names"
            _check(ok, f"{_flag(f.name)} must be {kind}, got {value!r}")
            continue
        if base is bool:
            ok = isinstance(value, bool)
        elif base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, base)
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(base, base)
        _check(ok, f"{_flag(f.name)} must be {kind}, got {value!r}")


def _check_choice(obj: Any) -> None:
    """Reject a string field whose value is not one of its ``Literal`` choices (and any field of the wrong type)."""
    _check_types(obj)
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if typing.get_origin(hint) is Literal:
            value = getattr(obj, f.name)
            choices = typing.get_args(hint)
            _check(
                isinstance(value, str) and value in choices,
                f"{_flag(f.name)} must be one of {', '.join(map(str, choices))}, got {value!r}",
            )


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward process and what the network predicts.

    ``family`` "ddpm" (default): the paper's discrete-time DDPM with zero terminal SNR and v-prediction (arXiv
    2401.00110, Sec. 4, after Lin et al. 2023); ``beta_*`` and ``zero_terminal_snr`` are its parameters.
    ``family`` "flow": rectified flow, x_s = (1 - s) x0 + s eps with the network predicting v = eps - x0 (arXiv
    2403.03206, Sec. 2; diffusers' FlowMatchEulerDiscreteScheduler); the network sees t = s * num_train_timesteps, and
    ``shift`` maps u to s = shift u / (1 + (shift - 1) u) in training and sampling alike. ``time_distribution`` (with
    ``logit_mean`` / ``logit_std``) is the training-time distribution of u in both families (DDPM: t = floor(u T)).
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    zero_terminal_snr: bool = True
    prediction_type: PredictionType = "v"
    family: ScheduleFamily = "ddpm"
    shift: float = 1.0
    time_distribution: TimeDistribution = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        _check_choice(self)
        _check(self.num_train_timesteps >= 2, "num_train_timesteps must be at least 2")
        _check(0 < self.beta_start < self.beta_end < 1, "need 0 < beta_start < beta_end < 1")
        _check(
            not (self.zero_terminal_snr and self.prediction_type == "eps"),
            "eps-prediction cannot reach zero terminal SNR (x0 is undefined at alpha=0): use --prediction-type v",
        )
        _check(self.shift > 0, f"--shift must be > 0 (1: no shift), got {self.shift}")
        _check(self.logit_std > 0, f"--logit-std must be > 0, got {self.logit_std}")
        if self.family == "flow":
            ddpm_only = {
                "--beta-schedule": self.beta_schedule != "scaled_linear",
                "--beta-start": self.beta_start != 0.00085,
                "--beta-end": self.beta_end != 0.012,
                "--no-zero-snr": not self.zero_terminal_snr,
            }
            given = [flag for flag, differs in ddpm_only.items() if differs]
            _check(not given, f"{', '.join(given)} are options of --schedule ddpm, not of --schedule flow")
            _check(
                self.prediction_type == "v",
                f"--schedule flow predicts the velocity eps - x0 (--prediction-type v), not {self.prediction_type}",
            )
        else:
            _check(self.shift == 1.0, f"--shift is an option of --schedule flow, not of --schedule {self.family}")

    # How t is drawn in training and spaced in sampling: choices of a run, not of what the network's output means.
    TRAINING_CHOICES: typing.ClassVar[tuple[str, ...]] = ("shift", "time_distribution", "logit_mean", "logit_std")

    def process(self) -> dict[str, Any]:
        """The fields that fix what (x_t, t) and the network's output mean: two models whose ``process`` agree can
        be teacher, guide or starting point of each other (the training-time draw of t may differ)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.TRAINING_CHOICES}


@dataclass(frozen=True)
class Preset:
    """U-Net widths per resolution level; attention only where the level's flag is set."""

    block_out_channels: tuple[int, ...]
    attention: tuple[bool, ...]
    layers_per_block: int
    norm_num_groups: int
    note: str


# U-Net sizes as plain data (networks.build_unet builds one), measured on 2 CPU cores (benchmarks/throughput.py,
# README): "small" is the CPU demo's model.
PRESETS: dict[str, Preset] = {
    "tiny": Preset((16, 32), (False, False), 1, 8, "tests only: 0.17 M parameters"),
    "small": Preset((32, 64, 64), (False, False, False), 1, 8, "CPU demo: 1.07 M parameters"),
    "medium": Preset((64, 128, 128), (False, False, True), 2, 16, "CPU full runs / small GPUs: 6.5 M parameters"),
    "base": Preset((128, 256, 256), (False, True, True), 2, 32, "one GPU: 27 M parameters"),
    "large": Preset((128, 256, 384, 512), (False, True, True, True), 2, 32, "GPUs, 32 px and up: 90 M parameters"),
}


def min_image_multiple(preset: str) -> int:
    """Image sides must be a multiple of this: each level but the last halves the resolution."""
    return 2 ** (len(PRESETS[preset].block_out_channels) - 1)


@dataclass(frozen=True)
class DiTPreset:
    """A pixel DiT's size (diffusers DiTTransformer2DModel): ``num_layers`` transformer blocks of ``width`` channels
    (``num_heads`` heads of width / num_heads), on patches of ``patch_size`` pixels (tokens: (size / patch)^2)."""

    num_layers: int
    width: int
    num_heads: int
    patch_size: int
    note: str


# DiT sizes as plain data (models/dit.py builds one). The CPU sizes follow issue 19, measured at 28 px, batch 64,
# one thread (benchmarks/RESULTS.md, 2026-12-04): "small" (6 blocks, width 64, patch 4) 185 ms per MSE step, 0.57x
# the tiny U-Net of the CPU budgets; "small-p2" (4x the tokens) 822 ms, 2.53x. "base" is DiT-S/2's size (arXiv
# 2212.09748, Table 1), sized by FLOPs for one GPU.
DIT_PRESETS: dict[str, DiTPreset] = {
    "tiny": DiTPreset(4, 32, 2, 2, "tests only: 4 blocks, width 32, patch 2, 0.12 M parameters"),
    "small": DiTPreset(6, 64, 4, 4, "CPU: 6 blocks, width 64, patch 4, 0.59 M parameters"),
    "small-p2": DiTPreset(6, 64, 4, 2, "CPU: small at patch 2 (4x the tokens), 0.59 M parameters"),
    # unmeasured: no GPU has run it yet
    "base": DiTPreset(12, 384, 6, 2, "one GPU (unmeasured): DiT-S/2, 12 blocks, width 384, patch 2, 35 M parameters"),
}
PRESETS_OF: dict[str, dict[str, Any]] = {"unet": PRESETS, "dit": DIT_PRESETS}
assert PRESETS_OF.keys() == set(typing.get_args(Architecture))


def default_feature_block(preset: str) -> int:
    """A DiT's default tap: the output of the first n // 2 of its n blocks, the analogue of the paper's mid-block
    (arXiv 2401.00110, Sec. 3): the teacher then runs half of the network, as a U-Net's encoder half."""
    return DIT_PRESETS[preset].num_layers // 2


@dataclass(frozen=True)
class ModelConfig:
    """Which denoiser to build: an architecture (``arch``, default the U-Net) and its named size preset, plus the
    data's shape and number of classes (0: unconditional). A config saved before ``arch`` existed reads as a U-Net."""

    preset: str = "small"
    image_size: int = 16
    channels: int = 3
    num_classes: int = 4
    arch: Architecture = "unet"

    def __post_init__(self) -> None:
        _check_choice(self)
        presets = PRESETS_OF[self.arch]
        _check(
            self.preset in presets,
            f"unknown {self.arch} preset {self.preset!r}; choose one of {', '.join(presets)} (--arch {self.arch})",
        )
        _check(self.channels in (1, 3), f"channels must be 1 or 3, got {self.channels}")
        _check(self.num_classes >= 0, "num_classes must be >= 0 (0 means unconditional)")
        _check(self.image_size <= MAX_IMAGE_SIZE, f"image size {self.image_size} is above {MAX_IMAGE_SIZE} pixels")
        if self.arch == "dit":
            patch = DIT_PRESETS[self.preset].patch_size
            _check(
                self.image_size >= patch and self.image_size % patch == 0,
                f"image size {self.image_size} does not fit DiT preset {self.preset!r}: its patch size {patch} must "
                f"divide it; choose e.g. --image-size {max(patch, round(self.image_size / patch) * patch)}, or "
                "another --preset",
            )
            return
        multiple = min_image_multiple(self.preset)
        _check(
            self.image_size >= multiple and self.image_size % multiple == 0,
            f"image size {self.image_size} does not fit preset {self.preset!r}: it must be a multiple of {multiple} "
            f"(the U-Net halves the resolution {multiple.bit_length() - 1} times); choose e.g. --image-size "
            f"{max(multiple, round(self.image_size / multiple) * multiple)}",
        )


@dataclass(frozen=True)
class SourceFacts:
    """What the rest of the code needs to know of a data source, as plain data: a new source adds its loader in
    ``data/datasets.py``, its name to ``DataSource`` and one entry to ``SOURCES``."""

    default_size: int  # image size when --image-size is not given
    no_test_split: str | None  # why the source has no held-out test split, or None when it has one


SOURCES: dict[str, SourceFacts] = {
    "shapes": SourceFacts(16, "the shapes data is its whole valid set, so no image is held out"),
    "fashion-mnist": SourceFacts(28, None),
    "folder": SourceFacts(32, "a folder of images has no held-out split"),
}
assert SOURCES.keys() == set(typing.get_args(DataSource))


@dataclass(frozen=True)
class DataConfig:
    """Where training images come from; all three sources need no download."""

    source: DataSource = "shapes"
    path: str | None = None
    image_size: int = 16
    grayscale: bool = False
    on_bad_image: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        _check_choice(self)
        _check(
            4 <= self.image_size <= MAX_IMAGE_SIZE,
            f"image size must be in [4, {MAX_IMAGE_SIZE}], got {self.image_size}",
        )
        _check(self.source != "folder" or self.path is not None, "--data folder needs --data-path DIR")
        _check(
            self.path is None or self.path.strip() != "",
            "--data-path '' names no folder; give the folder, or leave --data-path out",
        )
        _check(
            self.source != "shapes" or self.path is None,
            f"--data-path is for --data folder or fashion-mnist: the shapes data is built in, so {self.path!r} would "
            "be ignored; drop --data-path (or choose --data folder)",
        )
        _check(
            self.source != "shapes" or self.image_size <= MAX_SHAPES_SIZE,
            f"the shapes data needs --image-size <= {MAX_SHAPES_SIZE} (it holds 16 x (size - 6)^2 images, which grows "
            f"as size^4), got {self.image_size}",
        )


@dataclass(frozen=True)
class LossConfig:
    """The training objective; the self-perceptual fields follow the paper's ablations, defaults its choices."""

    kind: LossKind = "mse"
    cond_dropout: float = 0.1
    feature_layer: FeatureLayer = "mid"
    # A DiT's taps by depth: K is the output of its first K transformer blocks, 1 <= K <= n (several: their sum).
    # Empty: feature_layer's ("mid": block n // 2, the analogue of the paper's mid-block, arXiv 2401.00110, Sec. 3).
    feature_blocks: tuple[int, ...] = ()
    t_prime: TPrime = "uniform"
    distance: Distance = "mse"
    predicted_noise: PredictedNoise = "predicted"
    mse_weight: float = 0.0
    # Beyond the paper (issue #11): "channel" unit-normalises the teacher's features over channels at each position
    # before the distance, as LPIPS does (Zhang et al. 2018, Eq. 1); t_prime_max < 1 draws t' only from the lower
    # noise levels U{0 .. t_prime_max * T - 1}, where the features still see fine detail.
    feature_norm: Literal["none", "channel"] = "none"
    t_prime_max: float = 1.0
    teacher: str | None = None
    teacher_sha256: str | None = None
    # External-perceptual (the control for arXiv 2401.00110's premise, Sec. 3): a shipped classifier asset trained
    # apart from the metric's (e.g. "fashion-mnist-perceptual"; None: the one for the run's data) or a weights file.
    # block2, a middle layer, as feature losses use VGG's relu2_2 (Johnson et al. 2016, arXiv 1603.08155, Sec. 4):
    # block1 is nearly a pixel loss; block3 and features are pooled towards the class, which a blurry x0_hat meets.
    perceptual_net: str | None = None
    perceptual_layer: PerceptualLayer = "block2"
    perceptual_sha256: str | None = None
    # Latent Perceptual Loss (Berrada et al., arXiv 2411.04873; latent models only, models/latent_perceptual.py):
    # loss = mse + lpl_weight * [SNR(t) >= lpl_snr_min] * LPL over the frozen VAE decoder's features (the mid block
    # and the first lpl_up_blocks up blocks; None: all), with the paper's outlier masking at this quantile.
    lpl_weight: float = 3.0
    lpl_snr_min: float = 3.0
    lpl_up_blocks: int | None = None
    lpl_outlier_quantile: float = 0.02
    lpl_norm: LPLNorm = "position"
    lpl_layer_weights: LPLLayerWeights = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.feature_blocks, list):  # read back from JSON
            object.__setattr__(self, "feature_blocks", tuple(self.feature_blocks))
        _check_choice(self)
        blocks = self.feature_blocks
        _check(
            all(k >= 1 for k in blocks), f"--feature-blocks must be >= 1 (K: after the first K blocks), got {blocks}"
        )
        _check(len(set(blocks)) == len(blocks), f"--feature-blocks lists a block twice: {blocks}")
        _check(
            not blocks or self.feature_layer == "mid",
            f"--feature-blocks and --feature-layer {self.feature_layer} both choose the tap: give one of them",
        )
        _check(0.0 <= self.cond_dropout < 1.0, f"condition dropout must be in [0, 1), got {self.cond_dropout}")
        _check(self.mse_weight >= 0.0, f"--mse-weight must be >= 0, got {self.mse_weight}")
        _check(0.0 < self.t_prime_max <= 1.0, f"--t-prime-max must be in (0, 1], got {self.t_prime_max}")
        _check(
            self.kind != "self-perceptual" or self.teacher is not None,
            "--loss self-perceptual needs --teacher RUN_DIR_OR_WEIGHTS (an MSE-trained model)",
        )
        _check(
            self.kind == "external-perceptual" or (self.perceptual_net is None and self.perceptual_sha256 is None),
            f"--perceptual-net is for --loss external-perceptual, not --loss {self.kind}",
        )
        _check(
            self.perceptual_net != "",
            "--perceptual-net must name a shipped classifier (e.g. fashion-mnist-perceptual) or a weights file",
        )
        _check(self.lpl_weight >= 0, f"--lpl-weight must be >= 0, got {self.lpl_weight}")
        _check(self.lpl_snr_min >= 0, f"--lpl-snr-min must be >= 0 (0: every t), got {self.lpl_snr_min}")
        _check(
            self.lpl_up_blocks is None or self.lpl_up_blocks >= 0,
            f"--lpl-up-blocks must be >= 0 (0: the decoder's mid block only), got {self.lpl_up_blocks}",
        )
        _check(
            0 <= self.lpl_outlier_quantile < 0.5,
            f"--lpl-outlier-quantile must be in [0, 0.5) (0: no masking), got {self.lpl_outlier_quantile}",
        )


@dataclass(frozen=True)
class LoraConfig:
    """A LoRA adapter (Hu et al. 2021, arXiv 2106.09685) trained through PEFT on a frozen base model
    (``models/lora.py``): W x + (alpha / rank) B A x, with A and B of rank ``rank`` on the ``targets`` modules (None:
    the architecture's default, ``models/lora.py`` DEFAULT_TARGETS; a run records the resolved list). ``alpha``
    defaults to the rank (scale 1). ``base_sha256`` is the sha256 of the base weights the adapter belongs to, recorded
    by the run (``training.rundir``): an adapter is meaningless on any other base."""

    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    base_sha256: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):  # read back from JSON
            object.__setattr__(self, "targets", tuple(self.targets))
        _check_types(self)
        _check(
            self.rank >= 1,
            f"--lora-rank must be >= 1 (the adapter's rank; leave it out to fine-tune every weight), got {self.rank}",
        )
        if self.alpha is None:
            object.__setattr__(self, "alpha", float(self.rank))
        _check(self.alpha > 0, f"--lora-alpha must be > 0 (default: the rank, a scale of 1), got {self.alpha}")
        _check(0 <= self.dropout < 1, f"--lora-dropout must be in [0, 1), got {self.dropout}")
        _check(
            self.targets is None or (len(self.targets) > 0 and all(name.strip() for name in self.targets)),
            f"--lora-targets must name at least one module (comma-separated, e.g. to_q,to_v), got {self.targets}",
        )


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping; schedules are pure functions of images seen (EDM2).

    ``batch_size`` is the global batch of one optimiser step, over all processes and micro-batches: each of W
    processes computes ``batch_size / W`` images, in ``grad_accum`` micro-batches. So the learning rate, the EMA and
    what every step computes do not change with the number of GPUs or with ``grad_accum``.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_images: int = 4096
    # "constant" after warm-up, or "cosine": half a cosine from lr down to lr * lr_final_ratio at the last step, so a
    # stage-1 model ends annealed and stage 2 gets no bonus from a learning-rate drop it did not have (issue #11).
    lr_schedule: Literal["constant", "cosine"] = "constant"
    lr_final_ratio: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_halflife_images: int = 8192
    ema_rampup: float = 0.1
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    # Every this many steps the EMA weights are also kept as snapshots/ema-STEP.safetensors (0: never), so a
    # training curve of any sample metric can be measured after the run (experiments/compare.py, the teacher's plateau).
    snapshot_every: int = 0
    device: str = "auto"
    mixed_precision: Literal["auto", "bf16", "no"] = "auto"
    init_from: str | None = None
    progress: bool = True
    # Speed options: they change float rounding, not the maths or the randomness (see RESUMABLE_FIELDS).
    grad_accum: int = 1
    channels_last: bool = False
    compile: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check_choice(self)
        _check(self.steps >= 1, f"--steps must be >= 1, got {self.steps}")
        _check(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        _check(
            self.batch_size <= MAX_BATCH,
            f"--batch-size must be at most {MAX_BATCH} (the global batch of one step), got {self.batch_size}; use "
            "--grad-accum to split a large batch",
        )
        _check(self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}")
        _check(
            self.batch_size % self.grad_accum == 0,
            f"--batch-size {self.batch_size} does not split into --grad-accum {self.grad_accum} equal micro-batches",
        )
        _check(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        _check(
            self.lr <= MAX_LR,
            f"--lr must be at most {MAX_LR:g} (AdamW moves every weight by about lr per step), got {self.lr:g}",
        )
        _check(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        _check(self.seed <= MAX_SEED, f"--seed must be at most 2**63 - 1, got {self.seed}")
        _check(self.warmup_images >= 0, "--warmup-images must be >= 0")
        _check(0.0 <= self.lr_final_ratio <= 1.0, f"--lr-final-ratio must be in [0, 1], got {self.lr_final_ratio}")
        _check(self.snapshot_every >= 0, f"--snapshot-every must be >= 0, got {self.snapshot_every}")
        _check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        _check(self.grad_clip >= 0, "--grad-clip must be >= 0 (0 disables clipping)")
        _check(self.ema_halflife_images >= 0, "--ema-halflife-images must be >= 0")
        _check(self.ema_rampup >= 0, "--ema-rampup must be >= 0")
        for name in ("log_every", "sample_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, f"{_flag(name)} must be >= 1, got {getattr(self, name)}")


# APG's norm threshold (arXiv 2410.02416) as an RMS per element of the x0-space guidance difference, so that it does
# not change with the image size: the paper's r = 15 (an L2 norm) on SDXL's 4x128x128 latent is 15 / sqrt(4*128*128).
APG_NORM_THRESHOLD = 15 / 256


@dataclass(frozen=True)
class SampleConfig:
    """DDIM sampling (arXiv 2401.00110, Sec. 4: 50 steps, trailing spacing, eta 0) and guidance (core/guidance.py):
    ``guidance`` is the rule (against the null label, or a guide model given to the sampler), ``cfg_scale`` its w
    (1: none), only at EDM noise levels sigma_t / alpha_t in [guidance_sigma_min, guidance_sigma_max] (arXiv
    2404.07724; None: no upper bound); ``apg_``: APG's eta, momentum and RMS norm threshold (arXiv 2410.02416)."""

    steps: int = 50
    spacing: Spacing = "trailing"
    eta: float = 0.0
    cfg_scale: float = 1.0
    guidance_rescale: float = 0.0
    clip_x0: bool = True  # clamp x0_hat to the data range [-1, 1] each step (diffusers' DDIM clip_sample)
    guidance: GuidanceMethod = "cfg"
    guidance_sigma_min: float = 0.0
    guidance_sigma_max: float | None = None
    apg_eta: float = 0.0
    apg_momentum: float = -0.5
    apg_norm_threshold: float = APG_NORM_THRESHOLD
    zero_init_steps: int = 1  # CFG-Zero*: sampler steps whose velocity is zeroed (arXiv 2503.18886, Sec. 4.2)

    def __post_init__(self) -> None:
        _check_choice(self)
        _check(self.steps >= 1, f"sampling steps must be >= 1, got {self.steps}")
        _check(self.eta >= 0, f"eta must be >= 0, got {self.eta}")
        _check(
            self.eta <= 1,
            f"--eta must be at most 1 (1: DDPM's noise; above it DDIM's update is undefined, its noise exceeds the "
            f"step's variance), got {self.eta:g}",
        )
        _check(self.cfg_scale >= 0, f"CFG scale must be >= 0, got {self.cfg_scale}")
        _check(0 <= self.guidance_rescale <= 1, f"guidance rescale must be in [0, 1], got {self.guidance_rescale}")
        low, high = self.guidance_sigma_min, self.guidance_sigma_max
        _check(low >= 0, f"--guidance-interval: SIGMA_LO must be >= 0 (0: no lower bound), got {low:g}")
        _check(
            high is None or high > low,
            f"--guidance-interval: SIGMA_HI must be above SIGMA_LO (inf: no upper bound), got {low:g} {high}",
        )
        _check(self.apg_eta >= 0, f"--apg-eta must be >= 0 (0: the paper's, no parallel part), got {self.apg_eta}")
        beta, r = self.apg_momentum, self.apg_norm_threshold
        _check(-1 < beta < 1, f"--apg-momentum must be in (-1, 1) (the paper's is negative; 0: off), got {beta}")
        _check(r >= 0, f"--apg-threshold must be >= 0 (an RMS per element; 0: no clipping), got {r}")
        _check(
            0 <= self.zero_init_steps <= self.steps,
            f"--zero-init-steps must be in [0, steps] ({self.steps}), got {self.zero_init_steps}",
        )


class _Sections:
    """JSON round trip for a config made of section dataclasses (``RunConfig``, ``LatentRunConfig``)."""

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON holds it (tuples as lists), so that a config read back compares equal to its dict."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Rebuild a config from :meth:`to_dict` output; anything malformed is a :class:`UserError`."""
        _check(isinstance(data, dict), f"a config must be a JSON object, got {type(data).__name__}")
        parts = {}
        for f in dataclasses.fields(cls):
            sub = typing.get_type_hints(cls)[f.name]
            if type(None) in typing.get_args(sub):  # an optional section (``lora``): absent or null means none
                if data.get(f.name) is None:
                    parts[f.name] = None
                    continue
                sub = next(a for a in typing.get_args(sub) if a is not type(None))
            known = {g.name for g in dataclasses.fields(sub)}
            values = data.get(f.name, {})
            _check(isinstance(values, dict), f"config section {f.name!r} must be a JSON object")
            unknown = set(values) - known
            _check(not unknown, f"config section {f.name!r} has unknown fields {sorted(unknown)}")
            parts[f.name] = sub(**values)
        return cls(**parts)


def default_sampler(schedule: ScheduleConfig, **fields: Any) -> SampleConfig:
    """A SampleConfig with the defaults of ``schedule``'s family (flow: no x0 clipping) under ``fields``."""
    if schedule.family == "flow":
        fields.setdefault("clip_x0", False)
    return SampleConfig(**fields)


def check_sampler(sample: SampleConfig, schedule: ScheduleConfig) -> None:
    """What a sampler setting needs of the schedule it samples (every run config checks it, and so does sampling
    a run with overrides)."""
    _check(
        sample.steps <= schedule.num_train_timesteps,
        f"sampling steps ({sample.steps}) cannot exceed training timesteps ({schedule.num_train_timesteps})",
    )
    _check(
        sample.guidance not in FLOW_ONLY_GUIDANCE or schedule.family == "flow",
        f"--guidance {sample.guidance} is made for flow models (its zero-init is a zero velocity): use it with "
        "--schedule flow, or --guidance cfg / apg here",
    )
    if schedule.family == "flow":
        # Euler on the flow ODE is DDIM written in (alpha, sigma) with eta 0 (core/sampling.py); diffusers'
        # FlowMatchEulerDiscreteScheduler, whose loop an export runs, has neither x0 clipping nor DDIM's eta
        # noise nor a choice of spacing, so none is defined here either.
        _check(
            sample.eta == 0, f"--eta is DDIM's noise and is not defined for --schedule flow: use 0, got {sample.eta}"
        )
        _check(not sample.clip_x0, "x0 clipping is not defined for --schedule flow (Euler has none): use --no-clip-x0")
        _check(
            sample.spacing == "trailing",
            f"--spacing {sample.spacing}: --schedule flow samples diffusers' FlowMatchEuler time grid (from pure "
            "noise, like trailing); leave --spacing out",
        )


@dataclass(frozen=True)
class RunConfig(_Sections):
    """Everything that defines a training run; written to ``config.json`` and into every checkpoint."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    lora: LoraConfig | None = None  # None: every weight is trained (configs written before LoRA have no section)

    def __post_init__(self) -> None:
        _check(
            self.lora is None or self.train.init_from is not None or self.loss.kind == "self-perceptual",
            "--lora-rank trains an adapter on a base model: give the base with --init-from RUN (or --loss "
            "self-perceptual --teacher RUN, whose teacher is then the base)",
        )
        _check(
            self.loss.kind != "latent-perceptual",
            "--loss latent-perceptual needs a VAE's decoder: use it with `latent train`",
        )
        _check(
            self.model.image_size == self.data.image_size,
            f"model image size {self.model.image_size} differs from data image size {self.data.image_size}",
        )
        check_taps(self.loss, self.model)
        check_sampler(self.sample, self.schedule)


def check_taps(loss: LossConfig, model: ModelConfig) -> None:
    """The loss's feature taps must exist in the model's architecture (the teacher is the same network)."""
    blocks = loss.feature_blocks
    if model.arch != "dit":
        _check(
            not blocks,
            f"--feature-blocks {','.join(map(str, blocks))} taps transformer blocks (--arch dit); a U-Net's taps are "
            "--feature-layer mid, downK or all",
        )
        return
    n = DIT_PRESETS[model.preset].num_layers
    _check(
        loss.feature_layer in ("mid", "all"),
        f"--feature-layer {loss.feature_layer} is a U-Net tap; a DiT's taps are --feature-blocks K[,K..] (default "
        f"{n // 2}, the middle of its {n} blocks) or --feature-layer all",
    )
    _check(
        all(k <= n for k in blocks),
        f"--feature-blocks {','.join(map(str, blocks))}: DiT preset {model.preset!r} has {n} blocks; choose taps "
        f"in 1..{n}",
    )


# ---------------------------------------------------------------------------------------------------------------
# Latent, text-conditioned models (the paper's own setting: Stable Diffusion's U-Net, VAE and CLIP text encoder).


@dataclass(frozen=True)
class LatentModelConfig:
    """A latent text-to-image model from a local diffusers folder: Stable Diffusion's (``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``) or SD3's (``transformer/``, two CLIP text encoders, optional T5; the folder's
    model_index.json says which, ``models/latent.py`` LATENT_ARCHITECTURES): the network is trained, the VAE and
    text encoders stay frozen. ``resolution`` is in pixels. Taps and resolution are checked against the folder when
    the run starts (``LatentArchitecture.check``).

    ``t5``: use the folder's T5 text encoder if it has one (an SD3 folder's ``text_encoder_3/``). False
    (``--no-t5``) never loads it: T5's tokens of every prompt are zeros, as ``StableDiffusion3Pipeline`` with
    ``text_encoder_3=None``; only for an SD3 folder that has T5 (checked against the folder at the start). A config
    written before this field reads as True, what those runs did."""

    pretrained: str = ""
    resolution: int = 512
    t5: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self.pretrained != "", "a latent model needs --pretrained DIFFUSERS_FOLDER (unet, vae, text_encoder)")
        _check(
            8 <= self.resolution <= MAX_IMAGE_SIZE,
            f"--resolution must be in [8, {MAX_IMAGE_SIZE}] pixels, got {self.resolution}",
        )


CaptionFormat = Literal["auto", "folder", "jsonl", "webdataset"]


@dataclass(frozen=True)
class CaptionDataConfig:
    """Image-caption pairs: a folder with ``.txt`` captions, a JSONL file, or WebDataset ``.tar`` shards.

    ``cache_latents`` encodes every image with the VAE once (rank 0, before training) into a safetensors cache
    keyed by the data, the VAE and the resolution; otherwise each micro-batch is loaded and encoded on the fly.
    """

    path: str = ""
    format: CaptionFormat = "auto"
    cache_latents: bool = True
    cache_dir: str | None = None
    on_bad_image: Literal["skip", "error"] = "skip"

    def __post_init__(self) -> None:
        _check_choice(self)
        _check(self.path != "", "latent training needs --data-path (a captioned image folder, JSONL or .tar shards)")
        _check(
            self.cache_dir is None or self.cache_dir.strip() != "",
            "--cache-dir '' names no folder; give a folder, or leave --cache-dir out for the default",
        )
        _check(
            self.cache_dir is None or self.cache_latents,
            "--cache-dir is the latent cache's folder, which --no-cache-latents does not use; drop one of them",
        )


@dataclass(frozen=True)
class LatentRunConfig(_Sections):
    """Everything that defines a latent text-to-image run; the loss, train and sample sections are the pixel ones."""

    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    model: LatentModelConfig = field(default_factory=LatentModelConfig)
    data: CaptionDataConfig = field(default_factory=CaptionDataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(clip_x0=False))
    lora: LoraConfig | None = None  # None: the whole U-Net is trained; the base of an adapter: --init-from or the U-Net

    def __post_init__(self) -> None:
        _check(
            not self.sample.clip_x0,
            "clipping x0 to [-1, 1] is for pixels; latents are not bounded: sample latent models without --clip-x0",
        )
        _check(
            self.loss.kind != "external-perceptual",
            "--loss external-perceptual judges pixels with a classifier of the built-in data: use it with the pixel "
            "train command",
        )
        check_sampler(self.sample, self.schedule)
