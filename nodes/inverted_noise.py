"""Inverted noise as the Video Sampler takes it: a LATENT whose record says how it was inverted,
checked against the sampling that walks it back."""
from __future__ import annotations

import comfy.samplers
import torch

from ..simda_core.host.register import get_config
from ..simda_core.host.samplers import adds_fresh_noise, noise_free_samplers
from ..simda_core.video.inversion import INVERSION_KEY, INVERSION_SAMPLER, SimDAState, simda_state

INVERTER = "SimDA Invert"
"""The node that makes inverted noise, as the messages name it."""


def check_start_latent(
    start: dict, frames: int, height: int, width: int, steps: int, scheduler: str, denoise: float, *,
    sampler_name: str, model,
) -> torch.Tensor:
    """The samples of an inverted ``start_latent``, after checking that this sampling walks the
    inversion back: same frames and size, same steps and schedule, ``model`` in the SimDA state of
    the MODEL that inverted, denoise 1, and a sampler that adds no fresh noise
    (``host.samplers.adds_fresh_noise``)."""
    samples = start["samples"]
    if samples.ndim != 4:
        raise ValueError(
            "SimDA Video Sampler: start_latent must be a batch of frame "
            f"latents [F, C, H, W], got shape {list(samples.shape)}."
        )
    if samples.shape[0] != frames or samples.shape[2] != height or samples.shape[3] != width:
        raise ValueError(
            f"SimDA Video Sampler: start_latent holds {samples.shape[0]} frames of "
            f"{samples.shape[3] * 8}x{samples.shape[2] * 8}, but the clip to sample has "
            f"{frames} frames of {width * 8}x{height * 8}; make both from the same clip."
        )
    made_with = start.get(INVERSION_KEY)
    if made_with is None:
        raise ValueError(
            "SimDA Video Sampler: start_latent is not inverted noise (it carries no inversion settings); connect the "
            f"output of {INVERTER}, or connect the clip to 'latent' instead."
        )
    if (not isinstance(made_with, dict) or not {"steps", "scheduler", "simda"} <= set(made_with)
            or not isinstance(made_with["simda"], SimDAState)):
        raise ValueError(
            "SimDA Video Sampler: start_latent carries unreadable inversion settings; connect the output of "
            f"{INVERTER} directly."
        )
    if made_with["steps"] != steps or made_with["scheduler"] != scheduler:
        raise ValueError(
            f"SimDA Video Sampler: start_latent was inverted with {made_with['steps']} steps of the "
            f"'{made_with['scheduler']}' schedule, but this sampler runs {steps} steps of '{scheduler}'; use the same "
            "steps and scheduler as the inversion."
        )
    check_same_state(made_with["simda"], simda_state(get_config(model)))
    if adds_fresh_noise(sampler_name):
        raise ValueError(
            f"SimDA Video Sampler: the sampler '{sampler_name}' adds fresh noise at every step, which undoes the "
            "inverted start_latent; pick one that adds none: "
            f"{', '.join(noise_free_samplers(comfy.samplers.KSampler.SAMPLERS))} "
            f"(the inversion walked '{made_with.get('sampler', INVERSION_SAMPLER)}')."
        )
    if denoise != 1.0:
        raise ValueError(
            "SimDA Video Sampler: sampling from inverted noise starts at the first step; set denoise to 1.0."
        )
    return samples


def check_same_state(inverted: SimDAState, sampling: SimDAState) -> None:
    """Inverted noise walks back to the source clip only through the function that inverted it: a
    MODEL in another SimDA state (latent shift, adapters, strength, ...) is refused, naming both."""
    differences = inverted.differences(sampling)
    if differences:
        raise ValueError(
            f"SimDA Video Sampler: start_latent was inverted by a MODEL with {', '.join(a for a, _ in differences)}, "
            f"but the MODEL sampling it has {', '.join(b for _, b in differences)}; connect the MODEL that goes into "
            f"the Video Sampler to {INVERTER} too (the One-Shot Tuner's tuned MODEL into both, for an edit)."
        )
