"""Latent-Shift Attention (docs/METHOD.md §4).

Queries stay the current frame's tokens. Keys and values come from a shifted token map: the
token at grid position (r, c) of frame t is taken from frame ``t - P[r % 4][c % 4]`` (or stays
its own when that frame does not exist), and frame t attends to the shifted maps of frames
t-1 and t: ``2N`` keys per query instead of ``F * N``. A looping clip (``ClipLayout.loop_length``)
has no first frame: times are taken modulo the loop, so frame 0 reads from the last frames.

The shift is done on the projected keys and values (the projections act per token, so this
equals shifting the tokens first) as one ``index_select`` each of ``k`` and ``v``. The gather
index depends only on the frames' positions relative to the first one, the loop length, the grid
and the device; it is built once for each of those, with tensor operations on the device, so
sliding context windows of one shape share a single index.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange

from .layout import ClipLayout

SHIFT_PATTERN = ((4, 3, 2, 1), (3, 2, 1, 0), (2, 1, 0, 0), (1, 2, 3, 4))
"""Temporal offset of each grid position, tiled every 4 rows and columns."""
MAX_SHIFT = max(max(row) for row in SHIFT_PATTERN)

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def shift_offsets(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``[h * w]`` temporal offset of every token of an ``h x w`` grid (row-major)."""
    rows = torch.arange(h, device=device).remainder(4)
    cols = torch.arange(w, device=device).remainder(4)
    pattern = torch.tensor(SHIFT_PATTERN, device=device)
    return pattern[rows[:, None], cols[None, :]].flatten()


def source_frames(positions: torch.Tensor, distances: torch.Tensor, loop_length: int = 0) -> torch.Tensor:
    """``[F, D]``: for each frame t (time ``positions[t]``, increasing) and each distance d, the
    latest frame whose time is at most ``positions[t] - d``, or t itself when the clip has no such
    frame. In a loop of ``loop_length`` frames that time is taken modulo the loop, counted on from
    the first frame; a time that falls after the last frame (outside a window of a longer loop)
    also leaves frame t its own token."""
    frames = positions.shape[0]
    target = positions[:, None] - distances[None, :]  # [F, D]
    if loop_length:
        first = positions[:1]
        target = first + (target - first).remainder(loop_length)
    found = torch.searchsorted(positions, target, right=True) - 1
    own = torch.arange(frames, device=positions.device)[:, None]
    exists = (found >= 0) & (target <= positions[-1:])
    return torch.where(exists, found, own)


def build_key_value_index(
    frame_offsets: tuple[int, ...], loop_length: int, h: int, w: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Flat gather indices ``[F * 2N]`` into a clip's ``F * N`` tokens (see
    :func:`key_value_index`), computed on ``device`` without a loop over tokens."""
    tokens = h * w
    positions = torch.tensor(frame_offsets, device=device)
    sources = source_frames(positions, torch.arange(MAX_SHIFT + 1, device=device), loop_length)  # [F, 5]
    # shifted[t, n]: flat index (frame * N + n) of the token that position n of frame t takes.
    shifted = sources[:, shift_offsets(h, w, device)] * tokens + torch.arange(tokens, device=device)  # [F, N]
    previous = sources[:, 1]  # the frame one step earlier (frame 0 of an open clip: itself)
    return torch.cat([shifted[previous], shifted], dim=1).flatten()  # [F * 2N]


_index_cache: dict[tuple, torch.Tensor] = {}
INDEX_CACHE_SIZE = 256
"""Distinct (window shape, grid, device) indices kept; the oldest is dropped past this."""


def key_value_index(layout: ClipLayout, h: int, w: int, device: torch.device) -> torch.Tensor:
    """Flat gather indices ``[F * 2N]`` into a clip's ``F * N`` tokens: for each frame t, the
    shifted map of frame t-1 followed by the shifted map of frame t (frame 0 of an open clip uses
    itself twice), cached by what decides them: relative frame positions, loop length, grid, device.

    The cached index is always an ordinary tensor: one made while the host samples (inference
    mode) could not be saved for backward by a later training step (the One-Shot Tuner)."""
    key = (layout.frame_offsets, layout.loop_length, h, w, device)
    index = _index_cache.get(key)
    if index is None:
        index = _build_cached_index(key)
    return index


@torch.compiler.disable
def _build_cached_index(key: tuple) -> torch.Tensor:
    # Runs once per key; a compiled caller finds the entry on its next trace.
    with torch.inference_mode(False):
        index = build_key_value_index(*key)
    if len(_index_cache) >= INDEX_CACHE_SIZE:
        del _index_cache[next(iter(_index_cache))]
    _index_cache[key] = index
    return index


def latent_shift_keys_values(
    k: torch.Tensor, v: torch.Tensor, layout: ClipLayout, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v``: ``[clips * F, h * w, D]`` -> ``[clips * F, 2 * h * w, D]`` latent-shifted."""
    batch, tokens, _ = k.shape
    if tokens != h * w or batch != layout.batch:
        raise ValueError(
            f"latent shift expected {layout.batch} x {h * w} tokens ({layout.clips} clips of "
            f"{layout.frames} frames, {h}x{w} grid) but got {batch} x {tokens}"
        )
    index = key_value_index(layout, h, w, k.device)

    def gather(t: torch.Tensor) -> torch.Tensor:
        clip_tokens = rearrange(t, "(b f) n d -> b (f n) d", f=layout.frames)
        shifted = clip_tokens.index_select(1, index)  # [b, F * 2N, d]
        return rearrange(shifted, "b (f n2) d -> (b f) n2 d", f=layout.frames)

    return gather(k), gather(v)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``[B, tokens, heads * d]`` tensors (PyTorch's SDPA)."""
    q, k, v = (rearrange(t, "b n (heads d) -> b heads n d", heads=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b heads n d -> b n (heads d)")


def latent_shift_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    layout: ClipLayout,
    h: int,
    w: int,
    attention: AttentionFn = scaled_dot_product_attention,
) -> torch.Tensor:
    """Self-attention of each frame's queries over its latent-shifted keys/values."""
    if not layout.is_video:
        return attention(q, k, v, heads)
    k, v = latent_shift_keys_values(k, v, layout, h, w)
    return attention(q, k, v, heads)
