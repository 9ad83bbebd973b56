"""The external-perceptual loss (the control for the paper's premise, arXiv 2401.00110 Sec. 3) against a reference
written from its formula, its frozen network, its config and its command line.

The reference shares no code with ``losses.py``: it indexes alpha_bar itself, runs the classifier's *full* forward
pass with gradients on and captures the layer with a forward hook.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from _runs import CLI_TINY
from torch import nn

from perceptual_diffusion.cli import main
from perceptual_diffusion.config import LatentRunConfig, LossConfig, RunConfig
from perceptual_diffusion.core.losses import (
    ExternalPerceptualLoss,
    MSELoss,
    build_loss,
    external_perceptual_loss,
)
from perceptual_diffusion.core.networks import DiffusionUNet
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models.classifier_net import (
    ClassifierConfig,
    DomainClassifier,
    asset_path,
    load_classifier,
)
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.training.loop import build_perceptual_net

N = 4
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
EXTERNAL = LossConfig(kind="external-perceptual", perceptual_net="x")
LAYERS = ["block1", "block2", "block3", "features"]


@pytest.fixture
def online(make_tiny_model) -> DiffusionUNet:
    return make_tiny_model(seed=0).train()


@pytest.fixture
def net() -> DomainClassifier:
    """A random classifier of 8x8 RGB images, frozen as the training loop builds it."""
    torch.manual_seed(3)
    return DomainClassifier(ClassifierConfig("shapes", 8, 3, 4, pool=2)).eval().requires_grad_(False)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(N, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(N, 3, 8, 8, generator=g)
    return x0, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 999, 250, 600]), eps


def _layer_by_hook(net: DomainClassifier, x: torch.Tensor, layer: str) -> torch.Tensor:
    captured = {}
    module = net.embed if layer == "features" else net.body[3 * int(layer[-1]) - 1]  # the level's SiLU
    handle = module.register_forward_hook(lambda m, a, out: captured.__setitem__("f", out))
    try:
        net(x)  # the full forward, head included, with autograd on
    finally:
        handle.remove()
    return nn.functional.silu(captured["f"]) if layer == "features" else captured["f"]


def reference_external(online, net, x0, cond, t, eps, layer: str) -> torch.Tensor:
    """Per-sample || net_layer(x0_hat) - net_layer(x0) ||^2 / D with x0_hat = alpha_t x_t - sigma_t v_hat."""
    alpha_bar = online.schedule.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    x_t = alpha * x0 + sigma * eps
    x0_hat = alpha * x_t - sigma * online(x_t, t, cond)
    diff = _layer_by_hook(net, x0_hat, layer) - _layer_by_hook(net, x0, layer)
    return (diff**2).flatten(1).mean(1)


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


@pytest.mark.parametrize("layer", LAYERS)
def test_external_perceptual_loss_and_gradients_equal_reference(online, net, layer: str) -> None:
    x0, cond, t, eps = _batch()
    loss = external_perceptual_loss(online, online.schedule, net, x0, cond, t, eps, layer=layer)
    loss.sum().backward()
    ours = _grads(online)
    online.zero_grad(set_to_none=True)
    ref = reference_external(online, net, x0, cond, t, eps, layer)
    ref.sum().backward()

    assert loss.shape == (N,)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert ref.min() > 0, "vacuous: the random online model should miss x0 at every t"
    theirs = _grads(online)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in theirs.values()) > 0


def test_the_loss_object_draws_t_and_eps_as_mse_does_and_equals_the_function(online, net) -> None:
    x0, cond, *_ = _batch()
    config = replace(EXTERNAL, perceptual_layer="block3", mse_weight=0.5)
    loss_fn = build_loss(config, online.schedule, perceptual_net=net)
    assert isinstance(loss_fn, ExternalPerceptualLoss)
    noise = loss_fn.draw(x0.shape, torch.Generator().manual_seed(5))
    mse_noise = MSELoss(LossConfig(), online.schedule).draw(x0.shape, torch.Generator().manual_seed(5))
    assert noise.keys() == mse_noise.keys() and all(torch.equal(noise[k], mse_noise[k]) for k in noise)

    terms = loss_fn(online, x0, cond, torch.Generator(), noise)
    want = external_perceptual_loss(online, online.schedule, net, x0, cond, noise["t"], noise["eps"], layer="block3")
    torch.testing.assert_close(terms["perceptual"], want.detach())
    torch.testing.assert_close(terms["loss"], want + 0.5 * terms["mse"])
    for name, value in terms.items():
        assert value.shape == (N,) and torch.isfinite(value).all(), name
        assert value.requires_grad == (name == "loss"), name
    assert loss_fn(online, x0, None, torch.Generator().manual_seed(0))["loss"].shape == (N,)


class OracleV(nn.Module):
    """Predicts the true v for the batch it was built for: x0_hat = x0 exactly."""

    def __init__(self, model: DiffusionUNet, x0: torch.Tensor, eps: torch.Tensor) -> None:
        super().__init__()
        self.schedule, self.x0, self.eps = model.schedule, x0, eps

    def forward(self, x_t, t, cond):
        return self.schedule.target(self.x0, self.eps, t)


def test_oracle_online_model_has_zero_loss(online, net) -> None:
    x0, cond, t, eps = _batch()
    loss = external_perceptual_loss(OracleV(online, x0, eps), online.schedule, net, x0, cond, t, eps)
    assert float(loss.abs().max()) < 1e-6


def test_frozen_network_gets_no_gradient_and_the_online_model_does(online, net) -> None:
    before = {k: v.clone() for k, v in net.state_dict().items()}
    online_before = {k: v.clone() for k, v in online.state_dict().items()}
    optimizer = torch.optim.AdamW(online.parameters(), lr=1e-2)
    loss_fn = ExternalPerceptualLoss(EXTERNAL, online.schedule, net)
    x0, cond, *_ = _batch()
    loss_fn(online, x0, cond, torch.Generator().manual_seed(0))["loss"].mean().backward()

    assert all(p.grad is None for p in net.parameters())
    with_grad = [n for n, p in online.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= len(list(online.parameters())) - 1  # all but absent classes' embeddings
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert any(not torch.equal(v, online_before[k]) for k, v in online.state_dict().items())


def test_a_trainable_network_is_refused(online) -> None:
    trainable = DomainClassifier(ClassifierConfig("shapes", 8, 3, 4))
    with pytest.raises(ValueError, match="must be frozen"):
        ExternalPerceptualLoss(EXTERNAL, online.schedule, trainable)
    with pytest.raises(ValueError, match="needs its frozen perceptual network"):
        build_loss(EXTERNAL, online.schedule)


# ---------------------------------------------------------------------------------------------------------------
# Config, resume and the command line.


def test_config_fields_are_validated_and_round_trip() -> None:
    config = RunConfig(loss=replace(EXTERNAL, perceptual_net="fashion-mnist-perceptual", perceptual_layer="block3"))
    again = RunConfig.from_dict(json.loads(config.to_json()))
    assert again == config and again.loss.perceptual_layer == "block3"
    with pytest.raises(UserError, match="--perceptual-layer must be one of block1, block2, block3, features"):
        LossConfig(kind="external-perceptual", perceptual_layer="mid")
    with pytest.raises(UserError, match="--perceptual-net is for --loss external-perceptual, not --loss mse"):
        LossConfig(perceptual_net="fashion-mnist-perceptual")
    with pytest.raises(UserError, match="--perceptual-net must be a string"):
        LossConfig(kind="external-perceptual", perceptual_net=3)
    with pytest.raises(UserError, match="pixel train command"):
        LatentRunConfig.from_dict(
            {
                "model": {"pretrained": "sd"},
                "data": {"path": "d"},
                "loss": asdict(EXTERNAL),
                "sample": {"clip_x0": False},
            }
        )


def test_the_shipped_perceptual_networks_are_not_the_metric_classifiers() -> None:
    for data, size in (("shapes", 16), ("fashion-mnist", 28)):
        perceptual, metric = asset_path(f"{data}-perceptual"), asset_path(data)
        assert ckpt.sha256_file(perceptual) != ckpt.sha256_file(metric)
        net, result = load_classifier(perceptual)
        assert (net.config.data, net.config.image_size) == (data, size)
        assert "--seed 1" in result["command"] and result["validation_images"] > 0
        assert not any(p.requires_grad for p in net.parameters()) and not net.training


def _train(run: Path, *extra: str) -> int:
    return main(["train", "--run-dir", str(run), *CLI_TINY, "--loss", "external-perceptual", *extra])


def test_train_cli_with_the_shipped_shapes_network_resumes_and_refuses_a_changed_layer(tmp_path: Path) -> None:
    run = tmp_path / "ext"
    shapes16 = ["--image-size", "16", "--steps", "2", "--checkpoint-every", "1"]
    assert _train(run, *shapes16) == 0  # no --perceptual-net: the one shipped for the data
    saved = json.loads((run / "config.json").read_text())["loss"]
    assert saved["perceptual_net"] == "shapes-perceptual" and saved["perceptual_layer"] == "block2"
    assert saved["perceptual_sha256"] == ckpt.sha256_file(asset_path("shapes-perceptual"))
    state = torch.load(ckpt.list_states(run)[-1], weights_only=True)
    assert not any(k.startswith(("body.", "embed.", "head.")) for k in state["model"])  # the net is not saved
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["perceptual"] > 0 and "mse" in r for r in log)

    assert _train(run, *shapes16[:2], "--steps", "3", "--checkpoint-every", "1") == 0  # resumes to step 3
    assert ckpt.state_step(ckpt.list_states(run)[-1]) == 3
    assert _train(run, *shapes16[:2], "--steps", "4", "--perceptual-layer", "block3") == 2


def test_build_perceptual_net_is_frozen_and_checks_the_data() -> None:
    config = RunConfig(loss=replace(EXTERNAL, perceptual_net="shapes-perceptual"))  # shapes at 16 px, RGB
    net = build_perceptual_net(config, torch.device("cpu"))
    assert net is not None and not net.training and not any(p.requires_grad for p in net.parameters())
    assert build_perceptual_net(RunConfig(), torch.device("cpu")) is None
    other = replace(config, loss=replace(config.loss, perceptual_net="fashion-mnist-perceptual"))
    with pytest.raises(UserError, match="trained on fashion-mnist at 28px with 1 channel"):
        build_perceptual_net(other, torch.device("cpu"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--perceptual-layer", "mid"], "invalid choice: 'mid'"),
        (["--perceptual-net", "no-such-net"], "neither a shipped classifier"),
        (["--perceptual-net", "fashion-mnist-perceptual"], "trained on fashion-mnist at 28px"),
        ([], "trained on shapes at 16px"),  # the shipped shapes network reads 16 px, CLI_TINY trains at 8
        (["--perceptual-net", ""], "--perceptual-net must name a shipped classifier"),
    ],
)
def test_bad_values_are_one_error_line(tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    assert _train(tmp_path / "bad", "--steps", "1", *extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "bad" / "config.json").exists()  # refused before the run folder holds a config


def test_perceptual_net_with_another_loss_is_one_error_line(tmp_path: Path, capsys) -> None:
    args = ["train", "--run-dir", str(tmp_path / "r"), *CLI_TINY, "--steps", "1", "--perceptual-net", "shapes-v1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--perceptual-net is for --loss external-perceptual" in err


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_train_cli_on_fashion_mnist_with_the_perceptual_asset(tmp_path: Path) -> None:
    run = tmp_path / "fm"
    args = ["--data", "fashion-mnist", "--image-size", "28", "--steps", "2", "--perceptual-net"]
    assert _train(run, *args, "fashion-mnist-perceptual") == 0
    saved = json.loads((run / "config.json").read_text())["loss"]
    assert saved["kind"] == "external-perceptual" and saved["perceptual_net"] == "fashion-mnist-perceptual"
    assert (run / ckpt.WEIGHTS_NAME).is_file()


@pytest.mark.slow
def test_compare_trains_the_external_perceptual_arm_from_the_teacher(tmp_path: Path, monkeypatch) -> None:
    from test_experiment import TINY

    from perceptual_diffusion.experiments import compare

    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    budget = replace(TINY, training_seeds=1, finetune_lrs=(1e-4,), variants=("external-perceptual",))
    results = compare.run_compare(tmp_path / "c", replace(budget, unconditional=False), device="cpu")
    run = tmp_path / "c" / "seed0" / "external-perceptual-lr0.0001"
    config = json.loads((run / "config.json").read_text())
    assert config["loss"]["kind"] == "external-perceptual" and config["loss"]["perceptual_net"] == "shapes-perceptual"
    assert Path(config["train"]["init_from"]).parent == tmp_path / "c" / "seed0" / "stage1-mse"
    assert "external-perceptual/none" in results["evaluations"]["0"]
    assert "external-perceptual" in results["fixed_batch_losses"]["0"]


def test_a_file_that_is_no_classifier_is_one_error_line(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "not-a-classifier.safetensors"
    bad.write_text("hello")
    assert _train(tmp_path / "r", "--steps", "1", "--perceptual-net", str(bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a domain-classifier file" in err
