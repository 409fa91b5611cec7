"""Latent-Shift Attention (SIMDA_SPEC.md section 3).

Queries stay the current frame's tokens. Keys and values come from a shifted token map: the
token at grid position (r, c) of frame t is taken from frame ``t - P[r % 4][c % 4]`` (or stays
its own when that frame does not exist), and frame t attends to the shifted maps of frames
t-1 and t: ``2N`` keys per query instead of ``F * N``.

The shift is done on the projected keys and values (the projections act per token, so this
equals shifting the tokens first) as one gather of ``k`` and ``v`` together, with the gather
indices computed once per (frame positions, h, w, device).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import ClipLayout

SHIFT_PATTERN = ((4, 3, 2, 1), (3, 2, 1, 0), (2, 1, 0, 0), (1, 2, 3, 4))
"""Temporal offset of each grid position, tiled every 4 rows and columns."""

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def shift_offsets(h: int, w: int) -> torch.Tensor:
    """``[h * w]`` temporal offset of every token of an ``h x w`` grid (row-major)."""
    rows = torch.arange(h).remainder(4)
    cols = torch.arange(w).remainder(4)
    pattern = torch.tensor(SHIFT_PATTERN)
    return pattern[rows[:, None], cols[None, :]].flatten()


def earlier_frame(positions: tuple[int, ...], frame: int, distance: int) -> int:
    """Index of the latest frame at least ``distance`` earlier in time than ``frame``, or
    ``frame`` itself when the clip starts later than that (no wrap-around)."""
    target = positions[frame] - distance
    if distance == 0 or target < positions[0]:
        return frame
    source = frame
    while positions[source] > target:
        source -= 1
    return source


@lru_cache(maxsize=64)
def _key_value_index_cpu(positions: tuple[int, ...], h: int, w: int) -> torch.Tensor:
    frames = len(positions)
    tokens = h * w
    offsets = shift_offsets(h, w).tolist()
    token_ids = torch.arange(tokens)
    # shifted[t][n]: flat index (frame * N + n) of the token that position n of frame t takes.
    shifted = torch.stack(
        [
            torch.tensor([earlier_frame(positions, t, s) for s in offsets]) * tokens + token_ids
            for t in range(frames)
        ]
    )  # [F, N]
    previous = [earlier_frame(positions, t, 1) for t in range(frames)]
    return torch.cat([shifted[previous], shifted], dim=1).flatten()  # [F * 2N]


_device_index_cache: dict[tuple, torch.Tensor] = {}


def key_value_index(positions: tuple[int, ...], h: int, w: int, device: torch.device) -> torch.Tensor:
    """Flat gather indices ``[F * 2N]`` into a clip's ``F * N`` tokens: for each frame t, the
    shifted map of frame t-1 followed by the shifted map of frame t (frame 0 uses itself twice).

    The cached index is always an ordinary tensor: one made while the host samples (inference
    mode) could not be saved for backward by a later training step (the Edit Tuner)."""
    key = (positions, h, w, str(device))
    index = _device_index_cache.get(key)
    if index is None:
        if len(_device_index_cache) > 64:
            _device_index_cache.clear()
        with torch.inference_mode(False):
            index = _key_value_index_cpu(positions, h, w).to(device)
        _device_index_cache[key] = index
    return index


def latent_shift_keys_values(
    k: torch.Tensor, v: torch.Tensor, layout: ClipLayout, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v``: ``[clips * F, h * w, D]`` -> ``[clips * F, 2 * h * w, D]`` latent-shifted."""
    batch, tokens, dim = k.shape
    if tokens != h * w or batch != layout.batch:
        raise ValueError(
            f"latent shift expected {layout.batch} x {h * w} tokens ({layout.clips} clips of "
            f"{layout.frames} frames, {h}x{w} grid) but got {batch} x {tokens}"
        )
    index = key_value_index(layout.positions, h, w, k.device)
    kv = torch.stack([k, v]).reshape(2, layout.clips, layout.frames * tokens, dim)
    kv = kv.index_select(2, index)  # [2, clips, F * 2N, D]
    kv = kv.reshape(2, batch, 2 * tokens, dim)
    return kv[0], kv[1]


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``[B, tokens, heads * d]`` tensors (PyTorch's SDPA)."""
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


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
