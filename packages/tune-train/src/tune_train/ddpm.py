"""DDPM noise (epsilon and v-prediction): timestep sampling, noising, targets, SNR loss weights.

The second noise scheme of the generic loop, beside :mod:`tune_train.flow`. A family whose
``prediction`` is not ``flow`` (the UNet families) is trained here:

- a timestep ``t`` is drawn uniformly from the scheduler's ``num_train_timesteps`` (optionally a
  sub-range, e.g. the low-noise end a refiner is trained on), or, with SimpleTuner's
  ``timestep_bias_*`` keys, in proportion to per-timestep weights (:func:`timestep_bias_weights`,
  the scheme of diffusers' SDXL example script);
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

Diff2Flow (SimpleTuner's ``diff2flow_enabled`` + ``diff2flow_loss``; Schusterbauer et al. 2025)
trains such a model with the flow-matching objective instead, without touching the network:
the sample is noised exactly as above, and the network's native output is read as what it
implies about the pair ``(x0, noise)`` -- for epsilon ``noise_hat = pred`` and
``x0_hat = (x_t - sqrt(1 - a) noise_hat) / sqrt(a)``; for v-prediction
``x0_hat = sqrt(a) x_t - sqrt(1 - a) v`` and ``noise_hat = sqrt(1 - a) x_t + sqrt(a) v``. The
implied velocity ``noise_hat - x0_hat`` is regressed onto the flow target ``noise - x0`` (the
same convention as :func:`tune_train.flow.velocity_target`). Both paths share one ``(x0, noise)``
pair, so a perfect prediction in the native space is a perfect velocity: the objective changes
how errors are weighted across timesteps (high-noise epsilon errors count more, since
``x0_hat`` amplifies them by ``sqrt(1 - a) / sqrt(a)``), never what the optimum is. The model
still predicts epsilon / v afterwards, so validation and export are unchanged.

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


TIMESTEP_BIAS_STRATEGIES = ("none", "earlier", "later", "range")
TIMESTEP_BIAS_KEYS = (
    "timestep_bias_strategy",
    "timestep_bias_multiplier",
    "timestep_bias_begin",
    "timestep_bias_end",
    "timestep_bias_portion",
)


def timestep_bias_weights(
    num_timesteps: int,
    strategy: str = "none",
    multiplier: float = 1.0,
    portion: float = 0.25,
    begin: int = 0,
    end: int = 1000,
) -> torch.Tensor | None:
    """Per-timestep sampling weights of SimpleTuner's ``timestep_bias_*`` keys (the scheme of
    diffusers' SDXL example, ``generate_timestep_weights``): a weight of 1 per timestep, the
    biased ones multiplied by ``multiplier`` -- ``later``: the last ``portion`` of the timesteps
    (the noisy end), ``earlier``: the first ``portion``, ``range``: ``begin`` to ``end``
    (``end`` excluded). ``multiplier`` 0 removes them. ``None`` for ``none`` (uniform draws).
    Errors name the key at fault."""
    if strategy not in TIMESTEP_BIAS_STRATEGIES:
        raise ValueError(f"timestep_bias_strategy must be one of {', '.join(TIMESTEP_BIAS_STRATEGIES)}, got {strategy!r}")
    if strategy == "none":
        return None
    if not (multiplier >= 0 and multiplier != float("inf")):
        raise ValueError(f"timestep_bias_multiplier must be >= 0 and finite, got {multiplier!r}")
    weights = torch.ones(num_timesteps, dtype=torch.float64)
    if strategy in ("earlier", "later"):
        if not 0 < portion <= 1:
            raise ValueError(f"timestep_bias_portion must be in (0, 1], got {portion!r}")
        count = max(1, int(portion * num_timesteps))
        biased = slice(0, count) if strategy == "earlier" else slice(num_timesteps - count, num_timesteps)
    else:
        if not 0 <= begin < end <= num_timesteps:
            raise ValueError(
                f"timestep_bias_begin ({begin}) and timestep_bias_end ({end}) must satisfy "
                f"0 <= begin < end <= {num_timesteps} (the scheduler's timestep count)"
            )
        biased = slice(int(begin), int(end))
    weights[biased] *= float(multiplier)
    if not weights.sum() > 0:
        raise ValueError(
            f"timestep_bias_multiplier 0 with timestep_bias_strategy {strategy!r} removes every timestep; "
            "use a multiplier > 0 or bias fewer timesteps"
        )
    return weights


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
    diff2flow: bool = False
    """Train against the flow velocity (Diff2Flow, see the module doc): ``target`` becomes
    ``noise - x0`` and ``loss`` converts the prediction before comparing."""
    timestep_weights: torch.Tensor | None = None
    """Per-timestep sampling weights (``timestep_bias_*``, :func:`timestep_bias_weights`);
    ``None``: uniform. Timesteps outside ``[min_timestep, max_timestep)`` are never drawn."""

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

    def _range_weights(self) -> torch.Tensor | None:
        """``timestep_weights`` with the timesteps outside ``[min_timestep, max_timestep)`` zeroed."""
        if self.timestep_weights is None:
            return None
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        weights = torch.zeros(self.num_train_timesteps, dtype=torch.float64)
        weights[self.min_timestep:high] = self.timestep_weights.double().cpu()[self.min_timestep:high]
        if not weights.sum() > 0:
            raise ValueError(
                f"the timestep_bias_* keys leave no timestep to train in [{self.min_timestep}, {high}) "
                "(a timestep_bias_multiplier of 0 covers the whole range); use a multiplier > 0 or another range"
            )
        return weights

    def sample_timesteps(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """Integer timesteps over ``[min_timestep, max_timestep)``: uniform, or in proportion to
        ``timestep_weights`` (``torch.multinomial`` with replacement), drawn from ``generator``."""
        weights = self._range_weights()
        if weights is not None:
            return torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        high = self.num_train_timesteps if self.max_timestep is None else self.max_timestep
        return torch.randint(self.min_timestep, high, (batch_size,), generator=generator)

    def _alpha(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[timesteps.long().cpu()]

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``."""
        alpha = self._alpha(timesteps).to(latents.device)
        return _view(alpha.sqrt(), latents) * latents + _view((1 - alpha).sqrt(), latents) * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the network learns: ``noise`` or the velocity ``sqrt(a) noise - sqrt(1-a) x0``
        (with ``diff2flow``: the flow velocity ``noise - x0``)."""
        if self.diff2flow:
            return noise - latents
        if self.prediction_type == "epsilon":
            return noise
        alpha = self._alpha(timesteps).to(latents.device)
        return _view(alpha.sqrt(), latents) * noise - _view((1 - alpha).sqrt(), latents) * latents

    def flow_velocity(self, prediction: torch.Tensor, noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow velocity ``noise_hat - x0_hat`` a native (epsilon / v) prediction implies at
        ``noisy = x_t`` (the module doc has the algebra). Computed in float32 at least; the
        schedule's coefficients come from the float64 ``alphas_cumprod``."""
        dtype = torch.promote_types(prediction.dtype, torch.float32)
        prediction = prediction.to(dtype)
        noisy = noisy.to(prediction.device, dtype)
        alpha = self._alpha(timesteps).to(prediction.device)
        a, s = _view(alpha.sqrt(), prediction), _view((1 - alpha).sqrt(), prediction)
        if self.prediction_type == "epsilon":
            noise_hat = prediction
            x0_hat = (noisy - s * noise_hat) / a
        else:
            x0_hat = a * noisy - s * prediction
            noise_hat = s * noisy + a * prediction
        return noise_hat - x0_hat

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """``a_t / (1 - a_t)`` per sample (float64)."""
        alpha = self._alpha(timesteps)
        return alpha / (1 - alpha)

    def loss(
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        timesteps: torch.Tensor,
        noisy: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MSE, per sample weighted by min-SNR when ``snr_gamma`` is set (plain MSE otherwise);
        with a loss ``mask`` (``B x 1 x h x w``, :mod:`tune_train.masks`) the mask-weighted mean.

        With ``diff2flow`` the prediction is first converted to the flow velocity, which needs the
        model input ``noisy``; the loss is then the plain MSE to the flow target (min-SNR weights
        are derived for the native targets and do not apply)."""
        from tune_train.masks import weighted_mse

        if self.diff2flow:
            if noisy is None:
                raise ValueError("diff2flow needs the noisy latents the model saw: pass noisy= to DDPMScheme.loss")
            velocity = self.flow_velocity(prediction, noisy, timesteps)
            return weighted_mse(velocity, target, mask)
        if not self.snr_gamma:
            return weighted_mse(prediction, target, mask)
        per_sample = weighted_mse(prediction, target, mask, per_sample=True)
        weights = min_snr_weights(self.snr(timesteps), self.snr_gamma, self.prediction_type, soft=self.soft_min_snr)
        return (per_sample * weights.to(per_sample.device, per_sample.dtype)).mean()


def scheme_for(family: Any, model: Any, config: Any) -> DDPMScheme | None:
    """The DDPM scheme a run trains with, or ``None`` for a flow family (the loop then uses
    :mod:`tune_train.flow`). Which one is the family's declaration (``family.prediction``), never
    its name. ``config`` supplies SimpleTuner's ``prediction_type`` (overrides the checkpoint's
    scheduler config; it is recorded in ``model.extras`` so validation samples the same way),
    ``snr_gamma``, ``use_soft_min_snr`` and ``refiner_training`` / ``refiner_training_strength``
    (train only the lowest ``strength`` share of the timesteps, the range a refiner denoises;
    with ``refiner_training_invert_schedule`` the rest, from that share up to pure noise),
    ``diff2flow_enabled`` / ``diff2flow_loss`` (train on the flow velocity; refused for flow
    families, which need no bridge), and the ``timestep_bias_*`` keys (which timesteps are drawn
    more or less often; no effect, with a warning, on flow families)."""
    override = getattr(config, "prediction_type", None)
    if family.prediction == "flow" and (getattr(config, "diff2flow_enabled", False) or getattr(config, "diff2flow_loss", False)):
        raise ValueError(
            f"diff2flow_enabled / diff2flow_loss do not apply to model_family {family.name!r}, which is already "
            "trained with flow matching (diff2flow bridges epsilon / v-prediction models to it); remove the keys"
        )
    if family.prediction == "flow":
        if override not in (None, "flow_matching"):
            raise ValueError(
                f"prediction_type {override!r} does not apply to model_family {family.name!r}, which is "
                "trained with flow matching; remove the key"
            )
        if getattr(config, "snr_gamma", None):
            log.warning("snr_gamma is ignored: model_family %r is trained with flow matching", family.name)
        if timestep_bias_active(config):
            log.warning(
                "timestep_bias_strategy %r has no effect: model_family %r is trained with flow matching; "
                "weight timesteps with the flow sampling keys instead (flow_sigmoid_scale, flow_use_beta_schedule, "
                "flow_use_uniform_schedule, flow_schedule_shift)",
                config.timestep_bias_strategy, family.name,
            )
        return None
    if override == "flow_matching":
        raise ValueError(f"prediction_type 'flow_matching' does not apply to model_family {family.name!r}")
    if override is not None:
        model.extras["prediction_type"] = override
    prediction_type = family.prediction_type(model)
    scheme = DDPMScheme.from_scheduler(model.scheduler, prediction_type=prediction_type)
    if getattr(config, "refiner_training", False):
        strength = float(getattr(config, "refiner_training_strength", 0.2))
        boundary = max(1, int(round(scheme.num_train_timesteps * strength)))
        if getattr(config, "refiner_training_invert_schedule", False):
            # The first stage's range: from the boundary up to pure noise (eDiffi-style experts).
            scheme.min_timestep = min(boundary, scheme.num_train_timesteps - 1)
        else:
            scheme.max_timestep = boundary
    elif getattr(config, "refiner_training_invert_schedule", False):
        log.warning("refiner_training_invert_schedule changes nothing without refiner_training: true")
    scheme.snr_gamma = getattr(config, "snr_gamma", None)
    scheme.soft_min_snr = bool(getattr(config, "use_soft_min_snr", False))
    if scheme.soft_min_snr and not scheme.snr_gamma:
        raise ValueError("use_soft_min_snr needs snr_gamma (the gamma of the soft minimum), e.g. 5")
    scheme.timestep_weights = timestep_bias_weights(
        scheme.num_train_timesteps,
        getattr(config, "timestep_bias_strategy", "none") or "none",
        multiplier=float(getattr(config, "timestep_bias_multiplier", 1.0)),
        portion=float(getattr(config, "timestep_bias_portion", 0.25)),
        begin=int(getattr(config, "timestep_bias_begin", 0)),
        end=int(getattr(config, "timestep_bias_end", 1000)),
    )
    scheme._range_weights()  # refuse, before training, a bias that leaves the trained range empty
    scheme.diff2flow = _diff2flow(config)
    if scheme.diff2flow and scheme.prediction_type == "epsilon" and float(scheme.alphas_cumprod.min()) < 1e-8:
        # x0_hat = (x_t - sqrt(1 - a) eps) / sqrt(a) is undefined at a = 0 (zero terminal SNR).
        raise ValueError(
            "diff2flow_loss with an epsilon model needs a schedule without zero terminal SNR "
            "(x0 cannot be recovered from an epsilon prediction at pure noise); use prediction_type: v_prediction"
        )
    if scheme.diff2flow and scheme.snr_gamma:
        log.warning("snr_gamma is ignored with diff2flow_loss: the loss is the plain MSE to the flow velocity")
    return scheme


def timestep_bias_active(config: Any) -> bool:
    """Whether the config asks for a timestep bias (``timestep_bias_strategy`` other than none)."""
    return (getattr(config, "timestep_bias_strategy", "none") or "none") != "none"


def _diff2flow(config: Any) -> bool:
    """Whether ``diff2flow_loss`` is on (it needs ``diff2flow_enabled``, as in SimpleTuner, where
    the flag alone only prepares the bridge and changes nothing)."""
    enabled, loss = bool(getattr(config, "diff2flow_enabled", False)), bool(getattr(config, "diff2flow_loss", False))
    if loss and not enabled:
        raise ValueError("diff2flow_loss needs diff2flow_enabled: true (the diffusion-to-flow bridge)")
    if enabled and not loss:
        log.warning("diff2flow_enabled alone changes nothing; set diff2flow_loss: true to train on the flow target")
    return enabled and loss
