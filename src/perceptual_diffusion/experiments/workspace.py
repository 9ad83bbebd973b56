"""The folder of one comparison: where each training seed's runs and each cached evaluation live, and what every step
of ``compare`` and ``ablate`` shares (``Context``: budget, data, device, criterion, feature extractor).

Layout of ``--out``: ``seed{s}/stage1-phase{p}`` and ``seed{s}/stage1-mse`` (stage 1), ``seed{s}/{branch}-lr{lr}``
(stage 2), ``seed{s}/uncond/...`` (the unconditional pair), ``seed{s}/lora{R}-{branch}-lr{lr}`` and ``lora{R}.json``
(a LoRA arm, ``lora_arm.py``), ``eval/seed{s}/{name}.json|.npz`` (cached evaluations).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from perceptual_diffusion.config import DataConfig, SampleConfig, default_sampler
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.evaluation.features import auto_extractor
from perceptual_diffusion.evaluation.scoring import Criterion, criterion_for, evaluate_cached, load_per_sample
from perceptual_diffusion.experiments.budgets import Budget
from perceptual_diffusion.experiments.teacher import Gain
from perceptual_diffusion.models.loading import load_model
from perceptual_diffusion.runtime.checkpoint import atomic_write_text
from perceptual_diffusion.runtime.ownership import claim_dir
from perceptual_diffusion.training.loop import resolve_device

SELECTION_SEED_BASE = 1_000_000  # sampling seeds of curves and lr selection: disjoint from the headline rows' seeds


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Context:
    """What every step of one comparison needs."""

    out: Path
    budget: Budget
    data: DataConfig
    device: str
    dev: torch.device
    criterion: Criterion
    extractor: Any
    reference_split: str
    eval_dir: str = "eval"  # "eval-inception": the same rows in the standard Inception features

    def cache(self, name: str, seed: int) -> Path:
        """Where the evaluation ``name`` of training seed ``seed`` is cached (``scoring.evaluate_cached`` adds the
        .json and .npz extensions)."""
        return self.out / self.eval_dir / f"seed{seed}" / name.replace("/", "__")

    def root(self, seed: int, unconditional: bool = False) -> Path:
        """The folder of one training seed's runs (``uncond/`` inside it for the unconditional pair)."""
        return self.out / f"seed{seed}" / ("uncond" if unconditional else "")

    def evaluate(
        self,
        name: str,
        seed: int,
        model: Any,
        sample_config: SampleConfig,
        seeds: list[int],
        guide: Any = None,
        use_labels: bool = True,
        fingerprint: str | None = None,
        legacy_fingerprints: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        return evaluate_cached(
            self.cache(name, seed),
            model,
            sample_config,
            self.data,
            self.extractor,
            seeds,
            self.dev,
            guide=guide,
            use_labels=use_labels,
            reference_split=self.reference_split,
            fingerprint=fingerprint,
            legacy_fingerprints=legacy_fingerprints,
        )

    def selection_point(self, name: str, seed: int, weights: Path) -> tuple[float, float, dict[str, Any]]:
        """The criterion of ``weights`` on the held-out selection seeds: (value, standard error, result)."""
        from perceptual_diffusion.evaluation.reference import reference_stats

        seeds = list(range(SELECTION_SEED_BASE, SELECTION_SEED_BASE + self.budget.curve_samples))
        res = self.evaluate(
            name,
            seed,
            lambda: load_model(weights, self.dev)[0],
            default_sampler(self.budget.schedule, steps=self.budget.sample_steps),
            seeds,
        )
        per_sample = load_per_sample(self.cache(name, seed)) if self.criterion.key == "fid" else None
        reference = reference_stats(self.data, self.extractor, split=self.reference_split) if per_sample else None
        return self.criterion.value(res), self.criterion.standard_error(res, per_sample, reference), res

    def paired_gain(self, seed: int, earlier: str, later: str, n_boot: int = 200) -> Gain:
        """How much better the cached evaluation ``later`` is than ``earlier`` on the criterion, paired: both were
        sampled from the same seeds and labels, so the bootstrap draws the same sample indices for both."""
        from perceptual_diffusion.evaluation import stats
        from perceptual_diffusion.evaluation.reference import reference_stats

        reference = None
        if self.criterion.key == "fid":
            reference = reference_stats(self.data, self.extractor, split=self.reference_split)
        a = load_per_sample(self.cache(later, seed))
        b = load_per_sample(self.cache(earlier, seed))
        d = stats.paired_bootstrap([a], [b], self.criterion.statistic(reference), n_boot=n_boot)
        sign = 1.0 if self.criterion.higher_is_better else -1.0
        low, high = sorted((sign * d.ci_low, sign * d.ci_high))
        return Gain(sign * d.estimate, low, high)


def make_out_dir(out: Path, command: str = "compare") -> None:
    """The experiment's folder, refused in one line when it cannot be one (a file, a folder under a file, a run,
    an export, a folder another command made, a folder of the user's own files); ``compare``, ``ablate`` and
    ``demo`` share one kind of folder. Folders made before ownership markers are adopted by their budget.json."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create --out {out} ({exc.strerror or exc}); choose another --out") from None
    claim_dir(out, "experiment", command=command, legacy=("budget.json",))


# Budget fields that only change what the gathering call recomputes every time (the report, the bootstrap, the
# fixed-batch losses): a rerun may change them. Every other field changes a trained model or a cached evaluation.
RECOMPUTED_FIELDS = ("name", "bootstrap", "loss_batch")
# Budget fields of a LoRA arm alone (``compare --lora-rank``): its own settings file guards them (``lora_arm.py``),
# so that a LoRA arm with its own learning rates can join a folder made without one.
ARM_FIELDS = ("lora_lrs", "lora_lr_extensions")
# What ``ablate`` shares with ``compare`` in one folder: the runs and the evaluations of the same rows.
SHARED_FIELDS = (
    "data", "preset", "batch_size", "stage1", "finetune_steps", "finetune_lrs", "sample_steps", "eval_samples",
    "curve_samples", "training_seeds", "finetune_warmup", "finetune_ema", "teacher", "perceptual",
)  # fmt: skip


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): value}


def plain(value: Any) -> Any:
    """Settings as JSON would hold them: dataclasses as dictionaries, tuples as lists, anything else as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return json.loads(json.dumps(value, default=str))


def with_defaults(stored: Any, current: Any) -> Any:
    """``stored`` settings (read from an older folder) with every dataclass field of ``current`` they lack set to
    that field's declared default: a field added to a budget (or to a config inside it) after a folder was made held
    its default there, so it compares as that default instead of refusing the resume (a folder from before the
    schedule families ran the DDPM family; one from before ``lora_lrs`` trained no LoRA arm). Nested dataclasses,
    tuples of them and dictionaries of them are filled recursively; a field without a default stays missing."""
    if dataclasses.is_dataclass(current) and not isinstance(current, type) and isinstance(stored, dict):
        out = dict(stored)
        for f in dataclasses.fields(current):
            if f.name in out:
                out[f.name] = with_defaults(out[f.name], getattr(current, f.name))
            elif f.default is not dataclasses.MISSING:
                out[f.name] = plain(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = plain(f.default_factory())
        return out
    if isinstance(current, (tuple, list)) and isinstance(stored, list) and len(stored) == len(current):
        return [with_defaults(s, c) for s, c in zip(stored, current)]
    if isinstance(current, dict) and isinstance(stored, dict):
        return {k: with_defaults(v, current[k]) if k in current else v for k, v in stored.items()}
    return stored


def changed_settings(stored: Any, current: Any, keep: Any = lambda key: True) -> list[str]:
    """ "key: old -> new" for every flattened setting that differs (``stored`` filled by :func:`with_defaults`)."""
    old, new = _flat(plain(with_defaults(stored, current))), _flat(plain(current))
    changed = [k for k in sorted(set(old) | set(new)) if keep(k) and old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in changed]


def check_settings(out: Path, settings: dict[str, Any], fields: tuple[str, ...] | None = None) -> None:
    """Refuse to resume ``out`` with settings other than those it was made with (``settings.json``), naming every
    changed field; write them when the folder is new. ``settings`` maps names to the typed configs (``Budget``,
    ``DataConfig``), so that a field added since the folder was made compares as its default (:func:`with_defaults`).
    ``fields``: compare only these top-level budget fields (``ablate`` shares a folder with ``compare``). A folder that
    mixed two configurations would report settings it did not run."""
    path = out / "settings.json"
    # A folder without any run or evaluation yet holds no work to mix with: a command that failed before its first
    # run (a typo in --data-path, say) must not lock the folder to its mistaken settings.
    has_work = any(p.name.startswith(("seed", "eval")) for p in out.iterdir()) if out.is_dir() else False
    if not path.is_file() or not has_work:
        if fields is None:
            atomic_write_text(path, json.dumps(plain(settings), indent=2, sort_keys=True))
        return
    keep = lambda key: (  # noqa: E731
        key.split(".")[1] not in (*RECOMPUTED_FIELDS, *ARM_FIELDS)
        and (fields is None or key.split(".")[1] in fields or not key.startswith("budget."))
    )
    changed = changed_settings(json.loads(path.read_text()), settings, keep)
    if changed:
        listed = "; ".join(changed[:8])
        more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
        raise UserError(
            f"--out {out} was made with other settings ({listed}{more}); its runs and evaluations belong to those: "
            "rerun with the settings it was made with, or choose a new --out to start afresh"
        )


def make_context(out: Path, budget: Budget, data: DataConfig, device: str) -> Context:

    dev = resolve_device(device)
    split = "test" if data.source == "fashion-mnist" else "train"  # held out where the data has a split
    extractor = auto_extractor(data, out, device=dev, classifier=budget.domain_classifier)
    return Context(out, budget, data, device, dev, criterion_for(data), extractor, split)


def teacher_dir(ctx: Context, seed: int, unconditional: bool = False) -> Path:
    if ctx.budget.teacher is not None and not unconditional:
        return Path(ctx.budget.teacher)
    return ctx.root(seed, unconditional) / "stage1-mse"


def branch_dir(root: Path, branch: str, lr: float) -> Path:
    return root / f"{branch}-lr{lr:g}"


def model_dir(ctx: Context, seed: int, model: str, chosen: dict[str, float]) -> Path:
    """The run directory a row's model name refers to, at the branch's chosen learning rate."""
    unconditional = model.startswith("uncond/")
    name = model.removeprefix("uncond/")
    root = ctx.root(seed, unconditional)
    if name == "stage1-mse":
        return teacher_dir(ctx, seed, unconditional)
    return branch_dir(root, name, chosen["self-perceptual" if name in ctx.budget.variants else name])
