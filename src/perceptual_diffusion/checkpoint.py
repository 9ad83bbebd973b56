"""Checkpoints and weights: atomic writes, safe reads, and the run-directory layout.

A run directory holds:
    config.json                 the RunConfig (written once; a resume must match it)
    log.jsonl                   one JSON object per logged step
    model.safetensors           EMA weights of the newest checkpoint, the config in its metadata (inference snapshot)
    checkpoints/state-XXXXXXXX.pt  full training state (model, EMA, optimiser, step), the last K kept
    samples/step-XXXXXXXX.png   sample grids under fixed seeds

Nothing is ever pickled with code: training state holds tensors and plain containers only and is read back with
``torch.load(weights_only=True)``, which refuses any pickle that would construct arbitrary objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RunConfig
from .errors import UserError

FORMAT = "perceptual-diffusion/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_DIR = "checkpoints"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash or exception midway leaves the previous file untouched (rename is atomic on POSIX filesystems).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Inference weights: safetensors with the run config in the metadata.


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], config: RunConfig, step: int) -> None:
    """EMA (or any) weights as safetensors; the metadata carries the config, so the file alone rebuilds the model."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": FORMAT, "config": config.to_json(), "step": str(step)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def resolve_weights(path: str | Path) -> Path:
    """A run directory or a weights file -> the weights file; a clear error for anything else."""
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME
        raise UserError(f"{p} has no {WEIGHTS_NAME}: it is not a finished run directory (train it first)")
    if not p.exists():
        raise UserError(f"{p} does not exist: give a run directory or a .safetensors weights file")
    return p


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], RunConfig, int]:
    """Read (state_dict, config, step) from a run directory or a weights file written by :func:`save_weights`."""
    p = resolve_weights(path)
    try:
        with open(p, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if not 0 < header_len < 100_000_000:
                raise SafetensorError("bad header length")
            meta = json.loads(fh.read(header_len)).get("__metadata__") or {}
        tensors = load_file(str(p))
    except (SafetensorError, ValueError, OSError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(
            f"{p} is not a safetensors weights file ({exc}); give a run directory or model.safetensors"
        ) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{p} is a safetensors file but not perceptual-diffusion weights (no config in its metadata)")
    try:
        config = RunConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"{p} has an unreadable config in its metadata ({exc})") from None
    return tensors, config, int(meta.get("step", 0))


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a mismatch (other architecture, image size or class count) into one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise UserError(
            f"{source} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {detail!r}): it was trained with another preset, image size, "
            "channel or class count"
        )
    model.load_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------------------------
# Full training state.


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / STATE_DIR / f"state-{step:08d}.pt"


def list_states(run_dir: Path) -> list[Path]:
    """Training-state files of a run, oldest first."""
    d = Path(run_dir) / STATE_DIR
    return sorted(d.glob("state-*.pt")) if d.is_dir() else []


def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the full training state atomically, then delete all but the newest ``keep`` states."""
    path = state_path(run_dir, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    for old in list_states(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: a pickle that would run code is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint and could execute code when unpickled "
            f"({str(exc).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable training checkpoint ({str(exc).splitlines()[0]})") from None


def latest_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable training state; an unreadable newest file (a crash mid-copy) falls back to the previous."""
    for path in reversed(list_states(run_dir)):
        try:
            return load_state(path)
        except UserError:
            continue
    return None
