"""End to end through the command line: train on every data source, sample, the two-stage recipe, resume, --help.

Most tests call ``cli.main`` in-process (no interpreter start-up per call); two run the installed console script in a
subprocess to check what a user's shell sees: exit codes and one-line errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from perceptual_diffusion.cli import build_parser, main
from perceptual_diffusion.runtime import checkpoint as ckpt

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def train_cli(tiny_cli_train: list[str]):
    """``train_cli(run_dir, *options)``: ``perceptual-diffusion train`` on the tiny preset, in-process."""

    def run(run_dir: Path, *extra: str) -> int:
        return main(["train", "--run-dir", str(run_dir), *tiny_cli_train, *extra])

    return run


@pytest.fixture(scope="module")
def cli_mse_run(tmp_path_factory: pytest.TempPathFactory, train_cli) -> Path:
    """Stage 1 of the recipe through the CLI: a tiny class-conditional MSE model on 8x8 shapes."""
    run_dir = tmp_path_factory.mktemp("cli") / "mse"
    assert train_cli(run_dir, "--data", "shapes", "--image-size", "8", "--steps", "3") == 0
    return run_dir


def test_train_on_shapes_writes_a_complete_run_directory(cli_mse_run: Path) -> None:
    for name in ("config.json", "log.jsonl", "model.safetensors", "checkpoints/state-00000003.pt"):
        assert (cli_mse_run / name).is_file(), name
    assert list((cli_mse_run / "samples").glob("step-*.png"))
    config = json.loads((cli_mse_run / "config.json").read_text())
    assert config["model"] == {"preset": "tiny", "image_size": 8, "channels": 3, "num_classes": 4, "arch": "unet"}
    assert config["loss"]["kind"] == "mse" and config["train"]["steps"] == 3
    assert _log_steps(cli_mse_run) == [1, 2, 3]


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_train_on_fashion_mnist(tmp_path: Path, train_cli) -> None:
    assert train_cli(tmp_path, "--data", "fashion-mnist", "--steps", "1") == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"] == {"preset": "tiny", "image_size": 28, "channels": 1, "num_classes": 10, "arch": "unet"}
    assert (tmp_path / "model.safetensors").is_file()


def test_train_on_a_folder_of_pngs_with_subfolders_as_classes(tmp_path: Path, train_cli) -> None:
    data = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(data / cls / f"{i}.png")
    run_dir = tmp_path / "run"
    assert train_cli(run_dir, "--data", "folder", "--data-path", str(data), "--image-size", "8", "--steps", "2") == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["num_classes"] == 2 and config["model"]["channels"] == 3
    assert config["data"]["path"] == str(data)


def test_sample_writes_a_png_grid_and_an_npz_with_the_requested_count(cli_mse_run: Path, tmp_path: Path) -> None:
    png, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    argv = ["sample", str(cli_mse_run), "-n", "5", "--seed", "10", "--steps", "2", "--batch-size", "2"]
    assert main([*argv, "--out", str(png), "--npz", str(npz), "--device", "cpu", "--label", "random"]) == 0
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 8
    with np.load(npz) as saved:
        assert saved["images"].shape == (5, 8, 8, 3) and saved["images"].dtype == np.uint8
        assert saved["seeds"].tolist() == [10, 11, 12, 13, 14]
        assert saved["labels"].shape == (5,) and set(saved["labels"].tolist()) <= {0, 1, 2, 3}
        images = saved["images"]
    # Image i depends on seed i only: the first three of a 3-image draw are the same images.
    npz3 = tmp_path / "three.npz"
    argv3 = ["sample", str(cli_mse_run), "-n", "3", "--seed", "10", "--steps", "2", "--label", "random"]
    assert main([*argv3, "--out", "", "--npz", str(npz3), "--device", "cpu"]) == 0
    with np.load(npz3) as saved:
        assert np.abs(saved["images"].astype(int) - images[:3].astype(int)).max() <= 1


def test_sample_unconditional_writes_null_labels(cli_mse_run: Path, tmp_path: Path) -> None:
    npz = tmp_path / "u.npz"
    argv = ["sample", str(cli_mse_run), "-n", "2", "--steps", "2", "--label", "none", "--out", "", "--npz", str(npz)]
    assert main([*argv, "--device", "cpu"]) == 0
    with np.load(npz) as saved:
        assert saved["labels"].tolist() == [-1, -1]


def test_two_stage_recipe_runs_and_resumes(cli_mse_run: Path, tmp_path: Path, train_cli) -> None:
    teacher = tmp_path / "teacher"
    shutil.copytree(cli_mse_run, teacher)  # stage 1 reused read-only; a copy keeps the shared fixture pristine
    stage2 = tmp_path / "self-perceptual"
    common = ("--data", "shapes", "--image-size", "8", "--loss", "self-perceptual", "--teacher", str(teacher))
    assert train_cli(stage2, *common, "--steps", "2") == 0
    assert _log_steps(stage2) == [1, 2]
    saved = json.loads((stage2 / "config.json").read_text())
    assert saved["loss"]["teacher_sha256"] == ckpt.sha256_file(teacher / "model.safetensors")
    # Rerun with more steps: it continues from step 2.
    assert train_cli(stage2, *common, "--steps", "4") == 0
    assert _log_steps(stage2) == [1, 2, 3, 4]
    assert [p.name for p in ckpt.list_states(stage2)][-1] == "state-00000004.pt"
    # A changed objective option on resume is refused with exit code 2, and trains nothing.
    assert train_cli(stage2, *common, "--steps", "5", "--distance", "l1") == 2
    assert _log_steps(stage2) == [1, 2, 3, 4]


def test_self_perceptual_without_teacher_is_a_one_line_error(tmp_path: Path, capsys, train_cli) -> None:
    assert train_cli(tmp_path / "run", "--loss", "self-perceptual", "--steps", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--teacher" in err and "\n" not in err


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_subcommand_has_help_that_documents_every_option(capsys) -> None:
    subcommands = _subparsers(build_parser())
    assert {"train", "sample", "demo"} <= set(subcommands)
    for name, sub in subcommands.items():
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"{name} {label} has no help text"
            assert label in text, f"{name} --help does not mention {label}"


@pytest.mark.slow
def test_console_script_reports_user_errors_in_one_line_with_exit_code_2(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("perceptual-diffusion")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "perceptual_diffusion.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = tmp_path / "no-such-run"
    done = subprocess.run([*command, "sample", str(missing)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error:") and str(missing) in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and "train" in done.stdout and "sample" in done.stdout


def test_sample_label_rows_puts_one_class_in_each_row(cli_mse_run: Path, tmp_path: Path, capsys) -> None:
    """Classes in rows, as the help says and as every other class grid: 8 images of 4 classes -> 4 rows of 2."""
    png, npz = tmp_path / "rows.png", tmp_path / "rows.npz"
    argv = ["sample", str(cli_mse_run), "-n", "8", "--steps", "1", "--out", str(png), "--npz", str(npz)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert "one row per class" in capsys.readouterr().out
    with Image.open(png) as img:  # 8 px images, 1 px padding, 4x upscale
        assert img.size == ((2 * 9 + 1) * 4, (4 * 9 + 1) * 4)
    with np.load(npz) as saved:
        assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    help_text = next(a.help for a in _subparsers(build_parser())["sample"]._actions if a.dest == "label")
    assert "class c fills row c" in help_text


def test_progress_bar_shows_one_speed(tmp_path: Path, capsys, tiny_cli_train: list[str]) -> None:
    """images/s from the current throughput, not tqdm's step/s beside a cumulative img_s."""
    options = [o for o in tiny_cli_train if o != "--no-progress"]
    assert main(["train", "--run-dir", str(tmp_path / "run"), *options, "--steps", "3"]) == 0
    err = capsys.readouterr().err
    assert "images/s" in err and "step/s" not in err and "s/step" not in err and "img_s" not in err, err


def test_evaluate_uses_the_runs_sampler_names_it_and_writes_the_named_json(
    tmp_path: Path, capsys, monkeypatch, tiny_cli_train: list[str]
) -> None:
    """Defaults are the model's own sampling settings (the run's --sample-steps 3, not a fixed 50), printed with the
    numbers; the JSON lands where --help says: eval-EXTRACTOR-nN.json beside the weights."""
    monkeypatch.setenv("PD_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    options = [*tiny_cli_train, "--sample-steps", "3", "--image-size", "16", "--sample-every", "100"]
    assert main(["train", "--run-dir", str(run), *options, "--steps", "1"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "-n", "12", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "sampler: DDIM 3 steps, trailing spacing, eta 0, clip x0 on (the model's own settings)" in out, out
    written = run / "eval-domain-shapes16-n12.json"
    assert f"wrote {written}" in out
    (row,) = json.loads(written.read_text())
    assert row["sampling"]["steps"] == 3
    evaluate = _subparsers(build_parser())["evaluate"]
    helps = {a.dest: a.help for a in evaluate._actions}
    assert "eval-EXTRACTOR-nN.json" in helps["json"] and "domain-shapes16" in helps["json"]
    assert "the model's own sampling setting" in helps["sample_steps"]
    args = evaluate.parse_args([str(run), "--steps", "7"])
    from perceptual_diffusion.cli.sampling_options import run_sample_config
    from perceptual_diffusion.config import SampleConfig

    assert run_sample_config(args, SampleConfig(steps=3, eta=0.5), cfg_scale=2.0) == SampleConfig(
        steps=7, eta=0.5, cfg_scale=2.0
    )


def test_help_imports_neither_torch_nor_diffusers() -> None:
    """`--help` of every command answers at once: building the parser must not import the heavy libraries (the time
    itself is measured by benchmarks/cli_startup.py, not here)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from perceptual_diffusion.cli import build_parser\n"
        "parser = build_parser()\n"
        "for cmd in ('train', 'compare', 'latent'):\n"
        "    try:\n"
        "        parser.parse_args([cmd, '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'numpy', 'scipy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
