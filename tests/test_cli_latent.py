"""``perceptual-diffusion latent ...`` end to end, as a new user would run it: a tiny offline Stable-Diffusion-style
folder, the built-in shapes as captions, MSE then self-perceptual training, resume, sampling with CFG, export to
diffusers; and one-line errors (exit code 2) for bad input. All in-process through ``cli.main``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from perceptual_diffusion.cli import build_parser, main

TRAIN = [
    "--resolution",
    "16",
    "--batch-size",
    "8",
    "--warmup-images",
    "0",
    "--steps",
    "4",
    "--log-every",
    "2",
    "--sample-every",
    "4",
    "--checkpoint-every",
    "2",
    "--sample-steps",
    "2",
    "--device",
    "cpu",
    "--no-progress",
]


def _log_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def _one_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


@pytest.fixture(scope="module")
def latent_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tiny -> shapes-captions -> MSE run -> self-perceptual run from it, through the CLI."""
    root = tmp_path_factory.mktemp("latent-cli")
    paths = {
        "pretrained": root / "tiny-sd",
        "data": root / "captions",
        "cache": root / "cache",
        "mse": root / "mse",
        "sp": root / "sp",
    }
    assert main(["latent", "tiny", "--out", str(paths["pretrained"])]) == 0
    assert main(["latent", "shapes-captions", "--out", str(paths["data"]), "--every", "40"]) == 0
    common = [
        "--pretrained",
        str(paths["pretrained"]),
        "--data-path",
        str(paths["data"]),
        "--cache-dir",
        str(paths["cache"]),
        *TRAIN,
    ]
    cache = ["latent", "cache", "--pretrained", str(paths["pretrained"]), "--data-path", str(paths["data"])]
    assert main([*cache, "--cache-dir", str(paths["cache"]), "--resolution", "16", "--device", "cpu"]) == 0
    (chunk,) = paths["cache"].glob("latents-*/chunk-*.safetensors")
    paths["chunk_stamp"] = chunk.stat().st_mtime_ns  # type: ignore[assignment]
    assert main(["latent", "train", "--run-dir", str(paths["mse"]), *common]) == 0
    sp = ["latent", "train", "--run-dir", str(paths["sp"]), *common]
    sp += ["--loss", "self-perceptual", "--teacher", str(paths["mse"])]
    assert main(sp) == 0
    paths["sp_command"] = sp  # type: ignore[assignment]
    paths["common"] = common  # type: ignore[assignment]
    return paths


def test_tiny_and_shapes_captions_print_what_they_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["latent", "tiny", "--out", str(tmp_path / "sd"), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "sd") in out and "latent train" in out
    for part in ("unet", "vae", "text_encoder", "tokenizer"):
        assert (tmp_path / "sd" / part).is_dir()
    assert main(["latent", "tiny", "--out", str(tmp_path / "sd")]) == 2  # not empty, no --force
    _one_error(capsys, "--force")
    assert main(["latent", "shapes-captions", "--out", str(tmp_path / "c"), "--every", "200"]) == 0
    assert "wrote 8 captioned images" in capsys.readouterr().out
    assert len(list((tmp_path / "c").glob("*.png"))) == 8


def test_train_mse_then_self_perceptual(latent_setup: dict[str, Path]) -> None:
    mse, sp = latent_setup["mse"], latent_setup["sp"]
    assert _log_steps(mse) == [2, 4]
    config = json.loads((sp / "config.json").read_text())
    assert config["loss"]["kind"] == "self-perceptual" and config["sample"]["clip_x0"] is False
    assert config["model"] == {"pretrained": str(latent_setup["pretrained"]), "resolution": 16, "t5": True}
    rows = [json.loads(line) for line in (sp / "log.jsonl").read_text().splitlines()]
    assert rows and all("perceptual" in row for row in rows)
    assert (sp / "model.safetensors").is_file()
    assert list((sp / "samples").glob("step-*.png"))
    (chunk,) = latent_setup["cache"].glob("latents-*/chunk-*.safetensors")
    assert chunk.stat().st_mtime_ns == latent_setup["chunk_stamp"], "training used the cache `latent cache` filled"


def test_rerun_with_more_steps_resumes(latent_setup: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    sp = latent_setup["sp"]
    command = [*latent_setup["sp_command"], "--steps", "6"]  # type: ignore[misc]
    assert main(command) == 0
    assert "to step 6" in capsys.readouterr().out
    steps = _log_steps(sp)
    assert steps == sorted(set(steps)) and steps[-1] == 6 and 4 in steps


def test_sample_with_cfg_writes_one_row_per_prompt(
    latent_setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "grid.png"
    argv = ["latent", "sample", str(latent_setup["sp"]), "--prompt", "a red disc", "--prompt", "a blue square"]
    argv += ["-n", "3", "--steps", "2", "--cfg-scale", "3", "--guidance-rescale", "0.7", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    assert str(out) in capsys.readouterr().out
    # save_grid: 1 px grey padding, then 4x nearest upscaling; 16 px images, 3 per row, 2 rows
    assert Image.open(out).size == ((3 * 17 + 1) * 4, (2 * 17 + 1) * 4)


def test_export_loads_in_diffusers(
    latent_setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import diffusers

    out = tmp_path / "pipe"
    assert main(["latent", "export", str(latent_setup["sp"]), "--out", str(out)]) == 0
    assert "StableDiffusionPipeline.from_pretrained" in capsys.readouterr().out
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(["a red disc"], num_inference_steps=2, height=16, width=16, output_type="np").images
    assert images.shape == (1, 16, 16, 3)
    # into a non-empty folder without --force: refused
    assert main(["latent", "export", str(latent_setup["sp"]), "--out", str(out)]) == 2
    _one_error(capsys, "not empty", "--force")


def test_train_bad_input_is_one_line(
    latent_setup: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pretrained, data = latent_setup["pretrained"], latent_setup["data"]
    broken = tmp_path / "broken"
    shutil.copytree(pretrained, broken)
    shutil.rmtree(broken / "text_encoder")

    def train(*extra: str) -> int:
        base = ["latent", "train", "--run-dir", str(tmp_path / "run"), "--pretrained", str(pretrained)]
        base += ["--data-path", str(data), "--cache-dir", str(tmp_path / "cache"), *TRAIN]
        return main([*base, *extra])

    assert train("--pretrained", str(broken)) == 2
    _one_error(capsys, "text_encoder/")
    assert train("--data-path", str(tmp_path / "missing")) == 2
    _one_error(capsys, "missing", "--data-path")
    # the tiny folder needs a multiple of 4 px (VAE 2x, one U-Net halving): 12 fits, 10 does not
    assert train("--resolution", "10") == 2
    _one_error(capsys, "--resolution 10", "multiple of 4")
    sp = ["--loss", "self-perceptual", "--teacher", str(latent_setup["mse"])]
    assert train(*sp, "--feature-layer", "down3") == 2  # the tiny U-Net has down0, down1, mid
    _one_error(capsys, "--feature-layer down3")
    assert not (tmp_path / "run").exists(), "refused before the run directory is written"
    assert train("--no-clip-x0") == 2  # latent models never clip: the flag is not offered
    _one_error(capsys, "--no-clip-x0")
    assert train("--preset", "tiny") == 2  # pixel-only
    _one_error(capsys, "--preset")
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_pixel_and_latent_commands_refuse_each_others_runs(
    latent_setup: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_cli_train: list[str],
) -> None:
    pixel = tmp_path / "pixel"
    argv = ["train", "--run-dir", str(pixel), *tiny_cli_train, "--image-size", "8", "--steps", "1"]
    assert main([*argv, "--sample-every", "100"]) == 0
    capsys.readouterr()
    out = tmp_path / "g.png"
    assert main(["latent", "sample", str(pixel), "--prompt", "x", "--out", str(out), "--device", "cpu"]) == 2
    _one_error(capsys, "pixel-space model")
    assert main(["latent", "export", str(pixel), "--out", str(tmp_path / "e")]) == 2
    _one_error(capsys, "pixel-space model")
    assert main(["sample", str(latent_setup["sp"]), "--out", str(out), "--device", "cpu"]) == 2
    _one_error(capsys, "latent text-to-image model", "latent")
    assert not out.exists()


def test_every_latent_subcommand_has_help_that_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        return dict(action.choices)

    latent = subparsers(subparsers(build_parser())["latent"])
    assert set(latent) == {"tiny", "shapes-captions", "cache", "train", "sample", "export"}
    for name, sub in latent.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["latent", name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = action.option_strings[0] if action.option_strings else action.dest
            assert action.help and action.help.strip(), f"latent {name} {label} has no help text"
            assert label in text, f"latent {name} --help does not mention {label}"
        assert "--clip-x0" not in text and "--no-clip-x0" not in text
        if name == "train":
            for pixel_only in ("--preset", "--image-size", "--unconditional", "--grayscale", "--data "):
                assert pixel_only not in text, pixel_only
            for shared in ("--teacher", "--prediction-type", "--no-zero-snr", "--grad-accum", "--cfg-scale"):
                assert shared in text, shared


def test_latent_train_with_the_latent_perceptual_loss_logs_both_terms(latent_setup, tmp_path, capsys) -> None:
    """--loss latent-perceptual (Berrada et al., arXiv 2411.04873) through the CLI: MSE + LPL over the frozen VAE's
    decoder, both logged; impossible LPL values and the loss on a pixel model are one error line."""
    run = tmp_path / "lpl"
    argv = ["latent", "train", "--run-dir", str(run), *latent_setup["common"], "--loss", "latent-perceptual"]
    assert main([*argv, "--lpl-snr-min", "0"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all({"mse", "lpl"} <= set(r) for r in records) and any(r["lpl"] > 0 for r in records)
    assert json.loads((run / "config.json").read_text())["loss"]["lpl_weight"] == 3.0
    assert main([*argv[:3], str(tmp_path / "bad"), *argv[4:], "--lpl-outlier-quantile", "0.7"]) == 2
    _one_error(capsys, "--lpl-outlier-quantile")
    assert main([*argv[:3], str(tmp_path / "deep"), *argv[4:], "--lpl-up-blocks", "9"]) == 2
    _one_error(capsys, "--lpl-up-blocks 9")
    assert main(["train", "--run-dir", str(tmp_path / "pixel"), "--loss", "latent-perceptual", "--steps", "1"]) == 2
    _one_error(capsys, "latent train")
