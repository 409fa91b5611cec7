"""How a UNet batch splits into clips of frames.

ComfyUI hands the UNet one batch of shape ``(groups * F, C, H, W)``: ``groups`` cond/uncond
groups (``len(transformer_options["cond_or_uncond"])``), each holding the frames of one or
more clips. Every SimDA operation that looks across frames reads the split from a
:class:`ClipLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


class ClipLayoutError(ValueError):
    """The batch cannot be split into clips the way the settings ask."""


@dataclass(frozen=True)
class ClipLayout:
    clips: int
    """Clips in the batch (cond/uncond groups times clips per group)."""
    frames: int
    """Frames per clip."""
    positions: tuple[int, ...]
    """Time position of each frame of a clip, increasing. ``0..F-1`` for a whole clip; the
    real frame indices of a context window (unwrapped when a looped window wraps around)."""

    @property
    def batch(self) -> int:
        return self.clips * self.frames

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    @classmethod
    def contiguous(cls, clips: int, frames: int) -> "ClipLayout":
        return cls(clips, frames, tuple(range(frames)))

    @classmethod
    def from_batch(
        cls,
        batch: int,
        groups: int,
        frames_per_clip: int = 0,
        window_indices: Sequence[int] | None = None,
    ) -> "ClipLayout":
        """Split a UNet batch.

        ``frames_per_clip`` 0 means "each cond/uncond group is one clip". A context window
        (``window_indices``) is one clip per group whatever ``frames_per_clip`` says, and its
        real frame indices become the positions.
        """
        if groups < 1 or batch % groups != 0:
            raise ClipLayoutError(
                f"a UNet batch of {batch} latents does not split into {groups} cond/uncond groups"
            )
        per_group = batch // groups
        if window_indices is not None and len(window_indices) == per_group:
            return cls(groups, per_group, unwrap_positions(window_indices))
        frames = frames_per_clip or per_group
        if per_group % frames != 0:
            raise ClipLayoutError(
                f"each cond/uncond group holds {per_group} latents, which is not a whole number of "
                f"{frames}-frame clips: set frames_per_clip to a divisor of {per_group}, or 0 for automatic"
            )
        return cls.contiguous(batch // frames, frames)


def unwrap_positions(indices: Sequence[int]) -> tuple[int, ...]:
    """Make window frame indices increasing: a looped window ``[14, 15, 0, 1]`` continues as
    ``[14, 15, 16, 17]``, a strided one ``[12, 14, 0, 2]`` as ``[12, 14, 16, 18]`` (the host's
    looped windows step evenly through time, wrapping around the clip's length)."""
    steps = [int(b) - int(a) for a, b in zip(indices, indices[1:]) if b > a]
    step = steps[0] if steps else 1
    positions: list[int] = []
    offset = 0
    for index in indices:
        position = int(index) + offset
        if positions and position <= positions[-1]:
            offset += positions[-1] + step - position
            position = positions[-1] + step
        positions.append(position)
    return tuple(positions)
