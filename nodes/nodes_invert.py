"""SimDA Invert: DDIM inversion of a clip with any SD MODEL (tuned, SimDA or plain), the starting
noise of a video edit in SimDA Video Sampler."""
from __future__ import annotations

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..simda_core.host.memory import unloaded_on_failure
from ..simda_core.host.register import get_config
from ..simda_core.host.samplers import host_sampler_inversion
from ..simda_core.model.config import SimDAConfig
from ..simda_core.video.clip_agreement import clip_mismatch
from ..simda_core.video.inversion import INVERSION_KEY, inversion_record, simda_state
from .simda_model import check_image_family


def invert_clip(model, latent: torch.Tensor, conditioning, steps: int, scheduler: str, callback=None) -> torch.Tensor:
    """DDIM inversion through the host's guider; returns LATENT samples (VAE space). ``callback``:
    the host's sampling callback (``callback(step, denoised, x, total_steps)``); by default the
    host's previews."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    if callback is None:
        callback = latent_preview.prepare_callback(model, steps)
    return guider.sample(
        torch.zeros_like(latent), latent, host_sampler_inversion(), torch.flip(sigmas, [0]),
        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0,
    ).to(comfy.model_management.intermediate_device())


def check_inversion_inputs(model, frames: int, clip, conditioning, what: str) -> None:
    """Before any work: a prompt to invert with (the conditioning, or the CLIP for the empty prompt)
    whose rows, and the MODEL's ``frames_per_clip``, agree with a clip of ``frames`` frames."""
    if conditioning is None and clip is None:
        raise ValueError(
            f"{what}: connect the checkpoint's CLIP (it encodes the empty inversion prompt) or an inversion "
            "conditioning."
        )
    frames_per_clip = (get_config(model) or SimDAConfig()).frames_per_clip
    problem = clip_mismatch({"inversion": conditioning}, frames, frames_per_clip)
    if problem:
        raise ValueError(f"{what}: {problem}.")


def empty_prompt(clip):
    """The empty prompt's conditioning (the authors invert with it)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(""))


def inverted_noise(model, samples: torch.Tensor, conditioning, steps: int, scheduler: str) -> dict:
    """The LATENT a Video Sampler starts an edit from: ``samples`` DDIM-inverted with ``model``,
    with the record of how (steps, scheduler, sampler, the MODEL's SimDA state)."""
    with unloaded_on_failure(model):
        inverted = invert_clip(model, samples, conditioning, steps, scheduler)
    return {"samples": inverted, INVERSION_KEY: inversion_record(steps, scheduler, simda_state(get_config(model)))}


def inversion_prompt_inputs() -> list:
    """What the inversion is conditioned on (SimDA Invert's inputs, and the deprecated Edit Tuner's)."""
    return [
        io.Clip.Input(
            "clip", optional=True,
            tooltip="The checkpoint's CLIP: encodes the empty prompt when no inversion conditioning is connected.",
        ),
        io.Conditioning.Input(
            "inversion_conditioning", optional=True,
            tooltip="Conditioning for the DDIM inversion; default: the empty prompt.",
        ),
    ]


def inversion_schedule_inputs(prefix: str = "") -> list:
    """The inversion's steps and scheduler, named ``<prefix>steps`` and ``<prefix>scheduler`` (the
    deprecated Edit Tuner keeps its ``inversion_`` names for saved workflows)."""
    return [
        io.Int.Input(
            f"{prefix}steps", default=50, min=1, max=1000,
            tooltip="DDIM inversion steps; the Video Sampler must use the same steps.",
        ),
        io.Combo.Input(
            f"{prefix}scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
            tooltip="Schedule of the inversion; the Video Sampler must use the same.",
        ),
    ]


class SimDAInvert(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAInvert",
            display_name="SimDA Invert",
            category="SimDA",
            description=(
                "DDIM inversion of a clip: the noise from which SimDA Video Sampler, with the same MODEL, steps and "
                "scheduler, walks back to the clip, so an edited prompt keeps the source's motion and layout. Takes "
                "any SD MODEL: the One-Shot Tuner's tuned MODEL, one with SimDA adapters or the Latent-Shift Patch "
                "(a training-free edit), or a plain checkpoint. Changing only its settings re-runs only the "
                "inversion; the tuner's training stays in ComfyUI's cache."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=(
                        "SD1.x, SD2.x or SDXL MODEL; connect the same MODEL to the Video Sampler (its SimDA state is "
                        "recorded and checked there)."
                    ),
                ),
                io.Latent.Input(
                    "latent",
                    tooltip=(
                        "The source clip as frame latents: the One-Shot Tuner's source latent, or SimDA Fit Frames "
                        "-> VAE Encode."
                    ),
                ),
                *inversion_prompt_inputs(),
                *inversion_schedule_inputs(),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="inverted noise",
                    tooltip="The clip's DDIM inversion: connect it to the Video Sampler's start_latent.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, latent, steps, scheduler, clip=None, inversion_conditioning=None) -> io.NodeOutput:
        what = "SimDA Invert"
        check_image_family(model, what)
        samples = latent["samples"]
        if samples.ndim != 4:
            raise ValueError(
                f"{what}: the latent must be a batch of frame latents [F, C, H, W], got shape {list(samples.shape)}; "
                "encode the clip's frames with VAE Encode."
            )
        check_inversion_inputs(model, int(samples.shape[0]), clip, inversion_conditioning, what)
        if inversion_conditioning is None:
            inversion_conditioning = empty_prompt(clip)
        return io.NodeOutput(inverted_noise(model, samples, inversion_conditioning, steps, scheduler))
