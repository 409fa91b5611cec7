"""The host's attention as SimDA calls it: the attention the host selected for a call (a user's
override honoured), a layer's own choice where the host gives layers one (0.38), a backward-safe
attention for training calls, and the GroupNorm parameters the host's cast layers compute with."""
from __future__ import annotations

import functools

from ..model.adapters import AdapterSite
from ..model.patch_functions import mark


def host_attention(q, k, v, heads, extra_options, preferred_attention=None):
    """The host's selected attention, given the call's options (``extra_options`` holds every
    ``transformer_options`` key but the patches), so a user's attention override is honoured; and
    the layer's own attention choice (``CrossAttention.comfy_attention``, ComfyUI 0.38) where the
    layer has one."""
    import comfy.ldm.modules.attention as host_attention_module

    choice = {} if preferred_attention is None else {"preferred_attention": preferred_attention}
    return host_attention_module.optimized_attention(
        q, k, v, heads, attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options, **choice
    )


def layer_attention(unet, site: AdapterSite, index: int):
    """The host attention call for the self-attention of block ``index`` of ``site``: with that
    layer's ``comfy_attention`` where the host gives layers one (0.38), else the plain call."""
    preferred = getattr(unet.get_submodule(site.block_path(index)).attn1, "comfy_attention", None)
    return host_attention if preferred is None else functools.partial(host_attention, preferred_attention=preferred)


def host_norm_parameters(norm, x):
    """A host GroupNorm's ``(weight, bias)`` for this call, as its own forward would use them:
    through the host's ``cast_bias_weight`` when the host casts that layer per call (low-VRAM
    offload, manual cast, weight patches applied on the fly), else the layer's own tensors."""
    if (
        getattr(norm, "comfy_cast_weights", False)
        or getattr(norm, "weight_function", None)
        or getattr(norm, "bias_function", None)
    ):
        import comfy.ops

        return comfy.ops.cast_bias_weight(norm, x)[:2]
    return norm.weight, norm.bias


def backward_safe_attention_override():
    """An attention override (the host's ``optimized_attention_override`` shape) that runs every
    attention of a training call through the host's PyTorch attention, which has a backward: a
    user's override or a kernel chosen at start-up (Sage, int8, ...) may have none."""
    import comfy.ldm.modules.attention as host_attention

    pytorch_attention = getattr(host_attention, "attention_pytorch", None)

    def override(func, *args, **kwargs):
        return (pytorch_attention or func)(*args, **kwargs)

    return mark(override)
