"""Writing a folder that others read: the checks before an export (never replace, enclose or write into an input,
a run, another command's folder or a downloaded pipeline) and the atomic publish (a hidden sibling, the ownership
marker, fsync, rename). Shared by ``export``, ``latent export`` and ``latent tiny``."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import ownership
from perceptual_diffusion.runtime.checkpoint import is_diffusers_folder

CONFIG_FILE = "perceptual_diffusion_config.json"  # our RunConfig and step beside an exported folder
EXPORT_KIND = "export"  # the ownership kind of `export` and `latent export` folders (runtime/ownership.py)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` to disk, so that the rename publishes complete data."""
    for path in sorted(folder.rglob("*"), reverse=True) + [folder]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:  # not supported for folders on some filesystems: the rename is still atomic
            pass
        finally:
            os.close(fd)


def _sibling(folder: Path, tag: str) -> Path:
    """A new, empty hidden folder beside ``folder`` (same filesystem, so renames between them are atomic)."""
    path = folder.parent / f".{folder.name}.{tag}.{secrets.token_hex(4)}{ckpt.TMP_SUFFIX}"
    path.mkdir()  # unlike mkdtemp's 0700, the usual permissions under the umask
    return path


def _input_folder(source: str | Path) -> Path:
    """The folder an export must never replace, enclose or write into for this input: the input itself, or for a
    weights file inside a run directory that whole run (replacing it would take the checkpoints and log along)."""
    path = Path(source).resolve()
    if path.is_file() and ((path.parent / ckpt.CONFIG_NAME).is_file() or (path.parent / ckpt.STATE_DIR).is_dir()):
        return path.parent
    return path


def check_export_target(
    out_dir: Path, force: bool, sources: Sequence[str | Path] = (), kind: str = EXPORT_KIND, command: str = "export"
) -> None:
    """Refuse, before any work, every target whose replacement could lose something.

    - a file, a path under a file, or (without --force) a folder that holds anything;
    - with or without --force, any target that is one of ``sources`` (the run or folders the export reads), holds
      one, or lies inside one: ``--out RUN --force`` would otherwise replace the run with the export;
    - with --force, a folder that ``command`` did not write (its ownership marker is of another ``kind``, or it has
      none and is not an export of this project): --force is for replacing one's own export, never a run directory,
      a folder of runs, a comparison or a downloaded pipeline.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; give a folder to export into")
    ancestor = out_dir.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {out_dir} cannot be written: {ancestor} is a file, not a folder")
    target = out_dir.resolve()
    for source in sources:
        protected = _input_folder(source)
        is_run = (protected / ckpt.CONFIG_NAME).is_file() or (protected / ckpt.STATE_DIR).is_dir()
        what = f"the run directory {protected}" if is_run else f"the input {source}"
        if target == protected:
            where = "is"
        elif protected in target.parents:
            where = "lies inside"
        elif target in protected.parents:
            where = "holds"
        else:
            continue
        raise UserError(f"--out {out_dir} {where} {what}, which this export reads: export to a folder outside it")
    ownership.check_not_inside(out_dir)  # another run's checkpoints/, another export, a listed folder
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise UserError(f"{out_dir} exists and is not empty; choose another folder or pass --force to replace it")
        marker = ownership.read_marker(out_dir)
        if marker is not None and marker.kind != kind:
            raise UserError(
                f"{out_dir} was made by `perceptual-diffusion {marker.command}`, not by `{command}`: --force replaces "
                f"only what `{command}` wrote; choose another folder"
            )
        if not is_diffusers_folder(out_dir):
            raise UserError(
                f"{out_dir} is not an earlier export (it has no model_index.json or unet/): --force replaces only a "
                "diffusers folder; choose another folder, or move this one away yourself"
            )
        legacy = kind == EXPORT_KIND and (out_dir / CONFIG_FILE).is_file()  # exported before markers existed
        if marker is None and not legacy:
            raise UserError(
                f"{out_dir} is a diffusers folder that `perceptual-diffusion {command}` did not write (it has no "
                f"{ownership.MARKER}): --force replaces only its own output, never a downloaded or another tool's "
                "pipeline; choose another folder, or move this one away yourself"
            )


def publish_folder(
    out_dir: Path,
    write: Callable[[Path], None],
    force: bool = False,
    checked: bool = False,
    kind: str = EXPORT_KIND,
    command: str = "export",
) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a hidden sibling, which gets the ownership marker of
    ``command`` (listing every entry, so no other command writes into it and only ``command --force`` replaces it),
    is fsynced and renamed over ``out_dir``; an old folder (``force``) is moved aside first and deleted only after
    the rename."""
    if not checked:
        check_export_target(out_dir, force, kind=kind, command=command)
    tmp = old = None
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = _sibling(out_dir, "new")
        write(tmp)
        entries = sorted(p.name for p in tmp.iterdir())
        marker = {"kind": kind, "command": command, "files": entries}
        (tmp / ownership.MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        _fsync_tree(tmp)
        if out_dir.is_dir() and any(out_dir.iterdir()):  # --force: move the old folder aside, delete it after
            old = _sibling(out_dir, "old")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)  # also replaces an empty folder (POSIX rename)
    except OSError as exc:
        raise UserError(f"cannot write {out_dir} ({exc.strerror or exc})") from None
    finally:
        for leftover in (tmp, old):  # tmp is gone after a successful rename
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    return out_dir
