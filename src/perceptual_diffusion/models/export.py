"""Export to and import from the diffusers format: a folder that diffusers' pipeline loads as is.

An exported folder holds:
    model_index.json, unet/, scheduler/   a pipeline written by diffusers' own ``save_pretrained`` (safetensors):
                                          DDPM family: DDIMPipeline + DDIMScheduler; flow family: DDPMPipeline +
                                          FlowMatchEulerDiscreteScheduler (``SCHEDULERS``)
    unet_conditional/                     class-conditional models only: the U-Net with its class embedding
    perceptual_diffusion_config.json      our RunConfig and step, so that importing the folder is lossless
    README.md                             how to sample from it with diffusers

A pixel DiT (``--arch dit``) fits no diffusers pipeline (``DiTPipeline`` needs a VAE; ``DDPMPipeline`` calls the
model without labels), so its folder holds ``transformer/`` (``DiTTransformer2DModel.save_pretrained``) and
``scheduler/`` (the family's scheduler, ``SCHEDULERS``), the config record and a README with the sampling loop.

Why DDPMPipeline for flow: its loop is set_timesteps, then unet(x, t) and scheduler.step for each t, which is exactly
Euler with the scheduler it is given; DDIMPipeline would convert any scheduler to DDIM on load. Both pipelines call
``unet(x, t)`` without class labels, and a ``UNet2DModel`` with a class embedding refuses
that call. So for a class-conditional model ``unet/`` holds the model with its null label folded in (see
:func:`null_label_unet`): the pipeline then draws the same unconditional samples as ``sample --label none``, and
``unet_conditional/`` holds the model itself for class-conditional sampling and CFG with a short diffusers loop.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DModel
from safetensors import SafetensorError
from safetensors.torch import load_file

from perceptual_diffusion.config import (
    DIT_PRESETS,
    PRESETS,
    DataConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
)
from perceptual_diffusion.core.networks import DiffusionUNet, build_unet
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import lora
from perceptual_diffusion.models.architectures import build_model
from perceptual_diffusion.models.dit import DiffusionDiT, dit_config_from_transformer
from perceptual_diffusion.models.publish import CONFIG_FILE, check_export_target, publish_folder
from perceptual_diffusion.models.schedulers import SCHEDULERS, read_scheduler
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime.checkpoint import TRANSFORMER_DIR, UNET_DIR

CONDITIONAL_UNET_DIR = "unet_conditional"
SCHEDULER_DIR = "scheduler"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def null_label_unet(model: DiffusionUNet) -> UNet2DModel:
    """The class-conditional U-Net with its null label folded in: an unconditional UNet2DModel, the same function.

    UNet2DModel adds ``class_embedding(label)`` to the output of ``time_embedding`` (whose last layer is the linear
    ``linear_2``); for a fixed label that is a constant vector, so it can move into ``linear_2``'s bias.
    """
    unet = model.unet
    if unet.time_embedding.post_act is not None or unet.config.class_embed_type is not None:
        raise RuntimeError("this diffusers UNet2DModel applies the class embedding differently; cannot fold it")
    config = {**unet.config, "num_class_embeds": None}
    folded = UNet2DModel.from_config(config)
    state = {k: v for k, v in unet.state_dict().items() if not k.startswith("class_embedding.")}
    null_embedding = unet.class_embedding.weight[model.null_label].detach()
    state["time_embedding.linear_2.bias"] = state["time_embedding.linear_2.bias"] + null_embedding
    folded.load_state_dict(state)
    return folded


def _unet_copy(model: DiffusionUNet) -> UNet2DModel:
    unet = UNet2DModel.from_config(model.unet.config)
    unet.load_state_dict(model.unet.state_dict())
    return unet


_README = """# {name}: a perceptual-diffusion model in diffusers format

Exported from `{source}` (step {step}). Full training configuration: `{config_file}`.
{usage}{conditional}"""

_DDIM_USAGE = """
```python
import torch
from diffusers import DDIMPipeline

pipe = DDIMPipeline.from_pretrained("{name}")
images = pipe(batch_size=4, num_inference_steps={steps}, eta=0.0, output_type="np").images
```

`scheduler/` reproduces the training schedule ({schedule}) and perceptual-diffusion's DDIM sampler
(spacing {spacing}, clip_sample {clip}). With per-image generators,
`generator=[torch.Generator().manual_seed(s) for s in seeds]`, the pipeline gives the same images as
`perceptual-diffusion sample --seed S --cfg-scale 1` for the same seeds (to float rounding) when the spacing is
trailing or leading and `num_inference_steps` divides {T}: otherwise diffusers' DDIMScheduler steps from t to
t - {T} // steps instead of to the next timestep of its own list.
"""

_FLOW_USAGE = """
```python
import torch
from diffusers import DDPMPipeline

pipe = DDPMPipeline.from_pretrained("{name}")  # DDPMPipeline's loop runs the FlowMatchEuler scheduler it holds
images = pipe(batch_size=4, num_inference_steps={steps}, output_type="np").images
```

A rectified-flow model ({schedule}): `scheduler/` is a `FlowMatchEulerDiscreteScheduler`, and its step loop is
perceptual-diffusion's Euler sampler. With per-image generators, `generator=[torch.Generator().manual_seed(s) for s in
seeds]`, the pipeline gives the same images as `perceptual-diffusion sample --seed S --cfg-scale 1` for the same
seeds (to float rounding). Do not load it as a `DDIMPipeline`: that converts the scheduler to DDIM.
"""

_CONDITIONAL_README = """
## Class labels

This model is class-conditional ({k} classes; label {k} is the null label of classifier-free guidance).
`DDIMPipeline` passes no labels, so `unet/` holds the model with the null label built in: the pipeline draws
*unconditional* samples. `unet_conditional/` is the model itself; sample class `c` with CFG scale `w` like this:

```python
import torch
from diffusers import DDIMScheduler, UNet2DModel

c, w, n = 0, 1.0, 4  # class, CFG scale (1: no guidance), number of images
unet = UNet2DModel.from_pretrained("{name}", subfolder="unet_conditional")
scheduler = DDIMScheduler.from_pretrained("{name}", subfolder="scheduler")
labels = torch.tensor([c] * n)
null = torch.full_like(labels, {k})
x = torch.stack([torch.randn(unet.config.in_channels, {size}, {size}, generator=torch.Generator().manual_seed(s))
                 for s in range(n)])
# flow models: scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(...); the loop is the same
scheduler.set_timesteps({steps})
with torch.no_grad():
    for t in scheduler.timesteps:
        cond = unet(x, t, class_labels=labels).sample
        uncond = unet(x, t, class_labels=null).sample
        x = scheduler.step(uncond + w * (cond - uncond), t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)
```
"""


_DIT_README = """# {name}: a perceptual-diffusion pixel DiT in diffusers format

Exported from `{source}` (step {step}). Full training configuration: `{config_file}`.

No diffusers pipeline fits a pixel DiT (`DiTPipeline` decodes latents with a VAE; `DDPMPipeline` passes no class
labels), so this folder holds the model, `transformer/` (a `DiTTransformer2DModel`), and `scheduler/` (a
`{scheduler}`: {schedule}). Its step loop is perceptual-diffusion's sampler: for the same seeds it gives the same
images as `perceptual-diffusion sample --seed S` (to float rounding{caveat}). Label {k} is the null class
(classifier-free guidance's unconditional branch, and every image of an unconditional model).

```python
import torch
from diffusers import {scheduler}, DiTTransformer2DModel

c, w, n = 0, 1.0, 4  # class, CFG scale (1: no guidance), number of images
transformer = DiTTransformer2DModel.from_pretrained("{name}", subfolder="transformer").eval()
scheduler = {scheduler}.from_pretrained("{name}", subfolder="scheduler")
labels = torch.tensor([c] * n)  # an unconditional model: torch.full((n,), {k})
null = torch.full_like(labels, {k})
x = torch.stack([torch.randn({channels}, {size}, {size}, generator=torch.Generator().manual_seed(s))
                 for s in range(n)])
scheduler.set_timesteps({steps})
with torch.no_grad():
    for t in scheduler.timesteps:
        time = t.expand(n)  # DiT's timestep embedding takes one time per image
        pred = transformer(x, timestep=time, class_labels=labels).sample
        if w != 1:
            uncond = transformer(x, timestep=time, class_labels=null).sample
            pred = uncond + w * (pred - uncond)
        x = scheduler.step(pred, t, x).prev_sample
images = (x / 2 + 0.5).clamp(0, 1)
```
"""


def _dit_readme(name: str, source: str | Path, step: int, config: RunConfig) -> str:
    s, sample = config.schedule, config.sample
    if s.family == "flow":
        scheduler, schedule, caveat = "FlowMatchEulerDiscreteScheduler", f"rectified flow, shift {s.shift}", ""
    else:
        scheduler = "DDIMScheduler"
        schedule = (
            f"{s.beta_schedule} {s.beta_start}-{s.beta_end}, zero terminal SNR {s.zero_terminal_snr}, "
            f"{s.prediction_type}-prediction, DDIM spacing {sample.spacing}, clip_sample {sample.clip_x0}"
        )
        caveat = f"; with trailing or leading spacing when the number of steps divides {s.num_train_timesteps}"
    mc = config.model
    return _DIT_README.format(
        name=name,
        source=source,
        step=step,
        config_file=CONFIG_FILE,
        scheduler=scheduler,
        schedule=schedule,
        caveat=caveat,
        k=mc.num_classes,
        channels=mc.channels,
        size=mc.image_size,
        steps=sample.steps,
    )


def export_diffusers(
    weights_or_run_dir: str | Path,
    out_dir: str | Path,
    sample_config: SampleConfig | None = None,
    force: bool = False,
) -> Path:
    """Write a trained model as a diffusers pipeline folder (``SCHEDULERS``), atomically; ``sample_config``
    defaults to the run's own."""
    out_dir = Path(out_dir)
    check_export_target(out_dir, force, [weights_or_run_dir])  # before any work: a refused target costs nothing
    state_dict, config, step = read_pixel_weights(weights_or_run_dir)  # a LoRA run's: merged through PEFT
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(
            f"{weights_or_run_dir} holds non-finite weights ({len(bad)} tensors with NaN or inf, e.g. {bad[0]!r}): "
            "the model produces non-finite samples, so there is nothing worth exporting"
        )
    config = replace(config, sample=sample_config or config.sample)
    model = build_model(config.model, config.schedule)
    ckpt.load_state_dict_checked(model, state_dict, str(weights_or_run_dir))
    conditional = config.model.num_classes > 0

    pipeline_class, make_scheduler = SCHEDULERS[config.schedule.family]
    scheduler = make_scheduler(config.schedule, config.sample)
    record = {"format": ckpt.FORMAT, "step": step, "config": config.to_dict()}
    if isinstance(model, DiffusionDiT):
        readme = _dit_readme(out_dir.name, weights_or_run_dir, step, config)

        def write_dit(tmp: Path) -> None:
            model.transformer.save_pretrained(tmp / TRANSFORMER_DIR, safe_serialization=True)
            scheduler.save_pretrained(tmp / SCHEDULER_DIR)
            (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            (tmp / "README.md").write_text(readme, errors="backslashreplace")

        return publish_folder(out_dir, write_dit, force, checked=True)
    unet = null_label_unet(model) if conditional else _unet_copy(model)
    s, k = config.schedule, config.model.num_classes
    if s.family == "flow":
        usage = _FLOW_USAGE.format(
            name=out_dir.name, steps=config.sample.steps, schedule=f"shift {s.shift}, velocity eps - x0"
        )
    else:
        usage = _DDIM_USAGE.format(
            name=out_dir.name,
            steps=config.sample.steps,
            schedule=f"{s.beta_schedule} {s.beta_start}-{s.beta_end}, zero terminal SNR {s.zero_terminal_snr}, "
            f"{s.prediction_type}-prediction",
            spacing=config.sample.spacing,
            clip=config.sample.clip_x0,
            T=s.num_train_timesteps,
        )
    readme = _README.format(
        name=out_dir.name,
        source=weights_or_run_dir,
        step=step,
        config_file=CONFIG_FILE,
        usage=usage,
        conditional=_CONDITIONAL_README.format(
            name=out_dir.name, k=k, size=config.model.image_size, steps=config.sample.steps
        )
        if conditional
        else "",
    )

    def write(tmp: Path) -> None:
        pipeline_class(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
        if conditional:
            _unet_copy(model).save_pretrained(tmp / CONDITIONAL_UNET_DIR, safe_serialization=True)
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        # A source path in another encoding (Latin-1 file names) holds surrogates: shown escaped, never a crash.
        (tmp / "README.md").write_text(readme, errors="backslashreplace")

    return publish_folder(out_dir, write, force, checked=True)


# ---------------------------------------------------------------------------------------------------------------
# Import.


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise UserError(f"cannot read {path} ({exc})") from None


def _unet_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """A UNet2DModel config normalised by the installed diffusers (defaults filled in, lists not tuples)."""
    with torch.device("meta"):  # no weights allocated: only the resolved config is wanted
        unet = UNet2DModel.from_config(config)
    return {k: v for k, v in json.loads(json.dumps(dict(unet.config))).items() if not k.startswith("_")}


def _model_config_from_unet(config: dict[str, Any], source: str) -> ModelConfig:
    """The preset whose U-Net has exactly this config; a :class:`UserError` when none does."""
    arch = _unet_architecture(config)
    num_class_embeds = arch.get("num_class_embeds")
    num_classes = num_class_embeds - 1 if num_class_embeds else 0  # our last label is the null label
    size = arch["sample_size"]
    for preset in PRESETS:
        try:
            candidate = ModelConfig(preset, size, arch["in_channels"], num_classes)
        except UserError:
            continue
        with torch.device("meta"):
            built = build_unet(candidate)
        if _unet_architecture(dict(built.config)) == arch:
            return candidate
    raise UserError(
        f"the U-Net in {source} is not one of perceptual-diffusion's presets ({', '.join(PRESETS)}; "
        f"its block_out_channels are {arch['block_out_channels']}): only U-Nets this project builds can be trained"
    )


def _read_unet_weights(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / UNET_WEIGHTS
    if not path.is_file():
        raise UserError(f"{folder} has no {UNET_WEIGHTS} (only safetensors weights are read, never pickles)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{path} is a damaged safetensors file ({exc})") from None


def read_diffusers(folder: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, int]:
    """(state_dict of a pixel model, config, step) from a diffusers folder, the shape ``read_weights`` returns.

    A folder written by :func:`export_diffusers` is read losslessly from its config file; any other folder is
    accepted when its U-Net is one of our presets, its config built from the U-Net and scheduler configs.
    """
    folder = Path(folder)
    unet_class = (
        _read_json(folder / UNET_DIR / "config.json").get("_class_name")
        if (folder / UNET_DIR / "config.json").is_file()
        else None
    )
    if unet_class == "UNet2DConditionModel" or (folder / "text_encoder").is_dir():
        raise UserError(
            f"{folder} is a latent text-to-image (Stable Diffusion) folder, not a pixel model; use it with the "
            "`latent` commands (latent train --pretrained / --init-from / --teacher)"
        )
    if (folder / TRANSFORMER_DIR / "config.json").is_file():
        return _read_dit_folder(folder)
    if (folder / CONFIG_FILE).is_file():
        config, step = _read_record(folder)
        unet_dir = folder / (CONDITIONAL_UNET_DIR if config.model.num_classes > 0 else UNET_DIR)
    else:
        # A conditional export's unet/ has the null label folded in; the model itself is in unet_conditional/.
        conditional_dir = folder / CONDITIONAL_UNET_DIR
        unet_dir = conditional_dir if (conditional_dir / "config.json").is_file() else folder / UNET_DIR
        if not (unet_dir / "config.json").is_file():
            raise UserError(f"{folder} has no {UNET_DIR}/config.json: it is not a diffusers pixel-model folder")
        model = _model_config_from_unet(_read_json(unet_dir / "config.json"), str(unet_dir))
        scheduler_file = folder / SCHEDULER_DIR / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise UserError(f"{folder} has no {SCHEDULER_DIR}/scheduler_config.json: its noise schedule is unknown")
        schedule, sample = read_scheduler(_read_json(scheduler_file), str(folder))
        data = DataConfig(image_size=model.image_size)  # unknown; training from the folder gives its own data
        config = RunConfig(schedule=schedule, model=model, data=data, sample=sample)
        step = 0
    state_dict = {f"unet.{k}": v for k, v in _read_unet_weights(unet_dir).items()}
    return state_dict, config, step


def _read_record(folder: Path) -> tuple[RunConfig, int]:
    """(config, step) of an export's ``perceptual_diffusion_config.json``."""
    ours = folder / CONFIG_FILE
    record = _read_json(ours)
    if not isinstance(record, dict) or record.get("format") != ckpt.FORMAT or "config" not in record:
        raise UserError(f"{ours} is not a perceptual-diffusion export record")
    try:
        config = RunConfig.from_dict(record["config"])
    except UserError as exc:
        raise UserError(f"{ours} has an invalid config: {exc}") from None
    step = record.get("step", 0)
    return config, int(step) if isinstance(step, int) else 0


def _read_dit_folder(folder: Path) -> tuple[dict[str, torch.Tensor], RunConfig, int]:
    """A pixel DiT's export (``transformer/`` + ``scheduler/``): from its record, or, for a folder without one,
    from the transformer's config (one of our DiT presets) and the scheduler's."""
    transformer_dir = folder / TRANSFORMER_DIR
    if (folder / CONFIG_FILE).is_file():
        config, step = _read_record(folder)
        if config.model.arch != "dit":
            raise UserError(f"{folder} holds {TRANSFORMER_DIR}/ but its record is of a {config.model.arch} model")
    else:
        arch = _read_json(transformer_dir / "config.json")
        model = dit_config_from_transformer(arch) if arch.get("_class_name") == "DiTTransformer2DModel" else None
        if model is None:
            raise UserError(
                f"the transformer in {transformer_dir} is not one of perceptual-diffusion's pixel DiT presets "
                f"({', '.join(DIT_PRESETS)}): only DiTs this project builds can be trained"
            )
        scheduler_file = folder / SCHEDULER_DIR / "scheduler_config.json"
        if not scheduler_file.is_file():
            raise UserError(f"{folder} has no {SCHEDULER_DIR}/scheduler_config.json: its noise schedule is unknown")
        schedule, sample = read_scheduler(_read_json(scheduler_file), str(folder))
        config = RunConfig(schedule=schedule, model=model, data=DataConfig(image_size=model.image_size), sample=sample)
        step = 0
    state_dict = {f"transformer.{k}": v for k, v in _read_unet_weights(transformer_dir).items()}
    return state_dict, config, step


def import_diffusers(folder: str | Path) -> tuple[Any, RunConfig]:
    """A diffusers folder (written by :func:`export_diffusers`, or holding a preset's U-Net or DiT) as our model,
    in eval."""
    state_dict, config, _ = read_diffusers(folder)
    model = build_model(config.model, config.schedule)
    ckpt.load_state_dict_checked(model, state_dict, str(folder))
    return model.eval(), config


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters of pixel models (models/lora.py): PEFT adapter folders, and reading any adapter merged into its base.


def adapter_record(folder: str | Path) -> tuple[Any, int, str]:
    """(config, step, kind) of an exported adapter folder (``CONFIG_FILE``, written beside the adapter)."""
    from perceptual_diffusion.config import LatentRunConfig

    record = _read_json(Path(folder) / CONFIG_FILE) if (Path(folder) / CONFIG_FILE).is_file() else None
    if not isinstance(record, dict) or record.get("format") != ckpt.FORMAT or "config" not in record:
        raise UserError(f"{folder} holds a LoRA adapter without its {CONFIG_FILE}: its base is unknown")
    kind = record.get("kind", "pixel")
    try:
        config = (LatentRunConfig if kind == "latent" else RunConfig).from_dict(record["config"])
    except UserError as exc:
        raise UserError(f"{folder / CONFIG_FILE} has an invalid config: {exc}") from None
    if config.lora is None:
        raise UserError(f"{folder / CONFIG_FILE} records no LoRA adapter")
    step = record.get("step", 0)
    return config, int(step) if isinstance(step, int) else 0, kind


def read_raw_weights(source: Path) -> tuple[dict[str, torch.Tensor], RunConfig, int]:
    """A pixel weights file or exported adapter folder as stored: of a LoRA run, the adapter alone."""
    if ckpt.is_adapter_folder(source):
        config, step, kind = adapter_record(source)
        if kind != "pixel":
            raise ckpt.wrong_kind(source, kind)
        return lora.read_adapter_file(source, lora.NETWORK[lora.architecture(config)]), config, step
    return ckpt.read_weights(source)


def pixel_lora_model(state: dict[str, torch.Tensor], config: RunConfig, source: str) -> Any:
    """A pixel LoRA model: its base (``--init-from`` of its run, sha256-checked) with the trained adapter on top."""
    base = lora.check_base(config.lora, config.train.init_from, source)
    base_state, _, _ = read_pixel_weights(base)
    model = build_model(config.model, config.schedule)
    ckpt.load_state_dict_checked(model, base_state, str(base))
    return lora.attach(model, config.lora, state, source)


def read_pixel_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, int]:
    """(state_dict of a DiffusionUNet, config, step) of any pixel weights: a run or weights file, a diffusers folder,
    or a LoRA adapter (a run's, or an exported folder) merged into its base through PEFT, as a plain model."""
    source = ckpt.resolve_weights(path)
    if source.is_dir() and not ckpt.is_adapter_folder(source):
        return read_diffusers(source)
    state, config, step = read_raw_weights(source)
    if config.lora is None:
        return state, config, step
    merged = lora.merge_adapter(pixel_lora_model(state, config, str(path)))
    return merged.state_dict(), replace(config, lora=None), step


def export_adapter(run: str | Path, out_dir: str | Path, force: bool = False) -> Path:
    """A pixel LoRA run's EMA adapter as a PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
    with ``CONFIG_FILE`` (the run config: the base's path and sha256), atomically. No diffusers pixel pipeline loads
    LoRA; ``export --merge-lora`` writes the merged model as a pipeline folder instead."""
    out_dir = Path(out_dir)
    check_export_target(out_dir, force, [run])
    source = ckpt.resolve_weights(run)
    state, config, step = read_raw_weights(source)
    if config.lora is None:
        raise UserError(f"{run} is not a LoRA run (no --lora-rank): export it without --adapter")
    model = pixel_lora_model(state, config, str(run))
    record = {"format": ckpt.FORMAT, "kind": "pixel", "step": step, "config": config.to_dict()}

    def write(tmp: Path) -> None:
        lora.write_peft_folder(model, tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    return publish_folder(out_dir, write, force, checked=True)
