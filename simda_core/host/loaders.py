"""Loading files through the host's own loaders, for the collection trainer (which runs outside a
ComfyUI server): a whole checkpoint (UNet, text encoder, VAE) and its resume state."""
from __future__ import annotations

import torch


def load_checkpoint(path: str, mixed_precision: bool):
    """``(model, clip, vae)`` of the checkpoint at ``path`` (any may be None when the file lacks
    it); the UNet in fp16 when ``mixed_precision`` and the host computes on CUDA, else fp32. The
    host keeps the text encoder in fp16 even on the CPU, where fp16 matmuls are many times slower,
    so it is loaded in fp32 there. Raises the host's ``RuntimeError`` for a file it cannot read."""
    import comfy.model_management
    import comfy.sd

    on_cuda = comfy.model_management.get_torch_device().type == "cuda"
    unet_dtype = torch.float16 if (mixed_precision and on_cuda) else torch.float32
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        path, output_vae=True, output_clip=True, model_options={"dtype": unet_dtype},
        te_model_options={} if on_cuda else {"dtype": torch.float32},
    )
    return model, clip, vae


def load_weights_file(path) -> dict:
    """A file of tensors (a ``torch.save`` pickle or safetensors) through the host's own
    ``comfy.utils.load_torch_file``, weights only: a pickle that holds code is refused, and the
    host's memory-mapping and device options apply."""
    import comfy.utils

    return comfy.utils.load_torch_file(str(path), safe_load=True)
