"""Frame-shared GroupNorm (SIMDA_SPEC.md section 4): the statistics of each channel group are
taken over all frames of a clip, as the authors' ResnetBlock3D does on ``[b, C, F, H, W]``."""
from __future__ import annotations

from typing import Callable

import torch
from einops import rearrange

from .layout import ClipLayout


def frame_shared_group_norm(
    x: torch.Tensor, layout: ClipLayout, group_norm: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply ``group_norm`` (any GroupNorm that accepts ``[N, C, *]``) to ``x``
    ``[clips * F, C, H, W]`` with statistics shared by the F frames of each clip."""
    if not layout.is_video:
        return group_norm(x)
    clip = rearrange(x, "(b f) c h w -> b c f h w", f=layout.frames)
    return rearrange(group_norm(clip), "b c f h w -> (b f) c h w")
