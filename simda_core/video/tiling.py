"""How a long, large clip is cut into pieces that fit the card, and put back together.

The Video Upscaler samples one piece at a time: a *frame group* (consecutive frames, sampled as
one clip so latent shift, temporal adapters and frame GroupNorm see them together) times a
*spatial tile* (a window of the latent). Pieces overlap:

- in time, a group starts with ``context`` frames the previous group already finished; they are
  handed to the sampler as known latents (mask 0), so the new frames are sampled next to the
  finished ones and attend to them, and the finished frames are never rewritten;
- a looped clip (its last frame leads into its first) that needs several groups is laid out as an
  open clip whose last group carries the clip's first ``context`` frames, finished by the first
  group, after its own last frame, as known latents in the order time runs round the loop
  (``..., F-2, F-1, 0, 1``). Each group is a straight piece of the loop and is sampled as one (no
  group wraps onto its own first frames), and the clip's end is sampled next to its start. Latent
  shift reads only earlier frames, so across the seam the first frames read nothing of the end
  (they were finished first, as the first group's first frames are in an open clip); the parts
  that look both ways in time (the temporal adapter, frame-shared GroupNorm) see the end meet the
  start. A looped clip that fits in one group is one looped call;
- in space, a tile's bands shared with tiles finished before it (above, left) are known latents
  that fade into the new tile along a cosine ramp; the sampler keeps re-imposing them at every
  step (the host's denoise mask), so the new tile grows out of its neighbours instead of being
  averaged with them afterwards.

One piece that covers the whole clip has no known part (mask ``None``): it is exactly the
untiled sampling call. Everything here is plain PyTorch on shapes; units are latent pixels
(for the x4 upscaler these are the input frame's pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch


# -- frame groups --------------------------------------------------------------------------------

@dataclass(frozen=True)
class FrameGroup:
    """Frames ``start .. stop-1`` of the clip, sampled together, followed (in a looped clip's last
    group) by the clip's frames ``0 .. closing-1``."""

    start: int
    stop: int
    context: int
    """Leading frames that an earlier group already finished: known latents, kept as they are."""
    closing: int = 0
    """The clip's first frames, finished by the first group, that follow this group's last frame as
    known latents: the last group of a looped clip, whose end leads into its start."""

    @property
    def indices(self) -> list[int]:
        """The clip's frames this group samples, in the order of the sampling call."""
        return list(range(self.start, self.stop)) + list(range(self.closing))

    @property
    def frames(self) -> int:
        return self.stop - self.start + self.closing


def frame_groups(frames: int, group_size: int, context: int, loop: bool = False) -> list[FrameGroup]:
    """Cover ``frames`` frames with groups of at most ``group_size``; each group after the first
    repeats the last ``context`` frames of the one before as its known context.

    Every frame is new in exactly one group; the last group may be shorter. With ``loop`` and more
    than one group, the last group also carries the clip's first frames as known frames after its
    end (``closing``: as many as ``context``, fewer where the group has no room for them); the module
    docstring says why."""
    if frames < 1 or group_size < 1:
        raise ValueError(f"need at least one frame and a group size of at least 1 (got {frames}, {group_size})")
    if not 0 <= context < group_size:
        raise ValueError(f"context frames ({context}) must be fewer than the frames per group ({group_size})")
    groups = [FrameGroup(0, min(group_size, frames), 0)]
    while groups[-1].stop < frames:
        start = groups[-1].stop - context
        groups.append(FrameGroup(start, min(start + group_size, frames), context))
    if loop and len(groups) > 1:
        groups[-1:] = closing_groups(groups[-1], frames, group_size, context)
    return groups


def closing_groups(last: FrameGroup, frames: int, group_size: int, context: int) -> list[FrameGroup]:
    """An open layout's last group as a looped clip's end: with the clip's first frames after it,
    or, where it is too full to take them, cut in two so the second part has room for them."""
    closing = min(context, group_size - context - 1)  # the last group keeps at least one new frame
    if last.frames + closing <= group_size:
        return [replace(last, closing=closing)]
    new_in_final = group_size - context - closing
    cut = FrameGroup(last.start, frames - new_in_final, last.context)
    return [cut, FrameGroup(cut.stop - context, frames, context, closing)]


def piece_conditioning(conditioning: list, indices: list[int], frames: int) -> list:
    """A CONDITIONING (``[context, options]`` entries) for the frames ``indices`` of a ``frames``-frame
    clip: per-frame rows (``frames`` rows of text context or pooled output; see
    ``clip_agreement.conditioning_rows``) cut to those frames, in that order; one row as it is."""
    if frames == 1:
        return conditioning
    index = torch.tensor(indices)

    def rows(tensor):
        if isinstance(tensor, torch.Tensor) and tensor.ndim >= 2 and tensor.shape[0] == frames:
            return tensor.index_select(0, index.to(tensor.device))
        return tensor

    pieces = []
    for context, options in conditioning:
        options = dict(options)
        if "pooled_output" in options:
            options["pooled_output"] = rows(options["pooled_output"])
        pieces.append([rows(context), options])
    return pieces


# -- spatial tiles -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tile:
    """A window ``[top, top + height) x [left, left + width)`` of the latent, with the bands it
    shares with the tiles finished before it (raster order: the row above, the tile to the left)."""

    top: int
    left: int
    height: int
    width: int
    known_top: int = 0
    """Rows at the top shared with the tile above (0 in the first row)."""
    known_left: int = 0
    """Columns at the left shared with the tile to the left (0 in the first column)."""

    @property
    def rows(self) -> slice:
        return slice(self.top, self.top + self.height)

    @property
    def cols(self) -> slice:
        return slice(self.left, self.left + self.width)

    @property
    def has_known_part(self) -> bool:
        return self.known_top > 0 or self.known_left > 0


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spaced starts of windows of ``tile`` covering ``[0, length)``, neighbours sharing at
    least ``overlap``. One window when it covers the whole length."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"the tile overlap ({overlap}) must be smaller than the tile ({tile})")
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def spatial_tiles(height: int, width: int, tile_height: int, tile_width: int, overlap: int) -> list[Tile]:
    """Tiles covering a ``height x width`` latent in raster order (rows top to bottom)."""
    tile_height, tile_width = min(tile_height, height), min(tile_width, width)
    tops = tile_starts(height, tile_height, overlap)
    lefts = tile_starts(width, tile_width, overlap)
    tiles = []
    for row, top in enumerate(tops):
        known_top = tops[row - 1] + tile_height - top if row else 0
        for col, left in enumerate(lefts):
            known_left = lefts[col - 1] + tile_width - left if col else 0
            tiles.append(Tile(top, left, tile_height, tile_width, known_top, known_left))
    return tiles


# -- blend weights ------------------------------------------------------------------------------

def cosine_ramp(length: int) -> torch.Tensor:
    """``[length]`` weights rising from near 0 to near 1 along a half cosine (sampled at pixel
    centres, so strictly inside (0, 1) and flat at both ends: no kink where the ramp meets
    the known side or the free side)."""
    position = (torch.arange(length, dtype=torch.float32) + 0.5) / length
    return 0.5 - 0.5 * torch.cos(math.pi * position)


def tile_new_weight(tile: Tile) -> torch.Tensor:
    """``[height, width]``: how much of each position the new tile decides (1 where no finished
    neighbour reaches, the cosine ramp across the bands it shares with finished tiles)."""
    rows = torch.ones(tile.height)
    cols = torch.ones(tile.width)
    if tile.known_top:
        rows[: tile.known_top] = cosine_ramp(tile.known_top)
    if tile.known_left:
        cols[: tile.known_left] = cosine_ramp(tile.known_left)
    return rows[:, None] * cols[None, :]


def piece_mask(tile: Tile, group: FrameGroup) -> torch.Tensor | None:
    """The sampler's denoise mask for one (group, tile) piece, ``[group frames, 1, height, width]``:
    0 on the group's context and closing frames (finished), the tile's new-weight on its new
    frames. ``None`` when the piece has no known part: sampling it is the plain, unmasked call."""
    if group.context == 0 and group.closing == 0 and not tile.has_known_part:
        return None
    mask = torch.zeros(group.frames, 1, tile.height, tile.width)
    mask[group.context:group.stop - group.start] = tile_new_weight(tile)
    return mask


def blend_piece_(
    canvas: torch.Tensor, piece: torch.Tensor, mask: torch.Tensor | None, group: FrameGroup, tile: Tile
) -> None:
    """Write a sampled piece ``[group frames, C, height, width]`` into ``canvas`` ``[F, C, H, W]``
    in place: ``canvas + mask * (piece - canvas)``, so known positions (mask 0) stay exactly as
    they were and new ones take the piece. The closing frames (known everywhere) are not written."""
    own = group.stop - group.start
    region = canvas[group.start:group.stop, :, tile.rows, tile.cols]
    if mask is None:
        region.copy_(piece[:own].to(region))
    else:
        region.lerp_(piece[:own].to(region), mask[:own].to(region))


# -- sizes from memory ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PieceSizes:
    frames_per_group: int
    tile_height: int
    tile_width: int

    def pieces(self, frames: int, height: int, width: int, context: int, overlap: int, loop: bool = False) -> int:
        groups = len(frame_groups(frames, self.frames_per_group, min(context, self.frames_per_group - 1), loop))
        return groups * len(spatial_tiles(height, width, self.tile_height, self.tile_width, overlap))


def choose_sizes(
    frames: int,
    height: int,
    width: int,
    budget_bytes: float,
    bytes_per_pixel: float,
    min_group: int,
    min_tile: int,
    align: int = 8,
) -> PieceSizes:
    """The largest pieces whose sampling memory (``bytes_per_pixel`` per latent pixel of one frame
    in one UNet call, cond and uncond counted by the caller) stays within ``budget_bytes``.

    Whole frames are kept while at least ``min_group`` frames (or the whole clip) fit, since
    groups cost only their context frames; below that the group stays at ``min_group`` frames and
    square tiles shrink (to multiples of ``align``, at least ``min_tile``)."""
    frame_bytes = bytes_per_pixel * height * width
    fit = int(budget_bytes // frame_bytes) if frame_bytes > 0 else frames
    if fit >= min(frames, min_group):
        return PieceSizes(max(1, min(frames, fit)), height, width)
    group = min(frames, min_group)
    side = math.sqrt(max(budget_bytes, 0.0) / (bytes_per_pixel * group))
    side = max(min_tile, int(side) // align * align)
    return PieceSizes(group, min(side, height), min(side, width))
