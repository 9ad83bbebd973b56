"""The noise schedule as diffusers' schedulers hold it, both ways: our ``ScheduleConfig`` and ``SampleConfig`` as a
``DDIMScheduler`` (the paper's DDPM family) or a ``FlowMatchEulerDiscreteScheduler`` (rectified flow) config, and
back, refusing scheduler settings that have no counterpart here. ``SCHEDULERS`` names each family's diffusers
pipeline and scheduler: the one line a new schedule family adds (docs/architecture.md)."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, FlowMatchEulerDiscreteScheduler

from perceptual_diffusion.config import SampleConfig, ScheduleConfig
from perceptual_diffusion.core.schedule import FlowSchedule
from perceptual_diffusion.errors import UserError

# Our schedule names -> diffusers' DDIMScheduler names: the one place this mapping lives (the formulas behind both
# sides are the same; tests compare alphas_cumprod of the two implementations).
BETA_SCHEDULE_TO_DIFFUSERS = {"scaled_linear": "scaled_linear", "linear": "linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPE_TO_DIFFUSERS = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}
_BETA_SCHEDULE_FROM_DIFFUSERS = {v: k for k, v in BETA_SCHEDULE_TO_DIFFUSERS.items()}
_PREDICTION_TYPE_FROM_DIFFUSERS = {v: k for k, v in PREDICTION_TYPE_TO_DIFFUSERS.items()}
# DDIMScheduler settings our sampler has no counterpart for, with the only values it matches.
_FIXED_SCHEDULER_FIELDS = {
    "set_alpha_to_one": True,  # our t_prev = -1 is the clean end, alpha_bar = 1
    "steps_offset": 0,
    "clip_sample_range": 1.0,  # clip_x0 clamps x0_hat to the data range [-1, 1]
    "thresholding": False,
    "trained_betas": None,
}


def scheduler_config(schedule: ScheduleConfig, sample: SampleConfig) -> dict[str, Any]:
    """The DDIMScheduler arguments that reproduce our training schedule and DDIM sampler (eta is a call argument)."""
    return {
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_schedule": BETA_SCHEDULE_TO_DIFFUSERS[schedule.beta_schedule],
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "rescale_betas_zero_snr": schedule.zero_terminal_snr,
        "prediction_type": PREDICTION_TYPE_TO_DIFFUSERS[schedule.prediction_type],
        "timestep_spacing": sample.spacing,
        "clip_sample": sample.clip_x0,
        **_FIXED_SCHEDULER_FIELDS,
    }


def schedule_from_scheduler(config: dict[str, Any], source: str) -> tuple[ScheduleConfig, SampleConfig]:
    """The inverse of :func:`scheduler_config` for any diffusers scheduler config; unsupported values are errors."""
    # Missing keys take DDIMScheduler's defaults; read from its signature, as building it fails on unknown schedules.
    defaults = inspect.signature(DDIMScheduler.__init__).parameters
    cfg = {k: p.default for k, p in defaults.items() if p.default is not inspect.Parameter.empty} | config
    if cfg["trained_betas"] is not None or cfg["beta_schedule"] not in _BETA_SCHEDULE_FROM_DIFFUSERS:
        raise UserError(
            f"{source} uses beta_schedule {cfg['beta_schedule']!r}"
            f"{' with trained_betas' if cfg['trained_betas'] is not None else ''}; perceptual-diffusion supports "
            f"{', '.join(_BETA_SCHEDULE_FROM_DIFFUSERS)}"
        )
    if cfg["prediction_type"] not in _PREDICTION_TYPE_FROM_DIFFUSERS:
        raise UserError(f"{source} has prediction_type {cfg['prediction_type']!r}, which is not supported")
    other = {k: cfg[k] for k, v in _FIXED_SCHEDULER_FIELDS.items() if cfg[k] != v}
    if other:  # sampling-only settings: training is unaffected, our sampler just ignores them
        warnings.warn(f"{source}: scheduler settings {other} are ignored (no counterpart here)", stacklevel=2)
    try:
        schedule = ScheduleConfig(
            num_train_timesteps=cfg["num_train_timesteps"],
            beta_schedule=_BETA_SCHEDULE_FROM_DIFFUSERS[cfg["beta_schedule"]],
            beta_start=float(cfg["beta_start"]),
            beta_end=float(cfg["beta_end"]),
            zero_terminal_snr=cfg["rescale_betas_zero_snr"],
            prediction_type=_PREDICTION_TYPE_FROM_DIFFUSERS[cfg["prediction_type"]],
        )
        sample = SampleConfig(
            steps=min(SampleConfig.steps, schedule.num_train_timesteps),
            spacing=cfg["timestep_spacing"],
            clip_x0=cfg["clip_sample"],
        )
    except UserError as exc:
        raise UserError(f"{source} has a scheduler perceptual-diffusion cannot use: {exc}") from None
    return schedule, sample


# FlowMatchEulerDiscreteScheduler settings our flow sampler has no counterpart for, with the only values it matches.
_FIXED_FLOW_FIELDS = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}


def flow_schedule_from_scheduler(config: dict[str, Any], source: str) -> tuple[ScheduleConfig, SampleConfig]:
    """The flow ScheduleConfig of a FlowMatchEulerDiscreteScheduler config; settings with no counterpart are errors
    (unlike DDIM's sampling-only ones, they change the time grid the model was exported for)."""
    defaults = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
    cfg = {k: p.default for k, p in defaults.items() if p.default is not inspect.Parameter.empty} | config
    other = {k: cfg[k] for k, v in _FIXED_FLOW_FIELDS.items() if cfg.get(k) != v}
    if other:
        raise UserError(
            f"{source}: FlowMatchEulerDiscreteScheduler settings {other} have no counterpart in perceptual-diffusion "
            "(its flow sampler is Euler on the default time grid with a fixed shift)"
        )
    try:
        schedule = ScheduleConfig(
            family="flow", num_train_timesteps=cfg["num_train_timesteps"], shift=float(cfg["shift"])
        )
        sample = SampleConfig(steps=min(SampleConfig.steps, schedule.num_train_timesteps), clip_x0=False)
    except UserError as exc:
        raise UserError(f"{source} has a scheduler perceptual-diffusion cannot use: {exc}") from None
    return schedule, sample


def read_scheduler(config: dict[str, Any], source: str) -> tuple[ScheduleConfig, SampleConfig]:
    """(schedule, sampler) of any diffusers scheduler config: the family is the scheduler's class."""
    if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        return flow_schedule_from_scheduler(config, source)
    return schedule_from_scheduler(config, source)


def _ddim(schedule: ScheduleConfig, sample: SampleConfig) -> DDIMScheduler:
    return DDIMScheduler(**scheduler_config(schedule, sample))


def _flow(schedule: ScheduleConfig, sample: SampleConfig) -> FlowMatchEulerDiscreteScheduler:
    return FlowSchedule(schedule).diffusers_scheduler()


# Per schedule family: the diffusers pipeline an export declares and the scheduler whose step loop samples as
# core.sampling does. A new family adds one line here (and its class in core/schedule.py).
SCHEDULERS: dict[str, tuple[type, Callable[[ScheduleConfig, SampleConfig], Any]]] = {
    "ddpm": (DDIMPipeline, _ddim),
    "flow": (DDPMPipeline, _flow),
}
