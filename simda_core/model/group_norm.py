"""Frame-shared GroupNorm (docs/METHOD.md §5): the statistics of each channel group are
taken over all frames of a clip, as the authors' ResnetBlock3D does on ``[b, C, F, H, W]``.

The batch stays in the host's frame-major layout ``[clips * F, C, H, W]``: viewed as
``[clips, F, groups, C / groups, H * W]``, a group's statistics are a reduction over the frame
axis and its own channels and pixels, and the normalisation with the affine weights is one
``x * scale + shift`` with per-clip, per-channel ``scale`` and ``shift``. No permuted copy of the
activations is made.
"""
from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange

from .layout import ClipLayout

NormParameters = Callable[[torch.nn.GroupNorm, torch.Tensor], tuple]
"""``(weight, bias)`` of a GroupNorm layer for input ``x``, as the host computes with them
(cast, offloaded weights fetched, weight patches such as LoRA applied)."""


def frame_shared_group_norm(
    x: torch.Tensor, layout: ClipLayout, norm: torch.nn.GroupNorm, parameters: NormParameters | None = None
) -> torch.Tensor:
    """GroupNorm of ``x`` ``[clips * F, C, H, W]`` with statistics shared by the F frames of each clip.

    ``norm``'s ``num_groups`` and ``eps`` are used directly, its ``forward`` is never looked up on
    the instance (so an object patch of that ``forward`` may call this), and its affine weights come
    from ``parameters`` (the host's for this call) or else are the layer's own, cast to ``x``'s
    device as needed. A batch that is not a video (one frame per clip) is the layer's own GroupNorm."""
    if not layout.is_video:
        return type(norm).forward(norm, x)
    weight, bias = parameters(norm, x) if parameters is not None else (norm.weight, norm.bias)
    return _shared_statistics_norm(x, layout.clips, norm.num_groups, weight, bias, norm.eps)


def _shared_statistics_norm(
    x: torch.Tensor,
    clips: int,
    groups: int,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``x`` ``[clips * F, C, *spatial]``: each clip's group statistics over (F, C/groups, spatial),
    accumulated in float32 at least (as torch's own GroupNorm does for half inputs), output in
    ``x``'s dtype. One temporary of ``x``'s size (the centred rows) besides the output."""
    channels = x.shape[1]
    if channels % groups != 0:
        raise ValueError(f"GroupNorm of {groups} groups cannot split {channels} channels")
    per_group = channels // groups
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = rearrange(x, "(b f) (g c) ... -> b f g (c ...)", b=clips, g=groups)
    # Each frame's group statistics from contiguous rows, in two passes (mean, then the mean
    # square around it: no cancellation whatever the mean), accumulated in float32 at least;
    # then the frames' statistics combined into the clip's (small tensors, float64).
    frame_mean = rows.mean(dim=-1, keepdim=True, dtype=accumulate)  # [b, f, g, 1]
    pivot = frame_mean.to(x.dtype)  # what is subtracted (the mean, rounded for half inputs)
    wide = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    spread = torch.linalg.vector_norm(rows - pivot, 2, dim=-1, dtype=accumulate).to(wide)
    frame_mean, pivot = frame_mean[..., 0].to(wide), pivot[..., 0].to(wide)
    frame_var = spread.square() / rows.shape[-1] - (frame_mean - pivot).square()  # [b, f, g]
    mean = frame_mean.mean(dim=1)  # [b, g]
    var = (frame_var.mean(dim=1) + (frame_mean - mean[:, None]).square().mean(dim=1)).clamp_(min=0)
    scale = torch.rsqrt(var + eps).to(accumulate)[:, None, :, None, None]  # [b, 1, g, 1, 1]
    mean = mean.to(accumulate)[:, None, :, None, None]
    per_channel = (1, 1, groups, per_group, 1)
    if weight is not None:
        scale = scale * weight.to(device=x.device, dtype=accumulate).reshape(per_channel)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(device=x.device, dtype=accumulate).reshape(per_channel)
    view = rearrange(x, "(b f) (g c) ... -> b f g c (...)", b=clips, g=groups)
    return torch.addcmul(shift.to(x.dtype), view, scale.to(x.dtype)).reshape(x.shape)
