"""SimDA's trainable parts (docs/METHOD.md §2 and §3): spatial adapters inside every
transformer block and a depth-wise temporal adapter before every transformer.

Every layer here is a plain ``torch.nn`` layer (never one of the host's ``comfy.ops`` classes), so
no host setting can create them without weights or skip their initialisation. The layers cast
their weights to the input's device and dtype when those differ: the host may keep the adapters
in another dtype or on the offload device (low-VRAM loading, fp8 base weights with a manual-cast
compute dtype, autocast during training).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .layout import ClipLayout

SPATIAL_RATIO = 0.25
"""Spatial adapter bottleneck: ``D -> D/4 -> D``."""
TEMPORAL_RATIO = 0.5
"""Temporal adapter bottleneck: ``C -> C/2 -> C``."""


def _like(param: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if param is None or (param.device == x.device and param.dtype == x.dtype):
        return param
    return param.to(device=x.device, dtype=x.dtype)


class AdapterLinear(nn.Linear):
    """``nn.Linear`` that follows its input's device and dtype (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _like(self.weight, x), _like(self.bias, x))


class AdapterConv3d(nn.Conv3d):
    """``nn.Conv3d`` that follows its input's device and dtype (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _like(self.weight, x), _like(self.bias, x))


class SpatialAdapter(nn.Module):
    """``fc2(GELU(fc1(x)))``: ``fc1`` with PyTorch's default initialisation and ``fc2`` zero, as the
    authors' ``simda/models/attention.py`` has it: a no-op until trained."""

    def __init__(self, dim: int, ratio: float = SPATIAL_RATIO, dtype=None, device=None):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = AdapterLinear(dim, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.fc2 = AdapterLinear(hidden, dim, dtype=dtype, device=device)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TemporalAdapter(nn.Module):
    """``x + up(dw(down(x)))`` over the frames of each clip: 1x1x1 down-projection, depth-wise
    (3, 1, 1) convolution in time with zero padding, 1x1x1 up-projection.

    Initialised as the authors' ``Temp_Adapter`` (``simda/models/unet_blocks.py``): kaiming-normal
    weights on the down and depth-wise convolutions, PyTorch's default biases, the up-projection
    zero (weights and bias)."""

    def __init__(self, channels: int, ratio: float = TEMPORAL_RATIO, dtype=None, device=None):
        super().__init__()
        hidden = int(channels * ratio)
        self.down = AdapterConv3d(channels, hidden, kernel_size=1, dtype=dtype, device=device)
        self.depthwise = AdapterConv3d(
            hidden, hidden, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=hidden, dtype=dtype, device=device
        )
        self.up = AdapterConv3d(hidden, channels, kernel_size=1, dtype=dtype, device=device)
        nn.init.kaiming_normal_(self.down.weight)
        nn.init.kaiming_normal_(self.depthwise.weight)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor, layout: ClipLayout) -> torch.Tensor:
        """The adapter's contribution for ``x`` ``[clips * F, C, H, W]`` (without the skip).

        Computed in the host's frame-major layout, with no permuted copies: the 1x1x1 convolutions
        are per-pixel linear maps (one matrix product over each frame's pixels), and the depth-wise
        (3, 1, 1) convolution in time is three per-channel multiply-adds of neighbouring frames.
        Time is padded with zeros, or circularly when the layout's frames close a loop."""
        down_w, down_b = _like(self.down.weight, x), _like(self.down.bias, x)
        dw_w, dw_b = _like(self.depthwise.weight, x), _like(self.depthwise.bias, x)
        up_w, up_b = _like(self.up.weight, x), _like(self.up.bias, x)
        pixels = rearrange(x, "bf c h w -> bf c (h w)")
        hidden = torch.matmul(down_w.flatten(1), pixels)  # [(b f), C/2, H * W]
        if down_b is not None:
            hidden.add_(down_b[:, None])
        frames = rearrange(hidden, "(b f) c n -> b f c n", b=layout.clips, f=layout.frames)  # a view
        before, now, after = (dw_w[:, 0, i, 0] for i in range(3))  # [C/2, 1] taps for t-1, t, t+1
        mixed = torch.addcmul(dw_b[:, None], frames, now) if dw_b is not None else frames * now
        mixed[:, 1:].addcmul_(frames[:, :-1], before)
        mixed[:, :-1].addcmul_(frames[:, 1:], after)
        if layout.closes_loop:
            mixed[:, :1].addcmul_(frames[:, -1:], before)
            mixed[:, -1:].addcmul_(frames[:, :1], after)
        out = torch.matmul(up_w.flatten(1), rearrange(mixed, "b f c n -> (b f) c n"))  # [(b f), C, H * W]
        if up_b is not None:
            out.add_(up_b[:, None])
        return rearrange(out, "bf c (h w) -> bf c h w", h=x.shape[2])

    def forward(self, x: torch.Tensor, layout: ClipLayout) -> torch.Tensor:
        return x + self.delta(x, layout)


@dataclass(frozen=True)
class AdapterSite:
    """One transformer of the UNet that SimDA adapts."""

    path: str
    """Module path of the transformer in the host's UNet, e.g. ``input_blocks.1.1``."""
    channels: int
    """Channels entering the transformer (the temporal adapter's width)."""
    inner_dim: int
    """Width of its transformer blocks (the spatial adapters' width)."""
    depth: int
    """Transformer blocks in it."""
    level: int
    """Resolution level: 0 at the latent's own size, +1 per downsampling."""
    self_attention: tuple[bool, ...] = field(default=())
    """Per transformer block: whether attn1 is real self-attention (False where it attends to
    text, as in the x4 upscaler's ``disable_self_attn`` blocks)."""

    def block_path(self, index: int) -> str:
        return f"{self.path}.transformer_blocks.{index}"


def _module_key(path: str) -> str:
    return path.replace(".", "_")


class SimDAAdapters(nn.Module):
    """All adapters of one UNet, addressed by the host's module paths."""

    def __init__(
        self,
        sites: list[AdapterSite],
        spatial_ratio: float = SPATIAL_RATIO,
        temporal_ratio: float = TEMPORAL_RATIO,
        dtype=None,
        device=None,
    ):
        super().__init__()
        self.sites = list(sites)
        self.spatial_ratio = spatial_ratio
        self.temporal_ratio = temporal_ratio
        self.attn = nn.ModuleDict()
        self.ffn = nn.ModuleDict()
        self.temporal = nn.ModuleDict()
        for site in self.sites:
            self.temporal[_module_key(site.path)] = TemporalAdapter(
                site.channels, temporal_ratio, dtype, device
            )
            for index in range(site.depth):
                key = _module_key(site.block_path(index))
                self.attn[key] = SpatialAdapter(site.inner_dim, spatial_ratio, dtype, device)
                self.ffn[key] = SpatialAdapter(site.inner_dim, spatial_ratio, dtype, device)

    def temporal_adapter(self, site_path: str) -> TemporalAdapter:
        return self.temporal[_module_key(site_path)]

    def attention_adapter(self, block_path: str) -> SpatialAdapter:
        return self.attn[_module_key(block_path)]

    def ffn_adapter(self, block_path: str) -> SpatialAdapter:
        return self.ffn[_module_key(block_path)]

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # File keys use the host's module paths with dots: "<block path>.attn_adapter.fc1.weight",
    # "<block path>.ffn_adapter.fc2.bias", "<site path>.temporal_adapter.down.weight".
    def file_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for site in self.sites:
            for name, tensor in self.temporal_adapter(site.path).state_dict().items():
                out[f"{site.path}.temporal_adapter.{name}"] = tensor
            for index in range(site.depth):
                block = site.block_path(index)
                for name, tensor in self.attention_adapter(block).state_dict().items():
                    out[f"{block}.attn_adapter.{name}"] = tensor
                for name, tensor in self.ffn_adapter(block).state_dict().items():
                    out[f"{block}.ffn_adapter.{name}"] = tensor
        return out

    def file_keys_to_module_keys(self) -> dict[str, str]:
        mapping = {}
        for site in self.sites:
            for name in self.temporal_adapter(site.path).state_dict():
                mapping[f"{site.path}.temporal_adapter.{name}"] = f"temporal.{_module_key(site.path)}.{name}"
            for index in range(site.depth):
                block = site.block_path(index)
                for name in self.attention_adapter(block).state_dict():
                    mapping[f"{block}.attn_adapter.{name}"] = f"attn.{_module_key(block)}.{name}"
                    mapping[f"{block}.ffn_adapter.{name}"] = f"ffn.{_module_key(block)}.{name}"
        return mapping

    def load_file_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load tensors keyed as in :meth:`file_state_dict`; every key must be present."""
        mapping = self.file_keys_to_module_keys()
        missing = sorted(set(mapping) - set(tensors))
        unexpected = sorted(set(tensors) - set(mapping))
        if missing or unexpected:
            raise KeyError(
                f"adapter tensors do not fit this UNet: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        self.load_state_dict({mapping[k]: v for k, v in tensors.items()})
