"""Registration of SimDA on a ComfyUI ``ModelPatcher`` clone: SimDA's hook functions
(``model/patch_functions.py``) go onto the host's hook points, so the host applies them when it loads that
clone and removes them when it unloads it (docs/HOST_COMPAT.md maps every hook in each host).

What goes where (see docs/ARCHITECTURE.md):
- spatial attention adapter -> ``attn1_output_patch``;
- latent-shift attention -> ``patches_replace["attn1"]`` of every block with real self-attention;
- FFN adapter -> object patches of ``ff.forward`` and ``norm3.forward`` of each transformer block;
- temporal adapter -> object patch of each SpatialTransformer's ``forward``;
- frame-shared GroupNorm -> object patches of the ResBlock norms' and the output norm's ``forward``;
- clip layout per UNet call, latent shift on or off at its sigma, other nodes' attention patches
  composed or refused (``host.attention_slots``) -> a ``DIFFUSION_MODEL`` wrapper;
- a sampling run: conditioning rows, ControlNet hints and ``frames_per_clip`` against the clip, the
  latent-shift range in the run's sigmas, each context window's own rows and hints -> an
  ``OUTER_SAMPLE`` wrapper (``host.sampling_run``);
- adapter weights -> an additional ModelPatcher, so the host moves, casts and counts them (with a
  ``cached_patcher_init`` so a multi-GPU deep clone gets adapters of its own, and an
  ``ON_DEEPCLONE_MULTIGPU`` callback that points the deep clone's patches at them);
- a clone that carries another model object -> an ``ON_CLONE`` callback re-registers everything on
  that model, and the wrapper refuses a call on a model the patches were not made for.
Module paths never change, so weight patches (LoRA) still find their keys.
"""
from __future__ import annotations

import copy
import math
import weakref
from dataclasses import replace
from typing import Callable

import torch

from ..model import patch_functions
from ..model.adapters import AdapterSite
from ..model.config import SimDAConfig
from ..model.layout import ClipLayout, ClipLayoutError
from ..model.runtime import SimDARuntime
from ..model.patch_functions import TokenGridError
from ..model.unet_sites import find_adapter_sites, find_resblock_norms, find_resblocks
from ..video.frame_windows import window_frames
from .attention import host_norm_parameters, layer_attention
from .attention_slots import options_for_call, resident_conflict, token_grid_refusal
from .sampling_run import RUN_KEY, sampling_wrapper

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


# -- the per-call wrapper ------------------------------------------------------------------------

def call_options(transformer_options: dict, shift_keys: list[tuple[str, int, int]], run) -> dict:
    """The options this UNet call hands the UNet (``host.attention_slots``): inside a sampling run,
    with another node's per-call replacements composed; outside one, any other node's replacement at
    a latent-shift block is refused."""
    if run is not None:
        return options_for_call(transformer_options, shift_keys)
    conflict = resident_conflict(transformer_options, shift_keys)
    if conflict:
        raise SimDAPatchError(f"SimDA: {conflict}.")
    return transformer_options


def call_layout(batch: int, transformer_options: dict, config: SimDAConfig, run) -> ClipLayout:
    """How this call's batch splits into clips: cond/uncond groups, ``frames_per_clip``, and the
    context window's frames (their time positions around the whole clip)."""
    groups = len(transformer_options.get("cond_or_uncond", [0])) or 1
    window = window_frames(transformer_options, run.total_frames if run is not None else 0)
    indices, total = window if window is not None else (None, 0)
    try:
        return ClipLayout.from_batch(
            batch, groups, config.frames_per_clip, indices, loop=config.loop,
            loop_length=total if config.loop else 0, total_frames=total,
        )
    except ClipLayoutError as e:
        raise SimDAPatchError(f"SimDA: {e}.") from None


def shift_active(runtime: SimDARuntime, transformer_options: dict, run) -> bool:
    """Whether latent shift acts on this call: at the call's sigma, inside the range the sampling
    run resolved (or, outside a run, the one resolved when SimDA was registered)."""
    shift = runtime.config.latent_shift
    if shift is None:
        return False
    sigmas = transformer_options.get("sigmas")
    if shift.whole_schedule or not isinstance(sigmas, torch.Tensor):
        return True
    start, end = run.shift_sigmas if run is not None else runtime.fallback_shift_sigmas
    return end <= float(sigmas.max()) <= start


def _call_wrapper(runtime: SimDARuntime, shift_keys: list[tuple[str, int, int]], unet_ref: Callable):
    def wrapper(executor, x, *args, **kwargs):
        if getattr(executor, "class_obj", None) is not None and executor.class_obj is not unet_ref():
            raise SimDAPatchError(
                "SimDA: this MODEL now runs another model object than the one its SimDA patches were made for "
                "(a node after the SimDA nodes replaced the model); put the SimDA nodes after that node."
            )
        args = list(args)
        positional = len(args) > 4
        transformer_options = args[4] if positional else kwargs.get("transformer_options", {})
        run = transformer_options.get(RUN_KEY)
        if runtime.config.latent_shift is not None:
            transformer_options = call_options(transformer_options, shift_keys, run)
            if positional:
                args[4] = transformer_options
            elif "transformer_options" in kwargs:
                kwargs["transformer_options"] = transformer_options
        layout = call_layout(x.shape[0], transformer_options, runtime.config, run)
        active = shift_active(runtime, transformer_options, run)
        with runtime.using(layout, active):
            try:
                return executor(x, *args, **kwargs)
            except TokenGridError as e:
                raise SimDAPatchError(f"SimDA: {token_grid_refusal(transformer_options, e)}.") from None

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
        registered["attn1_output_patch"] = [
            p for p in registered["attn1_output_patch"] if not patch_functions.is_simda(p)
        ]
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


class _ObjectPatches:
    """Object patches of ``forward`` on the UNet's modules, added to one clone; remembers their keys
    so that a later registration on the clone can take them off again."""

    def __init__(self, model_patcher, unet):
        self.model_patcher, self.unet, self.keys = model_patcher, unet, []

    def module(self, path: str):
        return self.unet.get_submodule(path)

    def add(self, path: str, fn: Callable) -> None:
        key = f"{UNET}.{path}.forward"
        self.model_patcher.add_object_patch(key, fn)
        self.keys.append(key)


def _transformer_sites(unet) -> list[AdapterSite]:
    sites = find_adapter_sites(unet)
    if not sites:
        raise SimDAPatchError(
            "SimDA: the connected MODEL has no spatial transformers (it is not an SD1.x/SD2.x/SDXL-style UNet); "
            "connect an SD1.x, SD2.x or SDXL checkpoint."
        )
    return sites


def _check_attention_slots(model_patcher, shift_keys: list[tuple[str, int, int]]) -> None:
    """Another node's self-attention replacement already on the MODEL at a latent-shift block is
    refused before anything changes (``host.attention_slots``)."""
    conflict = resident_conflict(model_patcher.model_options.get("transformer_options", {}), shift_keys)
    if conflict:
        raise SimDAPatchError(f"SimDA: {conflict}.")


def _fallback_shift_sigmas(model_patcher, config: SimDAConfig) -> tuple[float, float]:
    """Latent shift's range in sigmas of this MODEL's schedule, for UNet calls outside a sampling run."""
    if config.latent_shift is None:
        return (math.inf, 0.0)
    sampling = model_patcher.get_model_object("model_sampling")
    return config.latent_shift.sigma_range(sampling.percent_to_sigma)


def _patch_adapters(patches: _ObjectPatches, model_patcher, sites, runtime: SimDARuntime, carried) -> None:
    """Temporal adapters before each transformer, FFN and attention adapters in each block, the adapter
    weights as an additional model; and gradient checkpointing of every ResBlock and transformer."""
    config, runtime_ref = runtime.config, weakref.ref(runtime)
    adapters = config.active_adapters
    if adapters is not None or config.gradient_checkpointing:
        for site in sites:
            transformer = patches.module(site.path)
            forward = patch_functions.temporal_adapter_then_transformer(transformer, site.path, runtime_ref)
            patches.add(site.path, forward)
    if config.gradient_checkpointing:
        for path in find_resblocks(patches.unet):
            patches.add(path, patch_functions.checkpointed_resblock(patches.module(path), runtime_ref))
    if adapters is None:
        return
    by_block = {}
    for site in sites:
        for index in range(site.depth):
            block_path = site.block_path(index)
            block = patches.module(block_path)
            patches.add(f"{block_path}.ff", patch_functions.ffn_with_adapter(block, block_path, runtime_ref))
            patches.add(f"{block_path}.norm3", patch_functions.pass_through)
            by_block[shift_block_key(site, index)] = adapters.attention_adapter(block_path)
    model_patcher.set_model_attn1_output_patch(patch_functions.attention_adapters(by_block, runtime))
    model_patcher.set_additional_models(
        ADDITIONAL_MODELS_KEY, [carried[0] if carried else adapter_patcher(adapters, model_patcher)]
    )


def _patch_frame_group_norm(patches: _ObjectPatches, runtime: SimDARuntime) -> None:
    if runtime.config.uses_frame_group_norm:
        for path in find_resblock_norms(patches.unet):
            norm = patches.module(path)
            patches.add(path, patch_functions.frame_group_norm(norm, weakref.ref(runtime), host_norm_parameters))


def _patch_latent_shift(model_patcher, unet, shifted, runtime: SimDARuntime) -> None:
    for site, index in shifted:
        replace_fn = patch_functions.latent_shift_self_attention(runtime, layer_attention(unet, site, index))
        model_patcher.set_model_attn1_replace(replace_fn, *shift_block_key(site, index))


def _add_wrappers_and_callbacks(model_patcher, runtime: SimDARuntime, shift_keys, unet) -> None:
    """The per-call wrapper, the sampling run's wrapper, and the clone callbacks."""
    import comfy.patcher_extension

    unet_ref = weakref.ref(unet)
    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, KEY, _call_wrapper(runtime, shift_keys, unet_ref)
    )
    run_wrapper = patch_functions.mark(sampling_wrapper(runtime, shift_keys))
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, run_wrapper)
    model_patcher.add_callback_with_key(comfy.patcher_extension.CallbacksMP.ON_CLONE, KEY, _follow_clone)
    on_deep_clone = getattr(comfy.patcher_extension.CallbacksMP, "ON_DEEPCLONE_MULTIGPU", None)
    if on_deep_clone is not None:
        model_patcher.add_callback_with_key(on_deep_clone, KEY, _follow_deep_clone)
    model_patcher.attachments[BOUND_UNET] = unet_ref


def apply_simda(model_patcher, config: SimDAConfig):
    """Register ``config`` on ``model_patcher`` (a clone the caller owns), replacing any SimDA
    patches it already carries. Raises :class:`SimDAPatchError` before anything is changed when
    another patch on the MODEL cannot coexist with it."""
    unet = model_patcher.get_model_object(UNET)
    sites = _transformer_sites(unet)
    shifted = shift_sites(sites, config.latent_shift.levels) if config.latent_shift else []
    shift_keys = [shift_block_key(site, index) for site, index in shifted]
    if config.latent_shift is not None:
        _check_attention_slots(model_patcher, shift_keys)

    # The clone's copy of the adapters' patcher when they stay the same: it is a host clone (its
    # parent is the source MODEL's), so when this MODEL is dropped while the source lives on, the
    # host follows the parent instead of taking the living adapters for a leak.
    carried = [p for p in model_patcher.additional_models.get(ADDITIONAL_MODELS_KEY, []) if p.model is config.adapters]
    _remove_previous(model_patcher, get_config(model_patcher))
    runtime = SimDARuntime(config, _fallback_shift_sigmas(model_patcher, config))
    patches = _ObjectPatches(model_patcher, unet)
    _patch_adapters(patches, model_patcher, sites, runtime, carried)
    _patch_frame_group_norm(patches, runtime)
    _patch_latent_shift(model_patcher, unet, shifted, runtime)
    _add_wrappers_and_callbacks(model_patcher, runtime, shift_keys, unet)
    model_patcher.attachments[ATTACHMENT] = replace(config, object_patch_keys=tuple(patches.keys))
    return model_patcher


def serve_context_windows(model_patcher):
    """``model_patcher``, or a clone that serves its context windows the way a SimDA MODEL's sampling
    runs do (``host.windows``): for a MODEL without SimDA that has a context handler."""
    import comfy.patcher_extension

    if get_config(model_patcher) is not None or model_patcher.model_options.get("context_handler") is None:
        return model_patcher
    clone = model_patcher.clone()
    clone.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, KEY, patch_functions.mark(sampling_wrapper())
    )
    return clone
