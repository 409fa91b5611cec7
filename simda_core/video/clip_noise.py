"""Seeded noise for a clip: each frame's noise depends on the seed and the frame's index only."""
from __future__ import annotations

import torch


def clip_noise(shape: tuple[int, ...], seed: int, shared: float) -> torch.Tensor:
    """Noise for the F frames of a clip, reproducible per frame: frame i's noise depends on the
    seed and i only (a longer clip keeps the frames of a shorter one). ``shared`` mixes in one
    noise map common to all frames, keeping unit variance (0 = independent, 1 = identical)."""
    frames, *frame_shape = shape
    generator = torch.Generator(device="cpu").manual_seed(seed)
    common = torch.randn(frame_shape, generator=generator)
    own = torch.stack([torch.randn(frame_shape, generator=generator) for _ in range(frames)])
    if shared <= 0:
        return own
    return (1.0 - shared) ** 0.5 * own + shared**0.5 * common
