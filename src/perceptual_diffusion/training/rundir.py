"""A training run's folder: the lock, the configuration check, the resume point, atomic saves and the log.

Layout: ``config.json`` (the run's typed configuration), ``checkpoints/state-*.pt`` (model, EMA, optimiser, step,
config, data fingerprint; the newest ``keep_checkpoints``), ``model.safetensors`` (the EMA weights of the newest
checkpoint: what ``sample``, ``evaluate`` and a teacher read), ``snapshots/ema-*.safetensors`` (EMA weights kept
for a learning curve), ``samples/step-*.png`` and ``log.jsonl``.

Every file is written atomically (``checkpoint.atomic_write``), and after a crash the newest complete checkpoint is
the resume point; what a kill interrupted after it (a log line, a grid, the snapshot) is redone identically by the
replay. A failed write (a full disk) becomes one line naming the last good checkpoint, never a half-written run.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import torch

from perceptual_diffusion.errors import UserError
from perceptual_diffusion.models import lora
from perceptual_diffusion.models.classifier_net import load_perceptual_net, resolve_perceptual_net
from perceptual_diffusion.runtime import checkpoint as ckpt
from perceptual_diffusion.runtime import ownership
from perceptual_diffusion.runtime.checkpoint import weights_sha256

AnyConfig = Any  # RunConfig | LatentRunConfig: the two model families share this folder's layout
LOG_NAME = "log.jsonl"

# Fields that may differ when a run directory is resumed: they change how long or how chattily a run goes, or (like
# the device) only the float rounding of the same computation, not what it computes step by step. The speed options
# belong here: every step still sees the same images, t, eps and t' (the global batch is drawn whole, then split), so
# a run resumed on another machine with more accumulation or without torch.compile continues the same run; only a
# bit-for-bit replay needs the same options. (The number of processes is not in the config at all, for the same
# reason.) Mixed precision is not here: bf16 changes results by far more than rounding order.
RESUMABLE_FIELDS = frozenset(
    {
        "train.steps",
        "train.log_every",
        "train.sample_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.snapshot_every",
        "train.progress",
        "train.device",
        "train.grad_accum",
        "train.channels_last",
        "train.compile",
        "train.grad_checkpointing",
    }
)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """List ``section.field: old -> new`` for every leaf that differs between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def snapshot_path(run_dir: str | Path, step: int) -> Path:
    """Where ``TrainConfig.snapshot_every`` keeps the EMA weights of ``step``."""
    return Path(run_dir) / "snapshots" / f"ema-{step:08d}.safetensors"


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every EMA snapshot of a run, by step."""
    found = []
    for p in (Path(run_dir) / "snapshots").glob("ema-*.safetensors"):
        try:
            found.append((int(p.stem.split("-")[1]), p))
        except ValueError:
            continue
    return sorted(found)


def is_finished(run_dir: str | Path, steps: int) -> bool:
    """True if ``run_dir`` holds a checkpoint at or past ``steps`` and the inference snapshot of that checkpoint."""
    states = ckpt.list_states(Path(run_dir))
    if not states or ckpt.state_step(states[-1]) < steps:
        return False
    return ckpt.weights_step(Path(run_dir) / ckpt.WEIGHTS_NAME) == ckpt.state_step(states[-1])


def as_read_back(old: dict, config: AnyConfig) -> dict:
    """A saved config as its type reads it back, in JSON form: a field added since it was saved holds its default
    (a run from before ``model.arch`` is a U-Net), tuples are lists on both sides. Unreadable: as saved, so that the
    comparison names what differs."""
    with contextlib.suppress(UserError, TypeError):
        old = type(config).from_dict(old).to_dict()
    return json.loads(json.dumps(old, default=str))


def check_same_config(old: dict, config: AnyConfig, where: str, override: bool) -> None:
    """Refuse to resume with a configuration that changes what the steps compute, naming the fields that differ."""
    resumable = RESUMABLE_FIELDS
    if config.train.lr_schedule != "constant":  # a decay is a function of the total steps: changing them is new run
        resumable = resumable - {"train.steps"}
    diffs = [
        d
        for d in config_diff(as_read_back(old, config), json.loads(config.to_json()))
        if d.split(":")[0] not in resumable
    ]
    if diffs and not override:
        raise UserError(
            f"{where} was started with another configuration ({'; '.join(diffs)}); use a new --run-dir, "
            "or pass --override-config to resume with the new values"
        )


def with_teacher_hash(config: AnyConfig) -> AnyConfig:
    """Resolve the teacher (and init) path to the weights file and record the teacher's sha256 in the config (and
    the external-perceptual network's, and a LoRA adapter's targets and base sha256)."""
    changes = {}
    if config.loss.teacher is not None:
        path = ckpt.resolve_weights(config.loss.teacher).resolve()
        changes["loss"] = replace(config.loss, teacher=str(path), teacher_sha256=weights_sha256(path))
    train = config.train
    if train.init_from is None and config.loss.kind == "self-perceptual":
        train = replace(train, init_from=changes["loss"].teacher)  # the paper: online model starts as the teacher
    if train.init_from is not None:
        train = replace(train, init_from=str(ckpt.resolve_weights(train.init_from).resolve()))
    if config.lora is not None:
        # The adapter's targets (the architecture's default unless given) and its base's sha256: an adapter is only
        # meaningful on the weights it was trained on, and a resume must not change either.
        base = ckpt.resolve_weights(lora.base_path(replace(config, train=train))).resolve()
        teacher = changes.get("loss")
        same = teacher is not None and teacher.teacher == str(base)
        changes["lora"] = replace(
            config.lora,
            targets=config.lora.targets or lora.DEFAULT_TARGETS[lora.architecture(config)],
            base_sha256=teacher.teacher_sha256 if same else weights_sha256(base),
        )
    if config.loss.kind == "external-perceptual":  # pixel runs only (LatentRunConfig refuses it)
        name, path = resolve_perceptual_net(config.loss.perceptual_net, config.data.source)
        load_perceptual_net(path, config.data.source, config.model.image_size, config.model.channels)  # fits?
        loss = changes.get("loss", config.loss)
        changes["loss"] = replace(loss, perceptual_net=name, perceptual_sha256=ckpt.sha256_file(path))
    return replace(config, train=train, **changes)


class RunDir:
    """One run's folder, as the training loop uses it (rank 0 only: other ranks never touch the folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.weights = self.path / ckpt.WEIGHTS_NAME
        self._log: TextIO | None = None

    # -- set-up --------------------------------------------------------------------------------------------------

    def check_target(self) -> None:
        """Refuse, before any work, a folder that is not a run: another command's output, an export, the user's
        own files (``ownership.check_run_dir``). A new or empty folder, or a run to resume, passes."""
        ownership.check_run_dir(self.path)

    def create(self) -> None:
        self.check_target()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the run directory {self.path} ({exc.strerror or exc})") from None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold a lock on the folder so that two processes never train into it at once (freed on any exit)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            fh = open(self.path / ".lock", "a")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            raise UserError(f"cannot write into the run directory {self.path} ({exc.strerror or exc})") from None
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise UserError(
                    f"another process is training in {self.path}; wait for it to finish or stop it"
                ) from None
            yield

    def prepare(self, config: AnyConfig, override: bool = False) -> AnyConfig:
        """Check the folder's sub-folders and that a resume uses the same configuration; write ``config.json``."""
        self.create()
        for name, what in (
            (ckpt.STATE_DIR, "checkpoints"),
            ("samples", "sample grids"),
            ("snapshots", "EMA snapshots"),
        ):
            # Checked before any work: found at the first checkpoint, it would cost the steps trained until then.
            folder = self.path / name
            if folder.exists() and not folder.is_dir():
                raise UserError(
                    f"{folder} is a file, not the folder of the run's {what}; move it away, or use a new --run-dir"
                )
        config = with_teacher_hash(config)
        saved = self.path / ckpt.CONFIG_NAME
        if saved.is_file():
            try:
                old = json.loads(saved.read_text())
            except (ValueError, OSError, RecursionError):  # RecursionError: JSON nested deeper than Python's stack
                raise UserError(f"{saved} is not valid JSON; restore it or use a new --run-dir") from None
            if not isinstance(old, dict):
                raise UserError(f"{saved} does not hold a configuration; restore it or use a new --run-dir")
            check_same_config(old, config, str(self.path), override)
        try:
            ckpt.atomic_write_text(saved, config.to_json())
        except OSError as exc:
            raise UserError(f"cannot write {saved} ({exc.strerror or exc}); check the --run-dir") from None
        return config

    # -- resume --------------------------------------------------------------------------------------------------

    def resume(self, config: AnyConfig, fingerprint: str, override: bool, model, ema, optimizer) -> int:
        """Load the newest checkpoint into model, EMA and optimiser after checking it belongs to this run; returns
        its step (0 for a new run). Also removes temporaries a killed write left, and log lines past the step."""
        ckpt.remove_stale_temporaries(self.path)
        state = ckpt.latest_state(self.path)
        step = 0
        if state is not None:
            step = self._load_state(state, config, fingerprint, override, model, ema, optimizer)
            if ckpt.state_step(ckpt.list_states(self.path)[-1]) == step:  # the newest state loaded: none damaged
                ckpt.prune_states(self.path, config.train.keep_checkpoints)
        self._trim_log(step)
        if state is not None and ckpt.weights_step(self.weights) != step:  # killed between state and snapshot
            with self.guard("inference snapshot", step):
                ckpt.save_weights(self.weights, lora.saved_state(ema), config, step)
        return step

    def _load_state(self, state: dict, config: AnyConfig, fingerprint: str, override: bool, model, ema, optimizer):
        where = f"{self.path} checkpoint at step {state['step']}"
        try:
            saved_config = json.loads(state.get("config") or "null")
        except (ValueError, TypeError, RecursionError):
            saved_config = None
        if isinstance(saved_config, dict):  # guards a resume whose config.json was deleted or replaced
            check_same_config(saved_config, config, where, override)
        if state.get("data") not in (None, fingerprint) and not override:
            raise UserError(
                f"the training data changed since {self.path} was started ({state['data']} -> {fingerprint}, as "
                "images:hash); restore it, use a new --run-dir, or pass --override-config"
            )
        lora.load_saved_state(model, state["model"], where)  # a LoRA run's checkpoints hold the adapter alone
        lora.load_saved_state(ema, state["ema"], where)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except Exception as exc:  # noqa: BLE001 - the file's contents are data from disk: any malformation
            raise UserError(f"{where} has an optimiser state that does not fit this model ({exc})") from None
        return int(state["step"])

    def _trim_log(self, step: int) -> None:
        """Keep only complete log records up to ``step``: the resumed run rewrites the later ones it replays."""
        path = self.path / LOG_NAME
        if not path.exists():
            return
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise UserError(f"cannot read the log {path} ({exc.strerror or exc}); move it away to resume") from None
        kept = []
        for line in text.splitlines(keepends=True):
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue  # a line cut short by SIGKILL
            complete = line.endswith("\n") and isinstance(record, dict) and isinstance(record.get("step"), int)
            if complete and record["step"] <= step:
                kept.append(line)
        if "".join(kept) != text:
            ckpt.atomic_write_text(path, "".join(kept))

    # -- writing -------------------------------------------------------------------------------------------------

    def last_good(self) -> str:
        kept = ckpt.list_states(self.path)
        return str(kept[-1]) if kept else "none"

    @contextlib.contextmanager
    def guard(self, what: str, step: int) -> Iterator[None]:
        """Turn a failed write (a full disk, a read-only folder) into one line; the last checkpoint stays intact.

        Every file is written atomically (``ckpt.atomic_write``, which also turns torch's and safetensors' failed
        writes into ``OSError``), so a failed write leaves the previous version of each file in place.
        """
        try:
            yield
        except OSError as exc:
            if what == "log":
                # The failed line is still in the file's buffer, and closing it later would raise the same error
                # again over this message: close it here, where the error is already reported.
                with contextlib.suppress(OSError):
                    self._log.close()
                self._log = None
            good = self.last_good()
            after = (
                f"the last good checkpoint {good} is intact: free space and rerun the same command to resume"
                if good != "none"
                else "no checkpoint had been written yet: free space and rerun the same command to start again"
            )
            raise UserError(
                f"could not write the {what} at step {step} ({exc.strerror or exc}); files stayed consistent, " + after
            ) from None

    @contextlib.contextmanager
    def log_open(self) -> Iterator[None]:
        try:
            self._log = open(self.path / LOG_NAME, "a")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise UserError(f"cannot write the log in {self.path} ({exc.strerror or exc})") from None
        try:
            yield
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def write_log(self, record: dict[str, Any]) -> None:
        with self.guard("log", record["step"]):
            self._log.write(json.dumps(record) + "\n")
            self._log.flush()

    def grid_path(self, step: int) -> Path:
        return self.path / "samples" / f"step-{step:08d}.png"

    def save_snapshot(self, step: int, ema: torch.nn.Module, config: AnyConfig) -> None:
        """The EMA weights of ``step`` kept under ``snapshots/`` (a learning curve's point)."""
        with self.guard("EMA snapshot", step):
            ckpt.save_weights(snapshot_path(self.path, step), lora.saved_state(ema), config, step)

    def save_checkpoint(self, step: int, payload: dict[str, Any], ema: torch.nn.Module, config: AnyConfig) -> None:
        """The training state, then the inference weights: a kill between the two leaves a stale snapshot, which
        ``resume`` refreshes from the state."""
        keep = config.train.keep_checkpoints
        with self.guard("checkpoint", step):
            ckpt.save_state(self.path, step, payload, keep)
            ckpt.save_weights(self.weights, lora.saved_state(ema), config, step)

    def ensure_weights(self, step: int, ema: torch.nn.Module, config: AnyConfig) -> None:
        """A resumed finished run whose inference weights were removed gets them back."""
        if ckpt.weights_step(self.weights) is None:
            with self.guard("inference snapshot", step):
                ckpt.save_weights(self.weights, lora.saved_state(ema), config, step)
