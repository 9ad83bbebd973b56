"""The fair comparison in LoRA form (``compare --lora-rank R``, issue 20): both stage-2 branches as LoRA adapters of
the same rank on the same teacher, inside the full fine-tune's comparison folder, so stage 1 is shared.

The self-perceptual objective's frozen network is the starting model (arXiv 2401.00110, Sec. 3 and Algorithm 1);
a LoRA branch's base is that same model, so the self-perceptual LoRA run gets the shared teacher
(``models.lora.BaseTeacher``: the base with its adapter off) without a second copy. The MSE-continued LoRA branch is
the fair baseline of the same rank, targets, schedule and lr sweep (``Budget.lora_lrs``).

Layout inside ``--out``: ``seed{s}/lora{R}-{branch}-lr{lr}`` (the runs), ``lora{R}.json`` (the adapter settings of
rank R); rows name the models ``lora{R}-mse-continued`` and ``lora{R}-self-perceptual``, so their evaluation caches
(``eval/seed{s}/lora{R}-...``) never collide with the full fine-tune's and several ranks coexist in one folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from perceptual_diffusion.config import LoraConfig, LossConfig
from perceptual_diffusion.errors import UserError
from perceptual_diffusion.experiments.budgets import Budget
from perceptual_diffusion.experiments.rows import Row
from perceptual_diffusion.experiments.workspace import Context, changed_settings, model_dir, plain
from perceptual_diffusion.runtime.checkpoint import atomic_write_text

MSE, SP = "mse-continued", "self-perceptual"  # the full fine-tune's two branches, which each LoRA branch mirrors


@dataclass(frozen=True)
class LoraArm:
    """Both stage-2 branches as LoRA adapters of ``lora`` (its ``base_sha256`` is each run's to record)."""

    lora: LoraConfig

    def __post_init__(self) -> None:
        if self.lora.base_sha256 is not None:  # every branch records its own base (the seed's teacher)
            object.__setattr__(self, "lora", replace(self.lora, base_sha256=None))

    @property
    def prefix(self) -> str:
        """``lora{R}``: the rank names the arm's runs, rows and caches, so that ranks coexist in one folder."""
        return f"lora{self.lora.rank}"

    def model(self, branch: str) -> str:
        """The row model (and run-folder stem) of the LoRA form of a full fine-tune branch."""
        return f"{self.prefix}-{branch}"

    @property
    def mse(self) -> str:
        return self.model(MSE)

    @property
    def sp(self) -> str:
        return self.model(SP)

    def branches(self, budget: Budget) -> dict[str, LossConfig]:
        """The arm's branches and their losses: MSE continued and self-perceptual, as the full fine-tune's."""
        return {self.mse: LossConfig(kind="mse"), self.sp: budget.perceptual}

    @property
    def settings_file(self) -> str:
        return f"{self.prefix}.json"

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "models": {MSE: self.mse, SP: self.sp}, "lora": asdict(self.lora)}


def arm_settings(arm: LoraArm, budget: Budget) -> dict[str, Any]:
    """What rank R's runs depend on beyond the folder's own settings: the adapter's options and the lr sweep."""
    return {"lora": arm.lora, "lora_lrs": budget.lora_lrs, "lora_lr_extensions": budget.lora_lr_extensions}


def check_arm(out: Path, arm: LoraArm, budget: Budget) -> None:
    """Refuse to resume rank R's arm with other adapter options (alpha, dropout, targets) or other LoRA learning
    rates, in one line: a finished run is never retrained, so a changed option would silently reuse adapters
    trained with the old one. Written when the folder holds no run of this rank yet (a failed first attempt does not
    lock it); fields added to ``LoraConfig`` later compare as their defaults (``workspace.with_defaults``)."""
    path = out / arm.settings_file
    settings = arm_settings(arm, budget)
    has_work = any(out.glob(f"seed*/{arm.prefix}-*"))
    if path.is_file() and has_work:
        changed = changed_settings(json.loads(path.read_text()), settings)
        if changed:
            raise UserError(
                f"--out {out} holds LoRA rank-{arm.lora.rank} arms trained with other options "
                f"({'; '.join(changed)}): rerun with those options, give another --lora-rank (ranks coexist in one "
                "folder), or choose a new --out"
            )
        return
    atomic_write_text(path, json.dumps(plain(settings), indent=2, sort_keys=True))


def lora_rows(budget: Budget, arm: LoraArm, selections: dict[str, Any]) -> list[Row]:
    """The arm's rows: both LoRA branches without guidance, then the MSE-continued LoRA with each guidance method at
    its own best setting (``selections``: ``guidance_sweep.Selection`` by method), or (v1 budgets) the fixed CFG
    rows, as the full fine-tune's MSE continued gets them."""
    rows = [Row(arm.mse), Row(arm.sp)]
    if budget.guidance_grids:
        return rows + [sel.best for sel in selections.values() if sel.best is not None]
    return rows + [Row(arm.mse, "cfg", w, phi) for phi in budget.guidance_rescales for w in budget.cfg_scales]


def lora_results(
    ctx: Context, arm: LoraArm, points: dict, chosen: dict[str, float], selections: dict[str, Any]
) -> dict[str, Any]:
    """What the report's LoRA section renders beside the rows and pairs: the adapter (targets as resolved by the
    runs), its size against the base, the lr sweep over ``Budget.lora_lrs`` and the chosen rates, each guidance
    method's best setting for the MSE-continued LoRA, and per seed whether the self-perceptual LoRA run's teacher
    was its own base (``models.lora.shares_teacher``: one copy of the base weights)."""
    from perceptual_diffusion.models import lora
    from perceptual_diffusion.models.loading import load_model, weights_config

    seeds = range(ctx.budget.training_seeds)
    configs = {s: weights_config(model_dir(ctx, s, arm.sp, chosen))[0] for s in seeds}
    model = load_model(model_dir(ctx, 0, arm.sp, chosen), ctx.dev)[0]
    adapter = sum(p.numel() for n, p in model.named_parameters() if lora.is_adapter_key(n))
    base = sum(p.numel() for n, p in model.named_parameters() if not lora.is_adapter_key(n))
    return arm.to_dict() | {
        "targets": list(configs[0].lora.targets),
        "adapter_parameters": adapter,
        "base_parameters": base,
        "lrs": list(ctx.budget.lora_lrs),
        "sweep": {b: {f"{lr:g}": v for lr, v in by_lr.items()} for b, by_lr in points.items()},
        "chosen_lrs": chosen,
        "guidance_selection": {m: sel.to_dict() for m, sel in selections.items()},
        "shared_teacher": {str(s): lora.shares_teacher(c) for s, c in configs.items()},
    }
