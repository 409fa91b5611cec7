"""The einops regroupings of frames and tokens give bit-identical outputs to the view/permute/reshape
chains they replaced. Each earlier implementation is written out here and run on the same seeded
inputs as the code's function, over several shapes, dtypes and layouts (open and looping clips,
several clips per batch, a channels-last input); the outputs must be ``torch.equal``."""
from __future__ import annotations

import host  # noqa: F401  (registers the pack as simda_pack)
import pytest
import torch
import torch.nn.functional as F

from simda_pack.simda_core.model.adapters import TemporalAdapter
from simda_pack.simda_core.model.group_norm import frame_shared_group_norm
from simda_pack.simda_core.model.latent_shift import (
    key_value_index, latent_shift_keys_values, scaled_dot_product_attention,
)
from simda_pack.simda_core.model.layout import ClipLayout

LAYOUTS = [
    ClipLayout.contiguous(1, 2),
    ClipLayout.contiguous(2, 3),
    ClipLayout.contiguous(1, 8, loop=True),
    ClipLayout.contiguous(4, 5, loop=True),
    ClipLayout(2, 4, (12, 14, 16, 18), 20),  # a strided window of a looping clip
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def seeded(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# -- the earlier implementations -------------------------------------------------------------------

def old_latent_shift_keys_values(k, v, layout: ClipLayout, h: int, w: int):
    batch, tokens, _ = k.shape
    index = key_value_index(layout, h, w, k.device)
    clip_tokens = layout.frames * tokens

    def gather(t):
        return t.reshape(layout.clips, clip_tokens, t.shape[-1]).index_select(1, index).reshape(batch, 2 * tokens, -1)

    return gather(k), gather(v)


def old_scaled_dot_product_attention(q, k, v, heads: int):
    b, _, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


def old_shared_statistics_norm(x, clips: int, groups: int, weight, bias, eps: float):
    channels = x.shape[1]
    per_group = channels // groups
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.reshape(clips, -1, groups, per_group * x[0, 0].numel())
    frame_mean = rows.mean(dim=-1, keepdim=True, dtype=accumulate)
    pivot = frame_mean.to(x.dtype)
    spread = torch.linalg.vector_norm(rows - pivot, 2, dim=-1, dtype=accumulate).to(torch.float64)
    frame_mean, pivot = frame_mean[..., 0].to(torch.float64), pivot[..., 0].to(torch.float64)
    frame_var = spread.square() / rows.shape[-1] - (frame_mean - pivot).square()
    mean = frame_mean.mean(dim=1)
    var = (frame_var.mean(dim=1) + (frame_mean - mean[:, None]).square().mean(dim=1)).clamp_(min=0)
    scale = torch.rsqrt(var + eps).to(accumulate)[:, None, :, None, None]
    mean = mean.to(accumulate)[:, None, :, None, None]
    per_channel = (1, 1, groups, per_group, 1)
    if weight is not None:
        scale = scale * weight.to(device=x.device, dtype=accumulate).reshape(per_channel)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(device=x.device, dtype=accumulate).reshape(per_channel)
    view = x.reshape(clips, -1, groups, per_group, x[0, 0].numel())
    return torch.addcmul(shift.to(x.dtype), view, scale.to(x.dtype)).reshape(x.shape)


def old_temporal_delta(adapter: TemporalAdapter, x, layout: ClipLayout):
    def like(p):
        return p.to(device=x.device, dtype=x.dtype)

    down_w, down_b = like(adapter.down.weight), like(adapter.down.bias)
    dw_w, dw_b = like(adapter.depthwise.weight), like(adapter.depthwise.bias)
    up_w, up_b = like(adapter.up.weight), like(adapter.up.bias)
    hidden = torch.matmul(down_w.flatten(1), x.flatten(2))
    hidden.add_(down_b[:, None])
    frames = hidden.unflatten(0, (layout.clips, layout.frames))
    before, now, after = (dw_w[:, 0, i, 0] for i in range(3))
    mixed = torch.addcmul(dw_b[:, None], frames, now)
    mixed[:, 1:].addcmul_(frames[:, :-1], before)
    mixed[:, :-1].addcmul_(frames[:, 1:], after)
    if layout.closes_loop:
        mixed[:, :1].addcmul_(frames[:, -1:], before)
        mixed[:, -1:].addcmul_(frames[:, :1], after)
    out = torch.matmul(up_w.flatten(1), mixed.flatten(0, 1))
    out.add_(up_b[:, None])
    return out.view(x.shape)


# -- the comparisons -------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("grid", [(4, 4), (5, 7), (8, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_latent_shift_keys_values(layout, grid, dtype):
    h, w = grid
    k = seeded(layout.batch, h * w, 40, seed=1, dtype=dtype)
    v = seeded(layout.batch, h * w, 40, seed=2, dtype=dtype)
    new, old = latent_shift_keys_values(k, v, layout, h, w), old_latent_shift_keys_values(k, v, layout, h, w)
    assert all(torch.equal(a, b) for a, b in zip(new, old))
    assert new[0].shape == (layout.batch, 2 * h * w, 40)


@pytest.mark.parametrize("shape", [(2, 16, 1, 64), (6, 35, 5, 40), (3, 24, 8, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_dot_product_attention(shape, dtype):
    batch, tokens, heads, d = shape
    q = seeded(batch, tokens, heads * d, seed=3, dtype=dtype)
    k = seeded(batch, 2 * tokens, heads * d, seed=4, dtype=dtype)
    v = seeded(batch, 2 * tokens, heads * d, seed=5, dtype=dtype)
    new = scaled_dot_product_attention(q, k, v, heads)
    assert torch.equal(new, old_scaled_dot_product_attention(q, k, v, heads))
    assert new.shape == (batch, tokens, heads * d)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("channels, groups, size", [(32, 8, (4, 4)), (64, 32, (5, 7)), (12, 3, (1, 9))])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_frame_shared_group_norm(layout, channels, groups, size, dtype, channels_last):
    x = seeded(layout.batch, channels, *size, seed=6, dtype=dtype) * 3 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(groups, channels)
    with torch.no_grad():
        norm.weight.copy_(seeded(channels, seed=7))
        norm.bias.copy_(seeded(channels, seed=8))
    new = frame_shared_group_norm(x, layout, norm)
    old = old_shared_statistics_norm(x, layout.clips, groups, norm.weight, norm.bias, norm.eps)
    assert torch.equal(new, old)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("channels, size", [(8, (4, 4)), (20, (3, 5)), (64, (2, 2))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_temporal_adapter(layout, channels, size, dtype):
    torch.manual_seed(9)
    adapter = TemporalAdapter(channels)
    with torch.no_grad():  # a trained adapter: the up-projection is no longer zero
        adapter.up.weight.copy_(seeded(*adapter.up.weight.shape, seed=10))
        adapter.up.bias.copy_(seeded(channels, seed=11))
    x = seeded(layout.batch, channels, *size, seed=12, dtype=dtype)
    with torch.no_grad():
        new, old = adapter.delta(x, layout), old_temporal_delta(adapter, x, layout)
    assert torch.equal(new, old)
    assert bool(new.abs().sum() > 0)
