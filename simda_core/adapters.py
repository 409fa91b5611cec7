"""SimDA's trainable parts (SIMDA_SPEC.md sections 1 and 2): spatial adapters inside every
transformer block and a depth-wise temporal adapter before every transformer.

Modules take an ``operations`` namespace (``Linear``, ``Conv3d``) like the host's layers do, so
the host can hand in its casting layers; plain ``torch.nn`` is the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from einops import rearrange
from torch import nn

from .layout import ClipLayout

TORCH_OPS = SimpleNamespace(Linear=nn.Linear, Conv3d=nn.Conv3d)

SPATIAL_RATIO = 0.25
"""Spatial adapter bottleneck: ``D -> D/4 -> D``."""
TEMPORAL_RATIO = 0.5
"""Temporal adapter bottleneck: ``C -> C/2 -> C``."""


class SpatialAdapter(nn.Module):
    """``fc2(GELU(fc1(x)))`` with ``fc2`` zero-initialised: a no-op until trained."""

    def __init__(self, dim: int, ratio: float = SPATIAL_RATIO, operations=TORCH_OPS, dtype=None, device=None):
        super().__init__()
        hidden = int(dim * ratio)
        self.fc1 = operations.Linear(dim, hidden, dtype=dtype, device=device)
        self.act = nn.GELU()
        self.fc2 = operations.Linear(hidden, dim, dtype=dtype, device=device)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TemporalAdapter(nn.Module):
    """``x + up(dw(down(x)))`` over the frames of each clip: 1x1x1 down-projection, depth-wise
    (3, 1, 1) convolution in time with zero padding, 1x1x1 zero-initialised up-projection."""

    def __init__(self, channels: int, ratio: float = TEMPORAL_RATIO, operations=TORCH_OPS, dtype=None, device=None):
        super().__init__()
        hidden = int(channels * ratio)
        self.down = operations.Conv3d(channels, hidden, kernel_size=1, dtype=dtype, device=device)
        self.depthwise = operations.Conv3d(
            hidden, hidden, kernel_size=(3, 1, 1), padding=(1, 0, 0), groups=hidden, dtype=dtype, device=device
        )
        self.up = operations.Conv3d(hidden, channels, kernel_size=1, dtype=dtype, device=device)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, x: torch.Tensor, layout: ClipLayout) -> torch.Tensor:
        """The adapter's contribution for ``x`` ``[clips * F, C, H, W]`` (without the skip)."""
        clip = rearrange(x, "(b f) c h w -> b c f h w", f=layout.frames)
        out = self.up(self.depthwise(self.down(clip)))
        return rearrange(out, "b c f h w -> (b f) c h w")

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
        operations=TORCH_OPS,
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
                site.channels, temporal_ratio, operations, dtype, device
            )
            for index in range(site.depth):
                key = _module_key(site.block_path(index))
                self.attn[key] = SpatialAdapter(site.inner_dim, spatial_ratio, operations, dtype, device)
                self.ffn[key] = SpatialAdapter(site.inner_dim, spatial_ratio, operations, dtype, device)

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
