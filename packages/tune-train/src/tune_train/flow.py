"""Flow-matching noise: sigma sampling, noising, and the velocity target.

Convention (shared with every flow family in tune-models): ``x_t = (1 - s) * x0 + s * noise`` and
the model is trained to predict ``noise - x0``. Shifting sigmas is the family's business
(``family.flow_shift`` / ``family.shift_sigmas``), since it depends on the model's resolution rules. Families that call their network differently
(Z-Image wants ``t = 1 - s`` and a negated output) hide that inside ``family.predict``.
"""

from __future__ import annotations

import torch


def sample_sigmas(
    batch_size: int,
    generator: torch.Generator,
    *,
    scheme: str = "logit_normal",
    scale: float = 1.0,
    alpha: float = 2.0,
    beta: float = 2.0,
) -> torch.Tensor:
    """Draw one sigma in (0, 1) per sample, every draw from ``generator``.

    ``logit_normal`` (sigmoid of a normal draw times ``scale``) spends more steps at mid noise
    levels, where flow models learn most; ``uniform`` is the plain alternative; ``beta`` draws from
    Beta(alpha, beta). torch's Beta sampler takes no generator, so that one draws a seed from
    ``generator`` and samples with numpy: still a pure function of the step's generator.
    """
    if scheme == "uniform":
        return torch.rand(batch_size, generator=generator)
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(batch_size, generator=generator) * scale)
    if scheme == "beta":
        import numpy as np

        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        draws = np.random.default_rng(seed).beta(alpha, beta, size=batch_size)
        return torch.from_numpy(draws).float().clamp(1e-6, 1 - 1e-6)
    raise ValueError(f"unknown sigma sampling scheme {scheme!r}; choose uniform, logit_normal or beta")


def offset_noise(
    noise: torch.Tensor, generator: torch.Generator, *, offset: float, probability: float
) -> torch.Tensor:
    """Add a per-sample, per-channel constant (``offset`` x a normal draw) to ``noise`` for a
    ``probability`` share of the samples: lets the model move an image's mean brightness."""
    shape = (noise.shape[0], noise.shape[1], *([1] * (noise.ndim - 2)))
    constant = torch.randn(shape, generator=generator, dtype=noise.dtype)
    applied = (torch.rand(noise.shape[0], generator=generator) < probability).to(noise.dtype)
    return noise + offset * constant * applied.view(-1, *([1] * (noise.ndim - 1)))


def input_perturbation_strength(strength: float, steps: int, step: int) -> float:
    """``input_perturbation`` at optimizer step ``step`` (0-based): ``strength`` throughout when
    ``steps`` is 0, else decaying linearly from ``strength`` at step 0 to 0 at step ``steps``
    (``input_perturbation_steps``) and 0 after."""
    if steps <= 0:
        return strength
    return strength * max(0.0, 1.0 - step / steps)


def add_noise(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Interpolate clean latents towards noise by each sample's sigma."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the straight path from data to noise."""
    return noise - latents
