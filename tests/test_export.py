"""Export to and import from the diffusers format: DDIMPipeline gives our sampler's images, import is lossless, and
training starts from an exported folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY
from conftest import make_model
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import DataConfig, ModelConfig, RunConfig, SampleConfig, ScheduleConfig
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.core.schedule import build_schedule, sampling_timesteps
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import loading
from perceptual_diffusion.models.export import (
    CONDITIONAL_UNET_DIR,
    CONFIG_FILE,
    export_diffusers,
    import_diffusers,
    read_diffusers,
)
from perceptual_diffusion.runtime import checkpoint as ckpt

SEEDS = [0, 1, 2, 3]
STEPS = 10  # divides T = 1000: diffusers' DDIMScheduler then visits exactly our timesteps

# (schedule, sampling) settings covering every beta schedule, prediction type and spacing the scheduler maps; linspace
# only in the config test, because diffusers' DDIMScheduler steps from t to t - T // steps, not to the next linspace
# timestep. Eps-prediction divides by alpha_t, which multiplies float32 rounding differences by up to 1 / alpha_t each
# step; with random weights and the 1e-4 linear schedule's alpha_900 = 0.016 that reaches 1.1e-4 after 10 steps,
# so the eps case uses the cosine schedule (alpha_900 = 0.14): the mapping under test is the same.
SETTINGS = {
    "paper": (ScheduleConfig(), SampleConfig(steps=STEPS)),
    "linear-x0-leading-noclip": (
        ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, zero_terminal_snr=False,
                       prediction_type="x0"),
        SampleConfig(steps=STEPS, spacing="leading", clip_x0=False),
    ),
    "cosine-eps-leading": (
        ScheduleConfig(beta_schedule="cosine", zero_terminal_snr=False, prediction_type="eps"),
        SampleConfig(steps=STEPS, spacing="leading"),
    ),
}  # fmt: skip


def _run_config(schedule: ScheduleConfig, sample_config: SampleConfig, num_classes: int) -> RunConfig:
    return RunConfig(
        schedule=schedule,
        model=ModelConfig(preset="tiny", image_size=8, channels=3, num_classes=num_classes),
        data=DataConfig(image_size=8),
        sample=sample_config,
    )


@pytest.fixture
def exported(tmp_path: Path) -> Callable[..., tuple[DiffusionUNet, RunConfig, Path]]:
    """``exported(setting, num_classes)``: a perturbed tiny model, saved as weights and exported to a folder."""

    def make(setting: str = "paper", num_classes: int = 0) -> tuple[DiffusionUNet, RunConfig, Path]:
        config = _run_config(*SETTINGS[setting], num_classes)
        model = make_model(config.model, config.schedule, seed=num_classes)
        weights = tmp_path / f"{setting}-{num_classes}.safetensors"
        ckpt.save_weights(weights, model.state_dict(), config, step=7)
        return model, config, export_diffusers(weights, tmp_path / f"{setting}-{num_classes}")

    return make


def _seeded(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def _assert_same_images(theirs: torch.Tensor, ours: torch.Tensor) -> None:
    assert theirs.shape == ours.shape
    assert (theirs - ours).abs().max().item() < 1e-4
    # Random weights must not drive every pixel into the [-1, 1] clamp, or the comparison would be vacuous.
    assert (ours.abs() < 0.99).float().mean() > 0.3


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_scheduler_config_matches_the_training_setting(exported, setting: str) -> None:
    _, config, folder = exported(setting)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    s, c = config.schedule, scheduler.config
    assert c.num_train_timesteps == s.num_train_timesteps
    assert (
        c.beta_schedule
        == {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}[s.beta_schedule]
    )
    assert (c.beta_start, c.beta_end) == (s.beta_start, s.beta_end)
    assert c.rescale_betas_zero_snr is s.zero_terminal_snr
    assert c.prediction_type == {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}[s.prediction_type]
    assert c.timestep_spacing == config.sample.spacing
    assert c.clip_sample is config.sample.clip_x0 and c.clip_sample_range == 1.0
    assert c.set_alpha_to_one is True and c.steps_offset == 0 and c.thresholding is False
    # The same noise schedule, not only the same names (diffusers computes it in float32).
    ours = build_schedule(s).alphas_cumprod.float()
    torch.testing.assert_close(scheduler.alphas_cumprod, ours, atol=2e-6, rtol=0)
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == sampling_timesteps(s.num_train_timesteps, STEPS, config.sample.spacing)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_ddim_pipeline_gives_our_sampler_images(exported, setting: str) -> None:
    model, config, folder = exported(setting)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(len(SEEDS), generator=_seeded(SEEDS), eta=0.0, num_inference_steps=STEPS, output_type="pt").images
    ours = sample(model, SEEDS, None, config.sample)
    _assert_same_images(theirs * 2 - 1, ours)  # the pipeline maps [-1, 1] to [0, 1]


def test_conditional_model_pipeline_is_unconditional_and_the_labelled_unet_gives_cfg_samples(exported) -> None:
    model, config, folder = exported("paper", num_classes=3)
    # DDIMPipeline passes no labels: its unet/ has the null label folded in, so it samples like `--label none`.
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(len(SEEDS), generator=_seeded(SEEDS), num_inference_steps=STEPS, output_type="pt").images
    _assert_same_images(theirs * 2 - 1, sample(model, SEEDS, None, config.sample))

    # unet_conditional/ with the README's loop: class labels and classifier-free guidance.
    unet = UNet2DModel.from_pretrained(folder, subfolder=CONDITIONAL_UNET_DIR)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    labels, w = torch.tensor([0, 1, 2, 1]), 2.0
    null = torch.full_like(labels, config.model.num_classes)
    x = torch.stack([torch.randn(3, 8, 8, generator=g) for g in _seeded(SEEDS)])
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            cond, uncond = unet(x, t, class_labels=labels).sample, unet(x, t, class_labels=null).sample
            x = scheduler.step(uncond + w * (cond - uncond), t, x).prev_sample
    ours = sample(model, SEEDS, labels, replace(config.sample, cfg_scale=w))
    _assert_same_images(x.clamp(-1, 1), ours)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_import_is_lossless(exported, num_classes: int) -> None:
    model, config, folder = exported("linear-x0-leading-noclip", num_classes)
    imported, imported_config = import_diffusers(folder)
    assert imported_config == config
    assert imported.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))
    assert loading.read_weights(folder)[2] == 7, "the step survives the round trip"


@pytest.mark.parametrize("num_classes", [0, 3])
def test_import_without_our_config_recognises_the_preset(exported, num_classes: int) -> None:
    model, config, folder = exported("linear-x0-leading-noclip", num_classes)
    (folder / CONFIG_FILE).unlink()  # a folder as diffusers alone would have written it
    imported, imported_config = import_diffusers(folder)
    assert (imported_config.model, imported_config.schedule) == (config.model, config.schedule)
    assert (imported_config.sample.spacing, imported_config.sample.clip_x0) == ("leading", False)
    assert all(torch.equal(a, b) for a, b in zip(imported.state_dict().values(), model.state_dict().values()))


def test_import_refuses_a_unet_that_is_no_preset_and_an_unsupported_schedule(exported) -> None:
    _, _, folder = exported()
    (folder / CONFIG_FILE).unlink()
    unet_config = folder / "unet" / "config.json"
    original = unet_config.read_text()
    unet_config.write_text(json.dumps({**json.loads(original), "block_out_channels": [24, 48]}))
    with pytest.raises(UserError, match="not one of perceptual-diffusion's presets"):
        read_diffusers(folder)
    unet_config.write_text(original)
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    scheduler_config.write_text(json.dumps({**json.loads(scheduler_config.read_text()), "beta_schedule": "sigmoid"}))
    with pytest.raises(UserError, match="beta_schedule 'sigmoid'"):
        read_diffusers(folder)


def test_export_refuses_to_overwrite_and_replaces_atomically_with_force(exported, monkeypatch) -> None:
    model, config, folder = exported()
    weights = folder.parent / "paper-0.safetensors"
    before = (folder / "scheduler" / "scheduler_config.json").read_text()
    with pytest.raises(UserError, match="--force"):
        export_diffusers(weights, folder)
    assert (folder / "scheduler" / "scheduler_config.json").read_text() == before

    def fail(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(DDIMPipeline, "save_pretrained", fail)
    with pytest.raises(UserError, match="No space left"):
        export_diffusers(weights, folder, force=True)
    assert (folder / "scheduler" / "scheduler_config.json").read_text() == before, "a failed export kept the old"
    monkeypatch.undo()

    export_diffusers(weights, folder, replace(config.sample, spacing="linspace"), force=True)
    assert DDIMScheduler.from_pretrained(folder, subfolder="scheduler").config.timestep_spacing == "linspace"
    empty = folder.parent / "empty"
    empty.mkdir()
    export_diffusers(weights, empty)  # an empty folder is not "existing output"
    assert not list(folder.parent.glob(f".*{ckpt.TMP_SUFFIX}")), "temporary folders left behind"


@pytest.mark.slow
def test_cli_export_then_train_from_the_folder_as_init_and_teacher(trained_mse_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    assert main(["export", str(trained_mse_run), "--out", str(out)]) == 0
    assert main(["export", str(trained_mse_run), "--out", str(out)]) == 2, "refuses to overwrite without --force"
    run_dir = tmp_path / "finetune"
    # A learning rate of ~0 keeps the weights at their initial values, which shows where they were loaded from.
    options = ["--loss", "self-perceptual", "--teacher", str(out), "--init-from", str(out), "--lr", "1e-12"]
    assert main(["train", "--run-dir", str(run_dir), *CLI_TINY, "--steps", "1", *options]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["init_from"] == saved["loss"]["teacher"] == str(out.resolve())
    assert saved["loss"]["teacher_sha256"] == ckpt.sha256_file(out)
    trained, _, _ = loading.read_weights(run_dir)
    source, _, _ = loading.read_weights(trained_mse_run)
    for key, value in source.items():
        torch.testing.assert_close(trained[key], value, atol=1e-6, rtol=0)


def test_an_export_never_replaces_or_enters_the_folder_it_reads(exported, capsys) -> None:
    """Data loss: exporting an exported folder onto itself, its parent or into it is refused, --force or not."""
    _, _, folder = exported()
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    for out in (folder, folder.parent, folder / "unet"):
        for force in ([], ["--force"]):
            capsys.readouterr()
            assert main(["export", str(folder), "--out", str(out), *force]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "which this export reads" in err, err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_latent_export_never_replaces_its_run_or_the_pretrained_folder(tmp_path: Path) -> None:
    """The latent export reads the run and the pretrained folder (its VAE and text encoder): neither may be replaced."""
    from perceptual_diffusion.config import CaptionDataConfig, LatentModelConfig, LatentRunConfig
    from perceptual_diffusion.models.latent import export_latent, read_unet_weights
    from perceptual_diffusion.testing import make_tiny_pipeline

    pretrained = make_tiny_pipeline(tmp_path / "sd")
    run = tmp_path / "run"
    config = LatentRunConfig(
        model=LatentModelConfig(pretrained=str(pretrained), resolution=16), data=CaptionDataConfig(path="unused")
    )
    state, _ = read_unet_weights(pretrained)
    ckpt.save_weights(run / ckpt.WEIGHTS_NAME, state, config, 0)
    (run / ckpt.CONFIG_NAME).write_text(config.to_json())
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out in (run, tmp_path, run / "export", pretrained, pretrained / "vae"):
        with pytest.raises(UserError, match="which this export reads"):
            export_latent(run, out, force=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    export_latent(run, tmp_path / "pipe")  # elsewhere it works
    assert (tmp_path / "pipe" / "model_index.json").is_file()


def test_from_pretrained_prints_no_advice_to_install_accelerate(exported, capfd) -> None:
    """diffusers asks for accelerate on every from_pretrained without it: it is a dependency, so output stays clean."""
    _, _, folder = exported()
    capfd.readouterr()
    DDIMPipeline.from_pretrained(folder)
    UNet2DModel.from_pretrained(folder, subfolder="unet")
    captured = capfd.readouterr()
    assert "accelerate" not in captured.out + captured.err
