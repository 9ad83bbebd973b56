"""The latent text-to-image path on tiny, randomly initialised components built here (no download).

Contracts (the feature tap, the empty prompt, a frozen teacher), maths against diffusers (our DDIM + CFG + guidance
rescale vs ``StableDiffusionPipeline``), and end to end: both stages, a resume, the latent cache, export and import.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from perceptual_diffusion import testing
from perceptual_diffusion.config import (
    CaptionDataConfig,
    LatentModelConfig,
    LatentRunConfig,
    LossConfig,
    SampleConfig,
    TrainConfig,
)
from perceptual_diffusion.core.losses import SelfPerceptualLoss, self_perceptual_loss
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import latent, loading
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import latent as latent_training


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.make_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.write_shapes_captions(tmp_path_factory.mktemp("data") / "shapes", every=40)  # 40 images


@pytest.fixture(scope="module")
def parts(tiny_sd: Path) -> latent.FrozenParts:
    return latent.load_frozen_parts(tiny_sd)


def perturbed_model(tiny_sd: Path, parts: latent.FrozenParts, seed: int = 0) -> latent.TextConditionedUNet:
    """The tiny U-Net with every weight perturbed: diffusers zero-initialises output layers, which would make
    comparisons trivially pass."""
    config = LatentRunConfig(model=LatentModelConfig(str(tiny_sd), 16), data=CaptionDataConfig(path="unused"))
    model = latent.build_model(config, parts.encode_text([""]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def run_config(tiny_sd: Path, captions: Path, tmp: Path, **train: object) -> LatentRunConfig:
    tc = {"steps": 4, "batch_size": 8, "log_every": 1, "sample_every": 4, "checkpoint_every": 2, "device": "cpu"}
    tc |= {"progress": False, "warmup_images": 0, "lr": 1e-3} | train
    return LatentRunConfig(
        model=LatentModelConfig(str(tiny_sd), 16),
        data=CaptionDataConfig(path=str(captions), cache_dir=str(tmp / "cache")),
        train=TrainConfig(**tc),
        sample=SampleConfig(steps=2, clip_x0=False),
    )


# ---------------------------------------------------------------------------------------------------------------
# Contracts.


def test_feature_taps_match_hooks_on_a_full_forward(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    model = perturbed_model(tiny_sd, parts)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 500, 999])
    cond = parts.encode_text(["a red disc", "a blue cross", ""])
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.unet.mid_block.register_forward_hook(lambda m, i, o: seen.__setitem__("mid", o))]
    for k, block in enumerate(model.unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"down{k}", o[0])))
    with torch.no_grad():
        model(x, t, cond)
        taps = model.features(x, t, cond, model.taps)
    for h in hooks:
        h.remove()
    assert model.taps == ("down0", "down1", "mid")
    for name in model.taps:
        torch.testing.assert_close(taps[name], seen[name], rtol=0, atol=1e-6)
    assert not torch.allclose(taps["mid"], model.features(x, t, parts.encode_text(["x"] * 3))["mid"])  # uses text


def test_empty_prompt_is_the_unconditional_input_and_not_a_weight(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    model = perturbed_model(tiny_sd, parts)
    assert "null_embedding" not in model.state_dict()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, None), model(x, t, parts.encode_text(["", ""])))
    assert frozen_copy(model).null_embedding.equal(model.null_embedding)


def test_self_perceptual_gradients_reach_the_online_model_only(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    online = perturbed_model(tiny_sd, parts, seed=1).train()
    teacher = frozen_copy(perturbed_model(tiny_sd, parts, seed=2))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x0, cond = torch.randn(2, 4, 8, 8), parts.encode_text(["a red disc", "a green square"])
    loss = self_perceptual_loss(online, teacher, x0, cond, torch.tensor([100, 700]), torch.randn(2, 4, 8, 8),
                                torch.tensor([300, 50]))  # fmt: skip
    loss.mean().backward()
    assert loss.shape == (2,) and bool((loss > 0).all())
    assert all(p.grad is None for p in teacher.parameters())
    assert sum(float(p.grad.abs().sum()) for p in online.parameters() if p.grad is not None) > 0
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="t"), teacher)  # accepted: frozen, has "mid"


def test_samples_come_at_the_trained_resolution(tiny_sd: Path, parts: latent.FrozenParts) -> None:
    config = LatentRunConfig(model=LatentModelConfig(str(tiny_sd), 32), data=CaptionDataConfig(path="unused"))
    model = latent.build_model(config, parts.encode_text([""]))
    assert model.unet.config.sample_size == 16  # the folder's default is 8 latents (16 px)
    images = latent.sample_latent(model, parts, ["a red disc"], [0], SampleConfig(steps=1, clip_x0=False))
    assert images.shape == (1, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------------
# Maths against diffusers' Stable Diffusion pipeline.


# Step counts that divide T: for others, diffusers' DDIMScheduler steps from t to t - T // steps instead of to the
# next timestep of its own trailing list (999 -> 666 -> 333, then evaluates at 332); ours steps to the listed one.
@pytest.mark.parametrize(("cfg", "rescale", "steps"), [(1.0, 0.0, 4), (3.0, 0.7, 5), (7.5, 0.0, 10)])
def test_sampler_matches_stable_diffusion_pipeline(
    tiny_sd: Path, parts: latent.FrozenParts, cfg: float, rescale: float, steps: int
) -> None:
    from diffusers import DDIMScheduler

    model = perturbed_model(tiny_sd, parts)
    prompts, seeds = ["a red disc", "a yellow cross"], [5, 11]
    config = SampleConfig(steps=steps, cfg_scale=cfg, guidance_rescale=rescale, clip_x0=False)
    ours = latent.sample_latent(model, parts, prompts, seeds, config, decode=False)

    scheduler = DDIMScheduler.from_pretrained(str(tiny_sd), subfolder="scheduler")
    pipe = latent.sd_pipeline(
        vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=model.unet, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=parts.encode_text(prompts),
            negative_prompt_embeds=parts.encode_text(["", ""]),
            latents=noise,
            num_inference_steps=steps,
            guidance_scale=cfg,
            guidance_rescale=rescale,
            height=16,
            width=16,
            output_type="latent",
        ).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a trivial agreement on zeros

    images = latent.sample_latent(model, parts, prompts, seeds, config)
    torch.testing.assert_close(images, parts.decode(theirs), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# End to end: both stages, resume, the cache, export and import.


def test_two_stages_resume_cache_and_export(tiny_sd: Path, captions: Path, tmp_path: Path) -> None:
    mse_cfg = run_config(tiny_sd, captions, tmp_path)
    latent_training.train_latent(mse_cfg, tmp_path / "mse")
    caches = sorted((tmp_path / "cache").glob("latents-*/chunk-*.safetensors"))
    assert len(caches) == 1  # 40 images: one chunk
    stamp = caches[0].stat().st_mtime_ns

    sp_cfg = replace(mse_cfg, loss=LossConfig(kind="self-perceptual", teacher=str(tmp_path / "mse")))
    straight = latent_training.train_latent(sp_cfg, tmp_path / "sp")
    assert straight.step == 4 and caches[0].stat().st_mtime_ns == stamp  # the cache is reused, not rewritten
    log = [json.loads(line) for line in (tmp_path / "sp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["perceptual"] > 0 for r in log)
    saved = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert saved["loss"]["teacher_sha256"] == ckpt.sha256_file(tmp_path / "mse" / "model.safetensors")
    state = ckpt.latest_state(tmp_path / "sp")
    assert all(k.startswith("unet.") for k in state["model"])  # the teacher, VAE and text encoder are not saved

    # Stop after 2 steps, resume to 4: the same weights as the uninterrupted run.
    latent_training.train_latent(replace(sp_cfg, train=replace(sp_cfg.train, steps=2)), tmp_path / "sp2")
    latent_training.train_latent(sp_cfg, tmp_path / "sp2")
    a, _, _ = loading.read_weights(tmp_path / "sp", kind="latent")
    b, _, _ = loading.read_weights(tmp_path / "sp2", kind="latent")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first, _, _ = loading.read_weights(tmp_path / "mse", kind="latent")
    assert any(not torch.equal(a[k], first[k]) for k in a)  # fine-tuning moved the weights

    # Export: a StableDiffusionPipeline folder whose U-Net holds the EMA weights; usable as --init-from again.
    out = latent.export_latent(tmp_path / "sp", tmp_path / "export")
    exported, _ = latent.read_unet_weights(out)
    assert all(torch.equal(exported[k], a[k]) for k in a)
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["prediction_type"], scheduler["timestep_spacing"]) == ("v_prediction", "trailing")
    assert scheduler["rescale_betas_zero_snr"] is True
    cont = replace(mse_cfg, train=replace(mse_cfg.train, steps=1, init_from=str(out)))
    assert latent_training.train_latent(cont, tmp_path / "from-export").step == 1


def test_cached_and_on_the_fly_latents_agree(
    tiny_sd: Path, captions: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(latent_training.LatentCache, "CHUNK", 16)  # 40 images: chunks of 16, 16 and 8
    config = run_config(tiny_sd, captions, tmp_path)
    task = latent_training.LatentTask(config)
    task.load()
    cached = task.source(torch.device("cpu"))
    task_fly = latent_training.LatentTask(
        replace(config, data=replace(config.data, cache_latents=False, cache_dir=None))
    )
    task_fly.load()
    fly = task_fly.source(torch.device("cpu"))
    assert fly.latents is None and cached.latents is not None
    idx, ids = torch.tensor([3, 0, 17]), torch.tensor([3, -1, 17])
    x_a, c_a = cached.micro_batch(idx, ids)
    x_b, c_b = fly.micro_batch(idx, ids)
    torch.testing.assert_close(x_a, x_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(c_a, c_b)
    torch.testing.assert_close(c_a[1], task.parts(torch.device("cpu")).encode_text([""])[0])  # -1: empty prompt

    # A lost chunk and a damaged one are encoded again; the intact one is not rewritten.
    chunks = sorted(cached.latents.folder.glob("chunk-*.safetensors"))
    assert [c.name for c in chunks] == [f"chunk-00000{i}.safetensors" for i in range(3)]
    stamp = chunks[1].stat().st_mtime_ns
    chunks[0].unlink()
    chunks[2].write_bytes(b"not safetensors")
    again = latent_training.LatentTask(config)
    again.load()
    rebuilt = again.source(torch.device("cpu"))
    assert chunks[1].stat().st_mtime_ns == stamp and rebuilt.latents.missing_chunks() == []
    every = torch.arange(40)
    torch.testing.assert_close(rebuilt.latents[every], fly.micro_batch(every, every)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Bad input.


def test_bad_input_is_one_clear_line(tiny_sd: Path, captions: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "unet").mkdir()
    with pytest.raises(UserError, match="has no vae/, text_encoder/, tokenizer/"):
        latent.check_pretrained(broken)
    config = run_config(tiny_sd, captions, tmp_path)
    bad_res = replace(config, model=replace(config.model, resolution=10))
    with pytest.raises(UserError, match="does not fit .* multiple of 4"):
        latent_training.LatentTask(bad_res).load()
    with pytest.raises(UserError, match="clipping x0"):
        replace(config, sample=SampleConfig(clip_x0=True))


def test_weights_of_the_other_family_are_refused(
    trained_mse_run: Path, tiny_sd: Path, captions: Path, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="holds a pixel-space model"):
        loading.read_weights(trained_mse_run, kind="latent")
    config = run_config(tiny_sd, captions, tmp_path, steps=1)
    latent_training.train_latent(config, tmp_path / "lat")
    with pytest.raises(UserError, match="holds a latent text-to-image model"):
        loading.read_weights(tmp_path / "lat")
    sp = replace(config, loss=LossConfig(kind="self-perceptual", teacher=str(trained_mse_run)))
    with pytest.raises(UserError, match="holds a pixel-space model"):
        latent_training.train_latent(sp, tmp_path / "sp")
    # The same for diffusers folders: a Stable Diffusion export in a pixel command, a pixel export in a latent one.
    from perceptual_diffusion.models.export import export_diffusers

    with pytest.raises(UserError, match="latent text-to-image .* use it with the `latent` commands"):
        loading.read_weights(latent.export_latent(tmp_path / "lat", tmp_path / "lat-export"))
    with pytest.raises(UserError, match="is a UNet2DModel, not a text-conditioned"):
        latent.read_unet_weights(export_diffusers(trained_mse_run, tmp_path / "px-export"))
    # load_model(kind=...), what the commands call: the same refusals, before any weights are read.
    with pytest.raises(UserError, match="holds a pixel-space model; use it with the pixel commands"):
        loading.load_model(trained_mse_run, kind="latent")
    with pytest.raises(UserError, match="holds a latent text-to-image model; use it with the `latent` commands"):
        loading.load_model(tmp_path / "lat", kind="pixel")
    with pytest.raises(UserError, match="is a diffusers folder, which loads as a pixel model"):
        loading.load_model(tmp_path / "px-export", kind="latent")
