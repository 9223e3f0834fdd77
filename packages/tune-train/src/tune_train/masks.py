"""Masked loss: a ``conditioning_type: mask`` dataset weights the training loss pixel by pixel.

A mask image pairs with its training image like a strict reference (same relative path, same
bucket, same resize and crop, see :mod:`tune_data.conditioning`), so after cropping it still covers
the same pixels. Its brightness is the weight: white trains, black is ignored, grey counts partly
(the mean of the RGB channels, so a mask saved as greyscale or as black-and-white RGB reads the
same; transparency was composited onto white when the image was read, so transparent pixels train).

The loss lives in latent space, where one latent cell stands for a block of pixels; a cell's weight
is the mean of its pixels' weights (area averaging), so a cell half inside the mask counts half.
Every family's ``predict`` returns its output in the ``B x C x h x w`` shape of the cached latents
(packing into tokens, if any, is undone inside ``predict``), so one ``B x 1 x h x w`` weight map
applies to every family and every channel.

The loss is the mask-weighted mean of the squared error: ``sum(w * err) / sum(w * C)``. A sample
whose mask is all black contributes nothing (and no NaN: the denominator is clamped).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["mask_from_pixels", "to_latent_grid", "weighted_mse"]

_EPSILON = 1e-8


def mask_from_pixels(array: np.ndarray) -> torch.Tensor:
    """``uint8`` ``H x W x 3`` mask pixels -> ``1 x H x W`` float weights in [0, 1]."""
    pixels = torch.from_numpy(np.array(array, copy=True)).float()
    if pixels.ndim == 3:
        pixels = pixels.mean(dim=-1)
    return (pixels / 255.0).clamp(0.0, 1.0).unsqueeze(0)


def to_latent_grid(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A ``1 x H x W`` pixel mask averaged down to the latent grid ``size`` = ``(h, w)``.

    ``H`` and ``W`` are whole multiples of ``h`` and ``w`` for every family (buckets align to the
    VAE scale), so this is an exact block mean; other sizes fall back to area interpolation."""
    height, width = mask.shape[-2:]
    h, w = int(size[0]), int(size[1])
    if height % h == 0 and width % w == 0:
        return torch.nn.functional.avg_pool2d(mask[None], (height // h, width // w))[0]
    return torch.nn.functional.interpolate(mask[None], size=(h, w), mode="area")[0]


def weighted_mse(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    per_sample: bool = False,
) -> torch.Tensor:
    """Mean squared error, weighted by ``mask`` (``B x 1 x h x w``, broadcast over channels).

    Without a mask this is :func:`torch.nn.functional.mse_loss` (or its per-sample means); with
    one, the mask-weighted mean over the batch, or per sample with ``per_sample`` (for per-sample
    loss weights such as min-SNR)."""
    prediction, target = prediction.float(), target.to(prediction.device).float()
    error = (prediction - target) ** 2
    if mask is None:
        return error.flatten(1).mean(dim=1) if per_sample else error.mean()
    if mask.ndim != error.ndim or mask.shape[0] != error.shape[0] or mask.shape[2:] != error.shape[2:]:
        raise ValueError(
            f"loss mask of shape {tuple(mask.shape)} does not cover a prediction of shape {tuple(error.shape)} "
            "(expected B x 1 x h x w on the latent grid)"
        )
    weights = mask.to(device=error.device, dtype=error.dtype).expand_as(error)
    if per_sample:
        return (error * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(_EPSILON)
    return (error * weights).sum() / weights.sum().clamp_min(_EPSILON)
