"""The SD3-style latent model (models/sd3.py) on tiny random StableDiffusion3Pipeline folders made here, without T5
and with a tiny random T5 (``testing.make_tiny_sd3_pipeline(t5=True)``).

Contracts (prompt embeddings as the pipeline builds them, the empty prompt, taps against hooks and the later blocks
never run, the VAE's shift and scale), the sampler against diffusers' ``StableDiffusion3Pipeline``, and end to end:
MSE and self-perceptual runs with their cache and a bit-identical resume, export loaded by diffusers, a LoRA run whose
adapter ``load_lora_weights`` reads, and bad input as one error line. With T5: the prompt embeddings (empty, longer
than CLIP's and than T5's 256 tokens) and the sampler against the pipeline, a run that resumes, and its export loaded
by a plain ``from_pretrained``. ``--no-t5`` on the T5 folder: the pipeline's ``text_encoder_3=None`` embeddings, T5
never loaded, a run that resumes, samples and exports without T5, the shared latent cache, bad input.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceptual_diffusion import cli, testing
from perceptual_diffusion.config import (
    CaptionDataConfig,
    LatentModelConfig,
    LatentRunConfig,
    LossConfig,
    SampleConfig,
    ScheduleConfig,
    TrainConfig,
)
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.data.caption_formats import load_captions
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import latent, loading, lora, sd3
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import latent as latent_training

PROMPTS = ["a red disc", "a yellow cross"]


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def tiny_sd3_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.make_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3-t5") / "tiny-sd3-t5", t5=True)


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return testing.write_shapes_captions(tmp_path_factory.mktemp("data") / "shapes", every=80)  # 20 images


@pytest.fixture(scope="module")
def parts(tiny_sd3: Path) -> sd3.SD3Parts:
    return latent.load_frozen_parts(tiny_sd3)


def flow(folder: Path) -> ScheduleConfig:
    return latent.native_schedule(folder, ScheduleConfig(family="flow"))


def perturbed_model(tiny_sd3: Path, parts: sd3.SD3Parts, seed: int = 0) -> sd3.TextConditionedSD3:
    """The tiny transformer with every weight perturbed: diffusers zero-initialises its adaLN-Zero gates and output
    layer, which would make comparisons trivially pass."""
    config = LatentRunConfig(
        schedule=flow(tiny_sd3), model=LatentModelConfig(str(tiny_sd3), 16), data=CaptionDataConfig(path="unused")
    )
    model = latent.build_model(config, parts.encode_text([""]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def sd3_pipeline(folder: Path, transformer: torch.nn.Module | None = None, t5: bool = False):
    """The folder's StableDiffusion3Pipeline: ``t5`` a plain ``from_pretrained(folder)``, else with the T5 parts None
    (as a folder without T5 needs)."""
    from diffusers import StableDiffusion3Pipeline

    none = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    with latent.quiet_libraries():
        pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), **none)
    if transformer is not None:
        pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_config(tiny_sd3: Path, captions: Path, tmp: Path, **train: object) -> LatentRunConfig:
    tc = {"steps": 4, "batch_size": 4, "log_every": 1, "sample_every": 4, "checkpoint_every": 2, "device": "cpu"}
    tc |= {"progress": False, "warmup_images": 0, "lr": 1e-3} | train
    return LatentRunConfig(
        schedule=flow(tiny_sd3),
        model=LatentModelConfig(str(tiny_sd3), 16),
        data=CaptionDataConfig(path=str(captions), cache_dir=str(tmp / "cache")),
        train=TrainConfig(**tc),
        sample=SampleConfig(steps=2, clip_x0=False),
    )


# ---------------------------------------------------------------------------------------------------------------
# Contracts.


def test_folder_is_an_sd3_pipeline_without_t5_and_its_scheduler_gives_the_shift(tiny_sd3: Path) -> None:
    index = json.loads((tiny_sd3 / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert latent.latent_architecture(tiny_sd3).name == "sd3" and not sd3.has_t5(tiny_sd3)
    assert flow(tiny_sd3).shift == 3.0  # the folder's FlowMatchEulerDiscreteScheduler
    assert latent.native_schedule(tiny_sd3, ScheduleConfig(family="flow", shift=2.0), {"shift"}).shift == 2.0


def test_prompt_embeddings_are_the_pipelines(tiny_sd3: Path, parts: sd3.SD3Parts) -> None:
    pipe = sd3_pipeline(tiny_sd3)
    with torch.no_grad():
        pe, ne, pp, npp = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    ours, pooled = parts.embeddings(parts.tokenize(PROMPTS))
    null, null_pooled = parts.embeddings(parts.tokenize(["", ""]))
    assert ours.shape == (2, 32 + sd3.T5_LENGTH, 96) and pooled.shape == (2, 64)  # CLIPs padded 80 -> 96
    for a, b in ((ours, pe), (pooled, pp), (null, ne), (null_pooled, npp)):
        assert torch.equal(a, b)
    packed = parts.encode_text(PROMPTS)
    back = sd3.unpack_condition(packed, 96, 64)
    assert torch.equal(back[0], ours) and torch.equal(back[1], pooled)


def test_empty_prompt_is_the_unconditional_input_and_not_a_weight(tiny_sd3: Path, parts: sd3.SD3Parts) -> None:
    model = perturbed_model(tiny_sd3, parts)
    assert "null_embedding" not in model.state_dict()
    assert all(k.startswith("transformer.") for k in model.state_dict())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, None), model(x, t, parts.encode_text(["", ""])))
        assert not torch.allclose(model(x, t, None), model(x, t, parts.encode_text(PROMPTS)))
    assert frozen_copy(model).null_embedding.equal(model.null_embedding)


def test_taps_match_hooks_on_a_full_forward_and_later_blocks_never_run(tiny_sd3: Path, parts: sd3.SD3Parts) -> None:
    model = perturbed_model(tiny_sd3, parts)
    assert model.taps == ("block1", "block2", "block3", "block4") and model.default_tap == "block2"
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, cond = torch.tensor([100.0, 700.0]), parts.encode_text(PROMPTS)
    blocks = model.transformer.transformer_blocks
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        b.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(f"block{k}", o[1]))
        for k, b in enumerate(blocks, 1)
    ]
    with torch.no_grad():
        model(x, t, cond)
        taps = model.features(x, t, cond, model.taps)
    for h in hooks:
        h.remove()
    for name in model.taps:
        torch.testing.assert_close(taps[name], seen[name], rtol=0, atol=1e-6)

    def refuse(*_: object) -> None:
        raise AssertionError("a block after the deepest tap ran")

    tr = model.transformer
    later = [h.register_forward_pre_hook(refuse) for h in (*blocks[2:], tr.norm_out, tr.proj_out)]
    with torch.no_grad():
        default = model.features(x, t, cond)
    for h in later:
        h.remove()
    assert set(default) == {"block2"} and torch.equal(default["block2"], taps["block2"])


def test_latents_are_shifted_and_scaled_and_decode_back(parts: sd3.SD3Parts) -> None:
    vae = parts.vae
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = parts.encode_images(images)
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        expected_images = vae.decode(z / testing.SD3_VAE_SCALING + testing.SD3_VAE_SHIFT).sample.clamp(-1, 1)
    torch.testing.assert_close(z, (mean - testing.SD3_VAE_SHIFT) * testing.SD3_VAE_SCALING)
    torch.testing.assert_close(z / testing.SD3_VAE_SCALING + testing.SD3_VAE_SHIFT, mean)  # the round trip
    torch.testing.assert_close(parts.decode(z), expected_images)


# ---------------------------------------------------------------------------------------------------------------
# The sampler against diffusers' StableDiffusion3Pipeline (which has no guidance rescale: compared at rescale 0).


@pytest.mark.parametrize(("cfg", "steps"), [(1.0, 3), (4.0, 5)])
def test_sampler_matches_stable_diffusion3_pipeline(
    tiny_sd3: Path, parts: sd3.SD3Parts, cfg: float, steps: int
) -> None:
    model = perturbed_model(tiny_sd3, parts)
    seeds = [5, 11]
    config = SampleConfig(steps=steps, cfg_scale=cfg, clip_x0=False)
    ours = latent.sample_latent(model, parts, PROMPTS, seeds, config, decode=False)
    pipe = sd3_pipeline(tiny_sd3, model.transformer)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    prompt, pooled = parts.embeddings(parts.tokenize(PROMPTS))
    null, null_pooled = parts.embeddings(parts.tokenize(["", ""]))
    kwargs = dict(
        prompt_embeds=prompt,
        pooled_prompt_embeds=pooled,
        negative_prompt_embeds=null,
        negative_pooled_prompt_embeds=null_pooled,
        latents=noise,
        num_inference_steps=steps,
        guidance_scale=cfg,
        height=16,
        width=16,
    )
    with torch.no_grad():
        theirs = pipe(**kwargs, output_type="latent").images
        theirs_images = pipe(**kwargs, output_type="pt").images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1  # not a trivial agreement on zeros
    images = latent.sample_latent(model, parts, PROMPTS, seeds, config)
    torch.testing.assert_close((images + 1) / 2, theirs_images, rtol=0, atol=1e-4)  # the pipeline's [0, 1]


# ---------------------------------------------------------------------------------------------------------------
# End to end: both stages, the cache, resume, export; LoRA.


def test_two_stages_cache_resume_and_export_load_in_diffusers(tiny_sd3: Path, captions: Path, tmp_path: Path) -> None:
    mse_cfg = run_config(tiny_sd3, captions, tmp_path)
    latent_training.train_latent(mse_cfg, tmp_path / "mse")
    (chunk,) = (tmp_path / "cache").glob("latents-*/chunk-*.safetensors")

    data = load_captions(str(captions), "auto", "skip")
    cached = load_file(str(chunk))["latents"]
    expected = latent.load_frozen_parts(tiny_sd3).encode_images(data.load_images([0, 1], 16))  # shifted and scaled
    torch.testing.assert_close(cached[:2], expected, rtol=0, atol=1e-5)

    sp_cfg = replace(mse_cfg, loss=LossConfig(kind="self-perceptual", teacher=str(tmp_path / "mse")))
    assert latent_training.train_latent(sp_cfg, tmp_path / "sp").step == 4
    log = [json.loads(line) for line in (tmp_path / "sp" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["perceptual"] > 0 for r in log)
    assert all(k.startswith("transformer.") for k in ckpt.latest_state(tmp_path / "sp")["model"])
    # Stop after 2 steps, resume to 4: the same weights as the uninterrupted run.
    latent_training.train_latent(replace(sp_cfg, train=replace(sp_cfg.train, steps=2)), tmp_path / "sp2")
    latent_training.train_latent(sp_cfg, tmp_path / "sp2")
    a, _, _ = loading.read_weights(tmp_path / "sp", kind="latent")
    b, _, _ = loading.read_weights(tmp_path / "sp2", kind="latent")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = latent.export_latent(tmp_path / "sp", tmp_path / "export")
    exported, _ = latent.read_unet_weights(out)
    assert all(torch.equal(exported[k], a[k]) for k in a)
    pipe = sd3_pipeline(out)  # text_encoder_3=None, tokenizer_3=None: the folder has no T5
    assert pipe.scheduler.config.shift == 3.0
    model, parts, config, _ = latent.load_latent_model(tmp_path / "sp")
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                      latents=torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s))
                                           for s in (0, 1)])).images  # fmt: skip
    ours = latent.sample_latent(model, parts, PROMPTS, [0, 1], config.sample, decode=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)  # the pipeline's own prompt encoding, too
    assert "text_encoder_3=None" in latent.export_load_hint(out)


def test_lora_run_shares_its_teacher_and_exports_for_load_lora_weights(
    tiny_sd3: Path, captions: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    common = ["--pretrained", str(tiny_sd3), "--schedule", "flow", "--data-path", str(captions)]
    common += ["--cache-dir", str(tmp_path / "cache"), "--resolution", "16", "--batch-size", "4", "--steps", "2"]
    common += ["--sample-every", "2", "--sample-steps", "2", "--device", "cpu", "--no-progress", "--warmup-images", "0"]
    options = ["--lora-rank", "2", "--lora-alpha", "6", "--loss", "self-perceptual", "--teacher", str(tiny_sd3)]
    # `latent cache` reads the folder's kind (an SD3 folder is a flow model) and fills the cache training reads.
    cache = ["latent", "cache", "--pretrained", str(tiny_sd3), "--data-path", str(captions), "--resolution", "16"]
    assert cli.main([*cache, "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]) == 0
    (chunk,) = (tmp_path / "cache").glob("latents-*/chunk-*.safetensors")
    stamp = chunk.stat().st_mtime_ns
    assert cli.main(["latent", "train", "--run-dir", str(run), *common, *options, "--feature-blocks", "1,3"]) == 0
    assert chunk.stat().st_mtime_ns == stamp  # the cache was complete: not rewritten
    config = json.loads((run / "config.json").read_text())
    assert config["lora"]["targets"] == list(lora.SD3_ATTENTION) and config["schedule"]["shift"] == 3.0
    assert config["lora"]["base_sha256"] == config["loss"]["teacher_sha256"]  # the teacher is the base: shared
    state, run_config, step = ckpt.read_weights(run / ckpt.WEIGHTS_NAME, kind="latent")
    assert state and all(lora.is_adapter_key(k) for k in state)
    gen = torch.Generator().manual_seed(0)  # an adapter far from B = 0, so that a wrong scale or key would show
    ckpt.save_weights(run / ckpt.WEIGHTS_NAME, {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()},
                      run_config, step)  # fmt: skip
    assert cli.main(["latent", "export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    ours, parts, _, _ = latent.load_latent_model(run)
    pipe = sd3_pipeline(tiny_sd3)
    base = copy.deepcopy(pipe.transformer)
    with latent.quiet_libraries():
        pipe.load_lora_weights(str(tmp_path / "adapter"))
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([50.0, 800.0]), parts.encode_text(PROMPTS)
    prompt, pooled = sd3.unpack_condition(cond, 96, 64)
    with torch.no_grad():
        expected = ours(x, t, cond)
        got = pipe.transformer(x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t).sample
        before = base(x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t).sample
    assert not torch.allclose(before, expected, atol=1e-3) and torch.allclose(got, expected, atol=1e-5)
    # Merged through PEFT: a StableDiffusion3Pipeline folder whose transformer is the same network.
    assert cli.main(["latent", "export", str(run), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged = sd3_pipeline(tmp_path / "merged")
    with torch.no_grad():
        got = merged.transformer(x, encoder_hidden_states=prompt, pooled_projections=pooled, timestep=t).sample
    assert torch.allclose(got, expected, atol=1e-5)
    # `latent sample` reads the architecture from the run (here: the SD3 base with the adapter on top).
    grid = tmp_path / "grid.png"
    assert cli.main(["latent", "sample", str(run), "--prompt", "a red disc", "-n", "2", "--steps", "2",
                     "--cfg-scale", "2", "--out", str(grid), "--device", "cpu"]) == 0  # fmt: skip
    assert grid.is_file()


def test_latent_tiny_kind_sd3_prints_the_next_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["latent", "tiny", "--kind", "sd3", "--out", str(tmp_path / "sd3")]) == 0
    assert "--schedule flow" in capsys.readouterr().out
    assert all((tmp_path / "sd3" / part).is_dir() for part in sd3.CLIP_PARTS)
    assert cli.main(["latent", "tiny", "--kind", "sd3", "--with-t5", "--out", str(tmp_path / "t5")]) == 0
    assert "with a tiny random T5" in capsys.readouterr().out and sd3.has_t5(tmp_path / "t5")
    assert cli.main(["latent", "tiny", "--with-t5", "--out", str(tmp_path / "sd")]) == 2  # T5 is SD3's
    assert "--kind sd3" in capsys.readouterr().err and not (tmp_path / "sd").exists()


# ---------------------------------------------------------------------------------------------------------------
# With T5: a tiny random T5EncoderModel (width 96, the joint width) and a character-level T5 tokenizer.

# The empty prompt; one longer than CLIP's 32 tokens (truncated there, whole in T5); one beyond T5's 256 tokens.
T5_PROMPTS = ["a red disc", "", "a yellow cross above a blue square on grey", "a green triangle, " * 16]


def test_t5_folder_loads_plainly_and_prompt_embeddings_are_the_pipelines(
    tiny_sd3: Path, tiny_sd3_t5: Path, parts: sd3.SD3Parts
) -> None:
    index = json.loads((tiny_sd3_t5 / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and index["tokenizer_3"][0] == "transformers"
    assert sd3.has_t5(tiny_sd3_t5) and "text_encoder_3=None" not in latent.export_load_hint(tiny_sd3_t5)
    t5_parts = latent.load_frozen_parts(tiny_sd3_t5)
    assert t5_parts.t5 is not None and t5_parts.t5.config.d_model == 96
    pipe = sd3_pipeline(tiny_sd3_t5, t5=True)  # no None arguments
    assert type(pipe.text_encoder_3).__name__ == "T5EncoderModel"
    with torch.no_grad(), latent.quiet_libraries():  # the pipeline warns of the truncated prompts
        pe, ne, pp, npp = pipe.encode_prompt(T5_PROMPTS, None, None, do_classifier_free_guidance=True)
    ids = t5_parts.tokenize(T5_PROMPTS)
    assert ids.shape == (4, 2 * 32 + sd3.T5_LENGTH)
    assert (ids[2, 64:] != 0).sum() > 32 and (ids[3, 64:] != 0).all()  # longer than CLIP's; truncated at 256
    ours, pooled = t5_parts.embeddings(ids)
    null, null_pooled = t5_parts.embeddings(t5_parts.tokenize([""] * 4))
    assert ours.shape == (4, 32 + sd3.T5_LENGTH, 96) and pooled.shape == (4, 64)
    for a, b in ((ours, pe), (pooled, pp), (null, ne), (null_pooled, npp)):
        assert torch.equal(a, b)
    assert torch.equal(ours[1], null[0])
    # T5 takes part: its 256 tokens are not zeros and tell prompts apart; the CLIP part is the folder without T5's.
    assert ours[:, 32:].abs().amin() > 0 and not torch.allclose(ours[0, 32:], ours[2, 32:])
    plain, plain_pooled = parts.embeddings(parts.tokenize(T5_PROMPTS))
    assert torch.equal(ours[:, :32], plain[:, :32]) and torch.equal(pooled, plain_pooled)
    assert not plain[:, 32:].any()


def test_t5_sampler_matches_stable_diffusion3_pipeline_on_its_own_prompt_encoding(tiny_sd3_t5: Path) -> None:
    t5_parts = latent.load_frozen_parts(tiny_sd3_t5)
    model = perturbed_model(tiny_sd3_t5, t5_parts)
    seeds, prompts = [5, 11], T5_PROMPTS[2:]
    config = SampleConfig(steps=3, cfg_scale=4.0, clip_x0=False)
    ours = latent.sample_latent(model, t5_parts, prompts, seeds, config, decode=False)
    pipe = sd3_pipeline(tiny_sd3_t5, model.transformer, t5=True)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in seeds])
    with torch.no_grad(), latent.quiet_libraries():
        theirs = pipe(prompts, latents=noise, num_inference_steps=3, guidance_scale=4.0, height=16, width=16,
                      output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
    assert ours.abs().max() > 0.1
    # Without T5 (its tokens zeros) the same transformer samples something else: T5 reaches the samples.
    no_t5 = replace(t5_parts, t5=None, t5_tokenizer=None)
    other = latent.sample_latent(model, no_t5, prompts, seeds, config, decode=False)
    assert not torch.allclose(ours, other, atol=1e-3)


def test_t5_run_resumes_and_its_export_loads_plainly_and_samples(
    tiny_sd3_t5: Path, captions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = run_config(tiny_sd3_t5, captions, tmp_path, steps=2, checkpoint_every=1, sample_every=2)
    config = replace(config, loss=LossConfig(kind="self-perceptual", teacher=str(tiny_sd3_t5)))
    assert latent_training.train_latent(config, tmp_path / "a").step == 2
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(r["perceptual"] > 0 for r in log)
    latent_training.train_latent(replace(config, train=replace(config.train, steps=1)), tmp_path / "b")
    assert latent_training.train_latent(config, tmp_path / "b").step == 2  # resumed from step 1
    a, _, _ = loading.read_weights(tmp_path / "a", kind="latent")
    b, _, _ = loading.read_weights(tmp_path / "b", kind="latent")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    grid = tmp_path / "grid.png"
    assert cli.main(["latent", "sample", str(tmp_path / "a"), "--prompt", T5_PROMPTS[2], "-n", "1", "--steps", "2",
                     "--out", str(grid), "--device", "cpu"]) == 0  # fmt: skip
    assert grid.is_file()
    assert cli.main(["latent", "export", str(tmp_path / "a"), "--out", str(tmp_path / "export")]) == 0
    assert "text_encoder_3=None" not in capsys.readouterr().out
    out = tmp_path / "export"
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and sd3.has_t5(out)
    pipe = sd3_pipeline(out, t5=True)  # plain from_pretrained(folder)
    model, parts, run, _ = latent.load_latent_model(tmp_path / "a")
    assert parts.t5 is not None
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="latent", latents=noise).images
    sample = replace(run.sample, cfg_scale=2.0)
    ours = latent.sample_latent(model, parts, PROMPTS, [0, 1], sample, decode=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_t5_of_another_width_is_one_error_line(
    tiny_sd3_t5: Path, captions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "wide-t5"
    shutil.copytree(tiny_sd3_t5, folder)
    t5_config = folder / "text_encoder_3" / "config.json"
    t5_config.write_text(json.dumps(json.loads(t5_config.read_text()) | {"d_model": 128}))
    args = ["latent", "train", "--pretrained", str(folder), "--data-path", str(captions), "--device", "cpu"]
    assert cli.main([*args, "--schedule", "flow", "--resolution", "16", "--run-dir", str(tmp_path / "run")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "128 wide" in err[0] and "must match" in err[0], err
    assert not (tmp_path / "run" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# --no-t5 on a folder with T5: T5 never loaded, its tokens zeros (the pipeline's text_encoder_3=None), recorded.


def _refuse_t5(*_: object, **__: object) -> None:
    raise AssertionError("T5 was loaded")


def test_no_t5_prompt_embeddings_are_the_pipelines_without_t5_and_the_field_is_typed(
    tiny_sd3_t5: Path, captions: Path, parts: sd3.SD3Parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import T5EncoderModel

    monkeypatch.setattr(T5EncoderModel, "from_pretrained", _refuse_t5)
    no_t5 = latent.load_frozen_parts(tiny_sd3_t5, t5=False)
    assert no_t5.t5 is None and no_t5.t5_tokenizer is None
    ids = no_t5.tokenize(T5_PROMPTS)
    assert torch.equal(ids, parts.tokenize(T5_PROMPTS))  # CLIP ids alone
    ours, pooled = no_t5.embeddings(ids)
    plain, plain_pooled = parts.embeddings(ids)  # the folder without T5 (the same CLIPs by construction)
    null, null_pooled = no_t5.embeddings(no_t5.tokenize([""] * 4))
    pipe = sd3_pipeline(tiny_sd3_t5)  # from_pretrained(T5 folder, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    with torch.no_grad(), latent.quiet_libraries():
        pe, ne, pp, npp = pipe.encode_prompt(T5_PROMPTS, None, None, do_classifier_free_guidance=True)
    for a, b in ((ours, plain), (pooled, plain_pooled), (ours, pe), (pooled, pp), (null, ne), (null_pooled, npp)):
        assert torch.equal(a, b)
    assert ours.shape == (4, 32 + sd3.T5_LENGTH, 96) and not ours[:, 32:].any()
    # A typed field of the run config; a config written before it reads as T5 on (what those runs did).
    data = run_config(tiny_sd3_t5, captions, tmp_path).to_dict()
    assert data["model"]["t5"] is True
    del data["model"]["t5"]
    assert LatentRunConfig.from_dict(data).model.t5 is True
    with pytest.raises(UserError, match="--no-t5"):
        LatentRunConfig.from_dict(data | {"model": data["model"] | {"t5": "no"}})


def test_no_t5_run_trains_resumes_samples_and_exports_without_t5(
    tiny_sd3_t5: Path,
    captions: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import T5EncoderModel

    cache = tmp_path / "cache"
    common = ["--pretrained", str(tiny_sd3_t5), "--data-path", str(captions), "--resolution", "16"]
    common += ["--cache-dir", str(cache), "--device", "cpu"]
    # The cache holds the VAE's latents alone: one made with T5 loaded is the one a --no-t5 run reads, unchanged.
    assert cli.main(["latent", "cache", *common]) == 0
    (chunk,) = cache.glob("latents-*/chunk-*.safetensors")
    stamp = chunk.stat().st_mtime_ns
    monkeypatch.setattr(T5EncoderModel, "from_pretrained", _refuse_t5)  # from here on T5 is never loaded
    run = tmp_path / "run"
    train = ["latent", "train", "--run-dir", str(run), *common, "--schedule", "flow", "--batch-size", "4"]
    train += ["--sample-every", "2", "--sample-steps", "2", "--no-progress", "--warmup-images", "0"]
    train += ["--checkpoint-every", "1"]
    assert cli.main([*train, "--no-t5", "--steps", "1"]) == 0
    assert cli.main([*train, "--no-t5", "--steps", "2"]) == 0  # resumed from step 1
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    assert json.loads((run / "config.json").read_text())["model"]["t5"] is False
    assert chunk.stat().st_mtime_ns == stamp and len(list(cache.glob("latents-*"))) == 1
    capsys.readouterr()
    assert cli.main([*train, "--steps", "3"]) == 2  # resuming with T5 is another configuration
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "model.t5" in err[0] and "another configuration" in err[0], err

    grid = tmp_path / "grid.png"
    assert cli.main(["latent", "sample", str(run), "--prompt", "a red disc", "-n", "1", "--steps", "2",
                     "--out", str(grid), "--device", "cpu"]) == 0  # fmt: skip
    assert grid.is_file()
    model, parts, config, _ = latent.load_latent_model(run)
    assert parts.t5 is None and not config.model.t5
    out = tmp_path / "export"
    capsys.readouterr()
    assert cli.main(["latent", "export", str(run), "--out", str(out)]) == 0
    assert "text_encoder_3=None, tokenizer_3=None" in capsys.readouterr().out
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not sd3.has_t5(out) and not (out / "text_encoder_3").exists()
    pipe = sd3_pipeline(out)  # text_encoder_3=None, tokenizer_3=None
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (0, 1)])
    with torch.no_grad():
        theirs = pipe(PROMPTS, num_inference_steps=2, guidance_scale=2.0, output_type="latent", latents=noise).images
    ours = latent.sample_latent(model, parts, PROMPTS, [0, 1], replace(config.sample, cfg_scale=2.0), decode=False)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one error line each.


def test_bad_input_is_one_error_line(
    tiny_sd3: Path, captions: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["latent", "train", "--pretrained", str(tiny_sd3), "--data-path", str(captions), "--device", "cpu"]
    cases = [
        ([], "--schedule flow"),  # the default ddpm on an SD3 folder
        (["--schedule", "flow", "--resolution", "18"], "multiple of 4"),
        (["--schedule", "flow", "--resolution", "16", "--feature-layer", "down0"], "--feature-blocks"),
        (["--schedule", "flow", "--resolution", "16", "--feature-blocks", "5"], "has 4 blocks"),
        (["--schedule", "flow", "--resolution", "256"], "position embedding"),
        (["--schedule", "flow", "--resolution", "16", "--no-t5"], "has no T5"),  # nothing to leave out
    ]
    for i, (extra, needle) in enumerate(cases):
        assert cli.main([*base, "--run-dir", str(tmp_path / f"r{i}"), *extra]) == 2, extra
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], (extra, err)
        assert not (tmp_path / f"r{i}" / "config.json").exists()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(UserError, match="text_encoder_2/"):
        latent.check_pretrained(broken)
    sd = testing.make_tiny_pipeline(tmp_path / "tiny-sd")
    sd_args = [
        "--pretrained",
        str(sd),
        "--data-path",
        str(captions),
        "--resolution",
        "16",
        "--device",
        "cpu",
        "--no-t5",
    ]
    for command in (["train", "--run-dir", str(tmp_path / "sd-run")], ["cache", "--cache-dir", str(tmp_path / "c")]):
        assert cli.main(["latent", *command, *sd_args]) == 2, command
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and "Stable Diffusion folder" in err[0] and "--no-t5" in err[0], (command, err)
    assert not (tmp_path / "sd-run" / "config.json").exists() and not (tmp_path / "c").exists()
    config = replace(
        run_config(sd, captions, tmp_path), schedule=ScheduleConfig(), loss=LossConfig(feature_blocks=(1,))
    )
    with pytest.raises(UserError, match="taps transformer blocks"):
        latent_training.LatentTask(config).load()
