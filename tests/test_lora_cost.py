"""benchmarks/lora_cost.py at a tiny architecture, one round (issue 20, item 5): the table's structure, and the
shared teacher's loss equal to the two-copy reference's. Timings at this size mean nothing and are not checked."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("lora_cost", ROOT / "benchmarks" / "lora_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_cost"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_sd21_constant_is_the_published_architecture() -> None:
    from diffusers import UNet2DConditionModel

    cost = _load()
    assert set(cost.SD21_BASE_UNET) <= set(inspect.signature(UNet2DConditionModel.__init__).parameters)
    assert cost.SD21_BASE_UNET["block_out_channels"] == (320, 640, 1280, 1280)
    assert cost.SD21_BASE_UNET["attention_head_dim"] == (5, 10, 20, 20)
    with torch.device("meta"):  # no memory, no init: the parameter count alone
        unet = UNet2DConditionModel(**cost.SD21_BASE_UNET)
    assert sum(p.numel() for p in unet.parameters()) == 865_910_724, "SD 2.x's U-Net: 3.46 GB in fp32"
    state = cost.state_bytes(865_910_724, 0)
    assert state["lora-sp-two-copy"] - state["lora-sp"] == 865_910_724 * 4  # one base copy: 3.46 GB in fp32
    assert state["full-sp"] == 6 * 865_910_724 * 4, "weights, gradients, two AdamW moments, EMA and teacher"


@pytest.mark.slow
def test_the_benchmark_runs_at_a_tiny_size_and_the_shared_teacher_loss_is_the_two_copy_loss() -> None:
    cost = _load()
    report = cost.measure("tiny-sd", rank=2, repeats=1, warmup=0, rss=False, full_cap_gib=16)
    assert report.losses["lora-sp"] == pytest.approx(report.losses["lora-sp-two-copy"], rel=1e-6, abs=1e-7)
    assert report.losses["lora-sp"] > 0
    assert 0 < report.adapter_parameters < report.base_parameters
    sp, two, mse = report.row("lora-sp"), report.row("lora-sp-two-copy"), report.row("lora-mse")
    assert two.state_bytes - sp.state_bytes == report.base_parameters * 4
    assert sp.saved_bytes > mse.saved_bytes > 0, "the teacher's pass on the predicted branch is saved for backward"
    assert report.full is not None and report.full.fit and report.full.saved_bytes > 0
    table = cost.render(report)
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| step |"))
    rows = [line for line in lines[header + 2 :] if line.startswith("| (")]
    assert [r.split(" |")[0] for r in rows] == [
        "| (a) lora-mse",
        "| (b) lora-sp",
        "| (b2) lora-sp-two-copy",
        "| (T) teacher",
        "| (d) full-sp",
    ]
    assert all(r.count("|") == lines[header].count("|") for r in rows), "every row has every column"
    assert "against its bound 1 + (T)/(a)" in table and "(|difference| " in table
    # A machine that cannot hold the full step says so instead of swapping.
    tight = cost.run_child(["--full-child", "--preset", "tiny-sd", "--repeats", "1"], cap_gib=0.25)
    assert tight is None
