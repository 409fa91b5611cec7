"""SimDA Video Sampler: one clip of F frames through the host's own sampling machinery."""
from __future__ import annotations

import logging

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..simda_core.host.memory import unloaded_on_failure
from ..simda_core.host.register import get_config, serve_context_windows
from ..simda_core.model.config import SimDAConfig
from ..simda_core.video.clip_agreement import clip_mismatch
from ..simda_core.video.clip_noise import clip_noise
from ..simda_core.video.keyframes import paste_fixed
from .inverted_noise import check_start_latent
from .simda_model import check_image_family

log = logging.getLogger("SimDA")


NODE = "SimDA Video Sampler"


def clip_latent(model, frames: int, width: int, height: int, latent: dict | None, start_latent: dict | None):
    """The clip's latent frames: the connected latent, zeros shaped as start_latent, or empty frames
    from the frames/width/height widgets."""
    if latent is not None:
        latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        if latent_image.ndim != 4:
            raise ValueError(
                f"{NODE}: the latent must be a batch of frames [F, C, H, W], got shape {list(latent_image.shape)}."
            )
        log.info(
            "%s: using the connected latent (%d frames, %dx%d); the frames/width/height widgets are ignored.",
            NODE, latent_image.shape[0], latent_image.shape[3] * 8, latent_image.shape[2] * 8,
        )
        return latent_image
    if start_latent is not None:
        latent_image = torch.zeros_like(start_latent["samples"])
        log.info(
            "%s: frames and size come from start_latent (%d frames, %dx%d); the frames/width/height widgets are "
            "ignored.", NODE, latent_image.shape[0], latent_image.shape[-1] * 8, latent_image.shape[-2] * 8,
        )
        return latent_image
    if frames < 1:
        raise ValueError(f"{NODE}: frames is {frames}; a clip needs at least 1 frame.")
    if width % 8 or height % 8 or width < 8 or height < 8:
        raise ValueError(
            f"{NODE}: {width}x{height} is not a multiple of 8 on both sides; SD latents are 1/8 of the image size."
        )
    channels = model.get_model_object("latent_format").latent_channels
    return torch.zeros(
        [frames, channels, height // 8, width // 8], device=comfy.model_management.intermediate_device()
    )


def check_clip_agreement(model, positive, negative, frames: int, noise_mask, start_latent) -> None:
    """The conditionings, ControlNet hints and ``frames_per_clip`` agree with the clip, and a keyframe
    mask does not meet inverted noise."""
    frames_per_clip = (get_config(model) or SimDAConfig()).frames_per_clip
    problem = clip_mismatch({"positive": positive, "negative": negative}, frames, frames_per_clip)
    if problem:
        raise ValueError(f"{NODE}: {problem}.")
    if noise_mask is not None and start_latent is not None:
        raise ValueError(
            f"{NODE}: the latent carries a noise mask (keyframes) and start_latent is inverted noise; sampling from "
            "inverted noise regenerates every frame: connect one of the two."
        )


def sample_clip(model, noise, latent_image, positive, negative, *, steps, cfg, sampler_name, scheduler, denoise,
                disable_noise, noise_mask, seed) -> torch.Tensor:
    """The host's sampling of the clip, with previews and progress; context windows on a MODEL without
    SimDA served as a SimDA MODEL's are (``register.serve_context_windows``)."""
    if get_config(model) is None:
        log.info(
            "%s: the MODEL carries no SimDA patch, so the %d frames are sampled independently.",
            NODE, latent_image.shape[0],
        )
    model = serve_context_windows(model)
    callback = latent_preview.prepare_callback(model, steps)
    with unloaded_on_failure(model):
        return comfy.sample.sample(
            model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
            denoise=denoise, disable_noise=disable_noise, noise_mask=noise_mask, callback=callback,
            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
        )


class SimDAVideoSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAVideoSampler",
            display_name="SimDA Video Sampler",
            category="SimDA",
            description=(
                "Samples one video clip: the F frames form a single batch that the SimDA patches see as one clip, "
                "in order, through ComfyUI's own samplers and schedulers (previews, progress and Cancel as with "
                "KSampler). There is no frame cap: memory grows linearly with the number of frames; for very long "
                "clips add the host's Context Windows (Manual) node to the MODEL."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=(
                        "SD1.x, SD2.x or SDXL MODEL, best after SimDA Adapter Loader and "
                        "Latent-Shift Patch. A plain MODEL samples independent frames."
                    ),
                ),
                io.Conditioning.Input("positive", tooltip="What the video shows (CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="What to avoid (CLIP Text Encode)."),
                io.Int.Input(
                    "frames", default=16, min=1, max=4096,
                    tooltip="Frames of the clip (ignored when a latent or start_latent is connected).",
                ),
                io.Int.Input(
                    "width", default=512, min=8, max=8192, step=8,
                    tooltip="Frame width in pixels, a multiple of 8 (ignored when a latent is connected).",
                ),
                io.Int.Input(
                    "height", default=512, min=8, max=8192, step=8,
                    tooltip="Frame height in pixels, a multiple of 8 (ignored when a latent is connected).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed of the noise; each frame's noise depends on the seed and its index only.",
                ),
                io.Int.Input(
                    "steps", default=50, min=1, max=10000, tooltip="Sampling steps (the paper uses 50 DDIM steps).",
                ),
                io.Float.Input(
                    "cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance scale.",
                ),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                    tooltip="The host's sampler.",
                ),
                io.Combo.Input(
                    "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                    tooltip="The host's noise schedule.",
                ),
                io.Float.Input(
                    "denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="1 samples from pure noise; below 1 re-noises the connected latent (video-to-video).",
                ),
                io.Float.Input(
                    "noise_shared", default=0.0, min=0.0, max=1.0, step=0.05,
                    tooltip=(
                        "Part of the noise common to all frames: 0 independent, 1 identical. A little steadies a clip."
                    ),
                ),
                io.Latent.Input(
                    "latent", optional=True,
                    tooltip=(
                        "Frames to start from (video-to-video with denoise < 1), or SimDA "
                        "Keyframes' clip (image-to-video at denoise 1): frames its noise "
                        "mask fixes come out as given. Wins over frames/width/height."
                    ),
                ),
                io.Latent.Input(
                    "start_latent", optional=True,
                    tooltip=(
                        "DDIM-inverted noise of a source clip (from SimDA Invert): "
                        "sampling starts from it; steps and scheduler must match the inversion."
                    ),
                ),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="The clip's F frame latents, in order (VAE Decode turns them into frames).",
                )
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, frames, width, height, seed, steps, cfg, sampler_name, scheduler,
                denoise, noise_shared, latent=None, start_latent=None) -> io.NodeOutput:
        check_image_family(model, NODE)
        if not 0.0 <= noise_shared <= 1.0:
            raise ValueError(f"{NODE}: noise_shared {noise_shared} must lie between 0 and 1.")
        latent_image = clip_latent(model, frames, width, height, latent, start_latent)
        noise_mask = latent.get("noise_mask") if latent is not None else None
        check_clip_agreement(model, positive, negative, latent_image.shape[0], noise_mask, start_latent)

        if start_latent is not None:
            latent_image = check_start_latent(
                start_latent, latent_image.shape[0], latent_image.shape[2], latent_image.shape[3], steps, scheduler,
                denoise, sampler_name=sampler_name, model=model,
            )
            noise = torch.zeros_like(latent_image, device="cpu")
        else:
            noise = clip_noise(tuple(latent_image.shape), seed, noise_shared)

        samples = sample_clip(
            model, noise, latent_image, positive, negative, steps=steps, cfg=cfg, sampler_name=sampler_name,
            scheduler=scheduler, denoise=denoise, disable_noise=start_latent is not None, noise_mask=noise_mask,
            seed=seed,
        )
        if noise_mask is None:
            return io.NodeOutput({"samples": samples})
        # The host keeps masked-out latents on their noised originals during sampling but returns its
        # last estimate of them: the fixed frames are written back as given.
        samples = paste_fixed(samples, latent_image, comfy.utils.reshape_mask(noise_mask, samples.shape))
        return io.NodeOutput({"samples": samples, "noise_mask": noise_mask})
