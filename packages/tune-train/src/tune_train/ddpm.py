"""DDPM noise (epsilon and v-prediction): timestep sampling, noising, targets, SNR loss weights.

The second noise scheme of the generic loop, beside :mod:`tune_train.flow`. A family whose
``prediction`` is not ``flow`` (the UNet families) is trained here:

- a timestep ``t`` is drawn uniformly from the scheduler's ``num_train_timesteps`` (optionally a
  sub-range, e.g. the low-noise end a refiner is trained on);
- ``x_t = sqrt(a_t) * x0 + sqrt(1 - a_t) * noise`` with ``a_t`` the scheduler's ``alphas_cumprod``
  (exactly diffusers' ``DDPMScheduler.add_noise``);
- the target is ``noise`` (``epsilon``) or ``sqrt(a_t) * noise - sqrt(1 - a_t) * x0``
  (``v_prediction``, diffusers' ``get_velocity``);
- ``SNR(t) = a_t / (1 - a_t)``. Min-SNR-gamma (Hang et al. 2023) weighs each sample's MSE by
  ``min(SNR, gamma) / SNR`` for epsilon and ``min(SNR, gamma) / (SNR + 1)`` for v-prediction,
  which caps the weight of the nearly clean timesteps, whose easy loss otherwise dominates. The
  *soft* variant replaces the hard minimum by the smooth one ``SNR * gamma / (SNR + gamma)``
  (``1 / (1/SNR + 1/gamma)``); it equals k-diffusion's soft-min-SNR weighting with
  ``sigma_data**2 = 1 / gamma``, and avoids the kink at ``SNR = gamma``.

Every random draw comes from the step's generator, so resumed runs stay exact.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import torch

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def alphas_cumprod_from_config(config: Any) -> torch.Tensor:
    """``alphas_cumprod`` of a diffusers DDPM-family scheduler config (``beta_schedule``
    ``linear``, ``scaled_linear`` or ``squaredcos_cap_v2``; ``trained_betas`` when given), as
    diffusers computes it, in float64 for the closed forms."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    steps = int(get("num_train_timesteps", 1000))
    trained = get("trained_betas", None)
    schedule = get("beta_schedule", "linear")
    start, end = float(get("beta_start", 0.0001)), float(get("beta_end", 0.02))
    if trained is not None:
        betas = torch.tensor(trained, dtype=torch.float64)
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float32).double()
    elif schedule == "scaled_linear":
        betas = (torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float32) ** 2).double()
    elif schedule == "squaredcos_cap_v2":
        import math

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
            dtype=torch.float64,
        )
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r} in the model's scheduler config")
    if get("rescale_betas_zero_snr", False):
        raise NotImplementedError("rescale_betas_zero_snr schedulers are not supported by tune yet")
    return torch.cumprod(1.0 - betas, dim=0)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str, *, soft: bool = False) -> torch.Tensor:
    """Per-sample loss weights of min-SNR-gamma (``soft``: the smooth minimum), see the module doc."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be > 0, got {gamma}")
    capped = snr * gamma / (snr + gamma) if soft else torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return capped / snr
    if prediction_type == "v_prediction":
        return capped / (snr + 1)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; choose {', '.join(PREDICTION_TYPES)}")


@attrs.define
class DDPMScheme:
    """The DDPM training maths of one model: its ``alphas_cumprod`` and prediction type."""

    alphas_cumprod: torch.Tensor
    """``a_t`` for ``t = 0 .. T-1`` (float64)."""
    prediction_type: str = attrs.field(default="epsilon")
    """``epsilon`` or ``v_prediction``: what the network predicts."""
    min_timestep: int = 0
    """Smallest timestep drawn (inclusive)."""
    max_timestep: int | None = None
    """Largest timestep drawn (exclusive); ``None``: ``T``."""
    snr_gamma: float | None = None
    """Min-SNR-gamma weighting when set (SimpleTuner's ``snr_gamma``)."""
    soft_min_snr: bool = False
    """Use the smooth minimum (SimpleTuner's ``use_soft_min_snr``)."""

    def __attrs_post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}"
            )
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        if not 0 <= self.min_timestep < high <= self.num_train_timesteps:
            raise ValueError(
                f"timestep range [{self.min_timestep}, {high}) is empty or outside 0..{self.num_train_timesteps}"
            )

    @classmethod
    def from_scheduler(cls, scheduler: Any, **kwargs: Any) -> DDPMScheme:
        """From a loaded diffusers scheduler (its ``alphas_cumprod``, else its config); the
        prediction type defaults to the scheduler config's."""
        values = getattr(scheduler, "alphas_cumprod", None)
        config = getattr(scheduler, "config", scheduler)
        if values is None:
            values = alphas_cumprod_from_config(config)
        if kwargs.get("prediction_type") is None:
            get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
            kwargs["prediction_type"] = get("prediction_type", "epsilon") or "epsilon"
        return cls(torch.as_tensor(values).double().cpu(), **kwargs)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Integer timesteps, uniform over ``[min_timestep, max_timestep)``."""
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        return torch.randint(self.min_timestep, high, (batch_size,), generator=generator)

    def _alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[timesteps.long().cpu()]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``."""
        alpha = self._alpha(timesteps).to(latents.device)
        return _view(alpha.sqrt(), latents) * latents + _view((1 - alpha).sqrt(), latents) * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns: ``noise`` or the velocity ``sqrt(a) noise - sqrt(1-a) x0``."""
        if self.prediction_type == "epsilon":
            return noise
        alpha = self._alpha(timesteps).to(latents.device)
        return _view(alpha.sqrt(), latents) * noise - _view((1 - alpha).sqrt(), latents) * latents

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``a_t / (1 - a_t)`` per sample (float64)."""
        alpha = self._alpha(timesteps)
        return alpha / (1 - alpha)

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """MSE, per sample weighted by min-SNR when ``snr_gamma`` is set (plain MSE otherwise)."""
        prediction, target = prediction.float(), target.to(prediction.device).float()
        if not self.snr_gamma:
            return torch.nn.functional.mse_loss(prediction, target)
        per_sample = ((prediction - target) ** 2).flatten(1).mean(dim=1)
        weights = min_snr_weights(self.snr(timesteps), self.snr_gamma, self.prediction_type, soft=self.soft_min_snr)
        return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def scheme_for(family: Any, model: Any, config: Any) -> DDPMScheme | None:
    """The DDPM scheme a run trains with, or ``None`` for a flow family (the loop then uses
    :mod:`tune_train.flow`). Which one is the family's declaration (``family.prediction``), never
    its name. ``config`` supplies SimpleTuner's ``prediction_type`` (overrides the checkpoint's
    scheduler config; it is recorded in ``model.extras`` so validation samples the same way),
    ``snr_gamma``, ``use_soft_min_snr`` and ``refiner_training`` / ``refiner_training_strength``
    (train only the lowest ``strength`` share of the timesteps, the range a refiner denoises)."""
    override = getattr(config, "prediction_type", None)
    if family.prediction == "flow":
        if override not in (None, "flow_matching"):
            raise ValueError(
                f"prediction_type {override!r} does not apply to model_family {family.name!r}, which is "
                "trained with flow matching; remove the key"
            )
        if getattr(config, "snr_gamma", None):
            log.warning("snr_gamma is ignored: model_family %r is trained with flow matching", family.name)
        return None
    if override == "flow_matching":
        raise ValueError(f"prediction_type 'flow_matching' does not apply to model_family {family.name!r}")
    if override is not None:
        model.extras["prediction_type"] = override
    prediction_type = family.prediction_type(model)
    scheme = DDPMScheme.from_scheduler(model.scheduler, prediction_type=prediction_type)
    if getattr(config, "refiner_training", False):
        strength = float(getattr(config, "refiner_training_strength", 0.2))
        scheme.max_timestep = max(1, int(round(scheme.num_train_timesteps * strength)))
    scheme.snr_gamma = getattr(config, "snr_gamma", None)
    scheme.soft_min_snr = bool(getattr(config, "use_soft_min_snr", False))
    if scheme.soft_min_snr and not scheme.snr_gamma:
        raise ValueError("use_soft_min_snr needs snr_gamma (the gamma of the soft minimum), e.g. 5")
    return scheme
