"""SimDA Fit Frames: the frames of a source clip that an edit works on (start, stride, count),
cropped and resized to the edit's size; the One-Shot Tuner fits its clip the same way."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..simda_core.training.video_data import fit_frames


def select_frames(images: torch.Tensor, frames: int, start_frame: int, stride: int, what: str) -> torch.Tensor:
    """``frames`` frames from ``start_frame`` every ``stride``-th (fewer if the clip is shorter)."""
    picked = images[start_frame::stride][:frames]
    if picked.shape[0] < 2:
        raise ValueError(
            f"{what}: the source clip gives {picked.shape[0]} frame(s) from frame {start_frame} every "
            f"{stride}; a video edit needs at least 2 (the clip has "
            f"{images.shape[0]} frames): lower start_frame or stride."
        )
    return picked


def check_size(width: int, height: int, what: str) -> None:
    if width % 8 or height % 8:
        raise ValueError(f"{what}: {width}x{height} is not a multiple of 8 on both sides.")


def fitted_clip(images: torch.Tensor, frames: int, start_frame: int, stride: int, width: int, height: int,
                what: str) -> torch.Tensor:
    """The clip an edit works on: ``frames`` frames from ``start_frame`` every ``stride``-th,
    centre-cropped to the aspect of ``width x height`` and resized to it with an antialiased filter
    (``training.video_data.fit_frames``): IMAGE ``[F, height, width, 3]``."""
    check_size(width, height, what)
    return fit_frames(select_frames(images, frames, start_frame, stride, what), width, height)


def fit_inputs(default_frames: int = 24) -> list:
    """The inputs that say which frames of the source and at what size: the Fit Frames node's and
    the One-Shot Tuner's."""
    return [
        io.Int.Input("frames", default=default_frames, min=2, max=4096, tooltip="Frames of the source clip to use."),
        io.Int.Input("start_frame", default=0, min=0, max=1000000, tooltip="First source frame to use."),
        io.Int.Input("stride", default=2, min=1, max=1000, tooltip="Use every n-th frame (the authors use 2)."),
        io.Int.Input(
            "width", default=512, min=64, max=4096, step=64,
            tooltip="Width in pixels (frames are centre-cropped to this aspect).",
        ),
        io.Int.Input("height", default=512, min=64, max=4096, step=64, tooltip="Height in pixels."),
    ]


SOURCE_FPS_TOOLTIP = (
    "Frame rate of the source clip (connect Get Video Components' fps); the edited clip's frame rate is this "
    "divided by stride."
)
FRAME_RATE_TOOLTIP = "Frame rate of the edited clip (source_fps / stride), for Create Video."


class SimDAFitFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAFitFrames",
            display_name="SimDA Fit Frames",
            category="SimDA",
            description=(
                "Picks the frames of a source clip that a video edit works on (from start_frame, every stride-th) "
                "and fits them to the edit's size: centre-cropped to its aspect, resized with an antialiased "
                "filter. Encode them with VAE Encode for SimDA Invert; the One-Shot Tuner fits its clip the same way."
            ),
            inputs=[
                io.Image.Input(
                    "images",
                    tooltip="The source clip as frames (Load Video -> Get Video Components, or any image batch).",
                ),
                *fit_inputs(),
                io.Float.Input("source_fps", default=24.0, min=0.01, max=1000.0, step=0.01, tooltip=SOURCE_FPS_TOOLTIP),
            ],
            outputs=[
                io.Image.Output(display_name="frames", tooltip="The fitted frames, for VAE Encode."),
                io.Float.Output(display_name="frame_rate", tooltip=FRAME_RATE_TOOLTIP),
            ],
        )

    @classmethod
    def execute(cls, images, frames, start_frame, stride, width, height, source_fps=24.0) -> io.NodeOutput:
        fitted = fitted_clip(images, frames, start_frame, stride, width, height, "SimDA Fit Frames")
        return io.NodeOutput(fitted, source_fps / stride)
