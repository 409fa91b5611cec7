"""Registration of SimDA on a ComfyUI ``ModelPatcher`` clone: SimDA's hook functions
(``model/patch_functions.py``) go onto the host's hook points, so the host applies them when it loads that
clone and removes them when it unloads it (docs/HOST_COMPAT.md maps every hook in each host).

What goes where (see docs/ARCHITECTURE.md):
- spatial attention adapter -> ``attn1_output_patch``;
- latent-shift attention -> ``patches_replace["attn1"]`` of every block with real self-attention;
- FFN adapter -> object patches of ``ff.forward`` and ``norm3.forward`` of each transformer block;
- temporal adapter -> object patch of each SpatialTransformer's ``forward``;
- frame-shared GroupNorm -> object patches of the ResBlock norms' and the output norm's ``forward``;
- clip layout per UNet call -> a ``DIFFUSION_MODEL`` wrapper;
- conditioning rows and ``frames_per_clip`` against the clip, before a sampling run -> an
  ``OUTER_SAMPLE`` wrapper;
- adapter weights -> an additional ModelPatcher, so the host moves, casts and counts them (with a
  ``cached_patcher_init`` so a multi-GPU deep clone gets adapters of its own, and an
  ``ON_DEEPCLONE_MULTIGPU`` callback that points the deep clone's patches at them);
- a clone that carries another model object -> an ``ON_CLONE`` callback re-registers everything on
  that model, and the wrapper refuses a call on a model the patches were not made for.
Module paths never change, so weight patches (LoRA) still find their keys.
"""
from __future__ import annotations

import copy
import weakref
from dataclasses import replace
from typing import Callable

import torch

from ..model import patch_functions
from ..model.adapters import AdapterSite
from ..model.config import SimDAConfig
from ..model.layout import ClipLayout, ClipLayoutError
from ..model.runtime import SimDARuntime
from ..model.unet_sites import find_adapter_sites, find_resblock_norms, find_resblocks
from ..video.clip_agreement import clip_mismatch
from ..video.frame_windows import window_context, window_frames
from .attention import host_norm_parameters, layer_attention

ATTACHMENT = "simda"
BOUND_UNET = "simda_unet"
"""Attachment: weak reference to the UNet module object the object patches were made for."""
KEY = "simda"
ADDITIONAL_MODELS_KEY = "simda_adapters"
UNET = "diffusion_model"


class SimDAPatchError(RuntimeError):
    """SimDA cannot be applied to this MODEL as it is; the message says why and what to do."""


def get_config(model_patcher) -> SimDAConfig | None:
    return model_patcher.attachments.get(ATTACHMENT)


def model_sites(model_patcher) -> list[AdapterSite]:
    return find_adapter_sites(model_patcher.get_model_object(UNET))


def shift_block_key(site: AdapterSite, index: int) -> tuple[str, int, int]:
    """The host's ``patches_replace`` key of a transformer block: (block name, id, index)."""
    parts = site.path.split(".")
    if parts[0] == "middle_block":
        return ("middle", 0, index)
    name = {"input_blocks": "input", "output_blocks": "output"}[parts[0]]
    return (name, int(parts[1]), index)


def shift_sites(sites: list[AdapterSite], levels: frozenset[int] | None) -> list[tuple[AdapterSite, int]]:
    return [
        (site, index)
        for site in sites
        if levels is None or site.level in levels
        for index in range(site.depth)
        if site.self_attention[index]
    ]


# -- conflicts ------------------------------------------------------------------------------------

def _describe(fn) -> str:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} (from {module})"


def find_conflicts(transformer_options: dict, shift_keys: list[tuple[str, int, int]]) -> str | None:
    """A sentence naming a patch that cannot coexist with latent shift, or None."""
    for patch in transformer_options.get("patches", {}).get("attn1_patch", []):
        if not patch_functions.is_simda(patch):
            return (
                f"another patch changes the self-attention tokens ({_describe(patch)}, e.g. HyperTile); "
                "latent-shift attention needs each frame's whole token grid: remove that node from this MODEL's chain "
                "or turn latent shift off"
            )
    replaced = transformer_options.get("patches_replace", {}).get("attn1", {})
    for key in shift_keys:
        fn = replaced.get(key)
        if fn is not None and not patch_functions.is_simda(fn):
            return (
                f"another node already replaces self-attention at {key} ({_describe(fn)}); SimDA's latent-shift "
                "attention needs that slot: use one of the two on this MODEL, not both"
            )
    return None


# -- the per-call wrapper ------------------------------------------------


def _call_wrapper(runtime: SimDARuntime, shift_keys: list[tuple[str, int, int]], unet_ref: Callable):
    def wrapper(executor, x, *args, **kwargs):
        if getattr(executor, "class_obj", None) is not None and executor.class_obj is not unet_ref():
            raise SimDAPatchError(
                "SimDA: this MODEL now runs another model object than the one its SimDA patches were made for "
                "(a node after the SimDA nodes replaced the model); put the SimDA nodes after that node."
            )
        args = list(args)
        if len(args) > 4:
            transformer_options = args[4]
        else:
            transformer_options = kwargs.get("transformer_options", {})
        config = runtime.config
        if config.latent_shift is not None:
            conflict = find_conflicts(transformer_options, shift_keys)
            if conflict:
                raise SimDAPatchError(f"SimDA: {conflict}.")
        groups = len(transformer_options.get("cond_or_uncond", [0])) or 1
        window = window_frames(transformer_options)
        indices, full_length = window if window is not None else (None, 0)
        try:
            layout = ClipLayout.from_batch(
                x.shape[0], groups, config.frames_per_clip, indices, loop=config.loop,
                loop_length=full_length if config.loop else 0,
            )
        except ClipLayoutError as e:
            raise SimDAPatchError(f"SimDA: {e}.") from None
        shift = config.latent_shift
        shift_active = False
        if shift is not None:
            shift_active = True
            sigmas = transformer_options.get("sigmas")
            if not shift.whole_schedule and isinstance(sigmas, torch.Tensor):
                sigma = float(sigmas.max())
                shift_active = shift.sigma_end <= sigma <= shift.sigma_start
        if len(args) > 1:
            args[1] = window_context(args[1], transformer_options, layout)
        elif "context" in kwargs:
            kwargs["context"] = window_context(kwargs["context"], transformer_options, layout)
        with runtime.using(layout, shift_active):
            return executor(x, *args, **kwargs)

    return patch_functions.mark(wrapper)


def _sampling_check(runtime: SimDARuntime):
    """``OUTER_SAMPLE`` wrapper: before the host loads anything for a sampling run on this MODEL
    (its KSampler, AnimateDiff-Evolved, the Video Sampler), the conditionings and
    ``frames_per_clip`` must agree with the clip's frame count (``clip_agreement``)."""

    def wrapper(executor, noise, latent_image, *args, **kwargs):
        frames = int(latent_image.shape[0])
        frames_per_clip = runtime.config.frames_per_clip
        conditionings = getattr(getattr(executor, "class_obj", None), "conds", None) or {}
        problem = clip_mismatch(conditionings, frames, frames_per_clip)
        if problem:
            raise SimDAPatchError(f"SimDA: {problem}.")
        return executor(noise, latent_image, *args, **kwargs)

    return patch_functions.mark(wrapper)


# -- registering a config on a clone --------------------------------------------------------------

def _remove_previous(model_patcher, previous: SimDAConfig | None) -> None:
    import comfy.patcher_extension

    if previous is not None:
        for key in previous.object_patch_keys:
            model_patcher.object_patches.pop(key, None)
    to = model_patcher.model_options.setdefault("transformer_options", {})
    registered = to.get("patches", {})
    if "attn1_output_patch" in registered:
        registered["attn1_output_patch"] = [p for p in registered["attn1_output_patch"] if not patch_functions.is_simda(p)]
    replaced = to.get("patches_replace", {}).get("attn1")
    if replaced:
        for key in [k for k, fn in replaced.items() if patch_functions.is_simda(fn)]:
            del replaced[key]
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY)
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY)
    for callback in ("ON_CLONE", "ON_DEEPCLONE_MULTIGPU"):
        if hasattr(comfy.patcher_extension.CallbacksMP, callback):
            model_patcher.remove_callbacks_with_key(getattr(comfy.patcher_extension.CallbacksMP, callback), KEY)
    model_patcher.additional_models.pop(ADDITIONAL_MODELS_KEY, None)


def _follow_clone(source, clone) -> None:
    """``ON_CLONE``: a clone whose ``.model`` is another object than the one the SimDA patches were
    made for (the newest host's non-dynamic delegate, multi-GPU clones, another pack's callback)
    gets them made anew for its own model."""
    config = get_config(clone)
    bound = clone.attachments.get(BOUND_UNET)
    if config is None or bound is None:
        return
    if bound() is not clone.get_model_object(UNET):
        apply_simda(clone, config)


def _follow_deep_clone(source, clone) -> None:
    """``ON_DEEPCLONE_MULTIGPU`` (0.33+): the deep clone owns a fresh copy of the adapters (made by
    :func:`_fresh_adapter_patcher`); its SimDA patches are made anew to use that copy."""
    config = get_config(clone)
    copies = clone.additional_models.get(ADDITIONAL_MODELS_KEY, [])
    if config is not None and config.adapters is not None and copies and copies[0].model is not config.adapters:
        apply_simda(clone, replace(config, adapters=copies[0].model))


def _fresh_adapter_patcher(adapters, load_device, offload_device, disable_dynamic=False):
    """The adapters' ``cached_patcher_init`` factory: a ModelPatcher around a copy of the adapters,
    as the host's loaders give a deep clone (multi-GPU) weights of its own."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        copy.deepcopy(adapters), load_device=load_device, offload_device=offload_device
    )


def adapter_patcher(adapters, model_patcher):
    """The additional ModelPatcher that lets the host move, cast and count the adapters; it can be
    made anew (``cached_patcher_init``) where the host deep-clones a MODEL for another device."""
    import comfy.model_patcher

    patcher = comfy.model_patcher.ModelPatcher(
        adapters, load_device=model_patcher.load_device, offload_device=model_patcher.offload_device
    )
    patcher.cached_patcher_init = (
        _fresh_adapter_patcher, (adapters, model_patcher.load_device, model_patcher.offload_device)
    )
    return patcher


def apply_simda(model_patcher, config: SimDAConfig):
    """Register ``config`` on ``model_patcher`` (a clone the caller owns), replacing any SimDA
    patches it already carries. Raises :class:`SimDAPatchError` before anything is changed when
    another patch on the MODEL cannot coexist with it."""
    import comfy.model_patcher
    import comfy.patcher_extension

    unet = model_patcher.get_model_object(UNET)
    sites = find_adapter_sites(unet)
    if not sites:
        raise SimDAPatchError(
            "SimDA: the connected MODEL has no spatial transformers (it is not an SD1.x/SD2.x/SDXL-style UNet); "
            "connect an SD1.x, SD2.x or SDXL checkpoint."
        )
    shifted = shift_sites(sites, config.latent_shift.levels) if config.latent_shift else []
    shift_keys = [shift_block_key(site, index) for site, index in shifted]
    previous = get_config(model_patcher)
    if config.latent_shift is not None:
        options = model_patcher.model_options.get("transformer_options", {})
        conflict = find_conflicts(
            {"patches": options.get("patches", {}), "patches_replace": options.get("patches_replace", {})}, shift_keys
        )
        if conflict:
            raise SimDAPatchError(f"SimDA: {conflict}.")

    # The clone's copy of the adapters' patcher when they stay the same: it is a host clone (its
    # parent is the source MODEL's), so when this MODEL is dropped while the source lives on, the
    # host follows the parent instead of taking the living adapters for a leak.
    carried = [p for p in model_patcher.additional_models.get(ADDITIONAL_MODELS_KEY, []) if p.model is config.adapters]
    _remove_previous(model_patcher, previous)
    runtime = SimDARuntime(config)
    runtime_ref = weakref.ref(runtime)
    keys: list[str] = []

    def object_patch(path: str, fn: Callable) -> None:
        key = f"{UNET}.{path}.forward"
        model_patcher.add_object_patch(key, fn)
        keys.append(key)

    adapters = config.active_adapters
    if adapters is not None or config.gradient_checkpointing:
        for site in sites:
            object_patch(
                site.path,
                patch_functions.temporal_adapter_then_transformer(unet.get_submodule(site.path), site.path, runtime_ref),
            )
    if config.gradient_checkpointing:
        for path in find_resblocks(unet):
            object_patch(path, patch_functions.checkpointed_resblock(unet.get_submodule(path), runtime_ref))
    if adapters is not None:
        by_block = {}
        for site in sites:
            for index in range(site.depth):
                block_path = site.block_path(index)
                block = unet.get_submodule(block_path)
                object_patch(f"{block_path}.ff", patch_functions.ffn_with_adapter(block, block_path, runtime_ref))
                object_patch(f"{block_path}.norm3", patch_functions.pass_through)
                by_block[shift_block_key(site, index)] = adapters.attention_adapter(block_path)
        model_patcher.set_model_attn1_output_patch(patch_functions.attention_adapters(by_block, runtime))
        model_patcher.set_additional_models(
            ADDITIONAL_MODELS_KEY, [carried[0] if carried else adapter_patcher(adapters, model_patcher)]
        )

    if config.uses_frame_group_norm:
        for path in find_resblock_norms(unet):
            object_patch(path, patch_functions.frame_group_norm(unet.get_submodule(path), runtime_ref, host_norm_parameters))

    for site, index in shifted:
        replace_fn = patch_functions.latent_shift_self_attention(runtime, layer_attention(unet, site, index))
        model_patcher.set_model_attn1_replace(replace_fn, *shift_block_key(site, index))

    unet_ref = weakref.ref(unet)
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, _call_wrapper(runtime, shift_keys, unet_ref)
    )
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, _sampling_check(runtime))
    model_patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, KEY, _follow_clone)
    on_deep_clone = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if on_deep_clone is not None:
        model_patcher.add_callback_with_key(on_deep_clone, KEY, _follow_deep_clone)
    model_patcher.attachments[ATTACHMENT] = replace(config, object_patch_keys=tuple(keys))
    model_patcher.attachments[BOUND_UNET] = unet_ref
    return model_patcher
