"""What SimDA asks of a host MODEL (a ``ModelPatcher``) besides its patch points: its family, the
dtype it computes in, the options of a direct UNet call, and how much device memory a call may use.
Newer hosts' additions are feature-detected (docs/HOST_COMPAT.md says where each one lives)."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger("SimDA")


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


def backward_safe_attention_override():
    """An attention override (the host's ``optimized_attention_override`` shape) that runs every
    attention of a training call through the host's PyTorch attention, which has a backward: a
    user's override or a kernel chosen at start-up (Sage, int8, ...) may have none."""
    import comfy.ldm.modules.attention as host_attention

    pytorch_attention = getattr(host_attention, "attention_pytorch", None)

    def override(func, *args, **kwargs):
        return (pytorch_attention or func)(*args, **kwargs)

    override.simda_patch = True
    return override


def call_options(model_patcher, cond_or_uncond: list[int], training: bool = False) -> dict:
    """``transformer_options`` for a direct UNet call, built as the host's sampler builds them:
    the patcher's own options, its wrappers, and the cond/uncond groups of the batch. A training
    call gets a backward-safe attention instead of any attention override."""
    import comfy.patcher_extension

    options = dict(model_patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
        dict(options.get("wrappers", {})), model_patcher.wrappers
    )
    options["cond_or_uncond"] = list(cond_or_uncond)
    if training:
        options["optimized_attention_override"] = backward_safe_attention_override()
    return options


def is_dynamic(model_patcher) -> bool:
    """Whether the host streams this MODEL's weights (the newest host's Dynamic VRAM)."""
    probe = getattr(model_patcher, "is_dynamic", None)
    return bool(probe()) if callable(probe) else False


def free_device_memory(model_patcher, device) -> float:
    """Free memory on ``device`` as the host counts it: the MODEL's own query where the host has
    one (the newest ModelPatcher's ``get_free_memory``, which knows streamed weights), else the
    host's ``get_free_memory``; capped by a per-process memory fraction where torch has one."""
    import comfy.model_management as mm

    query = getattr(model_patcher, "get_free_memory", None)
    free = float(query(device)) if callable(query) else float(mm.get_free_memory(device))
    if getattr(device, "type", "") == "cuda":
        fraction_of = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # torch >= 2.6
        fraction = fraction_of(device) if fraction_of is not None else 1.0
        if fraction < 1.0:
            capped = fraction * torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
            free = min(free, capped)
    return free


def resident_weight_bytes(model_patcher) -> float:
    """Bytes of this MODEL's weights (its additional models included) that must sit on the device
    while it samples: none of a streamed (dynamic) model's."""
    if is_dynamic(model_patcher):
        return 0.0
    return float(model_patcher.model_size() + sum(m.model_size() for m in model_patcher.get_nested_additional_models()))
