"""Who made a folder or a file, so that no command replaces what it did not make.

Every command that writes a folder claims it first (``claim_dir``): a new or empty folder gets a small marker file,
``.perceptual-diffusion.json``, naming the kind of folder, the command that made it and (where the command knows
them up front) the files it writes; a folder holding anything else is refused with one line before any work. Runs
and exports need no marker: they are recognised by their own files (``config.json`` with ``checkpoints/``,
``model_index.json``), and no other command may write into them. A single output file is claimed with
``claim_file``: an existing file is replaced only with ``--force`` and only when it is recognisably one that the
command made (``is_ours``, e.g. a classifier's safetensors metadata). ``check_run_dir`` is the claim of a training
run's folder (a run is its own marker), and ``protected_output`` says whether an output file would replace or mix
into something that another command made (a run's files, an export, a marked folder), whichever command writes it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime import checkpoint as ckpt

MARKER = ".perceptual-diffusion.json"
_SHOWN = 3  # foreign entries named in a refusal
# A training run's own entries (training/rundir.py): its files, and the folders it fills.
RUN_FILES = frozenset({ckpt.CONFIG_NAME, ckpt.WEIGHTS_NAME, "log.jsonl", ".lock"})
RUN_FOLDERS = frozenset({ckpt.STATE_DIR, "snapshots", "samples", "tensorboard"})
# What a run holds before its config.json is written (or after the user removed it): entries no other kind makes.
_UNCONFIGURED_RUN = frozenset({".lock", "log.jsonl"}) | RUN_FOLDERS
_MAX_CONFIG_BYTES = 1 << 20  # a run's config.json is a few kB; a larger config.json is someone else's


@dataclass(frozen=True)
class Marker:
    """What a folder's marker records."""

    kind: str  # the kind of folder ("shapes-captions", "experiment", ...): commands of one kind share a folder
    command: str  # the command that made it, as the user would type it after `perceptual-diffusion`
    files: tuple[str, ...] | None  # the top-level entries it writes; None: it fills the folder as it goes


def read_marker(folder: str | Path) -> Marker | None:
    """The marker of ``folder``; None when it has none (or an unreadable one, which then counts as none)."""
    try:
        raw = json.loads((Path(folder) / MARKER).read_text())
        files = raw.get("files")
        return Marker(str(raw["kind"]), str(raw["command"]), None if files is None else tuple(map(str, files)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _entries(folder: Path) -> list[str]:
    """Top-level names of ``folder`` other than its marker and atomic-write temporaries (those are ours)."""
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name != MARKER and not (p.name.startswith(".") and p.name.endswith(ckpt.TMP_SUFFIX))
    )


def _named(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > _SHOWN else shown


def _foreign_kind(folder: Path) -> str | None:
    """What ``folder`` is when it belongs to a run or an export, which only `train` and `export` write."""
    if (folder / ckpt.CONFIG_NAME).is_file() and (
        (folder / ckpt.STATE_DIR).is_dir() or (folder / ckpt.WEIGHTS_NAME).is_file()
    ):
        return "a run directory (config.json with checkpoints/ or model.safetensors)"
    if ckpt.is_diffusers_folder(folder):
        return "a diffusers export (model_index.json or unet/)"
    return None


def claim_dir(
    path: str | Path,
    kind: str,
    force: bool = False,
    *,
    command: str | None = None,
    files: Iterable[str] | None = None,
    legacy: Iterable[str] = (),
    adopt: Callable[[str], bool] | None = None,
    option: str = "--out",
) -> Path:
    """Make ``path`` this command's folder, or refuse in one line before any work; returns it as a ``Path``.

    Accepted: a new or empty folder, or one whose marker has the same ``kind`` (a rerun resumes or rewrites it); when
    that marker lists its files, any other entry is refused. Refused always: a file, a run directory, an export, a
    folder of another kind, and a folder without a marker that holds anything, unless it holds every name in
    ``legacy`` (the files this kind always wrote before markers existed: such a folder is adopted and marked), or
    every entry of which ``adopt`` accepts as a name this kind writes (e.g. the latent cache's ``latents-KEY``).
    ``force`` empties a folder of the same kind first (never one of another kind, nor foreign files in a listed one).
    ``files`` names the top-level entries this run will write (so an interrupted run's partial files stay ours).
    The marker is written before the function returns, which also proves the folder writable.
    """
    folder, command = Path(path), command or kind
    planned = None if files is None else sorted(set(files))
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder; choose another {option}")
    check_not_inside(folder, option)
    marker = None
    if folder.is_dir():
        what = _foreign_kind(folder)
        if what is not None:
            raise UserError(
                f"{option} {folder} is {what}, which `{command}` never writes into; choose another {option}"
            )
        marker, entries = read_marker(folder), _entries(folder)
        if marker is not None and marker.kind != kind:
            raise UserError(
                f"{option} {folder} was made by `perceptual-diffusion {marker.command}`, not by `{command}`; "
                f"choose another {option}"
            )
        if marker is not None and marker.files is not None:
            foreign = [e for e in entries if e not in marker.files]
            if foreign:
                raise UserError(
                    f"{option} {folder} holds files that `{command}` did not make ({_named(foreign)}); move them "
                    f"away or choose another {option}"
                )
        if marker is None and entries:
            adopted = adopt is not None and all(adopt(e) for e in entries)
            if not (adopted or (set(legacy) and set(legacy) <= set(entries))):
                raise UserError(
                    f"{option} {folder} is not empty and was not made by `{command}` (it holds {_named(entries)}); "
                    f"choose a new or empty folder for {option}"
                )
            marker = Marker(kind, command, None)  # made by this kind before markers existed: adopt it
        if force and marker is not None:
            for name in entries:
                entry = folder / name
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            marker = None
    if marker is not None and marker.files is not None and planned is not None:
        planned = sorted(set(planned) | set(marker.files))  # a superset of what it may have made stays truthful
    elif marker is not None and marker.files is None:
        planned = None  # a folder filled as it goes stays so
    record = {"kind": kind, "command": marker.command if marker else command, "files": planned}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(folder / MARKER, json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        raise UserError(
            f"cannot write into {option} {folder} ({exc.strerror or exc}); choose another {option}"
        ) from None
    return folder


def _is_run_config(path: Path) -> bool:
    """A run's config.json: a JSON object with ``model`` and ``train`` sections (``config.RunConfig.to_dict``)."""
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            return False
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
        return False
    return isinstance(raw, dict) and isinstance(raw.get("model"), dict) and isinstance(raw.get("train"), dict)


def is_run_dir(folder: str | Path) -> bool:
    """A training run's folder: checkpoints/ holds training states, or config.json holds a run configuration."""
    folder = Path(folder)
    return bool(ckpt.list_states(folder)) or _is_run_config(folder / ckpt.CONFIG_NAME)


def check_run_dir(path: str | Path, command: str = "train", option: str = "--run-dir") -> Path:
    """Refuse, before any work, a training target that is not a run: a file, a folder another command made (its
    marker), a diffusers export, or a non-empty folder that holds anything but a run's own entries. A new or empty
    folder starts a run; a run (``is_run_dir``) is resumed, whatever else its owner keeps in it."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{option} {folder} is a file, not a folder; choose another {option}")
    check_not_inside(folder, option)
    if not folder.is_dir():
        return folder
    marker = read_marker(folder)
    if marker is not None:
        raise UserError(
            f"{option} {folder} was made by `perceptual-diffusion {marker.command}`, not by `{command}`; choose a "
            f"new or empty folder for {option}"
        )
    if ckpt.is_diffusers_folder(folder):
        raise UserError(
            f"{option} {folder} is a diffusers export (model_index.json or unet/), which `{command}` never writes "
            f"into; choose a new or empty folder for {option}"
        )
    if is_run_dir(folder):
        return folder
    foreign = [e for e in _entries(folder) if e not in _UNCONFIGURED_RUN]
    if foreign:
        raise UserError(
            f"{option} {folder} is not empty and is not a run directory (it holds {_named(foreign)}); choose a new "
            f"or empty folder for {option}, or a run to resume"
        )
    return folder


def protected_output(path: str | Path, folder: bool = False) -> str | None:
    """What writing the output file ``path`` would replace or write into, in words ("the run RUN"); None when it
    touches nothing another command made. The nearest enclosing folder that a command made decides: in a run, its
    own files (config, weights, log, lock, checkpoints/, snapshots/, tensorboard/; other files, such as a user's
    grids, are free); anything in a diffusers export; in a marked folder its marker, any existing file, and when the
    marker lists the folder's files, any file at all (a stray file would make the folder refuse its own command).
    ``folder``: ``path`` is an output folder (a run, an export, a comparison), which a folder filled as it goes may
    hold (a comparison holds its runs), so there only a listed folder refuses it."""
    target = Path(path).resolve()
    for parent in target.parents:
        rel = target.relative_to(parent).parts
        if ckpt.is_diffusers_folder(parent):
            return f"the diffusers export {parent}"
        marker = read_marker(parent)
        if marker is not None:
            if rel[0] == MARKER or marker.files is not None or (target.exists() and not folder):
                return f"{parent}, which `perceptual-diffusion {marker.command}` made"
            return None
        if is_run_dir(parent):
            if (len(rel) == 1 and rel[0] in RUN_FILES) or (rel[0] in RUN_FOLDERS - {"samples"}):
                return f"the run {parent}"
            return None
    return None


def check_not_inside(path: str | Path, option: str = "--out") -> None:
    """Refuse an output folder that lies inside what another command made: a run's own folders (checkpoints/,
    snapshots/, tensorboard/), a diffusers export, a folder whose marker lists its files."""
    owner = protected_output(path, folder=True)
    if owner is not None:
        raise UserError(f"{option} {path} lies inside {owner}; choose a folder outside it")


def claim_file(
    path: str | Path,
    kind: str,
    is_ours: Callable[[Path], bool],
    force: bool = False,
    *,
    command: str | None = None,
    option: str = "--out",
) -> Path:
    """Refuse, before any work, an output file that would replace something the command did not make.

    A folder is refused; an existing file is replaced only with ``force`` and only if ``is_ours(path)`` (a ``kind``
    file that ``command`` made). Writability is the caller's to check (``cli.checks.check_output_file``).
    """
    target, command = Path(path), command or kind
    if target.is_dir():
        raise UserError(f"{option} {target} is a folder; give a file name for {option}")
    if target.exists() or target.is_symlink():
        if not target.is_file() or not is_ours(target):
            raise UserError(
                f"{option} {target} exists and is not a {kind} file that `{command}` made; choose another {option}"
            )
        if not force:
            raise UserError(f"{option} {target} exists; pass --force to replace it, or choose another {option}")
    return target


def safetensors_metadata(path: str | Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file from its JSON header alone (no tensors read); None if ``path``
    is not a safetensors file."""
    try:
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            if not 2 <= size <= 100_000_000:  # the format caps its header at 100 MB
                return None
            header = json.loads(fh.read(size))
    except (OSError, ValueError):
        return None
    meta = header.get("__metadata__", {}) if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else None
