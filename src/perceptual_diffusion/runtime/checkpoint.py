"""Checkpoints and weights: atomic writes, safe reads, and the run-directory layout.

A run directory holds:
    config.json                 the RunConfig (written once; a resume must match it)
    log.jsonl                   one JSON object per logged step
    model.safetensors           EMA weights of the newest checkpoint, the config in its metadata (inference snapshot)
    checkpoints/state-XXXXXXXX.pt  full training state (model, EMA, optimiser, step), the last K kept
    samples/step-XXXXXXXX.png   sample grids under fixed seeds
    .lock                       held (flock) while a process trains here; released by the kernel on any exit

Every file is written by :func:`atomic_write` (temporary file, fsync, rename), so a crash, a full disk or SIGKILL
leaves either the old or the new file, never half of one; the previous checkpoint is deleted only after the new one
is in place. Nothing is ever pickled with code: training state holds tensors and plain containers only and is read
back with ``torch.load(weights_only=True)``, which refuses any pickle that would construct arbitrary objects; such a
file is reported as :class:`UnsafeCheckpoint`. Weights are read from safetensors only.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import pickletools
import re
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from perceptual_diffusion.config import LatentRunConfig, RunConfig
from perceptual_diffusion.errors import UserError

FORMAT = "perceptual-diffusion/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
STATE_DIR = "checkpoints"
TMP_SUFFIX = ".tmp"
STATE_KEYS = ("step", "model", "ema", "optimizer")
_STATE_NAME = re.compile(r"state-\d{8,}\.pt")
# What torch.save itself writes for tensors and dicts; any other global in a refused pickle means it would run code.
_TORCH_GLOBALS = re.compile(
    r"torch\._utils\._rebuild_\w+|torch\._tensor\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict"
    r"|torch\.Size|torch\.device|torch\.(b?float|u?int|complex|bool)\w*"
)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class UnsafeCheckpoint(UserError):
    """A file whose pickle would import and call Python code: refused, never skipped silently."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via ``write(tmp)`` to a temporary file in the same folder, fsync it, then rename over ``path``.

    A crash or exception midway leaves the previous file untouched (rename is atomic on POSIX filesystems); a
    temporary file orphaned by SIGKILL is removed by :func:`remove_stale_temporaries` when the run resumes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            write(tmp)
        except (RuntimeError, SafetensorError) as exc:
            os_error = _as_os_error(exc, tmp, path)
            if os_error is None:
                raise
            raise os_error from exc
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)  # make the rename itself durable, not only the data
    finally:
        tmp.unlink(missing_ok=True)


# How writers that are not Python file objects report a failed write: torch.save's zip writer ("unexpected pos" when a
# write came up short, "file write failed") and safetensors' Rust writer ("I/O error: ... (os error 28)").
_WRITE_FAILURE = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed|I/O error|os error \d+")


def _as_os_error(exc: Exception, tmp: Path, path: Path) -> OSError | None:
    """A writer's failed write as the ``OSError`` it is, so that callers handling a full disk see one; None for any
    other error (a bug, an unpicklable object), which must surface as it is."""
    message = str(exc)
    if not _WRITE_FAILURE.search(message):
        return None
    code = re.search(r"os error (\d+)", message)
    if code:
        number = int(code.group(1))
    else:  # torch does not say why: a full filesystem is by far the usual cause, and statvfs can tell
        try:
            st = os.statvfs(tmp.parent)
            number = errno.ENOSPC if st.f_bavail * st.f_frsize < (1 << 20) else errno.EIO
        except OSError:
            number = errno.EIO
    return OSError(number, os.strerror(number), str(path))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(run_dir: Path) -> int:
    """Delete temporary files that :func:`atomic_write` left behind when a run was killed; returns how many."""
    count = 0
    for folder in (Path(run_dir), Path(run_dir) / STATE_DIR, Path(run_dir) / "samples"):
        if folder.is_dir():
            for tmp in folder.glob(f".*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                count += 1
    return count


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def sha256_file(path: Path) -> str:
    """sha256 of a file; of a folder (a diffusers export), over its files' relative names and contents, sorted."""
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        if path.is_dir():
            h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def weights_sha256(path: Path) -> str:
    """sha256 of a weights file or folder; of a Stable Diffusion (or SD3) folder, of its ``unet/`` (``transformer/``)
    only: the teacher is that network, and hashing the VAE and text encoders too would read gigabytes at every start."""
    path = Path(path)
    if path.is_dir() and (path / "text_encoder").is_dir():
        for network in (UNET_DIR, TRANSFORMER_DIR):
            if (path / network).is_dir():
                return sha256_file(path / network)
    return sha256_file(path)


# ---------------------------------------------------------------------------------------------------------------
# Inference weights: safetensors with the run config in the metadata.


def save_weights(
    path: Path, state_dict: dict[str, torch.Tensor], config: RunConfig | LatentRunConfig, step: int
) -> None:
    """EMA (or any) weights as safetensors; the metadata carries the config, so the file alone rebuilds the model."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    meta = {"format": FORMAT, "config": config.to_json(), "step": str(step), "kind": _kind(config)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _kind(config: RunConfig | LatentRunConfig) -> str:
    return "latent" if isinstance(config, LatentRunConfig) else "pixel"


# An exported LoRA adapter: PEFT's folder (adapter_config.json, adapter_model.safetensors; pixel models) or the file
# diffusers' load_lora_weights reads (latent models); models/lora.py writes and reads them.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "pytorch_lora_weights.safetensors")


def is_adapter_folder(path: str | Path) -> bool:
    """A folder holding an exported LoRA adapter (``ADAPTER_FILES``)."""
    p = Path(path)
    return p.is_dir() and ((p / ADAPTER_FILES[0]).is_file() or (p / ADAPTER_FILES[2]).is_file())


def resolve_weights(path: str | Path) -> Path:
    """A run directory or a weights file -> the weights file; a diffusers or adapter folder -> itself; else a clear
    error."""
    p = Path(path)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME
        if is_diffusers_folder(p) or is_adapter_folder(p):
            return p
        raise UserError(f"{p} has no {WEIGHTS_NAME}: it is not a finished run directory (train it first)")
    if not p.exists():
        raise UserError(f"{p} does not exist: give a run directory or a .safetensors weights file")
    if not p.is_file():
        raise UserError(f"{p} is not a regular file: give a run directory or a .safetensors weights file")
    return p


def _weights_metadata(p: Path) -> dict[str, str]:
    try:
        with safe_open(str(p), framework="pt") as fh:
            return fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise UserError(
            f"{p} is not a safetensors weights file ({exc}); give a run directory or model.safetensors"
        ) from None


def read_weights(path: str | Path, kind: str = "pixel") -> tuple[dict[str, torch.Tensor], Any, int]:
    """Read (state_dict, config, step) from a run directory or a weights file written by :func:`save_weights`
    (``loading.read_weights`` also reads diffusers folders).

    ``kind`` is the model family the caller can use ("pixel": ``RunConfig``, "latent": ``LatentRunConfig``); weights
    of the other family are refused with a message. Only safetensors is read here, never a pickle, so a weights file
    cannot run code however it was made.
    """
    p = resolve_weights(path)
    if p.is_dir():  # a diffusers folder (resolve_weights returns no other folder)
        where = (
            "latent models read it with latent.read_unet_weights" if kind == "latent" else "use loading.read_weights"
        )
        raise UserError(f"{p} is a diffusers folder: {where}")
    config, step = config_of(p, kind)
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{p} is a damaged safetensors file ({exc}); retrain or copy it again") from None
    return tensors, config, step


def wrong_kind(path: str | Path, theirs: str) -> UserError:
    """The one-line error for weights of the other model family, naming the commands that take them."""
    what = {"pixel": "a pixel-space model", "latent": "a latent text-to-image model"}.get(theirs, repr(theirs))
    use = "the `latent` commands" if theirs == "latent" else "the pixel commands (train, sample, evaluate)"
    return UserError(f"{path} holds {what}; use it with {use}")


def config_of(p: Path, kind: str) -> tuple[Any, int]:
    meta = _weights_metadata(p)
    if meta.get("format") != FORMAT or "config" not in meta:
        raise UserError(f"{p} is a safetensors file but not perceptual-diffusion weights (no config in its metadata)")
    theirs = meta.get("kind", "pixel")
    if theirs != kind:
        raise wrong_kind(p, theirs)
    config_cls = LatentRunConfig if kind == "latent" else RunConfig
    try:
        config = config_cls.from_dict(json.loads(meta["config"]))
        step = int(meta.get("step", "0"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise UserError(f"{p} has an unreadable config in its metadata ({exc})") from None
    except UserError as exc:
        raise UserError(f"{p} has an invalid config in its metadata: {exc}") from None
    return config, step


def weights_kind(path: Path) -> str:
    """ "pixel" or "latent", from a weights file's metadata (files of older versions are pixel)."""
    return _weights_metadata(Path(path)).get("kind", "pixel")


def weights_step(path: Path) -> int | None:
    """The step recorded in a weights file, or None if it is missing or unreadable (cheap: reads the header only)."""
    try:
        return int(_weights_metadata(Path(path)).get("step", ""))
    except (UserError, ValueError):
        return None


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights, turning a mismatch (other architecture, image size or class count) into one clear line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(
        k
        for k in set(own) & set(state_dict)
        if not isinstance(state_dict[k], torch.Tensor) or own[k].shape != state_dict[k].shape
    )
    if missing or unexpected or wrong:
        detail = (missing or unexpected or wrong)[0]
        raise UserError(
            f"{source} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} mis-shaped tensors, e.g. {detail!r}): it was trained with another preset, image size, "
            "channel or class count"
        )
    try:
        model.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as exc:  # e.g. a complex or non-numeric dtype
        raise UserError(f"{source} holds tensors this model cannot take ({str(exc).splitlines()[0][:200]})") from None


# ---------------------------------------------------------------------------------------------------------------
# Full training state.


def state_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / STATE_DIR / f"state-{step:08d}.pt"


def state_step(path: Path) -> int:
    """The step in a state file's name (``state-00000250.pt`` -> 250)."""
    return int(Path(path).stem.split("-")[1])


def list_states(run_dir: Path) -> list[Path]:
    """Training-state files of a run, oldest first (only names this module writes; strays are ignored)."""
    d = Path(run_dir) / STATE_DIR
    if not d.is_dir():
        return []
    paths = [p for p in d.glob("state-*.pt") if _STATE_NAME.fullmatch(p.name) and p.is_file()]
    return sorted(paths, key=state_step)


def save_state(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the full training state atomically, then delete all but the newest ``keep`` states.

    The old states are deleted only after the new one is safely renamed into place, so a failure while writing (a
    full disk, an exception, SIGKILL) always leaves at least the previous checkpoint.
    """
    path = state_path(run_dir, step)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    prune_states(run_dir, keep)
    return path


def prune_states(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` training states (also on resume: a kill between a new state's rename and
    this deletion leaves one state too many)."""
    for old in list_states(run_dir)[:-keep]:
        old.unlink(missing_ok=True)


def _pickled_callables(path: Path, limit: int = 64 << 20) -> list[str]:
    """Python callables (``module.name``) that the pickle(s) in a file would import, other than torch's own.

    Used only to explain why ``torch.load(weights_only=True)`` refused a file: it scans opcodes, never executes them.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                streams = [zf.read(n) for n in zf.namelist() if n.endswith(".pkl")]
        else:
            with open(path, "rb") as fh:
                streams = [fh.read(limit)]
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        return []
    found = []
    for data in streams:
        strings: list[str] = []
        try:
            for op, arg, _ in pickletools.genops(data):
                if isinstance(arg, str):
                    strings.append(arg)
                name = None
                if op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name and not _TORCH_GLOBALS.fullmatch(name):
                    found.append(name)
        except Exception:  # noqa: BLE001 - garbage after the first opcodes: report what was readable
            pass
    return found


def load_state(path: Path) -> dict[str, Any]:
    """Read a training state with ``weights_only=True``: a pickle that would run code is refused, never executed.

    Raises :class:`UnsafeCheckpoint` for a pickle that imports Python callables, :class:`UserError` for anything
    else that is not a state written by :func:`save_state`.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol of files it then refuses anyway
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        callables = _pickled_callables(path)
        if callables:
            raise UnsafeCheckpoint(
                f"refusing to load {path}: its pickle would import and call {callables[0]}, which could execute "
                "code; it was not written by perceptual-diffusion, so delete it if you do not trust its source"
            ) from None
        raise UserError(f"{path} is not a readable training checkpoint (not a plain-tensor torch file)") from None
    except Exception as exc:  # noqa: BLE001 - torch's reader raises many types on a damaged file
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path} is not a readable training checkpoint ({first})") from None
    if not (
        isinstance(state, dict)
        and all(k in state for k in STATE_KEYS)
        and isinstance(state["step"], int)
        and state["step"] >= 0
        and all(isinstance(state[k], dict) for k in ("model", "ema", "optimizer"))
    ):
        raise UserError(f"{path} is a torch file but not a perceptual-diffusion training state")
    return state


def latest_state(run_dir: Path) -> dict[str, Any] | None:
    """The newest readable training state (None for a new run; an error if there are states but none readable).

    An unreadable newest file (damaged by a disk error or a copy cut short) is skipped with a warning naming it, so
    the run resumes from the previous checkpoint. A file that would execute code stops the resume with an error
    instead: it can only have been planted, and skipping it quietly would leave it there for another tool to load.
    """
    paths = list_states(run_dir)
    for path in reversed(paths):
        try:
            state = load_state(path)
        except UnsafeCheckpoint:
            raise
        except UserError as exc:
            warnings.warn(f"skipping checkpoint {path.name}: {exc}; trying an older one", stacklevel=2)
            continue
        if state["step"] != state_step(path):
            warnings.warn(f"skipping checkpoint {path.name}: it holds step {state['step']}", stacklevel=2)
            continue
        return state
    if paths:
        # Starting over would overwrite the log and these files: let the user decide.
        raise UserError(
            f"none of the {len(paths)} checkpoints in {Path(run_dir) / STATE_DIR} can be read; move them away to "
            "start this run over, or use a new --run-dir"
        )
    return None


UNET_DIR = "unet"
TRANSFORMER_DIR = "transformer"  # a pixel DiT's export: transformer/ + scheduler/, no pipeline (models/export.py)


def is_diffusers_folder(path: str | Path) -> bool:
    """True for a folder that looks like a diffusers pipeline or model (``model_index.json``, ``unet/`` or
    ``transformer/``)."""
    p = Path(path)
    return p.is_dir() and any(
        (p / name).is_file()
        for name in ("model_index.json", f"{UNET_DIR}/config.json", f"{TRANSFORMER_DIR}/config.json")
    )
