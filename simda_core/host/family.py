"""A host MODEL's (a ``ModelPatcher``'s) family and dtypes: which adapters fit it, and the dtype
adapters are stored in so nothing is cast per call."""
from __future__ import annotations

import torch

def model_family(model_patcher) -> str:
    """``sd1``, ``sd2``, ``sd_x4_upscaler``, ``sdxl``, or the host's name of another model type.
    Decided by the host's class hierarchy (subclasses count as their family), never by class names.

    ``sdxl`` is the host's ``SDXL`` and every subclass of it (SSD-1B, Segmind Vega, KOALA,
    SDXL InstructPix2Pix). The SDXL refiner is not one of them, in the host's hierarchy or here: it
    is another UNet (384 channels, a 1280-wide context, an aesthetic score in its ADM) that only
    finishes the last steps of an SDXL image, so SDXL adapters cannot fit it."""
    import comfy.supported_models as supported

    model_config = getattr(model_patcher.model, "model_config", None)
    if isinstance(model_config, supported.SD_X4Upscaler):
        return "sd_x4_upscaler"
    if isinstance(model_config, supported.SDXL):
        return "sdxl"
    if isinstance(model_config, supported.SD20):
        return "sd2"
    if isinstance(model_config, supported.SD15):
        return "sd1"
    return type(model_config).__name__ if model_config is not None else type(model_patcher.model).__name__


def compute_dtype(model_patcher) -> torch.dtype:
    """The dtype the UNet computes in (its manual-cast dtype when its weights are stored in another)."""
    model = model_patcher.model
    return getattr(model, "manual_cast_dtype", None) or model.get_dtype()


def adapter_storage_dtype(model_patcher) -> torch.dtype:
    """Adapters are stored in the dtype the UNet computes in, so nothing is cast per call; fp32 when
    that is not a floating-point dtype torch layers compute in (e.g. fp8 storage without manual cast)."""
    dtype = compute_dtype(model_patcher)
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


