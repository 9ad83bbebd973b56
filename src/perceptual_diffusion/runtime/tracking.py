"""Experiment tracking beside the JSONL log: ``train --report-to tensorboard``.

The training loop writes ``log.jsonl`` and ``samples/step-*.png`` and knows nothing of trackers.
:class:`TensorBoardMirror` follows those two while the run trains (a background thread polling every few seconds, and
once more at the end) and writes what appears as TensorBoard events under ``RUN/tensorboard``: every number of a log
record as a scalar ``train/NAME`` (loss and its terms, lr, images_per_second) and every grid as the image
``samples``. So the log stays the one record of a run, a tracker can never slow or break a step, and a run trained
without the option can be mirrored later by rerunning the command with it (the records so far are filled in).

A resumed run replays the steps after its last checkpoint: events from the replayed steps are purged (TensorBoard's
``purge_step``), so the curves show each step once.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.runtime import checkpoint as ckpt

TENSORBOARD_DIR = "tensorboard"
POLL_SECONDS = 2.0


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(
            "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'perceptual-diffusion[tensorboard]')"
        ) from None
    return SummaryWriter


class TensorBoardMirror:
    """Mirror ``run_dir``'s log records and sample grids into TensorBoard event files (see the module docstring)."""

    def __init__(self, run_dir: Path, poll_seconds: float = POLL_SECONDS) -> None:
        self.run_dir = Path(run_dir)
        self.poll_seconds = poll_seconds
        self._writer_class = _summary_writer()  # before training starts: a missing package costs nothing
        self._writer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._offset = 0
        self._inode: int | None = None
        states = ckpt.list_states(self.run_dir)
        resume = ckpt.state_step(states[-1]) if states else 0
        events = self.run_dir / TENSORBOARD_DIR
        earlier = events.is_dir() and any(events.glob("events.out.tfevents.*"))
        # With events of an earlier session: steps up to the resume point are there already, later ones are replayed
        # (purged, then written again). Without: every record so far is written, the run's history filled in.
        self._after = resume if earlier else -1
        self._purge = resume + 1 if earlier else None
        self._grids_done: set[int] = set()

    def __enter__(self) -> TensorBoardMirror:
        self._thread = threading.Thread(target=self._follow, name="tensorboard-mirror", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sync_safely()
        if self._writer is not None:
            self._writer.close()

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._sync_safely()

    def _sync_safely(self) -> None:
        if self._failed:
            return
        try:
            self.sync()
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop training: warn once, then stay quiet
            self._failed = True
            warnings.warn(
                f"TensorBoard logging stopped ({type(exc).__name__}: {exc}); log.jsonl is complete", stacklevel=1
            )

    def _open(self) -> Any:
        if self._writer is None:
            self._writer = self._writer_class(log_dir=str(self.run_dir / TENSORBOARD_DIR), purge_step=self._purge)
        return self._writer

    def sync(self) -> None:
        """Write the log records and grids that appeared since the last call."""
        if not self.run_dir.is_dir():
            return
        wrote = False
        for record in self._new_records():
            step = record["step"]
            if step <= self._after:
                continue
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._open().add_scalar(f"train/{name}", value, step)
            self._after = step
            wrote = True
        for step, path in self._new_grids():
            from PIL import Image

            try:
                with Image.open(path) as img:
                    pixels = np.asarray(img.convert("RGB"))
            except OSError:  # being replaced right now: the next pass reads it
                continue
            self._open().add_image("samples", pixels, step, dataformats="HWC")
            self._grids_done.add(step)
            wrote = True
        if wrote:
            self._writer.flush()

    def _new_records(self) -> Iterator[dict[str, Any]]:
        log = self.run_dir / "log.jsonl"
        try:
            st = os.stat(log)
        except OSError:
            return
        if st.st_ino != self._inode or st.st_size < self._offset:  # a resume rewrote the log (atomic replace)
            self._inode, self._offset = st.st_ino, 0
        with open(log, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # complete lines only: the last may still be being written
        self._offset += end
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                yield record

    def _new_grids(self) -> list[tuple[int, Path]]:
        found = []
        for path in (self.run_dir / "samples").glob("step-*.png"):
            try:
                step = int(path.stem.split("-")[1])
            except (IndexError, ValueError):
                continue
            if step not in self._grids_done and (self._purge is None or step >= self._purge):
                found.append((step, path))
        return sorted(found)


@contextlib.contextmanager
def mirror(report_to: str, run_dir: Path, enabled: bool = True) -> Iterator[None]:
    """``--report-to``: "none" does nothing; "tensorboard" mirrors the run while the block trains it."""
    if report_to == "none" or not enabled:
        yield
        return
    if report_to != "tensorboard":
        raise UserError(f"--report-to must be none or tensorboard, got {report_to!r}")
    with TensorBoardMirror(run_dir):
        yield
