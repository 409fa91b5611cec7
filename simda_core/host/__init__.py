"""Everything in ``simda_core`` that touches ComfyUI: registering SimDA on a ModelPatcher, the
host's attention, memory and loaded models, UNet calls outside a sampler, training clones, the
host's samplers, loaders and x4 conditioning. The only subpackage that imports ``comfy``."""
