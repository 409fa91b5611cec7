"""SimDA's pieces as small functions in the shapes the host's patch points take (see
``host/register.py`` for where each one is registered). Nothing here imports the host: each function
gets the module it wraps, the call state (:class:`SimDARuntime`, by weak reference where the host
keeps the function on its modules) and, for attention, the host's attention function.

Adapters act on every call that has a clip layout, one frame included (the authors' UNet runs its
adapters, and the temporal adapter's centre tap, on a single frame too). Latent shift and
frame-shared GroupNorm act only on clips of two or more frames: over one frame both are the plain
operation.
"""
from __future__ import annotations

from typing import Callable

import torch

from .group_norm import NormParameters, frame_shared_group_norm
from .latent_shift import latent_shift_attention
from .runtime import RuntimeRef, SimDARuntime

HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, dict], torch.Tensor]
"""``attention(q, k, v, heads, extra_options)``: the host's attention for this call, honouring the
call's attention override."""


def mark(fn: Callable) -> Callable:
    """Tag a function as SimDA's, so conflict checks and re-registration can tell it apart."""
    fn.simda_patch = True
    return fn


def is_simda(fn) -> bool:
    return bool(getattr(fn, "simda_patch", False))


def temporal_adapter_then_transformer(transformer, site_path: str, runtime_ref: RuntimeRef):
    """SpatialTransformer ``forward``: ``x + strength * TemporalAdapter(x)``, then the transformer."""
    transformer_forward = type(transformer).forward

    def forward(x, context=None, transformer_options={}):
        runtime = runtime_ref()
        if runtime is None:
            return transformer_forward(transformer, x, context, transformer_options)

        def run(x_, context_, transformer_options_):
            layout = runtime.layout
            if runtime.adapters is not None and layout is not None:
                x_ = x_ + runtime.strength * runtime.adapters.temporal_adapter(site_path).delta(x_, layout)
            return transformer_forward(transformer, x_, context_, transformer_options_)

        return runtime.checkpointed(run, x, context, transformer_options)

    return mark(forward)


def checkpointed_resblock(resblock, runtime_ref: RuntimeRef):
    """ResBlock ``forward`` recomputed in backward (gradient checkpointing while training)."""
    resblock_forward = type(resblock).forward

    def forward(x, emb):
        runtime = runtime_ref()
        if runtime is None:
            return resblock_forward(resblock, x, emb)
        return runtime.checkpointed(lambda x_, emb_: resblock_forward(resblock, x_, emb_), x, emb)

    return mark(forward)


def ffn_with_adapter(block, block_path: str, runtime_ref: RuntimeRef):
    """``ff.forward``: ``ff(norm3(h)) + strength * Adapter_ffn(h)``; ``norm3`` is patched with
    :func:`pass_through` so that ``ff`` receives the un-normalised stream ``h``."""
    ff_forward = type(block.ff).forward
    norm3_forward = type(block.norm3).forward
    ff, norm3 = block.ff, block.norm3

    def forward(x):
        out = ff_forward(ff, norm3_forward(norm3, x))
        runtime = runtime_ref()
        if runtime is not None and runtime.layout is not None and runtime.adapters is not None:
            out = out + runtime.strength * runtime.adapters.ffn_adapter(block_path)(x)
        return out

    return mark(forward)


@mark
def pass_through(x):
    return x


def frame_group_norm(norm, runtime_ref: RuntimeRef, parameters: NormParameters):
    """GroupNorm ``forward`` with statistics shared by the frames of each clip."""
    norm_forward = type(norm).forward

    def forward(x):  # the norm's own class forward, never the instance attribute this replaces
        runtime = runtime_ref()
        layout = runtime.video_layout() if runtime is not None else None
        if layout is None:
            return norm_forward(norm, x)
        return frame_shared_group_norm(x, layout, norm, parameters)

    return mark(forward)


def attention_adapters(adapters_by_block: dict, runtime: SimDARuntime):
    """``attn1_output_patch``: ``a + strength * Adapter_s(a)`` after self-attention."""

    def attn1_output_patch(out, extra_options):
        if runtime.layout is None or runtime.adapters is None:
            return out
        block = extra_options.get("block")
        if block is None:
            return out
        adapter = adapters_by_block.get((block[0], block[1], extra_options.get("block_index", 0)))
        if adapter is None:
            return out
        return out + runtime.strength * adapter(out)

    return mark(attn1_output_patch)


class TokenGridError(RuntimeError):
    """Self-attention got tokens that are not each frame's whole token grid (another patch re-tiled
    them). The message says what the grid should have been; the caller, which knows the call's
    patches, names them."""


def check_token_grid(q, k, v, layout, h: int, w: int) -> None:
    """Latent shift reads each frame's ``h x w`` token grid: queries, keys and values of a video call
    must hold ``layout.batch`` items of ``h * w`` tokens. A patch that keeps the tokens (a
    hypernetwork changes k and v token by token) passes; one that re-tiles them (HyperTile) does not."""
    shapes = [tuple(t.shape[:2]) for t in (q, k, v)]
    if all(shape == (layout.batch, h * w) for shape in shapes):
        return
    raise TokenGridError(
        f"latent-shift attention needs each frame's whole {h}x{w} grid of tokens ({layout.batch} items of "
        f"{h * w} tokens, got queries, keys and values of {', '.join(f'{b} x {n}' for b, n in shapes)}); remove "
        "that node from this MODEL's chain or turn latent shift off"
    )


def latent_shift_self_attention(runtime: SimDARuntime, attention: HostAttention):
    """``patches_replace["attn1"]``: each frame's queries over its latent-shifted keys/values,
    through the host's attention (so the call's attention override is honoured). The token grid is
    checked on every video call, whether or not the shift is active at this step."""

    def attn1_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]

        def attend(q_, k_, v_, heads_):
            return attention(q_, k_, v_, heads_, extra_options)

        layout = runtime.video_layout()
        if layout is None:
            return attend(q, k, v, heads)
        _, _, h, w = extra_options["activations_shape"]
        check_token_grid(q, k, v, layout, h, w)
        if not runtime.shift_active:
            return attend(q, k, v, heads)
        return latent_shift_attention(q, k, v, heads, layout, h, w, attention=attend)

    return mark(attn1_replace)
