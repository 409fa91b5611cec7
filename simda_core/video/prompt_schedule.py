"""Prompt travel: keyframed prompts -> one cross-attention context per frame.

A schedule is a list of ``(frame, prompt)`` keyframes. Frame ``i`` between keyframes ``a`` (frame
``f_a``) and ``b`` (frame ``f_b``) gets ``(1 - w) * c_a + w * c_b`` with ``w = (i - f_a) / (f_b - f_a)``;
frames before the first keyframe hold the first prompt, frames after the last hold the last.

The result is ordinary ComfyUI CONDITIONING whose tensors have one row per frame
(``[F, tokens, dim]``, pooled ``[F, dim]``): the host repeats a one-row context over a batch and
keeps an F-row one as it is, so frame ``i`` of the clip meets row ``i``. Context windows slice the
rows to their frames (``frame_windows.window_conds`` for the host's windows; AnimateDiff-Evolved
slices them itself).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


class PromptScheduleError(ValueError):
    """The schedule text cannot be read; the message names the line and what to write instead."""


@dataclass(frozen=True)
class Keyframe:
    frame: int
    prompt: str


_LINE = re.compile(r"^\s*(-?\d+)\s*:\s*(.*?)\s*$")


def parse_schedule(text: str, frames: int) -> list[Keyframe]:
    """Keyframes from lines ``<frame>: <prompt>`` (blank lines and ``#`` comments skipped), in frame
    order. A negative frame counts from the end (``-1`` is the last frame). The prompt may carry
    the host's emphasis weights, e.g. ``(tiger:1.3)``."""
    if frames < 1:
        raise PromptScheduleError(f"the clip has {frames} frames; prompt travel needs at least 1")
    keyframes: dict[int, Keyframe] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise PromptScheduleError(
                f'line {number} ("{line.strip()[:60]}") is not "<frame>: <prompt>"; write e.g. "0: a cat walking"'
            )
        frame, prompt = int(match.group(1)), match.group(2).strip().strip('"').strip()
        resolved = frame + frames if frame < 0 else frame
        if not 0 <= resolved < frames:
            raise PromptScheduleError(
                f"line {number} sets a prompt at frame {frame}, but the clip has frames 0..{frames - 1}"
            )
        if resolved in keyframes:
            raise PromptScheduleError(f"line {number} sets frame {resolved} a second time; give each frame one prompt")
        keyframes[resolved] = Keyframe(resolved, prompt)
    if not keyframes:
        raise PromptScheduleError('the schedule holds no keyframes; write one per line, e.g. "0: a cat walking"')
    return [keyframes[f] for f in sorted(keyframes)]


def frame_weights(keyframe_frames: list[int], frames: int) -> torch.Tensor:
    """``[frames, keyframes]`` interpolation weights (each row sums to 1): linear between the two
    keyframes around a frame, held before the first and after the last."""
    weights = torch.zeros(frames, len(keyframe_frames), dtype=torch.float64)
    for i in range(frames):
        if i <= keyframe_frames[0]:
            weights[i, 0] = 1.0
            continue
        if i >= keyframe_frames[-1]:
            weights[i, -1] = 1.0
            continue
        b = next(k for k, f in enumerate(keyframe_frames) if f >= i)
        a = b - 1
        w = (i - keyframe_frames[a]) / (keyframe_frames[b] - keyframe_frames[a])
        weights[i, a] = 1.0 - w
        weights[i, b] = w
    return weights


def common_token_length(lengths: list[int]) -> int:
    """Token count all keyframe contexts are repeated to (the host pads contexts of different
    lengths the same way when it batches them: repeating keys and values leaves attention as it is)."""
    return math.lcm(*lengths)


def repeat_tokens(context: torch.Tensor, tokens: int) -> torch.Tensor:
    """``[1, t, d] -> [1, tokens, d]`` by repetition (``tokens`` a multiple of ``t``)."""
    return context.repeat(1, tokens // context.shape[1], 1)


def interpolate(keyframe_contexts: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``[frames, ...]``: each frame's weighted sum of the keyframes' ``[1, ...]`` tensors."""
    stacked = torch.cat(keyframe_contexts, dim=0)  # [k, ...]
    w = weights.to(dtype=torch.float32, device=stacked.device)
    mixed = torch.einsum("fk,k...->f...", w, stacked.float())
    return mixed.to(stacked.dtype)
