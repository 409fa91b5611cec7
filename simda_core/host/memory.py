"""Device memory and the host's loaded models: whether the host streams a MODEL's weights
(Dynamic VRAM), how much memory a call may use, and unloading a SimDA clone so the shared UNet
carries nothing of it after Cancel, an error or out-of-memory."""
from __future__ import annotations

import contextlib

import torch


def unload(model_patcher) -> None:
    """Take ``model_patcher`` and its additional models out of the host's loaded models, unpatched:
    the shared UNet no longer carries its object patches or weight changes."""
    import comfy.model_management as mm

    ours = [model_patcher, *model_patcher.get_nested_additional_models()]
    for index in reversed(range(len(mm.current_loaded_models))):
        loaded = mm.current_loaded_models[index]
        if any(loaded.model is patcher for patcher in ours):
            loaded.model_unload()
            mm.current_loaded_models.pop(index)


@contextlib.contextmanager
def unloaded_on_failure(model_patcher):
    """Cancel, an error or out-of-memory inside the block unloads ``model_patcher`` before the
    exception goes on, so nothing of it stays applied to the shared UNet until the host's next load."""
    try:
        yield model_patcher
    except BaseException:
        unload(model_patcher)
        raise


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
            capped = (
                fraction * torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
            )
            free = min(free, capped)
    return free


def resident_weight_bytes(model_patcher) -> float:
    """Bytes of this MODEL's weights (its additional models included) that must sit on the device
    while it samples: none of a streamed (dynamic) model's."""
    if is_dynamic(model_patcher):
        return 0.0
    return float(model_patcher.model_size() + sum(m.model_size() for m in model_patcher.get_nested_additional_models()))


def load(model_patcher) -> None:
    """Load ``model_patcher`` (patched, its additional models with it) as the host loads a MODEL to
    sample; a no-op when it is loaded already."""
    import comfy.model_management as mm

    mm.load_models_gpu([model_patcher])
