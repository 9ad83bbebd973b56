"""The U-Net's explicit feature taps against forward hooks on a full diffusers forward pass."""

from __future__ import annotations

import pytest
import torch

from perceptual_diffusion.core.networks import DiffusionUNet, frozen_copy, unwrap


def _inputs(model: DiffusionUNet, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    mc = model.model_config
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(n, mc.channels, mc.image_size, mc.image_size, generator=g)
    t = torch.tensor([0, 999, 321, 500, 17, 800][:n])
    cond = torch.randint(0, mc.num_classes + 1, (n,), generator=g) if mc.num_classes > 0 else None
    return x_t, t, cond


def _hooked_full_forward(model: DiffusionUNet, x_t, t, cond) -> dict[str, torch.Tensor]:
    """Every tap's tensor as the full diffusers forward produces it, captured by forward hooks."""
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for i, block in enumerate(model.unet.down_blocks):
        # A down block returns (hidden_states, residuals); the tap is the hidden state passed to the next block.
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(f"down{i}", out[0])))
    handles.append(model.unet.mid_block.register_forward_hook(lambda m, a, out: captured.__setitem__("mid", out)))
    try:
        model(x_t, t, cond)
    finally:
        for h in handles:
            h.remove()
    return captured


@pytest.mark.parametrize("conditional", [True, False])
def test_features_equal_hooked_full_forward_at_every_tap(conditional: bool, tiny_model, tiny_uncond_model) -> None:
    model = tiny_model if conditional else tiny_uncond_model
    x_t, t, cond = _inputs(model)
    with torch.no_grad():
        expected = _hooked_full_forward(model, x_t, t, cond)
        features = model.features(x_t, t, cond, model.taps)
    assert set(features) == set(model.taps) == {"down0", "down1", "mid"}
    for name in model.taps:
        torch.testing.assert_close(features[name], expected[name], rtol=0, atol=1e-6, msg=name)
        assert features[name].abs().max() > 0, f"{name} is all zeros: the comparison would be vacuous"


def test_features_with_null_condition_equal_full_forward_without_labels(tiny_model) -> None:
    # cond None on a conditional model means the null label, in features as in forward.
    x_t, t, _ = _inputs(tiny_model)
    with torch.no_grad():
        expected = _hooked_full_forward(tiny_model, x_t, t, None)
        features = tiny_model.features(x_t, t, None, ("mid",))
        with_null = tiny_model.features(x_t, t, torch.full((4,), tiny_model.null_label), ("mid",))
    torch.testing.assert_close(features["mid"], expected["mid"], rtol=0, atol=1e-6)
    torch.testing.assert_close(with_null["mid"], features["mid"], rtol=0, atol=0)


def test_features_accept_a_scalar_timestep(tiny_model) -> None:
    x_t, _, cond = _inputs(tiny_model)
    with torch.no_grad():
        scalar = tiny_model.features(x_t, torch.tensor(321), cond)["mid"]
        vector = tiny_model.features(x_t, torch.full((4,), 321), cond)["mid"]
    torch.testing.assert_close(scalar, vector, rtol=0, atol=0)


class _Forbidden(RuntimeError):
    pass


def _forbid(module: torch.nn.Module) -> list:
    def hook(*_):
        raise _Forbidden(f"{type(module).__name__} must not run")

    return [m.register_forward_pre_hook(hook) for m in module.modules()]


@pytest.mark.parametrize("taps", [("mid",), ("down0",), ("down1",), ("down0", "down1", "mid")])
def test_features_never_run_the_decoder(tiny_model, taps: tuple[str, ...]) -> None:
    x_t, t, cond = _inputs(tiny_model)
    handles = _forbid(tiny_model.unet.up_blocks) + _forbid(tiny_model.unet.conv_out)
    try:
        tiny_model.features(x_t, t, cond, taps)
        with pytest.raises(_Forbidden):  # the hooks are live: a full forward does trip them
            tiny_model(x_t, t, cond)
    finally:
        for h in handles:
            h.remove()


def test_features_stop_at_the_deepest_tap_asked_for(tiny_model) -> None:
    x_t, t, cond = _inputs(tiny_model)
    handles = _forbid(tiny_model.unet.mid_block) + _forbid(tiny_model.unet.down_blocks[1])
    try:
        out = tiny_model.features(x_t, t, cond, ("down0",))
    finally:
        for h in handles:
            h.remove()
    assert set(out) == {"down0"}


def test_unknown_tap_is_refused(tiny_model) -> None:
    x_t, t, cond = _inputs(tiny_model)
    with pytest.raises(ValueError, match="down3"):
        tiny_model.features(x_t, t, cond, ("down3",))


def test_frozen_copy_is_eval_without_grad_and_equal_weights(tiny_model) -> None:
    tiny_model.train()
    teacher = frozen_copy(tiny_model)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in tiny_model.parameters()), "the source model must stay trainable"
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), teacher.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        assert a.data_ptr() != b.data_ptr(), f"{name} shares storage: training would change the teacher"


def test_unwrap_strips_compile_and_ddp_style_wrappers(tiny_model) -> None:
    class DDPLike(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    class CompiledLike(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = module

    assert unwrap(DDPLike(CompiledLike(tiny_model))) is tiny_model
    assert unwrap(tiny_model) is tiny_model
