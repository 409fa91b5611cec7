"""Frame-shared GroupNorm (SIMDA_SPEC.md section 4): the statistics of each channel group are
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

GroupNormLike = torch.nn.GroupNorm | Callable[[torch.Tensor], torch.Tensor]


NormParameters = Callable[[torch.nn.GroupNorm, torch.Tensor], tuple]
"""``(weight, bias)`` of a GroupNorm layer for input ``x``, as the host computes with them
(cast, offloaded weights fetched, weight patches such as LoRA applied)."""


def frame_shared_group_norm(
    x: torch.Tensor, layout: ClipLayout, group_norm: GroupNormLike, parameters: NormParameters | None = None
) -> torch.Tensor:
    """GroupNorm of ``x`` ``[clips * F, C, H, W]`` with statistics shared by the F frames of each clip.

    ``group_norm`` is either a ``torch.nn.GroupNorm`` (the host's GroupNorm layers are ones): its
    ``num_groups``, ``eps``, ``weight`` and ``bias`` are used directly, cast to ``x``'s device as
    needed, and its ``forward`` is never looked up on the instance (so an object patch of that
    ``forward`` may call this). Or any callable GroupNorm that accepts ``[N, C, *]``: it is
    applied to a ``[clips, C, F, H, W]`` rearrangement (with the copies that takes).
    ``parameters`` gives a layer's affine weights for this call as the host computes with them;
    without it, a host layer that carries weight patches (``weight_function``/``bias_function``) is
    run through its own class ``forward`` the same way, so the patches apply."""
    if isinstance(group_norm, torch.nn.GroupNorm):
        module = group_norm
        if not layout.is_video:
            return type(module).forward(module, x)
        if parameters is not None:
            weight, bias = parameters(module, x)
            return _shared_statistics_norm(x, layout.clips, module.num_groups, weight, bias, module.eps)
        if not _has_weight_patches(module):
            return _shared_statistics_norm(x, layout.clips, module.num_groups, module.weight, module.bias, module.eps)
        group_norm = lambda t: type(module).forward(module, t)  # noqa: E731
    if not layout.is_video:
        return group_norm(x)
    clip = rearrange(x, "(b f) c h w -> b c f h w", f=layout.frames)
    return rearrange(group_norm(clip), "b c f h w -> (b f) c h w")


def _has_weight_patches(module: torch.nn.Module) -> bool:
    return bool(getattr(module, "weight_function", None)) or bool(getattr(module, "bias_function", None))


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
    rows = x.reshape(clips, -1, groups, per_group * x[0, 0].numel())  # [b, f, g, c/g * hw]
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
    view = x.reshape(clips, -1, groups, per_group, x[0, 0].numel())  # [b, f, g, c/g, hw]
    return torch.addcmul(shift.to(x.dtype), view, scale.to(x.dtype)).reshape(x.shape)
