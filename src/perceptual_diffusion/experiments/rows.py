"""What a comparison evaluates and pairs, as typed data: a ``Row`` is one (model, guidance setting) and *is* its own
key; a ``Pair`` is two rows with the role the report gives their difference. File names (``Row.slug``) and prose
(``Row.label``, ``Pair.title``) are derived from the fields, never parsed back.

Slugs of the rows that existed before these types (no guidance, null label, CFG and autoguidance by the teacher)
are the keys the committed results and evaluation caches use: ``mse-continued/cfg-w1.5-phi0.7``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

from perceptual_diffusion.config import SampleConfig, ScheduleConfig, default_sampler

# "none": the model alone; "null-label": a conditional model on its null label (an unconditional sampler for free);
# "cfg": classifier-free guidance (Ho & Salimans 2022) with optional rescale (arXiv 2305.08891) and optional noise
# interval (arXiv 2404.07724); "apg": adaptive projected guidance (arXiv 2410.02416); "autoguidance": a weaker
# model of the same task as the guide (arXiv 2406.02507); "cfg-zero-star": CFG-Zero* for flow models (arXiv 2503.18886).
GuidanceKind = Literal["none", "null-label", "cfg", "apg", "autoguidance", "cfg-zero-star"]
# "premise": the external-perceptual control against self-perceptual, the same fine-tuning with the loss network
# trained for perception instead of the frozen MSE model (arXiv 2401.00110, Sec. 3: the diffusion model is itself a
# perceptual network). "lora-*": the pairs of a LoRA arm (compare --lora-rank): its two branches without guidance,
# each against the full fine-tune of the same branch, and its self-perceptual branch against its MSE branch with
# each guidance method.
PairRole = Literal[
    "headline",
    "vs-teacher",
    "teacher-residual",
    "vs-guidance",
    "unconditional",
    "variant",
    "premise",
    "lora-headline",
    "lora-vs-full",
    "lora-vs-guidance",
]
LORA_ROLES: tuple[PairRole, ...] = ("lora-headline", "lora-vs-full", "lora-vs-guidance")


@dataclass(frozen=True)
class Row:
    """One evaluated (model, guidance setting); ``model`` names a model of a training seed's folder (stage1-mse,
    mse-continued, self-perceptual, a variant, or ``uncond/`` + one of the first three)."""

    model: str
    guidance: GuidanceKind = "none"
    cfg_scale: float = 1.0
    guidance_rescale: float = 0.0
    sigma_min: float = 0.0  # guidance only at EDM noise levels sigma_t/alpha_t in [sigma_min, sigma_max]
    sigma_max: float | None = None  # None: no upper bound (the pure-noise end included)
    apg_threshold: float | None = None  # APG's norm threshold (RMS per element); None: the method's default
    guide: str | None = None  # autoguidance: the weaker model (None: the teacher, as the v1 rows did)

    @property
    def unconditional(self) -> bool:
        return self.model.startswith("uncond/")

    @property
    def use_labels(self) -> bool:
        return self.guidance != "null-label" and not self.unconditional

    @property
    def interval(self) -> bool:
        return self.sigma_min > 0 or self.sigma_max is not None

    @property
    def slug(self) -> str:
        """The row's name in files and JSON keys; the v1 rows keep their v1 keys."""
        if self.guidance in ("none", "null-label"):
            return f"{self.model}/{self.guidance}"
        text = f"{self.model}/{self.guidance}-w{self.cfg_scale:g}-phi{self.guidance_rescale:g}"
        if self.interval:
            text += f"-sigma{self.sigma_min:g}-{'inf' if self.sigma_max is None else f'{self.sigma_max:g}'}"
        if self.apg_threshold is not None:
            text += f"-r{self.apg_threshold:g}"
        if self.guide is not None:
            text += f"-guide-{self.guide}"
        return text

    @property
    def method_label(self) -> str:
        """The guidance setting in words: "CFG w=3 φ=0.7", "no guidance"."""
        if self.guidance == "none":
            return "no guidance"
        if self.guidance == "null-label":
            return "null label"
        name = {"cfg": "CFG", "apg": "APG", "autoguidance": "autoguidance", "cfg-zero-star": "CFG-Zero*"}[self.guidance]
        text = f"{name} w={self.cfg_scale:g}"
        if self.guidance != "apg" or self.guidance_rescale:
            text += f" φ={self.guidance_rescale:g}"
        if self.interval:
            high = "∞" if self.sigma_max is None else f"{self.sigma_max:g}"
            text += f" σ∈[{self.sigma_min:g}, {high}]"
        if self.apg_threshold is not None:
            text += f" r={self.apg_threshold:g}"
        if self.guide is not None:
            text += f" guide {self.guide}"
        return text

    @property
    def label(self) -> str:
        """The row as the report names it: "self-perceptual, CFG w=3 φ=0.7"."""
        return f"{self.model}, {self.method_label}"

    def sample_config(self, steps: int, schedule: ScheduleConfig | None = None) -> SampleConfig:
        """The sampler settings of this row (``steps`` steps, the defaults of ``schedule``'s family; the guide model,
        if any, is loaded by the caller)."""
        schedule = schedule or ScheduleConfig()
        if self.guidance in ("none", "null-label"):
            return default_sampler(schedule, steps=steps)
        extra: dict[str, Any] = {}
        if self.interval:
            extra |= {"guidance_sigma_min": self.sigma_min, "guidance_sigma_max": self.sigma_max}
        if self.guidance == "apg":
            extra["guidance"] = "apg"
            if self.apg_threshold is not None:
                extra["apg_norm_threshold"] = self.apg_threshold
        if self.guidance == "cfg-zero-star":
            extra["guidance"] = "cfg-zero-star"
        return default_sampler(
            schedule, steps=steps, cfg_scale=self.cfg_scale, guidance_rescale=self.guidance_rescale, **extra
        )

    def fingerprint(self, **settings: Any) -> str:
        """A hash of the row and every other setting that changes its numbers (an evaluation cache's identity)."""
        text = json.dumps({"row": dataclasses.asdict(self), **settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"key": self.slug}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Pair:
    """Row ``a`` minus row ``b``, paired per training seed, with the role the report gives it (``method``: the
    guidance method of a ``vs-guidance`` pair; ``selected``: its setting was chosen on held-out seeds)."""

    role: PairRole
    a: Row
    b: Row
    method: str | None = None
    selected: bool = False

    @property
    def title(self) -> str:
        if self.role == "headline":
            return "self-perceptual vs MSE continued, no guidance (the paper's claim)"
        if self.role == "vs-teacher":
            return "self-perceptual vs its teacher"
        if self.role == "teacher-residual":
            return "MSE continued vs the teacher"
        if self.role == "vs-guidance":
            best = ", its best setting" if self.selected else ""
            return f"self-perceptual (no guidance) vs MSE + {self.b.method_label}{best}"
        if self.role == "unconditional":
            return "unconditional: self-perceptual vs MSE continued"
        if self.role == "premise":
            return f"{self.a.model} vs self-perceptual (the paper's premise: its own teacher as the perceptual network)"
        if self.role == "lora-headline":
            return f"LoRA: {self.a.model} vs {self.b.model}, no guidance"
        if self.role == "lora-vs-full":
            return f"LoRA vs full fine-tuning: {self.a.model} vs {self.b.model}, no guidance"
        if self.role == "lora-vs-guidance":
            best = ", its best setting" if self.selected else ""
            return f"LoRA: {self.a.model} (no guidance) vs {self.b.label}{best}"
        return f"{self.a.model} vs MSE continued (beyond the paper)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "method": self.method,
            "selected": self.selected,
            "title": self.title,
            "a": self.a.to_dict(),
            "b": self.b.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pair:
        return cls(
            data["role"],
            Row.from_dict(data["a"]),
            Row.from_dict(data["b"]),
            data.get("method"),
            bool(data.get("selected", False)),
        )
