"""SimDA Keyframes: images or latents fixed at chosen frames (image-to-video, first/last frame)."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..simda_core.video.keyframes import KeyframeError, keyframed_clip, parse_frame_list

log = logging.getLogger("SimDA")


class SimDAKeyframes(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAKeyframes",
            display_name="SimDA Keyframes",
            category="SimDA",
            description=(
                "Image-to-video and keyframes: a clip of 'frames' latents with the given images (or latents) fixed at "
                "the listed frames, e.g. '0' for image-to-video, '0, -1' for first and last frame. Connect it to the "
                "Video Sampler's 'latent' at denoise 1: the fixed frames are kept through ComfyUI's noise mask while "
                "the others are generated, latent shift carries their appearance to the following frames, and they "
                "come out exactly as given."
            ),
            inputs=[
                io.Int.Input("frames", default=16, min=1, max=4096, tooltip="Frames of the clip."),
                io.String.Input(
                    "keyframe_frames", default="0",
                    tooltip=(
                        "Frames the keyframes are fixed at, in the order of "
                        "the images: '0' = first, '-1' = last, e.g. '0, 8, -1'."
                    ),
                ),
                io.Vae.Input("vae", optional=True, tooltip="Encodes the keyframe images (needed with 'images')."),
                io.Image.Input(
                    "images", optional=True,
                    tooltip="Keyframe images, one per listed frame, in that order (Load Image, or a batch).",
                ),
                io.Latent.Input(
                    "keyframe_latents", optional=True,
                    tooltip="Keyframe latents instead of images, one per listed frame.",
                ),
            ],
            outputs=[
                io.Latent.Output(
                    display_name="LATENT",
                    tooltip="The clip's latents with a noise mask: 0 at the fixed frames, 1 elsewhere.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, frames=None, keyframe_frames=None):
        if isinstance(frames, int) and isinstance(keyframe_frames, str):  # linked inputs arrive at execution
            try:
                parse_frame_list(keyframe_frames, frames)
            except KeyframeError as e:
                return f"SimDA Keyframes: {e}."
        return True

    @classmethod
    def execute(cls, frames, keyframe_frames, vae=None, images=None, keyframe_latents=None) -> io.NodeOutput:
        try:
            at = parse_frame_list(keyframe_frames, frames)
        except KeyframeError as e:
            raise ValueError(f"SimDA Keyframes: {e}.") from None
        if (images is None) == (keyframe_latents is None):
            raise ValueError(
                "SimDA Keyframes: connect either 'images' (with a VAE) or 'keyframe_latents', exactly one of them."
            )
        if images is not None:
            if vae is None:
                raise ValueError(
                    "SimDA Keyframes: keyframe images need a VAE to encode them; connect the checkpoint's VAE."
                )
            count, height, width = images.shape[0], images.shape[1], images.shape[2]
            if count != len(at):
                raise ValueError(
                    f"SimDA Keyframes: {count} images are connected for {len(at)} "
                    f"keyframe frames ({keyframe_frames}); give one image per frame."
                )
            if height % 8 or width % 8:
                raise ValueError(
                    f"SimDA Keyframes: the images are {width}x{height}, not a multiple "
                    "of 8 on both sides; resize them first (e.g. Upscale Image)."
                )
            latents = vae.encode(images[:, :, :, :3])
        else:
            latents = keyframe_latents["samples"]
            if latents.ndim != 4:
                raise ValueError(
                    "SimDA Keyframes: keyframe_latents must be frame "
                    f"latents [K, C, H, W], got shape {list(latents.shape)}."
                )
        try:
            samples, mask = keyframed_clip(frames, latents.to(torch.float32), at)
        except KeyframeError as e:
            raise ValueError(f"SimDA Keyframes: {e}.") from None
        log.info("SimDA Keyframes: %d of %d frames fixed (%s).", len(at), frames, ", ".join(map(str, at)))
        return io.NodeOutput({"samples": samples, "noise_mask": mask})
