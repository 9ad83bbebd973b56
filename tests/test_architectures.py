"""Every registered architecture against one contract, and the pixel DiT's own guarantees (issue 19).

The contract is what the training loop, the sampler, evaluation, export and the losses rely on: the sample shape,
deterministic train-mode forwards, the null condition, explicit taps that equal forward hooks on a full forward,
a frozen teacher that gets no gradient, a save/load round trip, and a resume that replays bit-identically. A new
architecture adds one line to ``HOOKS`` (where its taps sit in its diffusers module) and runs here unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, TINY_IMAGE
from diffusers import DDIMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler

from perceptual_diffusion.config import (
    DIT_PRESETS,
    LossConfig,
    ModelConfig,
    RunConfig,
    ScheduleConfig,
    default_sampler,
)
from perceptual_diffusion.core.losses import SelfPerceptualLoss
from perceptual_diffusion.core.networks import frozen_copy
from perceptual_diffusion.core.sampling import sample
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.architectures import ARCHITECTURES, build_model
from perceptual_diffusion.models.dit import DiffusionDiT
from perceptual_diffusion.models.export import export_diffusers, import_diffusers
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training.loop import train
from perceptual_diffusion.training.rundir import check_same_config

ROOT = Path(__file__).resolve().parents[1]
FLOW = ScheduleConfig(family="flow")
DDPM = ScheduleConfig()


def tiny(arch: str, num_classes: int = TINY_CLASSES) -> ModelConfig:
    return ModelConfig(preset="tiny", image_size=TINY_IMAGE, channels=3, num_classes=num_classes, arch=arch)


def perturbed(mc: ModelConfig, schedule: ScheduleConfig = DDPM, seed: int = 0):
    """A fresh model whose weights depend on ``seed`` only, every parameter perturbed (diffusers zero-initialises
    some layers, which would make features and gradients trivially zero in places)."""
    torch.manual_seed(seed)
    model = build_model(mc, schedule)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


# Where each architecture's taps sit in its diffusers module: (tap, module, the tap's tensor from its output).
Hook = tuple[str, torch.nn.Module, Callable]
HOOKS: dict[str, Callable[[torch.nn.Module], list[Hook]]] = {
    "unet": lambda m: (
        [(f"down{i}", b, lambda out: out[0]) for i, b in enumerate(m.unet.down_blocks)]
        + [("mid", m.unet.mid_block, lambda out: out)]
    ),
    "dit": lambda m: [(f"block{k}", b, lambda out: out) for k, b in enumerate(m.transformer.transformer_blocks, 1)],
}


def hooked_forward(model, x_t, t, cond) -> dict[str, torch.Tensor]:
    """Every tap's tensor as the full diffusers forward produces it."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, out, tap=tap, get=get: captured.__setitem__(tap, get(out)))
        for tap, module, get in HOOKS[model.model_config.arch](model)
    ]
    try:
        out = model(x_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    return {**captured, "output": out}


def inputs(model, n: int = 4, seed: int = 0, flow: bool = False):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, *model.sample_shape, generator=g)
    t = torch.rand(n, generator=g) * 1000 if flow else torch.tensor([0, 999, 321, 500][:n])
    cond = torch.randint(0, model.num_classes + 1, (n,), generator=g) if model.num_classes > 0 else None
    return x_t, t, cond


def test_the_registry_is_the_config_type_s_choices() -> None:
    import typing

    from perceptual_diffusion.config import Architecture

    assert set(ARCHITECTURES) == set(typing.get_args(Architecture)) == set(HOOKS)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_contract(arch: str, tmp_path: Path, tiny_run_config) -> None:
    model = perturbed(tiny(arch))
    x_t, t, cond = inputs(model)
    # Shape and the protocol's facts.
    assert model.sample_shape == (3, TINY_IMAGE, TINY_IMAGE)
    assert model.num_classes == TINY_CLASSES and model.null_label == TINY_CLASSES
    assert model.default_tap in model.taps and model.strides
    with torch.no_grad():
        assert model(x_t, t, cond).shape == x_t.shape
    # Determinism: train-mode forwards (dropout of any kind included) repeat exactly and draw no global RNG.
    model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        first, second = model(x_t, t, cond), model(x_t, t, cond)
    assert torch.equal(first, second) and torch.equal(torch.get_rng_state(), state)
    model.eval()
    # The null condition: cond None means the null label, in forward and features alike.
    null = model.null_condition(cond)
    assert torch.equal(null, torch.full_like(cond, model.null_label))
    with torch.no_grad():
        assert torch.equal(model(x_t, t, None), model(x_t, t, null))
        f_none = model.features(x_t, t, None, (model.default_tap,))[model.default_tap]
        assert torch.equal(f_none, model.features(x_t, t, null, (model.default_tap,))[model.default_tap])
    # Taps: the explicit loop equals hooks on a full forward at every tap.
    with torch.no_grad():
        hooked = hooked_forward(model, x_t, t, cond)
        features = model.features(x_t, t, cond, model.taps)
    assert set(features) == set(model.taps)
    for tap in model.taps:
        torch.testing.assert_close(features[tap], hooked[tap], rtol=0, atol=1e-6, msg=tap)
        assert features[tap].abs().max() > 0, f"{tap} is all zeros: the comparison would be vacuous"
    # A frozen teacher passes gradients through to its input and gets none itself.
    teacher = frozen_copy(perturbed(tiny(arch), seed=1))
    x = x_t.clone().requires_grad_(True)
    teacher.features(x, t, cond, (teacher.default_tap,))[teacher.default_tap].square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # Save/load round trip: the state dict rebuilds the same function.
    again = build_model(tiny(arch), ScheduleConfig())
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(again.eval()(x_t, t, cond), model(x_t, t, cond))
    # Resume through the function API: 2 + 2 steps equal 4 straight, weights and EMA bit for bit; load_model
    # rebuilds the architecture from the run alone.
    config = tiny_run_config(steps=4)
    config = replace(config, model=replace(config.model, arch=arch))
    interrupted, straight = tmp_path / "interrupted", tmp_path / "straight"
    train(replace(config, train=replace(config.train, steps=2)), interrupted)
    train(config, interrupted)
    train(config, straight)
    a, b = ckpt.load_state(ckpt.state_path(interrupted, 4)), ckpt.load_state(ckpt.state_path(straight, 4))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
        assert torch.equal(a["ema"][key], b["ema"][key]), key
    loaded, loaded_config, step = load_model(straight)
    assert type(loaded) is ARCHITECTURES[arch] and loaded_config.model.arch == arch and step == 4
    assert json.loads((straight / "config.json").read_text())["model"]["arch"] == arch


# ---------------------------------------------------------------------------------------------------------------
# The DiT's own guarantees.


def test_dit_has_diffusers_null_class_and_no_label_dropout_of_its_own() -> None:
    model = DiffusionDiT(tiny("dit"), ScheduleConfig())
    for block in model.transformer.transformer_blocks:
        embedder = block.norm1.emb.class_embedder
        assert embedder.dropout_prob == 0.0
        assert embedder.embedding_table.num_embeddings == TINY_CLASSES + 1  # K classes + the null class K
    assert model.transformer.config.num_embeds_ada_norm == TINY_CLASSES


def test_dit_starts_adaln_zero_every_block_the_identity_and_the_output_zero() -> None:
    """DiT's adaLN-Zero initialisation (arXiv 2212.09748, Sec. 3.2), which diffusers' class leaves out."""
    model = DiffusionDiT(tiny("dit"), ScheduleConfig())
    x, t, cond = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE), torch.tensor([3, 700]), torch.tensor([0, 1])
    assert torch.equal(model(x, t, cond), torch.zeros_like(x))
    taps = model.features(x, t, cond, model.taps)
    first = taps[model.taps[0]]
    assert all(torch.equal(h, first) for h in taps.values())  # every block passes its input through
    assert torch.equal(first, model.transformer.pos_embed(x))


class _Forbidden(RuntimeError):
    pass


@pytest.mark.parametrize("taps", [("block1",), ("block2",), ("block1", "block3")])
def test_dit_features_never_run_the_blocks_past_the_deepest_tap(taps: tuple[str, ...]) -> None:
    model = perturbed(tiny("dit"))
    x_t, t, cond = inputs(model)
    depth = max(int(tap.removeprefix("block")) for tap in taps)
    tr = model.transformer
    later = [*tr.transformer_blocks[depth:], tr.norm_out, tr.proj_out_1, tr.proj_out_2]

    def forbid(module, *_):
        raise _Forbidden(f"{type(module).__name__} must not run")

    handles = [m.register_forward_pre_hook(forbid) for module in later for m in module.modules()]
    try:
        assert set(model.features(x_t, t, cond, taps)) == set(taps)
        with pytest.raises(_Forbidden):  # the hooks are live: a full forward trips them
            model(x_t, t, cond)
    finally:
        for h in handles:
            h.remove()


def test_dit_default_tap_is_the_middle_block_and_unknown_taps_are_refused() -> None:
    for preset, p in DIT_PRESETS.items():
        mc = ModelConfig(preset=preset, image_size=p.patch_size * 4, num_classes=2, arch="dit")
        with torch.device("meta"):
            model = DiffusionDiT(mc, ScheduleConfig())
        assert model.default_tap == f"block{p.num_layers // 2}", preset
    model = perturbed(tiny("dit"))
    x_t, t, cond = inputs(model)
    with pytest.raises(ValueError, match="block5"):
        model.features(x_t, t, cond, ("block5",))


def test_unconditional_dit_always_sees_its_null_class() -> None:
    model = perturbed(tiny("dit", num_classes=0))
    x_t, t, _ = inputs(model)
    assert model.num_classes == 0 and model.null_label == 0
    with torch.no_grad():
        out = model(x_t, t, None)
        hooked = hooked_forward(model, x_t, t, None)
        features = model.features(x_t, t, None, model.taps)
    assert out.shape == x_t.shape
    for tap in model.taps:
        torch.testing.assert_close(features[tap], hooked[tap], rtol=0, atol=1e-6)


def test_dit_takes_flow_s_continuous_time() -> None:
    model = perturbed(tiny("dit"), FLOW)
    x_t, t, cond = inputs(model, flow=True)
    assert not torch.equal(t, t.round())
    with torch.no_grad():
        hooked = hooked_forward(model, x_t, t, cond)
        features = model.features(x_t, t, cond, model.taps)
        nearby = model(x_t, t + 0.5, cond)
    for tap in model.taps:
        torch.testing.assert_close(features[tap], hooked[tap], rtol=0, atol=1e-6)
    assert not torch.equal(nearby, hooked["output"]), "a fractional time must reach the embedding"


def test_the_loss_resolves_dit_taps_and_refuses_missing_ones() -> None:
    teacher = frozen_copy(perturbed(tiny("dit"), seed=1))
    online = perturbed(tiny("dit")).train()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, TINY_IMAGE, TINY_IMAGE, generator=g) * 2 - 1
    cond = torch.arange(4) % TINY_CLASSES
    losses = {}
    for blocks in [(), (2,), (1, 3)]:
        loss = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", feature_blocks=blocks), teacher)
        losses[blocks] = loss(online, x0, cond, torch.Generator().manual_seed(1))["loss"]
    torch.testing.assert_close(losses[()], losses[(2,)], rtol=0, atol=0)  # default: block n // 2 = 2 of 4
    assert not torch.equal(losses[(1, 3)], losses[(2,)])
    with pytest.raises(UserError, match="--feature-blocks 5 is not in this network"):
        SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", feature_blocks=(5,)), teacher)


# ---------------------------------------------------------------------------------------------------------------
# Config: the arch field, old configs, bad combinations.


def test_a_config_saved_before_arch_existed_reads_and_resumes_as_a_unet(tmp_path: Path, tiny_run_config) -> None:
    config = tiny_run_config(steps=2)
    old = config.to_dict()
    del old["model"]["arch"], old["loss"]["feature_blocks"]
    assert RunConfig.from_dict(old) == config  # absent fields mean their defaults
    check_same_config(old, config, "old run", override=False)  # not refused as a changed configuration
    run = tmp_path / "run"
    train(config, run)
    (run / "config.json").write_text(json.dumps(old))
    assert train(tiny_run_config(steps=3), run).step == 3


def test_feature_blocks_round_trip_json_as_a_typed_tuple() -> None:
    loss = LossConfig(kind="self-perceptual", teacher="x", feature_blocks=(1, 3))
    config = RunConfig(model=ModelConfig(preset="small", image_size=16, arch="dit"), loss=loss)
    back = RunConfig.from_dict(json.loads(config.to_json()))
    assert back == config and back.loss.feature_blocks == (1, 3)
    check_same_config(json.loads(config.to_json()), config, "run", override=False)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: ModelConfig(preset="small", image_size=30, arch="dit"), "patch size 4 must divide it"),
        (lambda: ModelConfig(preset="medium", arch="dit"), "unknown dit preset 'medium'"),
        (lambda: ModelConfig(arch="vit"), "--arch must be one of unet, dit"),
        (lambda: LossConfig(feature_blocks=(0,)), "--feature-blocks must be >= 1"),
        (lambda: LossConfig(feature_blocks=(2, 2)), "lists a block twice"),
        (lambda: LossConfig(feature_blocks=[1.5]), "must be a list of integers"),
        (lambda: LossConfig(feature_blocks=(1,), feature_layer="all"), "both choose the tap"),
        (lambda: RunConfig(loss=LossConfig(feature_blocks=(1,))), "taps transformer blocks (--arch dit)"),
        (
            lambda: RunConfig(model=ModelConfig(arch="dit"), loss=LossConfig(feature_blocks=(7,))),
            "'small' has 6 blocks; choose taps in 1..6",
        ),
        (lambda: RunConfig(model=ModelConfig(arch="dit"), loss=LossConfig(feature_layer="down0")), "a U-Net tap"),
    ],
)
def test_bad_architecture_combinations_are_one_line(build, fragment: str) -> None:
    with pytest.raises(UserError, match=re.escape(fragment)) as info:
        build()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Export: transformer/ + scheduler/ and the README's loop, and the folder read back.


def _readme_loop(folder: Path, w: float) -> torch.Tensor:
    """Run the python block of the export's README as written (the folder's path and CFG scale filled in)."""
    text = (folder / "README.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    code = code.replace(f'"{folder.name}"', repr(str(folder))).replace("c, w, n = 0, 1.0, 4", f"c, w, n = 0, {w}, 4")
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the loop the export documents, run as written
    return scope["images"]


@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_dit_export_loads_in_diffusers_and_its_loop_is_our_sampler(
    family: str, tmp_path: Path, tiny_run_config
) -> None:
    config = tiny_run_config(steps=2)
    schedule = FLOW if family == "flow" else ScheduleConfig()
    config = replace(
        config,
        model=replace(config.model, arch="dit"),
        schedule=schedule,
        sample=default_sampler(schedule, steps=4),
    )
    run = tmp_path / "run"
    train(config, run)
    out = export_diffusers(run, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "README.md",
        "perceptual_diffusion_config.json",
        "scheduler",
        "transformer",
    ]
    assert isinstance(DiTTransformer2DModel.from_pretrained(out, subfolder="transformer"), DiTTransformer2DModel)
    scheduler_class = FlowMatchEulerDiscreteScheduler if family == "flow" else DDIMScheduler
    assert isinstance(scheduler_class.from_pretrained(out, subfolder="scheduler"), scheduler_class)
    model, _, _ = load_model(run)
    labels = torch.zeros(4, dtype=torch.long)
    for w in (1.0, 2.0):
        ours = sample(model, list(range(4)), labels, replace(config.sample, cfg_scale=w))
        theirs = _readme_loop(out, w)
        assert float(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max()) < 1e-4, w
    # Read back: losslessly from the record, and from the transformer and scheduler configs without it.
    imported, imported_config = import_diffusers(out)
    assert isinstance(imported, DiffusionDiT) and imported_config == replace(config, train=imported_config.train)
    (out / "perceptual_diffusion_config.json").unlink()
    _, foreign = import_diffusers(out)
    assert foreign.model == config.model and foreign.schedule.family == family


def test_a_dit_export_is_accepted_as_init_from_and_teacher(tmp_path: Path, tiny_run_config) -> None:
    config = tiny_run_config(steps=2)
    config = replace(config, model=replace(config.model, arch="dit"))
    train(config, tmp_path / "run")
    folder = export_diffusers(tmp_path / "run", tmp_path / "export")
    sp = LossConfig(kind="self-perceptual", teacher=str(folder), feature_blocks=(1, 3))
    assert train(replace(config, loss=sp), tmp_path / "sp").step == 2
    unet = tiny_run_config(steps=2)
    with pytest.raises(UserError, match="another model or schedule"):
        train(replace(unet, train=replace(unet.train, init_from=str(folder))), tmp_path / "unet")


# ---------------------------------------------------------------------------------------------------------------
# Layering and the benchmark.


def test_no_code_outside_the_model_modules_reaches_into_a_model() -> None:
    package = ROOT / "src" / "perceptual_diffusion"
    model_modules = {package / "core" / "networks.py", *(package / "models").glob("*.py")}
    pattern = re.compile(r"\.(unet|transformer|model_config)\b")
    wrong = [
        f"{path.relative_to(package)}:{i}"
        for path in package.rglob("*.py")
        if path not in model_modules
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not wrong, wrong


def test_step_cost_measures_every_dit_tap_and_its_bound() -> None:
    spec = importlib.util.spec_from_file_location("step_cost", ROOT / "benchmarks" / "step_cost.py")
    step_cost = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(step_cost)
    bench = step_cost.Bench(2, arch="dit", preset="tiny", image_size=8, feature_blocks=(1, 3))
    assert bench.taps == ("block1", "block3")
    for method in bench.methods:  # one functional step each, untimed
        bench.step(method, 0)
    median = {m: 1.0 for m in bench.methods} | {"teacher-pieces@block1": 0.25, "self-perceptual@block3": 1.5}
    assert step_cost.tap_ratios(median, bench.taps) == [("block1", 1.0, 1.25), ("block3", 1.5, 2.0)]


# ---------------------------------------------------------------------------------------------------------------
# compare / ablate choose the model through the budget.


def test_compare_and_ablate_take_arch_and_preset_through_the_budget(tmp_path: Path) -> None:
    from perceptual_diffusion.cli import build_parser
    from perceptual_diffusion.cli.budget_options import budget_from_args
    from perceptual_diffusion.experiments.ablation import default_variants
    from perceptual_diffusion.experiments.budgets import BUDGETS
    from perceptual_diffusion.experiments.stages import stage1_config

    parser = build_parser()
    base = ["--out", str(tmp_path / "out"), "--budget", "cpu-demo"]
    budget = budget_from_args(parser.parse_args(["compare", *base, "--arch", "dit", "--preset", "small"]))
    assert (budget.arch, budget.preset) == ("dit", "small")
    config = stage1_config(budget, budget.data, 0, 1e-3, 10, None, 0, "cpu")
    assert config.model.arch == "dit" and config.model.preset == "small"
    names = [v.name for v in default_variants(budget)]
    assert {"sp-block1", "sp-block4", "sp-all"} <= set(names) and "sp-down0" not in names  # 6 blocks: 1, 3, 4
    assert "sp-down0" in [v.name for v in default_variants(BUDGETS["cpu-demo"])]
    with pytest.raises(UserError, match="--arch dit needs --preset"):
        budget_from_args(parser.parse_args(["ablate", *base, "--arch", "dit"]))
    with pytest.raises(UserError, match="unknown dit --preset 'medium'"):
        budget_from_args(parser.parse_args(["compare", *base, "--arch", "dit", "--preset", "medium"]))


def test_dit_gradient_checkpointing_gives_the_same_loss_and_gradients() -> None:
    # The teacher's own tap loop checkpoints its blocks as diffusers' forward does (speed option, same maths).
    teacher = frozen_copy(perturbed(tiny("dit"), seed=1))
    online = perturbed(tiny("dit")).train()
    x0 = torch.rand(4, 3, TINY_IMAGE, TINY_IMAGE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    cond = torch.arange(4) % TINY_CLASSES
    loss = SelfPerceptualLoss(LossConfig(kind="self-perceptual", teacher="x", feature_blocks=(1, 3)), teacher)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            online.enable_gradient_checkpointing()
            teacher.enable_gradient_checkpointing()
        online.zero_grad(set_to_none=True)
        value = loss(online, x0, cond, torch.Generator().manual_seed(1))["loss"]
        value.sum().backward()
        results.append((value.detach(), {k: p.grad.clone() for k, p in online.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for k, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][k], rtol=1e-5, atol=1e-6, msg=k)
