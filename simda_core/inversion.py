"""DDIM inversion of a clip (the starting noise for editing, SIMDA_SPEC.md section 5).

The deterministic DDIM step is, in the sigma parametrisation the host samples in,
``x <- x + (sigma_next - sigma) * eps``. Inversion walks the same sigmas upwards, from the clean
latents to the largest sigma, taking each step's noise estimate at the level it moves to (as
Tune-A-Video and SimDA do), so that sampling with the same steps and schedule walks back.
"""
from __future__ import annotations

from typing import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoised = fn(x, sigma)``: the model's clean-latent estimate at noise level ``sigma``."""


def ddim_invert(
    denoise: DenoiseFn, x0: torch.Tensor, sigmas: torch.Tensor, callback: Callable[[int, torch.Tensor], None] | None = None
) -> torch.Tensor:
    """``x0`` -> the latent at ``sigmas.max()``. ``sigmas``: the sampling schedule, either order,
    its trailing 0 included or not."""
    levels = torch.sort(sigmas[sigmas > 0]).values
    x = x0
    previous = torch.zeros((), dtype=levels.dtype, device=levels.device)
    for index, sigma in enumerate(levels):
        eps = (x - denoise(x, sigma)) / sigma
        x = x + (sigma - previous) * eps
        previous = sigma
        if callback is not None:
            callback(index, x)
    return x


def host_sampler_inversion(sigmas_hint=None):
    """A host ``KSAMPLER`` that runs :func:`ddim_invert` instead of sampling, so the inversion
    goes through the host's guider (conditioning, patches, wrappers, model loading). Give it the
    ascending schedule ``[0, s1, ..., s_max]`` and zero noise; it returns the latent at ``s_max``."""
    import comfy.samplers

    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])

        def denoise(x_, sigma):
            return model(x_, sigma * s_in, **extra_args)

        def report(index, current):
            if callback is not None:
                callback({"i": index, "x": current, "sigma": sigmas[index], "sigma_hat": sigmas[index], "denoised": current})

        return ddim_invert(denoise, x, sigmas, report)

    return comfy.samplers.KSAMPLER(invert)
