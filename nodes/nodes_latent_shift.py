"""SimDA Latent-Shift Patch: training-free temporal consistency for any SD1.x, SD2.x or SDXL checkpoint."""
from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..simda_core.host.register import get_config, model_sites, shift_sites
from ..simda_core.model.config import LatentShiftSettings, SimDAConfig
from .simda_model import check_family, simda_clone

LEVELS = (
    ("full_resolution", "the latent's own size (64x64 for 512x512)"),
    ("half_resolution", "1/2 of the latent size"),
    ("quarter_resolution", "1/4 of the latent size"),
    ("eighth_resolution", "1/8 of the latent size"),
)
"""The switches, finest level first. The middle block belongs to the deepest level (eighth on
SD1.x/SD2.x, quarter on SDXL, whose full-resolution level has no transformer)."""


def level_names(levels) -> str:
    return ", ".join(LEVELS[level][0] for level in sorted(levels))


def check_levels_shift_something(model, levels: frozenset[int]) -> None:
    """A choice of switches that reaches no self-attention transformer of this MODEL is refused,
    naming the levels that have one."""
    sites = model_sites(model)
    if shift_sites(sites, levels):
        return
    present = {site.level for site in sites if any(site.self_attention)}
    raise ValueError(
        f"SimDA Latent-Shift Patch: this MODEL has no self-attention transformer at {level_names(levels)}, so latent "
        f"shift would change nothing; its transformers sit at {level_names(present)}: switch one of those on."
    )


class SimDALatentShiftPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDALatentShiftPatch",
            display_name="SimDA Latent-Shift Patch",
            category="SimDA",
            description=(
                "Latent-Shift Attention: each frame's self-attention also sees tokens shifted in from earlier frames "
                "(2 frames' worth of keys instead of all frames), for temporal consistency with no trained weights. "
                "Works on any SD1.x, SD2.x or SDXL MODEL, with or without SimDA adapters."
            ),
            inputs=[
                io.Model.Input("model", tooltip="An SD1.x, SD2.x or SDXL MODEL, plain or from SimDA Adapter Loader."),
                io.Int.Input(
                    "frames_per_clip", default=0, min=0, max=4096,
                    tooltip=(
                        "Frames of one clip in the batch. 0: automatic, the "
                        "whole batch is one clip (the Video Sampler's case)."
                    ),
                ),
                *[
                    io.Boolean.Input(name, default=True, tooltip=(
                        f"Latent shift in the transformers at {where}; the middle block counts with the deepest level "
                        "(eighth on SD1.x/SD2.x, quarter on SDXL). A choice that reaches no transformer is refused."))
                    for name, where in LEVELS
                ],
                io.Float.Input(
                    "start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                    tooltip=(
                        "Part of the sampling schedule where the shift starts (0 = first step), in the schedule "
                        "the MODEL samples with (a ModelSampling node after this one moves it along)."
                    ),
                ),
                io.Float.Input(
                    "end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                    tooltip="Part of the sampling schedule where the shift ends (1 = last step).",
                ),
                io.Boolean.Input(
                    "frame_group_norm", default=False,
                    tooltip=(
                        "Share ResBlock GroupNorm statistics over the frames of a clip. "
                        "Always on with SimDA adapters (they were trained with it)."
                    ),
                ),
                io.Boolean.Input(
                    "loop", default=False, optional=True,
                    tooltip=(
                        "Seamless loop: the first frame also sees the last ones (latent shift and "
                        "the temporal adapter wrap around), so the clip can repeat without a seam."
                    ),
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL", tooltip="The model with latent-shift attention, for the Video Sampler.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, frames_per_clip, full_resolution, half_resolution, quarter_resolution, eighth_resolution,
                start_percent, end_percent, frame_group_norm, loop=False) -> io.NodeOutput:
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(
                f"SimDA Latent-Shift Patch: start_percent {start_percent} "
                f"must not be above end_percent {end_percent} (both 0..1)."
            )
        if frames_per_clip < 0:
            raise ValueError(
                "SimDA Latent-Shift Patch: frames_per_clip must be 0 (automatic) or a positive frame count."
            )
        check_family(model, "", "SimDA Latent-Shift Patch")
        chosen = (full_resolution, half_resolution, quarter_resolution, eighth_resolution)
        levels = frozenset(level for level, on in enumerate(chosen) if on)
        if not levels:
            raise ValueError(
                "SimDA Latent-Shift Patch: every level is switched off; turn at least one on, or bypass the node."
            )
        check_levels_shift_something(model, levels)
        shift = LatentShiftSettings(
            levels=None if len(levels) == len(chosen) else levels, start_percent=start_percent, end_percent=end_percent,
        )
        config = get_config(model) or SimDAConfig()
        config = replace(
            config, latent_shift=shift, frame_group_norm=frame_group_norm, frames_per_clip=frames_per_clip, loop=loop
        )
        return io.NodeOutput(simda_clone(model, config))
