"""Checks and reports that several commands share: output paths checked before any work, sample counts bounded by
memory, non-finite models named, and the line after training. Imported by the commands only (it needs torch).

Every check raises ``UserError`` (one ``error:`` line, exit code 2) before the expensive part of a command starts, so
a mistake in an option never costs a finished evaluation or sampling run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import ownership

# Files of a run directory that no output option may replace (samples/ grids are outputs themselves).
_RUN_FILES = {ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, "log.jsonl", ".lock"}
_RUN_FOLDERS = {ckpt.STATE_DIR, "snapshots"}


# ---------------------------------------------------------------------------------------------------------------
# Output paths, checked before the work.


def _is_run_dir(folder: Path) -> bool:
    return (folder / ckpt.CONFIG_NAME).is_file() or (folder / ckpt.STATE_DIR).is_dir()


def _is_model_file(target: Path, model: str | Path) -> bool:
    """True when writing ``target`` would replace a file the model is read from, or a file of its run."""

    t = target.resolve()
    source = Path(model).resolve()
    if t == source:
        return True
    folder = source if source.is_dir() else source.parent
    if folder not in t.parents:
        return False
    if _is_run_dir(folder) or (folder / ckpt.WEIGHTS_NAME).is_file():
        rel = t.relative_to(folder)
        return rel.parts[0] in _RUN_FOLDERS or (len(rel.parts) == 1 and rel.name in _RUN_FILES)
    return source.is_dir() and ckpt.is_diffusers_folder(source)  # an exported folder: every file in it is the model


def check_output_file(path: str | Path, option: str, model: str | Path | None = None) -> Path:
    """Check an output file before any work: not a folder, not under a file, writable, not one of the model's
    own files (``sample RUN --out RUN/model.safetensors`` would replace the weights it samples), and not a file of
    anything another command made (another run's weights or config, an export, a comparison's report:
    ``ownership.protected_output``)."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option} {p} is a folder; give a file name for {option}")
    if model is not None and _is_model_file(p, model):
        raise UserError(f"{option} {p} would replace a file of the model {model}; write the output elsewhere")
    owner = ownership.protected_output(p)
    if owner is not None:
        what = f"would replace a file of {owner}" if p.exists() or p.is_symlink() else f"would write into {owner}"
        raise UserError(f"{option} {p} {what}; write the output elsewhere")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{option} {p} cannot be written: {ancestor} is a file, not a folder")
    try:  # a real write, not os.access: it also sees read-only mounts and full disks (and root ignores modes)
        with tempfile.NamedTemporaryFile(dir=ancestor, prefix=f".{p.name}.", suffix=ckpt.TMP_SUFFIX):
            pass
    except OSError as exc:
        raise UserError(f"{option} {p} cannot be written ({exc.strerror or exc}); choose another path") from None
    return p


# ---------------------------------------------------------------------------------------------------------------
# Sample counts and memory.


def available_memory() -> int | None:
    """Bytes of memory this process can still allocate (MemAvailable, within a cgroup limit), None if unknown."""
    found = []
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_fits_in_memory(n: int, channels: int, size: int, grid: bool, what: str = "-n") -> None:
    """Refuse a sampling command whose images (float samples, their uint8 copy and the upscaled grid) cannot fit."""
    per_image = 2 * channels * size * size * 4 + size * size * 3  # the batches and their concatenation; uint8
    if grid:
        per_image += 2 * ((size + 1) * 4) ** 2 * 3  # the mosaic and its 4x upscale
    need = n * per_image
    free = available_memory()
    if free is not None and need > free:
        raise UserError(
            f"{what} {n} needs about {need / 2**30:.1f} GiB for the images{' and the grid' if grid else ''}, more "
            f"than the {free / 2**30:.1f} GiB available; draw fewer per call (--seed continues a series)"
        )


# ---------------------------------------------------------------------------------------------------------------
# Models that produce NaN.


def non_finite_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    return [k for k, v in tensors if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_model(model: torch.nn.Module, source: str | Path) -> None:
    """A model with NaN or inf weights (a foreign or hand-edited file) produces non-finite samples: say so now."""
    bad = non_finite_tensors(model.state_dict().items())
    if bad:
        raise UserError(
            f"the model {source} produces non-finite samples: {len(bad)} of its weight tensors hold NaN or inf "
            f"(e.g. {bad[0]!r}); retrain it, or use another checkpoint"
        )


def check_finite_samples(images: torch.Tensor, source: str | Path) -> None:
    if not bool(torch.isfinite(images).all()):
        raise UserError(
            f"the model {source} produces non-finite samples (NaN or inf) with these settings, though its weights "
            "are finite; try other sampling settings, or another checkpoint"
        )


def refusing_non_finite(extractor: Any, source: str | Path) -> Any:
    """The feature extractor, refusing non-finite samples with one line (metrics would fail deep inside numpy or
    scikit-learn otherwise); the real data it also featurises is always finite."""
    forward: Callable[[torch.Tensor], Any] = extractor.forward

    def checked(images: torch.Tensor) -> Any:
        check_finite_samples(images, source)
        return forward(images)

    return dataclasses.replace(extractor, forward=checked)


# ---------------------------------------------------------------------------------------------------------------
# Training.


def train_and_report(train_fn: Callable[..., Any], config: Any, args: argparse.Namespace) -> None:
    """Run a training function (``training.loop.train``, ``training.latent.train_latent``) into --run-dir, mirrored to
    TensorBoard with --report-to tensorboard, and print one line from rank 0 (under torchrun); a run that had nothing
    left to train says so, rather than reporting a speed of nan images/s."""
    from perceptual_diffusion.runtime.distributed import launched_rank
    from perceptual_diffusion.runtime.tracking import mirror

    if not args.run_dir.strip():
        raise UserError("--run-dir must name a folder")
    with mirror(getattr(args, "report_to", "none"), Path(args.run_dir), enabled=launched_rank() == 0):
        result = train_fn(config, args.run_dir, override_config=args.override_config)
    if launched_rank() != 0:  # under torchrun, one line from rank 0, not one per process
        return
    weights = Path(result.run_dir) / ckpt.WEIGHTS_NAME
    requested = config.train.steps
    if result.step > requested:
        print(
            f"{result.run_dir} is already at step {result.step}, past the requested --steps {requested}: nothing "
            f"was trained (a run is never shortened; pass --steps above {result.step} to continue it, or use a new "
            f"--run-dir); weights of step {result.step}: {weights}"
        )
    elif math.isnan(result.images_per_second):
        print(f"{result.run_dir} was already trained to step {result.step}: nothing left to train; weights: {weights}")
    else:
        print(
            f"trained {result.run_dir} to step {result.step} ({result.images_per_second:.0f} images/s); "
            f"weights: {weights}"
        )
