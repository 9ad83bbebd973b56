"""LoRA adapters through PEFT for every architecture the project trains, and the teacher they give for free.

An adapter (Hu et al. 2021, arXiv 2106.09685) is injected by PEFT's ``inject_adapter_in_model`` into the diffusers
network of a model (``model.unet``, a DiT's ``model.transformer``: ``NETWORK``): one path for the pixel
``UNet2DModel`` (which has no adapter mixin) and the
latent ``UNet2DConditionModel`` (whose mixin's ``add_adapter`` is this same call plus diffusers' bookkeeping, which
nothing here needs: exports go through ``get_peft_model_state_dict`` and diffusers' ``save_lora_weights``). No
low-rank layer is written here; PEFT owns the layers, their merge and their state dict.

The seam for a new architecture is ``DEFAULT_TARGETS`` (its default target modules) and ``architecture`` (which
entry a run config uses): a DiT is one line in each.

The shared teacher: the self-perceptual objective's frozen network (arXiv 2401.00110, Sec. 3 and Algorithm 1) is
the starting model. In a LoRA run whose base *is* that model, the online network with its adapter switched off
computes exactly the teacher's features, so :class:`BaseTeacher` serves them without a second copy of the base.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from perceptual_diffusion.config import PRESETS, LatentRunConfig, LoraConfig
from perceptual_diffusion.core.networks import frozen_copy, unwrap
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.pretrained import folder_kind
from perceptual_diffusion.runtime import checkpoint as ckpt

ADAPTER = "default"  # PEFT's adapter name inside our modules; PEFT's and diffusers' files drop it from the keys
# A PEFT adapter folder (pixel exports) holds PEFT_CONFIG and PEFT_WEIGHTS; a latent export DIFFUSERS_LORA_WEIGHTS,
# the file diffusers' load_lora_weights looks for (runtime/checkpoint.py knows them to resolve such folders).
PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_LORA_WEIGHTS = ckpt.ADAPTER_FILES

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' Attention projections (self- and cross-attention)
# The ResNet blocks' convolutions and time projection, and the time embedding's two linears.
RESNET = ("conv1", "conv2", "time_emb_proj", "time_embedding.linear_1", "time_embedding.linear_2")
# SD3's joint attention: the image stream's projections and the text stream's (add_*), as diffusers' SD3 DreamBooth
# LoRA script targets by default (examples/dreambooth/train_dreambooth_lora_sd3.py); an SD3.5 block's second,
# image-only attention (attn2) matches the first four too. The last block has no to_add_out (its text output is
# never used): PEFT matches each name wherever it exists.
SD3_ATTENTION = (*ATTENTION, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
# Default target modules per architecture: attention projections where the network has attention levels, else the
# ResNet convolutions and time-embedding linears (the pixel tiny and small presets have attention only in the mid
# block, one layer at the lowest resolution: too little to carry an adapter).
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "pixel-unet": ATTENTION,  # UNet2DModel with AttnDownBlock2D levels (presets medium, base, large)
    "pixel-unet-no-attention": RESNET,  # UNet2DModel without attention levels (presets tiny, small)
    "sd-unet": ATTENTION,  # Stable Diffusion's UNet2DConditionModel (attn1 and attn2 in every transformer block)
    "pixel-dit": ATTENTION,  # DiTTransformer2DModel (attn1 of every block)
    "sd3-transformer": SD3_ATTENTION,  # SD3Transformer2DModel: both streams of every joint block (attn, attn2)
}
# The attribute of each model class that holds its diffusers network (where the adapter goes), by architecture.
NETWORK: dict[str, str] = {
    "pixel-unet": "unet",
    "pixel-unet-no-attention": "unet",
    "sd-unet": "unet",
    "pixel-dit": "transformer",
    "sd3-transformer": "transformer",
}


def architecture(config: Any) -> str:
    """The ``DEFAULT_TARGETS`` entry of a run config (``RunConfig`` or ``LatentRunConfig``), from the config alone."""
    if isinstance(config, LatentRunConfig):
        return "sd3-transformer" if folder_kind(config.model.pretrained) == "sd3" else "sd-unet"
    if config.model.arch == "dit":
        return "pixel-dit"
    return "pixel-unet" if any(PRESETS[config.model.preset].attention) else "pixel-unet-no-attention"


def base_path(config: Any) -> str | None:
    """Where a run's base weights come from: ``--init-from``, else (latent runs) the pretrained folder's network."""
    if config.train.init_from is not None:
        return config.train.init_from
    return config.model.pretrained if isinstance(config, LatentRunConfig) else None


def shares_teacher(config: Any) -> bool:
    """True when a self-perceptual LoRA run's teacher is its base (the same weights, by sha256): then the teacher is
    the online network with the adapter off (:class:`BaseTeacher`), not a second copy."""
    lora = getattr(config, "lora", None)
    return (
        lora is not None
        and config.loss.kind == "self-perceptual"
        and lora.base_sha256 is not None
        and lora.base_sha256 == config.loss.teacher_sha256
    )


# ---------------------------------------------------------------------------------------------------------------
# Injection, the trained state and the EMA.


def peft_config(lora: LoraConfig, architecture_name: str | None = None) -> Any:
    """The ``peft.LoraConfig`` of ours (targets resolved from ``architecture_name`` when the config has none)."""
    from peft import LoraConfig as PeftLoraConfig

    targets = lora.targets or DEFAULT_TARGETS[architecture_name or "sd-unet"]
    return PeftLoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(targets), bias="none"
    )


def _check_targets(net: nn.Module, targets: tuple[str, ...]) -> None:
    """Every target must name some module as PEFT matches names (the whole name or its last dotted parts)."""
    names = [n for n, _ in net.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        known = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))})
        raise UserError(
            f"--lora-targets {','.join(unmatched)} matches no module of this network (its linear and convolution "
            f"layers end in: {', '.join(known[:12])}{', ...' if len(known) > 12 else ''})"
        )


def add_adapter(model: nn.Module, lora: LoraConfig, seed: int = 0) -> nn.Module:
    """Inject a LoRA adapter into the model's diffusers network (``network``) through PEFT and train it alone: every
    other weight is frozen.

    PEFT initialises B to zero (the adapted network starts as its base) and A from the global generator, so the
    injection runs under a generator seeded by ``seed`` (the run's own stream): a run killed before its first
    checkpoint restarts from the same adapter, and resume replays exactly.
    """
    from peft import inject_adapter_in_model

    if lora.targets is not None:
        _check_targets(network(model), lora.targets)
    with torch.random.fork_rng(devices=[]):  # PEFT builds the layers on the CPU, then moves them to the base's device
        torch.manual_seed(seed)
        try:
            inject_adapter_in_model(
                peft_config(lora, _module_architecture(model)), network(model), adapter_name=ADAPTER
            )
        except ValueError as exc:  # PEFT's NoMatchingPeftModuleError, or a target of an unsupported layer type
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--lora-targets cannot be adapted here ({first})") from None
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        if is_adapter_key(name):
            p.requires_grad_(True)
    model.lora = lora  # a plain attribute: saved_state and the loaders read it
    return model


def network(model: nn.Module) -> nn.Module:
    """The diffusers network inside one of our models (``NETWORK``): where the adapter lives."""
    return getattr(unwrap(model), NETWORK[_module_architecture(model)])


def _module_architecture(model: nn.Module) -> str:
    from perceptual_diffusion.core.networks import DiffusionUNet
    from perceptual_diffusion.models.dit import DiffusionDiT
    from perceptual_diffusion.models.sd3 import TextConditionedSD3

    model = unwrap(model)
    if isinstance(model, DiffusionDiT):
        return "pixel-dit"
    if isinstance(model, TextConditionedSD3):
        return "sd3-transformer"
    if isinstance(model, DiffusionUNet):
        has_attention = any(PRESETS[model.model_config.preset].attention)
        return "pixel-unet" if has_attention else "pixel-unet-no-attention"
    return "sd-unet"


def is_adapter_key(name: str) -> bool:
    """A state-dict key of a PEFT LoRA weight (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    return ".lora_A." in name or ".lora_B." in name


def has_adapter(model: nn.Module) -> bool:
    return getattr(unwrap(model), "lora", None) is not None


def saved_state(model: nn.Module) -> dict[str, Tensor]:
    """What checkpoints keep of a model: its whole state, or of a LoRA model the adapter alone (its base is recorded
    by path and sha256 in the config)."""
    model = unwrap(model)
    state = model.state_dict()
    if not has_adapter(model):
        return state
    return {k: v for k, v in state.items() if is_adapter_key(k)}


def load_saved_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load :func:`saved_state` output back (one line naming the mismatch if it does not fit)."""
    if not has_adapter(model):
        ckpt.load_state_dict_checked(model, state, source)
        return
    own = saved_state(model)
    wrong = sorted(set(own) ^ set(state)) or sorted(
        k for k in own if not isinstance(state[k], Tensor) or state[k].shape != own[k].shape
    )
    if wrong:
        raise UserError(
            f"{source} does not fit this adapter ({len(state)} adapter tensors for {len(own)}, e.g. {wrong[0]!r}): "
            "it was trained with another --lora-rank, --lora-targets or base architecture"
        )
    model.load_state_dict(state, strict=False)


def frozen_ema(model: nn.Module) -> nn.Module:
    """The EMA of a model, frozen: a full copy (``networks.frozen_copy``), or for a LoRA model a copy of its adapter
    over the *same* base tensors (frozen, never updated), so an EMA costs the adapter's memory, not a second base."""
    model = unwrap(model)
    if not has_adapter(model):
        return frozen_copy(model)
    shared = {id(p): p for n, p in model.named_parameters() if not is_adapter_key(n)}
    return copy.deepcopy(model, shared).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# The shared teacher.


class BaseTeacher:
    """The frozen teacher of arXiv 2401.00110 (Sec. 3) as the online LoRA model with its adapter switched off: the
    base weights are the teacher, so no second copy exists. Follows ``networks.DiffusionModel`` for the loss
    (``features``, ``taps``, ``schedule``); its ``parameters`` are the base's, all frozen.

    Each teacher pass (:meth:`base_only`) switches the adapter off, puts the network in eval mode and turns
    gradient checkpointing off (a recomputation in backward would run with the adapter back on), and restores all
    three afterwards, and every parameter's requires_grad: PEFT's ``enable_adapters(False)`` clears it on the LoRA
    weights, and a leaf still off when backward runs silently gets no gradient. The online pass that precedes it
    has already recorded its graph (and drawn its dropout), so the switch does not touch it. Under DDP it must be
    given the unwrapped module: the teacher pass is not the DDP forward.
    """

    training = False

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.model = unwrap(model)
        if not has_adapter(self.model):
            raise ValueError("BaseTeacher needs a model with a LoRA adapter (lora.add_adapter)")
        self.schedule = self.model.schedule
        self._modules = list(self.model.modules())
        self._layers = [m for m in self._modules if isinstance(m, BaseTunerLayer)]
        self._params = list(self.model.parameters())
        self._checkpointed = [m for m in self._modules if hasattr(m, "gradient_checkpointing")]

    @property
    def taps(self) -> tuple[str, ...]:
        return self.model.taps

    @property
    def default_tap(self) -> str:
        return self.model.default_tap

    def parameters(self) -> Iterator[nn.Parameter]:
        """The base's parameters (the teacher's weights); the adapter is not part of the teacher."""
        return (p for n, p in self.model.named_parameters() if not is_adapter_key(n))

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        """The base network: adapter off, eval mode, no gradient checkpointing; all of it restored on exit."""
        grads = [p.requires_grad for p in self._params]
        modes = [m.training for m in self._modules]
        checkpointing = [m.gradient_checkpointing for m in self._checkpointed]
        disabled = [layer.disable_adapters for layer in self._layers]
        try:
            for layer in self._layers:
                layer.enable_adapters(False)
            self.model.eval()
            for m in self._checkpointed:
                m.gradient_checkpointing = False
            yield
        finally:
            for layer, off in zip(self._layers, disabled):
                layer.enable_adapters(not off)
            for m, mode in zip(self._modules, modes):
                m.training = mode
            for m, on in zip(self._checkpointed, checkpointing):
                m.gradient_checkpointing = on
            for p, flag in zip(self._params, grads):
                p.requires_grad_(flag)

    def features(
        self, x_t: Tensor, t: Tensor, cond: Tensor | None = None, taps: tuple[str, ...] = ("mid",)
    ) -> dict[str, Tensor]:
        """The base network's features (``DiffusionModel.features``); the graph runs through the frozen base only."""
        with self.base_only():
            return self.model.features(x_t, t, cond, taps)


# ---------------------------------------------------------------------------------------------------------------
# Bases, merging and the adapter formats.


def check_base(lora: LoraConfig, base: str | Path, source: str) -> Path:
    """The base weights of an adapter, refused in one line when their sha256 is not the one the adapter records."""
    try:
        path = ckpt.resolve_weights(base)
    except UserError as exc:
        raise UserError(f"{source} is an adapter whose base {base} cannot be read ({exc})") from None
    found = ckpt.weights_sha256(path)
    if lora.base_sha256 is not None and found != lora.base_sha256:
        raise UserError(
            f"{source} is an adapter for another base: it was trained on weights with sha256 "
            f"{lora.base_sha256[:16]}..., but {base} now holds {found[:16]}...; restore that base"
        )
    return path


def attach(model: nn.Module, lora: LoraConfig, state: dict[str, Tensor], source: str) -> nn.Module:
    """``model`` (its base weights loaded) with a trained adapter on top: our keys (:func:`saved_state`) or PEFT's
    (``get_peft_model_state_dict``: no adapter name, no ``unet.`` prefix)."""
    add_adapter(model, lora)
    prefix = NETWORK[_module_architecture(model)]
    if state and not any(k.startswith(prefix + ".") for k in state):
        state = from_peft_keys(state, prefix)
    load_saved_state(model, state, source)
    return model


def from_peft_keys(state: dict[str, Tensor], prefix: str = "unet") -> dict[str, Tensor]:
    """PEFT's file keys (``x.lora_A.weight``) as our modules' (``unet.x.lora_A.default.weight``; ``prefix`` is the
    model's network attribute, ``NETWORK``)."""
    out = {}
    for key, value in state.items():
        stem, dot, leaf = key.rpartition(".")
        out[f"{prefix}.{stem}.{ADAPTER}{dot}{leaf}"] = value
    return out


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights, in place, as PEFT's ``merge_and_unload`` does: each LoRA layer's own
    ``merge`` (W + scale B A), then its base layer replaces it. The result is a plain model of the base's layout."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    net = network(model)
    for name, module in list(net.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent) if parent else net, child, module.get_base_layer())
    with contextlib.suppress(AttributeError):
        del net.peft_config
    unwrap(model).lora = None
    return model


def peft_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapter in PEFT's file format (``get_peft_model_state_dict``): keys relative to the diffusers network."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(network(model), adapter_name=ADAPTER)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def write_peft_folder(model: nn.Module, folder: Path) -> None:
    """A PEFT adapter folder: ``adapter_config.json`` (PEFT's ``save_pretrained``) and ``adapter_model.safetensors``
    (keys of ``get_peft_model_state_dict``), which PEFT's ``set_peft_model_state_dict`` loads into the base."""
    from safetensors.torch import save_file

    lora = unwrap(model).lora
    peft_config(lora, _module_architecture(unwrap(model))).save_pretrained(str(folder))
    save_file(peft_state(model), str(folder / PEFT_WEIGHTS), metadata={"format": "pt"})


def read_adapter_file(folder: Path, prefix: str = "unet") -> dict[str, Tensor]:
    """The adapter weights of an exported adapter folder, in our keys (``prefix``: the network's attribute)."""
    from safetensors.torch import load_file

    if (folder / DIFFUSERS_LORA_WEIGHTS).is_file():  # diffusers' keys: "unet." (SD3: "transformer.") + PEFT's
        state = load_file(str(folder / DIFFUSERS_LORA_WEIGHTS))
        return from_peft_keys({k.removeprefix(prefix + "."): v for k, v in state.items()}, prefix)
    return from_peft_keys(load_file(str(folder / PEFT_WEIGHTS)), prefix)
