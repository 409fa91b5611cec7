"""The boundary between SimDA and the host's UNet: everything is registered on a ComfyUI
``ModelPatcher`` clone, so it is applied when the host loads that clone and removed when it
unloads it.

What goes where (see docs/ARCHITECTURE.md):
- spatial attention adapter -> ``attn1_output_patch`` (after self-attention and its output
  projection, before the residual add);
- latent-shift attention -> ``patches_replace["attn1"]`` of every block with real self-attention;
- FFN adapter -> object patches of ``ff.forward`` and ``norm3.forward`` of each transformer block
  (``norm3`` passes its input through; the new ``ff`` sees the un-normalised stream);
- temporal adapter -> object patch of each SpatialTransformer's ``forward`` (adapter, then the
  transformer), which also receives ``transformer_options``;
- frame-shared GroupNorm -> object patches of the ResBlock norms' and the output norm's ``forward``;
- clip layout per UNet call -> a ``DIFFUSION_MODEL`` wrapper that reads the batch and
  ``transformer_options`` and hands the layout to the pieces above for the call's duration;
- adapter weights -> an additional ModelPatcher, so the host moves, casts and counts them.
Module paths never change, so weight patches (LoRA) still find their keys.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch.utils.checkpoint import checkpoint

from .adapters import AdapterSite, SimDAAdapters
from .group_norm import frame_shared_group_norm
from .latent_shift import latent_shift_attention
from .layout import ClipLayout, ClipLayoutError
from .unet_sites import find_adapter_sites, find_resblock_norms, find_resblocks

log = logging.getLogger("SimDA")

ATTACHMENT = "simda"
WRAPPER_KEY = "simda"
ADDITIONAL_MODELS_KEY = "simda_adapters"
UNET = "diffusion_model"


class SimDAPatchError(RuntimeError):
    """SimDA cannot be applied to this MODEL as it is; the message says why and what to do."""


@dataclass(frozen=True)
class LatentShiftSettings:
    levels: frozenset[int] | None = None
    """Resolution levels (0 = the latent's own size) that get latent shift; None = all."""
    sigma_start: float = float("inf")
    """Latent shift is active while the current sigma lies in [sigma_end, sigma_start]."""
    sigma_end: float = 0.0


@dataclass(frozen=True)
class SimDAConfig:
    """Everything SimDA adds to one MODEL clone. Nodes derive a new config from the one already on
    the MODEL, so an Adapter Loader followed by a Latent-Shift Patch yields both."""

    adapters: SimDAAdapters | None = None
    adapter_name: str = ""
    family: str = ""
    strength: float = 1.0
    latent_shift: LatentShiftSettings | None = None
    frame_group_norm: bool = False
    frames_per_clip: int = 0
    gradient_checkpointing: bool = False
    """Recompute each ResBlock and transformer in the backward pass (training only): every
    adapter inside them still gets its gradient."""
    object_patch_keys: tuple[str, ...] = field(default=())

    @property
    def uses_frame_group_norm(self) -> bool:
        """Adapters were trained with frame-shared statistics: on whenever they are applied."""
        return self.frame_group_norm or self.adapters is not None


class SimDARuntime:
    """State of one UNet call, set by the DIFFUSION_MODEL wrapper and read by the patches."""

    def __init__(self, config: SimDAConfig):
        self.config = config
        self.layout: ClipLayout | None = None
        self.shift_active = False

    def video_layout(self) -> ClipLayout | None:
        layout = self.layout
        return layout if layout is not None and layout.is_video else None

    @contextlib.contextmanager
    def using(self, layout: ClipLayout | None, shift_active: bool):
        """Restore a call's state, e.g. while a checkpointed block is recomputed in backward."""
        saved = (self.layout, self.shift_active)
        self.layout, self.shift_active = layout, shift_active
        try:
            yield
        finally:
            self.layout, self.shift_active = saved

    def checkpointed(self, fn: Callable, *args):
        """``fn(*args)``, recomputed in the backward pass under the same call state when
        gradient checkpointing is on and gradients are being recorded."""
        if not (self.config.gradient_checkpointing and torch.is_grad_enabled()):
            return fn(*args)
        layout, shift_active = self.layout, self.shift_active
        # The host keeps writing "block" and "block_index" into the live transformer_options as it
        # walks the UNet: the recomputation in backward must see this call's values.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)

        def run(*inner):
            with self.using(layout, shift_active):
                return fn(*inner)

        return checkpoint(run, *args, use_reentrant=False)


def get_config(model_patcher) -> SimDAConfig | None:
    return model_patcher.attachments.get(ATTACHMENT)


def shift_block_key(site: AdapterSite, index: int) -> tuple[str, int, int]:
    """The host's ``patches_replace`` key of a transformer block: (block name, id, index)."""
    parts = site.path.split(".")
    if parts[0] == "middle_block":
        return ("middle", 0, index)
    name = {"input_blocks": "input", "output_blocks": "output"}[parts[0]]
    return (name, int(parts[1]), index)


def _is_ours(fn: Any) -> bool:
    return bool(getattr(fn, "simda_patch", False))


def _mark(fn: Callable) -> Callable:
    fn.simda_patch = True
    return fn


def _describe(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or type(fn).__module__
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} (from {module})"


def find_conflicts(transformer_options: dict, shift_keys: list[tuple[str, int, int]]) -> str | None:
    """A sentence naming a patch that cannot coexist with latent shift, or None."""
    patches = transformer_options.get("patches", {})
    for patch in patches.get("attn1_patch", []):
        if not _is_ours(patch):
            return (
                f"another patch changes the self-attention tokens ({_describe(patch)}, e.g. HyperTile); "
                "latent-shift attention needs each frame's whole token grid: remove that node from this MODEL's chain "
                "or turn latent shift off"
            )
    replaced = patches_replace_attn1(transformer_options)
    for key in shift_keys:
        fn = replaced.get(key)
        if fn is not None and not _is_ours(fn):
            return (
                f"another node already replaces self-attention at {key} ({_describe(fn)}); SimDA's latent-shift "
                "attention needs that slot: use one of the two on this MODEL, not both"
            )
    return None


def patches_replace_attn1(transformer_options: dict) -> dict:
    return transformer_options.get("patches_replace", {}).get("attn1", {})


# -- the patch functions -------------------------------------------------------------------------

# Object patches stay installed on the host's modules until the host next unpatches them, which
# can be after the MODEL clone that owns them is gone. They therefore reach the clone's runtime
# (and through it the adapters) by weak reference only, and act as the plain module once it is
# gone: the host's memory management sees the adapters freed with their clone.
RuntimeRef = Callable[[], "SimDARuntime | None"]


def _transformer_forward(transformer, site_path: str, runtime_ref: RuntimeRef):
    """The SpatialTransformer, preceded by its temporal adapter (when there are adapters)."""
    transformer_forward = type(transformer).forward

    def forward(x, context=None, transformer_options={}):
        runtime = runtime_ref()
        if runtime is None:
            return transformer_forward(transformer, x, context, transformer_options)

        def run(x_, context_, transformer_options_):
            layout = runtime.video_layout()
            adapters = runtime.config.adapters
            if adapters is not None and layout is not None:
                x_ = x_ + runtime.config.strength * adapters.temporal_adapter(site_path).delta(x_, layout)
            return transformer_forward(transformer, x_, context_, transformer_options_)

        return runtime.checkpointed(run, x, context, transformer_options)

    return _mark(forward)


def _checkpointed_resblock_forward(resblock, runtime_ref: RuntimeRef):
    resblock_forward = type(resblock).forward

    def forward(x, emb):
        runtime = runtime_ref()
        if runtime is None:
            return resblock_forward(resblock, x, emb)
        return runtime.checkpointed(lambda x_, emb_: resblock_forward(resblock, x_, emb_), x, emb)

    return _mark(forward)


def _ffn_forward(block, block_path: str, runtime_ref: RuntimeRef):
    """``ff(norm3(h)) + Adapter_ffn(h)``; ``norm3`` itself is patched to pass ``h`` through."""
    ff_forward = type(block.ff).forward
    norm3_forward = type(block.norm3).forward
    ff, norm3 = block.ff, block.norm3

    def forward(x):
        out = ff_forward(ff, norm3_forward(norm3, x))
        runtime = runtime_ref()
        if runtime is not None and runtime.video_layout() is not None and runtime.config.adapters is not None:
            out = out + runtime.config.strength * runtime.config.adapters.ffn_adapter(block_path)(x)
        return out

    return _mark(forward)


def _pass_through(x):
    return x


_pass_through.simda_patch = True


def _frame_group_norm_forward(norm, runtime_ref: RuntimeRef):
    norm_forward = type(norm).forward

    def forward(x):
        runtime = runtime_ref()
        layout = runtime.video_layout() if runtime is not None else None
        if layout is None:
            return norm_forward(norm, x)
        return frame_shared_group_norm(x, layout, lambda t: norm_forward(norm, t))

    return _mark(forward)


def _attention_adapter_patch(adapters: SimDAAdapters, sites: list[AdapterSite], runtime: SimDARuntime):
    by_block = {}
    for site in sites:
        for index in range(site.depth):
            by_block[shift_block_key(site, index)] = adapters.attention_adapter(site.block_path(index))

    def attn1_output_patch(out, extra_options):
        if runtime.video_layout() is None:
            return out
        block = extra_options.get("block")
        if block is None:
            return out
        adapter = by_block.get((block[0], block[1], extra_options.get("block_index", 0)))
        if adapter is None:
            return out
        return out + runtime.config.strength * adapter(out)

    return _mark(attn1_output_patch)


def _latent_shift_replace(runtime: SimDARuntime):
    import comfy.ldm.modules.attention as host_attention

    def attn1_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")

        def attention(q_, k_, v_, heads_):
            return host_attention.optimized_attention(q_, k_, v_, heads_, attn_precision=precision)

        layout = runtime.video_layout()
        if layout is None or not runtime.shift_active:
            return attention(q, k, v, heads)
        _, _, h, w = extra_options["activations_shape"]
        return latent_shift_attention(q, k, v, heads, layout, h, w, attention=attention)

    return _mark(attn1_replace)


def _call_wrapper(runtime: SimDARuntime, shift_keys: list[tuple[str, int, int]]):
    def wrapper(executor, x, *args, **kwargs):
        transformer_options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        config = runtime.config
        if config.latent_shift is not None:
            conflict = find_conflicts(transformer_options, shift_keys)
            if conflict:
                raise SimDAPatchError(f"SimDA: {conflict}.")
        groups = len(transformer_options.get("cond_or_uncond", [0])) or 1
        window = transformer_options.get("context_window")
        indices = getattr(window, "index_list", None)
        try:
            layout = ClipLayout.from_batch(x.shape[0], groups, config.frames_per_clip, indices)
        except ClipLayoutError as e:
            raise SimDAPatchError(f"SimDA: {e}.") from None
        shift = config.latent_shift
        runtime.shift_active = False
        if shift is not None:
            sigmas = transformer_options.get("sigmas")
            sigma = float(sigmas.max()) if isinstance(sigmas, torch.Tensor) else None
            runtime.shift_active = sigma is None or shift.sigma_end <= sigma <= shift.sigma_start
        runtime.layout = layout
        try:
            return executor(x, *args, **kwargs)
        finally:
            runtime.layout = None
            runtime.shift_active = False

    return _mark(wrapper)


# -- applying a config to a clone ----------------------------------------------------------------

def _remove_previous(model_patcher, previous: SimDAConfig | None) -> None:
    import comfy.patcher_extension

    if previous is not None:
        for key in previous.object_patch_keys:
            model_patcher.object_patches.pop(key, None)
    to = model_patcher.model_options.setdefault("transformer_options", {})
    patches = to.get("patches", {})
    if "attn1_output_patch" in patches:
        patches["attn1_output_patch"] = [p for p in patches["attn1_output_patch"] if not _is_ours(p)]
    replaced = to.get("patches_replace", {}).get("attn1")
    if replaced:
        for key in [k for k, fn in replaced.items() if _is_ours(fn)]:
            del replaced[key]
    model_patcher.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY)
    model_patcher.additional_models.pop(ADDITIONAL_MODELS_KEY, None)


def model_sites(model_patcher) -> list[AdapterSite]:
    return find_adapter_sites(model_patcher.get_model_object(UNET))


def shift_sites(sites: list[AdapterSite], levels: frozenset[int] | None) -> list[tuple[AdapterSite, int]]:
    return [
        (site, index)
        for site in sites
        if levels is None or site.level in levels
        for index in range(site.depth)
        if site.self_attention[index]
    ]


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
            "SimDA: the connected MODEL has no spatial transformers (it is not an SD1.x/SD2.x-style UNet); "
            "connect an SD1.x or SD2.x checkpoint."
        )
    shift_keys = [shift_block_key(s, i) for s, i in shift_sites(sites, config.latent_shift.levels)] if config.latent_shift else []
    previous = get_config(model_patcher)
    if config.latent_shift is not None:
        conflict = find_conflicts(
            {
                "patches": model_patcher.model_options.get("transformer_options", {}).get("patches", {}),
                "patches_replace": model_patcher.model_options.get("transformer_options", {}).get("patches_replace", {}),
            },
            shift_keys,
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

    adapters = config.adapters
    if adapters is not None or config.gradient_checkpointing:
        for site in sites:
            object_patch(site.path, _transformer_forward(unet.get_submodule(site.path), site.path, runtime_ref))
    if config.gradient_checkpointing:
        for path in find_resblocks(unet):
            object_patch(path, _checkpointed_resblock_forward(unet.get_submodule(path), runtime_ref))
    if adapters is not None:
        for site in sites:
            for index in range(site.depth):
                block_path = site.block_path(index)
                block = unet.get_submodule(block_path)
                object_patch(f"{block_path}.ff", _ffn_forward(block, block_path, runtime_ref))
                object_patch(f"{block_path}.norm3", _pass_through)
        model_patcher.set_model_attn1_output_patch(_attention_adapter_patch(adapters, sites, runtime))
        adapter_patcher = carried[0] if carried else comfy.model_patcher.ModelPatcher(
            adapters, load_device=model_patcher.load_device, offload_device=model_patcher.offload_device
        )
        model_patcher.set_additional_models(ADDITIONAL_MODELS_KEY, [adapter_patcher])

    if config.uses_frame_group_norm:
        for path in find_resblock_norms(unet):
            object_patch(path, _frame_group_norm_forward(unet.get_submodule(path), runtime_ref))

    if config.latent_shift is not None:
        replace_fn = _latent_shift_replace(runtime)
        for block_name, number, index in shift_keys:
            model_patcher.set_model_attn1_replace(replace_fn, block_name, number, index)

    model_patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, _call_wrapper(runtime, shift_keys)
    )
    model_patcher.attachments[ATTACHMENT] = replace(config, object_patch_keys=tuple(keys))
    return model_patcher


def model_family(model_patcher) -> str:
    """``sd1``, ``sd2``, ``sd_x4_upscaler``, or the host's name of another model type."""
    import comfy.supported_models as supported

    model_config = getattr(model_patcher.model, "model_config", None)
    if isinstance(model_config, supported.SD_X4Upscaler):
        return "sd_x4_upscaler"
    if isinstance(model_config, supported.SD20):
        return "sd2"
    if isinstance(model_config, supported.SD15):
        return "sd1"
    return type(model_config).__name__ if model_config is not None else type(model_patcher.model).__name__


def adapter_storage_dtype(model_patcher) -> torch.dtype:
    """Adapters are stored in the dtype the UNet computes in, so the host casts nothing extra."""
    model = model_patcher.model
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def call_options(model_patcher, cond_or_uncond: list[int]) -> dict:
    """``transformer_options`` for a direct UNet call, built as the host's sampler builds them:
    the patcher's own options, its wrappers, and the cond/uncond groups of the batch."""
    import comfy.patcher_extension

    options = dict(model_patcher.model_options.get("transformer_options", {}))
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(
        dict(options.get("wrappers", {})), model_patcher.wrappers
    )
    options["cond_or_uncond"] = list(cond_or_uncond)
    return options
