"""Many processes: DDP under ``torchrun`` with gloo on CPU.

2 processes with batch B each (``--batch-size 2B``, the global batch) must follow the same trajectory as 1 process
with batch 2B: every rank draws the whole global batch from the (seed, step) stream and keeps its slice, so both
runs see identical images, t, eps and condition dropout, and differ only in the float order of the gradient
average. Evaluation shards seeds over processes and gathers features in seed order, so its numbers do not depend on
the number of processes.

Measured on 2 CPU cores (10 steps, tiny preset): per-step losses agree to 2e-7 relative, weights to 3e-5 absolute;
evaluation (64 samples, 4 DDIM steps, domain features) gave bit-identical numbers. A self-perceptual LoRA run with
the shared teacher (4 steps, lr 1e-2): losses to 2e-7 relative, adapter and its EMA to 1e-5 absolute.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _runs import torch_threads_env

from perceptual_diffusion import cli, testing
from perceptual_diffusion.config import SampleConfig, TrainConfig
from perceptual_diffusion.core.sampling import sample, sample_sharded
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import loading, lora
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.runtime.cache import CACHE_ENV

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="this PyTorch build has no gloo backend"
)

LOSS_RTOL = 1e-5  # per-step loss, relative (measured: 2e-7)
WEIGHT_ATOL = 5e-4  # final weights after 10 AdamW steps at lr 1e-3, absolute (measured: 3e-5)
TRAIN = [
    "--preset",
    "tiny",
    "--image-size",
    "16",  # the shipped shapes classifier (evaluation's domain extractor) reads 16 px
    "--batch-size",
    "8",  # global: 2 processes x 4, or 1 process x 8
    "--steps",
    "10",
    "--warmup-images",
    "0",
    "--log-every",
    "1",
    "--sample-every",
    "1000",
    "--checkpoint-every",
    "1000",
    "--sample-steps",
    "2",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--mixed-precision",
    "no",
    "--no-progress",
]
EVALUATE = ["-n", "64", "--steps", "4", "--features", "domain", "--batch-size", "16", "--no-progress"]


PROBE = Path(__file__).with_name("_ddp_probe.py")  # the CLI, then each rank's trained state saved (rank<r>.pt)


def _torchrun(
    args: list[str], env: dict[str, str], program: tuple[str, ...] = ("-m", "perceptual_diffusion.cli")
) -> None:
    """Run the CLI (or ``program``: a script and its first arguments) in 2 CPU processes (one thread each) under
    torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    command += [*program, *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# The tests that start processes with torchrun are slow (marked one by one); the single-process ones run in
# `make test-fast` too.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run trained by 1 process with batch 8 and by 2 processes with batch 4 each."""
    root = tmp_path_factory.mktemp("ddp")
    one, two = root / "one-process", root / "two-processes"
    assert cli.main(["train", "--run-dir", str(one), *TRAIN]) == 0
    _torchrun(["train", "--run-dir", str(two), *TRAIN], torch_threads_env())
    return {"one": one, "two": two, "root": root}


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@slow
@needs_gloo
def test_two_processes_with_batch_b_follow_one_process_with_batch_2b(runs: dict[str, Path]) -> None:
    one, two = _log(runs["one"]), _log(runs["two"])
    assert [r["step"] for r in two] == list(range(1, 11)), "rank 0 alone writes the log, one line per step"
    for a, b in zip(one, two):
        assert (a["images_seen"], a["lr"]) == (b["images_seen"], b["lr"]), "schedules count the global batch"
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL), f"step {a['step']}"
        assert b["mse"] == pytest.approx(a["mse"], rel=LOSS_RTOL)
    state_one = ckpt.load_state(ckpt.list_states(runs["one"])[-1])
    state_two = ckpt.load_state(ckpt.list_states(runs["two"])[-1])
    assert state_two["step"] == 10 and set(state_two["model"]) == set(state_one["model"]), "no 'module.' prefixes"
    for part in ("model", "ema"):
        for key, value in state_one[part].items():
            torch.testing.assert_close(state_two[part][key], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{part} {key}")
    weights, _, step = loading.read_weights(runs["two"])
    assert step == 10 and set(weights) == set(state_one["ema"])


@slow
@needs_gloo
def test_evaluation_gives_the_same_numbers_with_one_and_two_processes(
    runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, out_one, out_two = runs["root"] / "cache", runs["root"] / "eval-one.json", runs["root"] / "eval-two.json"
    monkeypatch.setenv(CACHE_ENV, str(cache))
    assert cli.main(["evaluate", str(runs["one"]), *EVALUATE, "--json", str(out_one)]) == 0
    _torchrun(["evaluate", str(runs["one"]), *EVALUATE, "--json", str(out_two)], torch_threads_env())
    (one,), (two,) = json.loads(out_one.read_text()), json.loads(out_two.read_text())
    one.pop("seconds"), two.pop("seconds")
    # Each image has its own seed; only the batch an image is drawn in differs (convolutions may then round
    # differently), so the numbers agree to float32 round-off, and the exact shapes metrics exactly.
    assert two["n_samples"] == 64 and two["realism"] == one["realism"]
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4)
    for key in ("kid", "inception_score", "precision_recall", "memorisation"):
        numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float))}  # noqa: E731 - not the notes
        assert numbers(two[key]) == pytest.approx(numbers(one[key]), rel=1e-4, abs=1e-6), key
    assert two["kid"]["se_based_on"] == one["kid"]["se_based_on"]


def test_a_global_batch_that_does_not_split_evenly_is_refused() -> None:
    distributed.check_batch_split(TrainConfig(batch_size=8, grad_accum=2), world=2)  # 2 processes x 2 micro-batches x 2
    with pytest.raises(UserError, match="multiple of 4"):
        distributed.check_batch_split(TrainConfig(batch_size=6, grad_accum=2), world=2)
    with pytest.raises(UserError, match="--grad-accum"):
        TrainConfig(batch_size=6, grad_accum=4)


def test_without_torchrun_every_helper_is_a_single_process_no_op() -> None:
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    rows = torch.arange(10.0).reshape(5, 2)
    assert distributed.gather_seed_order(rows) is rows and distributed.mean_across(rows) is rows
    assert distributed.seed_shard([1, 2, 3]) == [1, 2, 3] and distributed.broadcast_object("x") == "x"
    with distributed.process_group(torch.device("cpu")):
        assert not dist.is_initialized(), "no process group without torchrun"


def test_sharded_sampling_in_one_process_is_plain_sampling(tiny_model) -> None:
    config = SampleConfig(steps=2)
    labels = torch.tensor([0, 1, 2, 0])
    expected = sample(tiny_model, [5, 6, 7, 8], labels, config)
    assert torch.equal(sample_sharded(tiny_model, [5, 6, 7, 8], labels, config), expected)


@slow
@needs_gloo
def test_latent_self_perceptual_with_two_processes_follows_one_process(tmp_path: Path) -> None:
    """The latent path under torchrun: the latent cache built by rank 0, the text encoder and the frozen teacher on
    every rank (never in DDP), and the same loss trajectory as one process with the same global batch."""

    tiny = testing.make_tiny_pipeline(tmp_path / "tiny-sd")
    data = testing.write_shapes_captions(tmp_path / "captions", every=40)
    common = ["--pretrained", str(tiny), "--data-path", str(data), "--resolution", "16", "--cache-dir",
              str(tmp_path / "cache"), "--batch-size", "8", "--warmup-images", "0", "--log-every", "1",
              "--sample-every", "1000", "--checkpoint-every", "1000", "--sample-steps", "2", "--device", "cpu",
              "--mixed-precision", "no", "--no-progress", "--seed", "3"]  # fmt: skip
    assert cli.main(["latent", "train", "--run-dir", str(tmp_path / "mse"), "--steps", "2", *common]) == 0
    sp = ["--loss", "self-perceptual", "--teacher", str(tmp_path / "mse"), "--steps", "4", "--lr", "1e-3", *common]
    assert cli.main(["latent", "train", "--run-dir", str(tmp_path / "one"), *sp]) == 0
    _torchrun(["latent", "train", "--run-dir", str(tmp_path / "two"), *sp], torch_threads_env())
    one, two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        assert b["perceptual"] == pytest.approx(a["perceptual"], rel=LOSS_RTOL), f"step {a['step']}"
        assert b["mse"] == pytest.approx(a["mse"], rel=LOSS_RTOL)
    w_one, _, _ = loading.read_weights(tmp_path / "one", kind="latent")
    w_two, _, _ = loading.read_weights(tmp_path / "two", kind="latent")
    for key, value in w_one.items():
        torch.testing.assert_close(w_two[key], value, rtol=0, atol=WEIGHT_ATOL, msg=key)


LORA_STEPS = ["--steps", "4", "--lr", "1e-2"]  # an lr at which 4 steps move the adapter well past WEIGHT_ATOL


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-perceptual LoRA run whose teacher is its base (the shared teacher: the online network with its adapter
    off), on the base of a short MSE run, trained by 1 process with batch 8 and by 2 processes with batch 4 each
    (through ``_ddp_probe.py``, which keeps each rank's final state)."""
    root = tmp_path_factory.mktemp("ddp-lora")
    at = TRAIN.index("--steps")
    common = [*TRAIN[:at], *TRAIN[at + 2 :]]  # TRAIN without its --steps
    assert cli.main(["train", "--run-dir", str(root / "mse"), *common, "--steps", "2"]) == 0
    sp = [*common, *LORA_STEPS, "--loss", "self-perceptual", "--teacher", str(root / "mse"), "--lora-rank", "2"]
    assert cli.main(["train", "--run-dir", str(root / "one"), *sp]) == 0
    _torchrun(["train", "--run-dir", str(root / "two"), *sp], torch_threads_env(), (str(PROBE), str(root)))
    return {"mse": root / "mse", "one": root / "one", "two": root / "two", "root": root}


@slow
@needs_gloo
def test_shared_teacher_lora_with_two_processes_follows_one_process(lora_runs: dict[str, Path]) -> None:
    """DDP over the adapter alone, the teacher pass through the unwrapped module with the adapter off: the same
    losses and adapter (and its EMA) as one process with the same global batch."""
    one, two = _log(lora_runs["one"]), _log(lora_runs["two"])
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for term in ("loss", "perceptual", "mse"):
            assert b[term] == pytest.approx(a[term], rel=LOSS_RTOL), f"step {a['step']} {term}"
    state_one = ckpt.load_state(ckpt.list_states(lora_runs["one"])[-1])
    state_two = ckpt.load_state(ckpt.list_states(lora_runs["two"])[-1])
    for part in ("model", "ema"):
        assert state_two[part] and set(state_two[part]) == set(state_one[part]), f"{part}: no 'module.' prefixes"
        assert all(lora.is_adapter_key(k) for k in state_two[part]), f"{part} holds the adapter alone"
        for key, value in state_one[part].items():
            torch.testing.assert_close(state_two[part][key], value, rtol=0, atol=WEIGHT_ATOL, msg=f"{part} {key}")
    moved = max(float(v.abs().max()) for k, v in state_two["model"].items() if ".lora_B." in k)
    assert moved > 20 * WEIGHT_ATOL, "B starts at zero: the adapter must have trained for the comparison to count"


@slow
@needs_gloo
def test_shared_teacher_lora_under_ddp_buckets_the_adapter_alone_and_leaves_the_base(
    lora_runs: dict[str, Path],
) -> None:
    """On both ranks after the last step: every base weight is the base file's, the adapters are the same (DDP
    averaged their gradients), and DDP's reducer holds the adapter's tensors alone (no bucket for the frozen base)."""
    config, _ = loading.weights_config(lora_runs["two"])  # read_weights would merge the adapter into the base
    assert lora.shares_teacher(config), "the teacher is the base: the online network with its adapter off"
    assert config.lora.base_sha256 == ckpt.weights_sha256(ckpt.resolve_weights(lora_runs["mse"]))
    base, _, _ = loading.read_weights(lora_runs["mse"])
    adapter = ckpt.load_state(ckpt.list_states(lora_runs["two"])[-1])["model"]
    ranks = [torch.load(lora_runs["root"] / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, report in enumerate(ranks):
        assert (report["code"], report["wrapper"]) == (0, "DistributedDataParallel"), f"rank {r}"
        assert report["bucketed_tensors"] == len(adapter), f"rank {r}: DDP buckets the adapter alone"
        assert report["bucketed_bytes"] == sum(v.numel() * v.element_size() for v in adapter.values())
        state = report["state"]
        own = {k.replace(".base_layer.", "."): v for k, v in state.items() if not lora.is_adapter_key(k)}
        assert set(own) == set(base), f"rank {r}"
        changed = [k for k, v in base.items() if not torch.equal(own[k], v)]
        assert not changed, f"rank {r} changed base weights: {changed[:3]}"
        for key, value in adapter.items():
            assert torch.equal(state[key], value), f"rank {r} {key}: the ranks hold one adapter"
    (group,) = ckpt.load_state(ckpt.list_states(lora_runs["two"])[-1])["optimizer"]["param_groups"]
    assert len(group["params"]) == len(adapter), "AdamW (and its weight decay) holds the adapter's tensors alone"
