"""LoRA through PEFT (models/lora.py): the config and its checks, injection and the trained state, the shared teacher
against a two-copy reference (arXiv 2401.00110, Sec. 3: the frozen teacher is the base), bit-identical resume, the
base's hash, and the adapters out: a PEFT folder (pixel), diffusers' LoRA file loaded by ``load_lora_weights``
(latent), merged exports and ``--init-from`` an adapter. Tiny sizes throughout.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY, assert_same_run, tiny_config

from perceptual_diffusion import cli, testing
from perceptual_diffusion.config import LoraConfig, LossConfig, ModelConfig, RunConfig, ScheduleConfig
from perceptual_diffusion.core.losses import SelfPerceptualLoss
from perceptual_diffusion.core.networks import DiffusionUNet, frozen_copy
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import latent, loading, lora
from perceptual_diffusion.models.architectures import build_model
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training import loop as training
from perceptual_diffusion.training.rundir import check_same_config

TINY = ModelConfig(preset="tiny", image_size=8, channels=3, num_classes=4)


def _one_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def _base(seed: int = 0, preset: str = "tiny", arch: str = "unet") -> DiffusionUNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(replace(TINY, preset=preset, arch=arch), ScheduleConfig())
        with torch.no_grad():  # a DiT starts with zero gates (adaLN-Zero): give them values, as training would
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
        return model


def _with_adapter(base: DiffusionUNet, dropout: float = 0.0, seed: int = 1) -> DiffusionUNet:
    """A copy of ``base`` with a rank-2 adapter whose B is non-zero (so the adapter changes the network)."""
    model = lora.add_adapter(copy.deepcopy(base), LoraConfig(rank=2, alpha=3.0, dropout=dropout), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


# ---------------------------------------------------------------------------------------------------------------
# The config.


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"rank": 0}, "--lora-rank must be >= 1"),
        ({"rank": -3}, "--lora-rank must be >= 1"),
        ({"rank": 2, "alpha": 0.0}, "--lora-alpha must be > 0"),
        ({"rank": 2, "dropout": 1.0}, "--lora-dropout must be in [0, 1)"),
        ({"rank": 2, "targets": ()}, "--lora-targets must name"),
        ({"rank": 2.5}, "--lora-rank must be an integer"),
    ],
)
def test_lora_config_is_validated_on_construction(fields: dict, needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace(")", r"\)")):
        LoraConfig(**fields)


def test_alpha_defaults_to_the_rank_and_the_config_round_trips() -> None:
    assert LoraConfig(rank=8).alpha == 8.0
    config = replace(tiny_config(init_from="x"), lora=LoraConfig(rank=2, alpha=4.0, targets=("to_q", "to_v")))
    assert RunConfig.from_dict(json.loads(config.to_json())) == config


def test_configs_without_the_lora_section_load_and_resume_as_full_fine_tuning() -> None:
    old = tiny_config().to_dict()
    del old["lora"]  # a config.json written before LoRA existed
    assert RunConfig.from_dict(old).lora is None
    check_same_config(old, tiny_config(), "run", override=False)  # no difference to name


def test_a_lora_run_needs_a_base() -> None:
    with pytest.raises(UserError, match="give the base with --init-from"):
        replace(tiny_config(), lora=LoraConfig(rank=2))


# ---------------------------------------------------------------------------------------------------------------
# Injection and the trained state.


def test_default_targets_per_architecture_and_only_the_adapter_trains() -> None:
    tiny = lora.add_adapter(_base(), LoraConfig(rank=2))  # no attention levels: ResNet convs and time embedding
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in tiny.named_parameters() if ".lora_A." in n}
    assert "unet.time_embedding.linear_1" in adapted and "unet.down_blocks.0.resnets.0.conv1" in adapted
    assert not any("attentions" in n for n in adapted)
    trained = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trained and all(lora.is_adapter_key(n) for n in trained)
    medium = lora.add_adapter(_base(preset="medium"), LoraConfig(rank=2))  # attention levels: their projections
    names = {n for n, p in medium.named_parameters() if p.requires_grad}
    assert names and all(".to_" in n for n in names)
    assert lora.architecture(replace(tiny_config(), model=replace(TINY, preset="medium"))) == "pixel-unet"
    dit = lora.add_adapter(_base(arch="dit"), LoraConfig(rank=2))  # a DiT: the attention projections of each block
    names = {n for n, p in dit.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("transformer.transformer_blocks.") and ".attn1.to_" in n for n in names)
    assert lora.architecture(replace(tiny_config(), model=replace(TINY, arch="dit"))) == "pixel-dit"


def test_targets_that_match_nothing_are_refused() -> None:
    with pytest.raises(UserError, match="--lora-targets nothing matches no module"):
        lora.add_adapter(_base(), LoraConfig(rank=2, targets=("conv1", "nothing")))


def test_the_adapter_starts_as_its_base_and_its_init_is_seeded() -> None:
    base = _base()
    a = lora.add_adapter(copy.deepcopy(base), LoraConfig(rank=2), seed=5)
    b = lora.add_adapter(copy.deepcopy(base), LoraConfig(rank=2), seed=5)
    c = lora.add_adapter(copy.deepcopy(base), LoraConfig(rank=2), seed=6)
    sa, sb, sc = lora.saved_state(a), lora.saved_state(b), lora.saved_state(c)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if ".lora_A." in k)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    assert torch.equal(a(x, t, torch.tensor([0, 1])), base(x, t, torch.tensor([0, 1])))  # B = 0


def test_the_ema_holds_its_own_adapter_over_the_shared_base() -> None:
    model = _with_adapter(_base())
    ema = lora.frozen_ema(model)
    for (name, p), (_, q) in zip(model.named_parameters(), ema.named_parameters()):
        assert (p is q) == (not lora.is_adapter_key(name)), name  # the base once in memory, the adapter twice
    assert not any(p.requires_grad for p in ema.parameters())
    assert set(lora.saved_state(ema)) == {n for n, _ in model.named_parameters() if lora.is_adapter_key(n)}


# ---------------------------------------------------------------------------------------------------------------
# The shared teacher.


def test_teacher_features_with_the_adapter_off_are_the_base_models() -> None:
    base = _base()
    model = _with_adapter(base).train()
    x, t, cond = torch.randn(3, 3, 8, 8), torch.tensor([5, 400, 999]), torch.tensor([0, 2, 4])
    teacher = lora.BaseTeacher(model)
    shared = teacher.features(x, t, cond, model.taps)
    untouched = base.eval().features(x, t, cond, model.taps)
    assert all(torch.equal(shared[k], untouched[k]) for k in model.taps)
    assert not torch.allclose(model.features(x, t, cond)["mid"], untouched["mid"])  # the adapter is back on
    # Everything the pass switched is restored: modes, requires_grad, adapters.
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad == lora.is_adapter_key(n) for n, p in model.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("arch", ["unet", "dit"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_shared_teacher_loss_and_lora_gradients_equal_a_two_copy_reference(checkpointing: bool, arch: str) -> None:
    base = _base(arch=arch)
    online = _with_adapter(base, dropout=0.2).train()
    online_ref = copy.deepcopy(online)
    reference_teacher = frozen_copy(base)  # the two-copy reference: a deep-copied frozen base
    if checkpointing:
        online.enable_gradient_checkpointing()
        online_ref.enable_gradient_checkpointing()
    config = LossConfig(kind="self-perceptual", teacher="base", feature_layer="all")
    shared_loss = SelfPerceptualLoss(config, lora.BaseTeacher(online))
    reference_loss = SelfPerceptualLoss(config, reference_teacher)
    x0, cond = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 4])
    noise = shared_loss.draw(x0.shape, torch.Generator().manual_seed(3))
    results = []
    for net, loss_fn in ((online, shared_loss), (online_ref, reference_loss)):
        torch.manual_seed(11)  # the same LoRA dropout masks in the online pass of both
        terms = loss_fn(net, x0, cond, torch.Generator(), noise)
        terms["loss"].mean().backward()
        grads = {n: p.grad for n, p in net.named_parameters() if lora.is_adapter_key(n)}
        assert all(p.grad is None for n, p in net.named_parameters() if not lora.is_adapter_key(n))  # no base grad
        results.append((terms["loss"].detach(), grads))
    (loss, grads), (loss_ref, grads_ref) = results
    assert torch.allclose(loss, loss_ref, rtol=0, atol=1e-6)
    assert all(g is not None for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], rtol=1e-5, atol=1e-6), name
    assert all(m.training for m in online.modules())
    assert all(p.grad is None for p in base.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Training runs: the shared teacher in the loop, resume, the base's hash.


@pytest.fixture(scope="module")
def base_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "base"
    training.train(tiny_config(steps=2), run_dir)
    return run_dir


def _sp_lora(base: Path, **train) -> RunConfig:
    config = tiny_config(**{"steps": 4, "checkpoint_every": 2, "sample_every": 2, **train})
    loss = LossConfig(kind="self-perceptual", teacher=str(base))
    return replace(config, loss=loss, lora=LoraConfig(rank=2, alpha=4.0, dropout=0.1))


def test_a_lora_run_shares_its_teacher_and_saves_the_adapter_alone(base_run: Path, tmp_path: Path) -> None:
    config = training.with_teacher_hash(_sp_lora(base_run))
    assert lora.shares_teacher(config)
    trainee = training._build(training.PixelTask(config), config, torch.device("cpu"), main=True)
    assert isinstance(trainee.loss_fn.teacher, lora.BaseTeacher) and trainee.loss_fn.teacher.model is trainee.model
    assert len(trainee.optimizer.param_groups[0]["params"]) == len(lora.saved_state(trainee.model))
    # Another teacher than the base: a separate frozen copy, as for full fine-tuning.
    other = tmp_path / "other"
    training.train(tiny_config(steps=1, seed=5), other)
    mixed = training.with_teacher_hash(replace(config, loss=replace(config.loss, teacher=str(other))))
    assert not lora.shares_teacher(mixed)
    separate = training._build(training.PixelTask(mixed), mixed, torch.device("cpu"), main=True)
    assert isinstance(separate.loss_fn.teacher, DiffusionUNet)
    training.train(mixed, tmp_path / "separate")
    state = ckpt.load_state(ckpt.list_states(tmp_path / "separate")[-1])
    assert state["model"] and all(lora.is_adapter_key(k) for k in state["model"])
    assert set(state["ema"]) == set(state["model"])


def test_resume_is_bit_identical(base_run: Path, tmp_path: Path) -> None:
    config = _sp_lora(base_run)
    training.train(config, tmp_path / "reference")
    training.train(replace(config, train=replace(config.train, steps=2)), tmp_path / "resumed")
    training.train(config, tmp_path / "resumed")
    assert_same_run(tmp_path / "reference", tmp_path / "resumed")


def test_an_adapter_on_another_base_is_one_error_line(
    base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = tmp_path / "base"
    training.train(tiny_config(steps=1), base)
    training.train(_sp_lora(base, steps=1), tmp_path / "sp")
    (base / ckpt.WEIGHTS_NAME).write_bytes((base_run / ckpt.WEIGHTS_NAME).read_bytes())  # the base is replaced
    with pytest.raises(UserError, match="is an adapter for another base"):
        loading.load_model(tmp_path / "sp")
    assert cli.main(["sample", str(tmp_path / "sp"), "-n", "2", "--out", str(tmp_path / "s.png")]) == 2
    _one_error(capsys, "adapter for another base")


# ---------------------------------------------------------------------------------------------------------------
# The command line, end to end, and the adapters out.


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--lora-rank", "0"], "--lora-rank must be >= 1"),
        (["--lora-rank", "-1"], "--lora-rank must be >= 1"),
        (["--lora-alpha", "4"], "give --lora-rank R too"),
        (["--lora-rank", "2", "--lora-targets", "to_nothing"], "to_nothing matches no module"),
    ],
)
def test_bad_lora_options_are_one_error_line(
    base_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], needle: str
) -> None:
    run = ["train", "--run-dir", str(tmp_path / "run"), *CLI_TINY, "--steps", "1", "--init-from", str(base_run)]
    assert cli.main([*run, *options]) == 2
    _one_error(capsys, needle)


def test_cli_lora_run_exports_a_peft_folder_merged_weights_and_inits_from_it(base_run: Path, tmp_path: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    sp = tmp_path / "sp"
    train = ["train", *CLI_TINY, "--steps", "2", "--lr", "0.05", "--warmup-images", "0"]
    lora_options = ["--lora-rank", "2", "--lora-alpha", "5"]
    assert (
        cli.main([*train, "--run-dir", str(sp), "--loss", "self-perceptual", "--teacher", str(base_run), *lora_options])
        == 0
    )
    assert cli.main(["export", str(sp), "--out", str(tmp_path / "adapter")]) == 0
    peft_cfg = json.loads((tmp_path / "adapter" / lora.PEFT_CONFIG).read_text())
    assert (peft_cfg["r"], peft_cfg["lora_alpha"]) == (2, 5.0)
    ours, _, _ = loading.load_model(sp)
    # PEFT's own loader on an untouched base gives our model.
    base, _, _ = loading.load_model(base_run)
    theirs = lora.add_adapter(base, LoraConfig(rank=2, alpha=5.0))
    result = set_peft_model_state_dict(theirs.unet, load_file(str(tmp_path / "adapter" / lora.PEFT_WEIGHTS)), "default")
    assert not result.unexpected_keys
    x, t, cond = torch.randn(2, 3, 8, 8), torch.tensor([100, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        assert not torch.allclose(
            ours(x, t, cond), base_out := frozen_copy(loading.load_model(base_run)[0])(x, t, cond)
        )
        assert torch.equal(ours(x, t, cond), theirs.eval()(x, t, cond))
        del base_out
    # Merged through PEFT: a plain DDIMPipeline folder of the same network.
    assert cli.main(["export", str(sp), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged, merged_config, _ = loading.load_model(tmp_path / "merged")
    assert merged_config.lora is None
    with torch.no_grad():
        assert torch.allclose(merged(x, t, cond), ours(x, t, cond), atol=1e-5)
    # --init-from the adapter folder: the run starts from base + adapter (checked against the base's hash).
    follow = tmp_path / "follow"
    assert cli.main([*train, "--run-dir", str(follow), "--init-from", str(tmp_path / "adapter"), "--steps", "1"]) == 0
    state, _, _ = loading.read_weights(tmp_path / "adapter")
    assert all(torch.allclose(v, merged.state_dict()[k], atol=1e-6) for k, v in state.items())


# ---------------------------------------------------------------------------------------------------------------
# Latent models: the SD-style U-Net, diffusers' LoRA file.


def test_latent_lora_export_loads_with_diffusers_load_lora_weights(tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    sd = testing.make_tiny_pipeline(tmp_path / "tiny-sd")
    data = testing.write_shapes_captions(tmp_path / "captions", every=80)
    run = tmp_path / "run"
    common = ["--pretrained", str(sd), "--data-path", str(data), "--cache-dir", str(tmp_path / "cache")]
    common += ["--resolution", "16", "--batch-size", "4", "--steps", "2", "--sample-every", "2", "--sample-steps", "2"]
    common += ["--device", "cpu", "--no-progress", "--warmup-images", "0"]
    lora_options = ["--lora-rank", "2", "--lora-alpha", "6", "--loss", "self-perceptual", "--teacher", str(sd)]
    assert cli.main(["latent", "train", "--run-dir", str(run), *common, *lora_options]) == 0
    config = json.loads((run / "config.json").read_text())
    assert (
        config["lora"]["targets"] == list(lora.ATTENTION)
        and config["lora"]["base_sha256"] == config["loss"]["teacher_sha256"]
    )  # the teacher is the base: shared
    # A trained adapter whose B is far from zero, so that a wrong scale or key would show.
    state, run_config, step = ckpt.read_weights(run / ckpt.WEIGHTS_NAME, kind="latent")
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in state.items()}
    ckpt.save_weights(run / ckpt.WEIGHTS_NAME, state, run_config, step)
    assert cli.main(["latent", "export", str(run), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / lora.DIFFUSERS_LORA_WEIGHTS).is_file()
    ours, parts, _, _ = latent.load_latent_model(run)
    with latent.quiet_libraries():
        pipe = StableDiffusionPipeline.from_pretrained(str(sd), safety_checker=None, requires_safety_checker=False)
        base_out_unet = copy.deepcopy(pipe.unet)
        pipe.load_lora_weights(str(tmp_path / "adapter"))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([50, 800])
    text = parts.encode_text(["a red disc", "a blue square"])
    with torch.no_grad():
        expected = ours(x, t, text)
        got = pipe.unet(x, t, encoder_hidden_states=text).sample
        assert not torch.allclose(base_out_unet(x, t, encoder_hidden_states=text).sample, expected, atol=1e-3)
    assert torch.allclose(got, expected, atol=1e-5)
    # Merged through PEFT: a StableDiffusionPipeline folder whose U-Net is the same network.
    assert cli.main(["latent", "export", str(run), "--out", str(tmp_path / "merged"), "--merge-lora"]) == 0
    with latent.quiet_libraries():
        merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None)
    with torch.no_grad():
        assert torch.allclose(merged.unet(x, t, encoder_hidden_states=text).sample, expected, atol=1e-5)
