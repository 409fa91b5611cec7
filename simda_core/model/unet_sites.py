"""Where SimDA attaches to an SD-style UNet (the host's ``openaimodel.UNetModel`` layout:
``input_blocks`` / ``middle_block`` / ``output_blocks`` of ResBlocks and SpatialTransformers).
Read from the module tree, never from hard-coded channel counts."""
from __future__ import annotations

from torch import nn

from .adapters import AdapterSite


def _is_transformer(module: nn.Module) -> bool:
    return hasattr(module, "transformer_blocks") and hasattr(module, "proj_in")


def _is_resblock(module: nn.Module) -> bool:
    return hasattr(module, "in_layers") and hasattr(module, "out_layers")


def _is_kind(module: nn.Module, name: str) -> bool:
    return any(type(child).__name__ == name for child in module.children()) or type(module).__name__ == name


def _stages(unet: nn.Module):
    """``(path, block)`` of every input, middle and output block, with its resolution level."""
    level = 0
    for index, block in enumerate(unet.input_blocks):
        if _is_kind(block, "Downsample"):
            level += 1
            continue
        yield f"input_blocks.{index}", block, level
    yield "middle_block", unet.middle_block, level
    for index, block in enumerate(unet.output_blocks):
        yield f"output_blocks.{index}", block, level
        if _is_kind(block, "Upsample"):
            level -= 1


def find_adapter_sites(unet: nn.Module) -> list[AdapterSite]:
    """Every SpatialTransformer in the UNet, in execution order."""
    sites = []
    for path, block, level in _stages(unet):
        for child_name, child in block.named_children():
            if not _is_transformer(child):
                continue
            blocks = list(child.transformer_blocks)
            sites.append(
                AdapterSite(
                    path=f"{path}.{child_name}",
                    channels=child.in_channels,
                    inner_dim=blocks[0].norm1.normalized_shape[0],
                    depth=len(blocks),
                    level=level,
                    self_attention=tuple(not b.disable_self_attn for b in blocks),
                )
            )
    return sites


def find_resblocks(unet: nn.Module) -> list[str]:
    """Paths of every ResBlock in the UNet's input, middle and output blocks."""
    return [
        f"{path}.{child_name}"
        for path, block, _ in _stages(unet)
        for child_name, child in block.named_children()
        if _is_resblock(child)
    ]


def find_resblock_norms(unet: nn.Module) -> list[str]:
    """Paths of the GroupNorms that the authors' 3-D UNet normalises per clip: both norms of
    every ResBlock and the final output norm."""
    paths = [f"{resblock}.{norm}" for resblock in find_resblocks(unet) for norm in ("in_layers.0", "out_layers.0")]
    paths.append("out.0")
    return paths


def level_channels(sites: list[AdapterSite]) -> list[int]:
    """Channels of the transformers at each resolution level (finest first)."""
    by_level: dict[int, int] = {}
    for site in sites:
        by_level.setdefault(site.level, site.channels)
    return [by_level[level] for level in sorted(by_level)]
