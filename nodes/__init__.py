"""SimDA's ComfyUI nodes (V3 schema)."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .folders import register_simda_folder

register_simda_folder()

from .nodes_adapters import SimDAAdapterLoader  # noqa: E402
from .nodes_edit import SimDAEditTuner, SimDAOneShotTuner, SimDASaveAdapters  # noqa: E402
from .nodes_fit_frames import SimDAFitFrames  # noqa: E402
from .nodes_invert import SimDAInvert  # noqa: E402
from .nodes_keyframes import SimDAKeyframes  # noqa: E402
from .nodes_latent_shift import SimDALatentShiftPatch  # noqa: E402
from .nodes_prompts import SimDAPromptTravel  # noqa: E402
from .nodes_sampler import SimDAVideoSampler  # noqa: E402
from .nodes_upscale import SimDAVideoUpscaler  # noqa: E402


class SimDAExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SimDAAdapterLoader, SimDALatentShiftPatch, SimDAVideoSampler, SimDAOneShotTuner, SimDAFitFrames,
                SimDAInvert, SimDASaveAdapters, SimDAVideoUpscaler, SimDAPromptTravel, SimDAKeyframes, SimDAEditTuner]


async def comfy_entrypoint() -> SimDAExtension:
    return SimDAExtension()
