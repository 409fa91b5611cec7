"""What the SimDA nodes share: the family check, registering SimDA on a clone with the error a user sees, the inversion
record carried by LATENTs, and per-frame seeded clip noise."""
from __future__ import annotations

import torch

from ..simda_core.config import SimDAConfig
from ..simda_core.formats import FAMILIES
from ..simda_core.host_patch import SimDAPatchError, apply_simda
from ..simda_core.model_info import model_family

INVERSION_KEY = "simda_inversion"
"""LATENT entry that marks DDIM-inverted noise: ``{"steps", "scheduler", "sampler"}`` it was made with."""


def check_family(model, wanted: str, what: str) -> str:
    """The MODEL's family, or a clear error when it is not the family ``what`` was made for."""
    family = model_family(model)
    if family not in FAMILIES:
        raise ValueError(
            f"{what} needs an SD1.x, SD2.x or SDXL model (or the SD x4 upscaler); the connected MODEL is {family}. "
            "Connect a Load Checkpoint with an SD1.5, SD2.x or SDXL base checkpoint."
        )
    if wanted and family != wanted:
        raise ValueError(
            f"{what} was made for {FAMILIES[wanted]}, but the connected MODEL is {FAMILIES[family]}; "
            "load adapters trained for this model, or connect the matching checkpoint."
        )
    return family


def simda_clone(model, config: SimDAConfig):
    """A clone of ``model`` with ``config`` registered; ``model`` itself is never changed. A patch
    that cannot coexist with SimDA is reported as the node's error, before any work."""
    patched = model.clone()
    try:
        apply_simda(patched, config)
    except SimDAPatchError as e:
        raise ValueError(str(e)) from None
    return patched


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
