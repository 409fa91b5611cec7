"""One call of the host's UNet outside a sampler (training losses): the options the host's sampler
would build, the call through ``BaseModel.apply_model`` and its wrappers, and the raw output (noise
or v) that the host's denoised estimate amounts to."""
from __future__ import annotations

import torch

from .attention import backward_safe_attention_override


def call_options(model_patcher, cond_or_uncond: list[int], training: bool = False) -> dict:
    """``transformer_options`` for a direct UNet call, built as the host's sampler builds them:
    the patcher's own options, its wrappers, and the cond/uncond groups of the batch. A training
    call gets a backward-safe attention instead of any attention override."""
    import comfy.patcher_extension

    options = dict(model_patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
        dict(options.get("wrappers", {})), model_patcher.wrappers
    )
    options["cond_or_uncond"] = list(cond_or_uncond)
    if training:
        options["optimized_attention_override"] = backward_safe_attention_override()
    return options


def denoising_target(model_sampling, sigma: torch.Tensor, x_noisy: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The raw UNet output that would denoise ``x_noisy`` to ``x0`` exactly: the noise for an
    epsilon model, v for a v-prediction model. Found from the host's own ``calculate_denoised``,
    which is affine in the output: ``denoised = a * x + b * out``."""
    zeros = torch.zeros_like(x_noisy)
    a_x = model_sampling.calculate_denoised(sigma, zeros, x_noisy)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(x_noisy), zeros)
    return (x0 - a_x) / b


def unet_output(
    model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, groups: int,
    conds: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The host UNet's raw output for a noisy batch of ``groups`` clips (the patcher must be
    loaded/patched), through the host's own model call as sampling makes it: the MODEL's
    ``model_function_wrapper`` where one is set, then ``BaseModel.apply_model`` with its
    ``APPLY_MODEL`` wrappers (so what other packs register there applies while training too).

    ``conds``: the model's extra conditioning of the batch (``BaseModel.extra_conds`` processed to
    the batch size, e.g. the x4 upscaler's ``c_concat`` and ``y``, SDXL's ``y``), passed by name
    as the host passes them. The host returns the denoised estimate; the raw output is the one
    that denoises to it (:func:`denoising_target`)."""
    base = model_patcher.model
    cond_or_uncond = [0] * groups
    inputs = {
        "c_crossattn": context,
        "transformer_options": call_options(model_patcher, cond_or_uncond, training=torch.is_grad_enabled()),
        **(conds or {}),
    }
    wrapper = model_patcher.model_options.get("model_function_wrapper")
    if wrapper is not None:
        denoised = wrapper(
            base.apply_model, {"input": x_noisy, "timestep": sigma, "c": inputs, "cond_or_uncond": cond_or_uncond}
        )
    else:
        denoised = base.apply_model(x_noisy, sigma, **inputs)
    return denoising_target(base.model_sampling, sigma, x_noisy, denoised)


class HostConditioning:
    """A CONDITIONING as the host's sampler uses it, for a training loss: every entry (with its
    strength, area, mask, timestep range, pooled output and the model's extra conditioning, e.g.
    SDXL's size vector) is run and the entries are combined by the host's own ``calc_cond_batch``,
    exactly as one cond of a sampling step."""

    def __init__(self, model_patcher, conditioning: list, x0: torch.Tensor, seed: int = 0):
        import comfy.sampler_helpers
        import comfy.samplers

        if not conditioning:
            raise ValueError("the conditioning is empty; connect a CLIP Text Encode output.")
        converted = comfy.sampler_helpers.convert_cond(conditioning)
        device = model_patcher.load_device
        self.conds = comfy.samplers.process_conds(
            model_patcher.model, x0, {"positive": converted}, device, latent_image=x0, seed=seed
        )["positive"]

    def denoised(self, model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, training: bool) -> torch.Tensor:
        import comfy.samplers

        base = model_patcher.model
        options = dict(model_patcher.model_options)
        options["transformer_options"] = call_options(model_patcher, [0], training=training)
        previous = getattr(base, "current_patcher", None)
        base.current_patcher = model_patcher  # as the host's sampler sets it for the run
        try:
            return comfy.samplers.calc_cond_batch(base, [self.conds], x_noisy, sigma, options)[0]
        finally:
            base.current_patcher = previous


def host_conditioned_output(
    model_patcher, conditioning: HostConditioning, x_noisy: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The raw UNet output (noise or v) that the host's combined prediction for ``conditioning``
    amounts to: the output that would denoise ``x_noisy`` to that prediction."""
    denoised = conditioning.denoised(model_patcher, x_noisy, sigma, training=torch.is_grad_enabled())
    return denoising_target(model_patcher.model.model_sampling, sigma, x_noisy, denoised)
