"""Keyframes (image-to-video): latents fixed at chosen frames of a clip while the rest is generated.

A keyframed clip is a LATENT whose ``samples`` hold the fixed frames' latents at their frames (zeros
elsewhere) and whose ``noise_mask`` is 0 at fixed frames and 1 at generated ones. The host's sampler
keeps every masked-out latent on its noised original at each step (its denoise mask), so the model
sees the fixed frames at every step, and latent shift carries their appearance into the frames after
them. After sampling the fixed frames are written back exactly (``paste_fixed``).
"""
from __future__ import annotations

import re

import torch


class KeyframeError(ValueError):
    """The keyframe settings cannot be met; the message says what to change."""


def parse_frame_list(text: str, frames: int) -> list[int]:
    """Frame indices from ``"0"``, ``"0, 15"``, ``"0, -1"`` (negative counts from the end), in the
    order written; each frame once."""
    if frames < 1:
        raise KeyframeError(f"the clip has {frames} frames; it needs at least 1")
    parts = [p.strip() for p in re.split(r"[,\s]+", text.strip()) if p.strip()]
    if not parts:
        raise KeyframeError('no keyframe frames are given; write e.g. "0" (first frame) or "0, -1" (first and last)')
    indices: list[int] = []
    for part in parts:
        if not re.fullmatch(r"-?\d+", part):
            raise KeyframeError(
                f'"{part}" is not a frame number; write frame numbers separated by commas, e.g. "0, 8, -1"'
            )
        index = int(part)
        resolved = index + frames if index < 0 else index
        if not 0 <= resolved < frames:
            raise KeyframeError(f"frame {index} lies outside the clip's frames 0..{frames - 1}")
        if resolved in indices:
            raise KeyframeError(f"frame {resolved} is given twice; give each keyframe once")
        indices.append(resolved)
    return indices


def keyframed_clip(frames: int, keyframes: torch.Tensor, at: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(samples [F, C, h, w], noise_mask [F, 1, h, w])`` for ``keyframes`` ``[K, C, h, w]`` placed at
    frames ``at`` (K entries)."""
    if keyframes.shape[0] != len(at):
        raise KeyframeError(
            f"{keyframes.shape[0]} keyframe images or latents are "
            f"given for {len(at)} keyframe frames; give one per frame"
        )
    _, channels, height, width = keyframes.shape
    samples = torch.zeros(frames, channels, height, width, dtype=keyframes.dtype, device=keyframes.device)
    mask = torch.ones(frames, 1, height, width, dtype=torch.float32, device=keyframes.device)
    samples[at] = keyframes
    mask[at] = 0.0
    return samples, mask


def paste_fixed(samples: torch.Tensor, given: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``samples`` with every latent whose (host-shaped, ``[F, C, h, w]``) mask is 0 replaced by the
    given one: the sampler only keeps them approximately (noised and denoised each step)."""
    keep = mask.to(samples.device) == 0
    return torch.where(keep, given.to(samples), samples)
