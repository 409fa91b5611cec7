"""The host's SD x4 upscaler conditioning (``SD_4XUpscale_Conditioning``), shared by the Video
Upscaler and the super-resolution trainer so both condition frames exactly as the host does."""
from __future__ import annotations

import importlib


def x4_conditioning(user: str = "SimDA Video Upscaler"):
    """The host's ``SD_4XUpscale_Conditioning`` node class, looked up when it is needed (if a host
    moved it, only ``user`` stops, with a sentence saying what it needs)."""
    try:
        return importlib.import_module("comfy_extras.nodes_sdupscale").SD_4XUpscale_Conditioning
    except (ImportError, AttributeError):
        raise RuntimeError(
            f"{user} needs the host's SD_4XUpscale_Conditioning node (comfy_extras/nodes_sdupscale.py, "
            "in ComfyUI 0.3.75 and newer), which this ComfyUI does not have; update ComfyUI."
        ) from None
