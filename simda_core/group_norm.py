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


def frame_shared_group_norm(x: torch.Tensor, layout: ClipLayout, group_norm: GroupNormLike) -> torch.Tensor:
    """GroupNorm of ``x`` ``[clips * F, C, H, W]`` with statistics shared by the F frames of each clip.

    ``group_norm`` is either a ``torch.nn.GroupNorm`` (the host's GroupNorm layers are ones): its
    ``num_groups``, ``eps``, ``weight`` and ``bias`` are used directly, cast to ``x``'s device as
    needed, and its ``forward`` is never looked up on the instance (so an object patch of that
    ``forward`` may call this). Or any callable GroupNorm that accepts ``[N, C, *]``: it is
    applied to a ``[clips, C, F, H, W]`` rearrangement (with the copies that takes).
    A host layer that carries weight patches (``weight_function``/``bias_function``) is run
    through its own class ``forward`` the same way, so the patches apply."""
    if isinstance(group_norm, torch.nn.GroupNorm):
        module = group_norm
        if _has_weight_patches(module):
            group_norm = lambda t: type(module).forward(module, t)  # noqa: E731
        elif not layout.is_video:
            return type(module).forward(module, x)
        else:
            return _shared_statistics_norm(x, layout.clips, module.num_groups, module.weight, module.bias, module.eps)
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
    computed in float32 (as torch's own GroupNorm does for half inputs), output in ``x``'s dtype."""
    channels = x.shape[1]
    if channels % groups != 0:
        raise ValueError(f"GroupNorm of {groups} groups cannot split {channels} channels")
    view = x.reshape(clips, -1, groups, channels // groups, x[0, 0].numel())  # [b, f, g, c/g, hw]
    dims = (1, 3, 4)
    if x.dtype in (torch.float32, torch.float64):
        var, mean = torch.var_mean(view, dim=dims, correction=0, keepdim=True)
    else:  # float32 accumulation without a float32 copy of x
        count = view[:, :, 0].numel() // clips
        mean = view.mean(dim=dims, keepdim=True, dtype=torch.float32)
        square = torch.linalg.vector_norm(view, 2, dim=dims, keepdim=True, dtype=torch.float32).square_() / count
        var = (square - mean.square()).clamp_(min=0)
    scale = torch.rsqrt(var + eps)  # [b, 1, g, 1, 1]
    stat_dtype = scale.dtype
    per_channel = (1, 1, groups, channels // groups, 1)
    if weight is not None:
        scale = scale * weight.to(device=x.device, dtype=stat_dtype).reshape(per_channel)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(device=x.device, dtype=stat_dtype).reshape(per_channel)
    out = torch.addcmul(shift.to(x.dtype), view, scale.to(x.dtype))
    return out.reshape(x.shape)
