"""SimDA for ComfyUI: Simple Diffusion Adapters turn an SD1.x/SD2.x image model into a video model."""
from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
