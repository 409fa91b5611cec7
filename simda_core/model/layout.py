"""How a UNet batch splits into clips of frames.

ComfyUI hands the UNet one batch of shape ``(groups * F, C, H, W)``: ``groups`` cond/uncond
groups (``len(transformer_options["cond_or_uncond"])``), each holding the frames of one or
more clips. Every SimDA operation that looks across frames reads the split from a
:class:`ClipLayout`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    loop_length: int = 0
    """0: the clip has a first and a last frame. Otherwise the clip loops: time is taken modulo
    ``loop_length`` (the whole clip's frame count, also when this batch is one context window of
    it), so the first frame follows the last one."""

    frame_offsets: tuple[int, ...] = field(init=False, repr=False)
    """``positions`` relative to the first frame. Together with ``loop_length`` this is all that
    decides which frame looks at which: windows at different places of a clip share it."""
    closes_loop: bool = field(init=False, repr=False)
    """The clip loops and its frames go all the way round it: one step after the last frame is
    the first frame again (a whole looped clip, or an evenly strided window covering the loop)."""

    def __post_init__(self) -> None:
        if len(self.positions) != self.frames:
            raise ClipLayoutError(
                f"a clip of {self.frames} frames needs {self.frames} time positions, got {len(self.positions)}"
            )
        first = self.positions[0] if self.positions else 0
        offsets = tuple(int(p) - first for p in self.positions)
        if any(b <= a for a, b in zip(offsets, offsets[1:])):
            raise ClipLayoutError(f"frame positions must increase, got {self.positions}")
        if self.loop_length < 0:
            raise ClipLayoutError(f"the loop length must be 0 (no loop) or a frame count, got {self.loop_length}")
        if self.loop_length and offsets and offsets[-1] >= self.loop_length:
            raise ClipLayoutError(
                f"frames at positions {self.positions[0]}..{self.positions[-1]} do not fit in a loop of "
                f"{self.loop_length} frames: the loop length must be the whole clip's frame count"
            )
        steps = {b - a for a, b in zip(offsets, offsets[1:])}
        step = steps.pop() if len(steps) == 1 else (1 if not steps else 0)
        closes = bool(self.loop_length) and step > 0 and offsets[-1] + step == self.loop_length
        object.__setattr__(self, "frame_offsets", offsets)
        object.__setattr__(self, "closes_loop", closes)

    @property
    def batch(self) -> int:
        return self.clips * self.frames

    @property
    def is_video(self) -> bool:
        return self.frames > 1

    @classmethod
    def contiguous(cls, clips: int, frames: int, loop: bool = False) -> "ClipLayout":
        return cls(clips, frames, tuple(range(frames)), frames if loop else 0)

    @classmethod
    def from_batch(
        cls,
        batch: int,
        groups: int,
        frames_per_clip: int = 0,
        window_indices: Sequence[int] | None = None,
        loop: bool = False,
        loop_length: int = 0,
        total_frames: int = 0,
    ) -> "ClipLayout":
        """Split a UNet batch.

        ``frames_per_clip`` 0 means "each cond/uncond group is one clip". A context window
        (``window_indices``) is one clip per group whatever ``frames_per_clip`` says, and the time
        positions of its frames (:func:`unwrap_positions`) become the positions; a window that wraps
        around the clip needs the whole clip's frame count, ``total_frames``.

        ``loop``: the clip loops (its last frame leads into its first). Each clip of the batch
        loops on its own frames; a context window loops on the whole clip, whose length only the
        caller knows: pass it as ``loop_length`` (which also turns looping on by itself, and stands
        for ``total_frames``).
        """
        if groups < 1 or batch % groups != 0:
            raise ClipLayoutError(
                f"a UNet batch of {batch} latents does not split into {groups} cond/uncond groups"
            )
        per_group = batch // groups
        if window_indices is not None and len(window_indices) == per_group:
            if loop and not loop_length:
                raise ClipLayoutError(
                    "a looped context window needs the whole clip's frame count: pass loop_length"
                )
            positions = unwrap_positions(window_indices, loop_length or total_frames)
            return cls(groups, per_group, positions, loop_length)
        frames = frames_per_clip or per_group
        if per_group % frames != 0:
            raise ClipLayoutError(
                f"each cond/uncond group holds {per_group} latents, which is not a whole number of "
                f"{frames}-frame clips: set frames_per_clip to a divisor of {per_group}, or 0 for automatic"
            )
        return cls(batch // frames, frames, tuple(range(frames)), loop_length or (frames if loop else 0))


def unwrap_positions(indices: Sequence[int], total_frames: int = 0) -> tuple[int, ...]:
    """The time position of each frame a context window holds, in the order the window holds them:
    the first frame at its own index, each next one as many frames later as its index lies ahead of
    the previous one going round a clip of ``total_frames`` frames. A looped window ``[14, 15, 0, 1]``
    of 16 frames is at ``14, 15, 16, 17``; a strided one with the frame before it first (an anchor),
    ``[13, 14, 0, 2]``, at ``13, 14, 16, 18``. Without ``total_frames`` the indices must increase."""
    positions = [int(indices[0])] if len(indices) else []
    for previous, index in zip(indices, indices[1:]):
        step = int(index) - int(previous)
        if total_frames:
            step %= total_frames
        if step <= 0:
            whole = f"a clip of {total_frames} frames" if total_frames else "a clip whose frame count is unknown"
            raise ClipLayoutError(
                f"the context window's frames {list(map(int, indices))} do not go forward in time around {whole}"
            )
        positions.append(positions[-1] + step)
    return tuple(positions)
