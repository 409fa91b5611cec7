"""SimDA for ComfyUI: Simple Diffusion Adapters turn an SD1.x/SD2.x image model into a video model.

WEB_DIRECTORY is the one folder ComfyUI serves from this pack (at /extensions/<pack folder>/): it
holds the nodes' help pages (web/docs/<NodeID>.md), which the frontend shows in its node help, and
the registry's pictures. Never the pack's own folder: that would serve its code and caches."""
from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"

__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
