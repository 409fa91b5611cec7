"""DDIM inversion of a clip (the starting noise for editing, docs/METHOD.md §8); which of the
host's samplers may start from it is decided in ``host/samplers.py``, which also runs it as a host sampler.

Tune-A-Video and SimDA invert in the VP parametrisation ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``:
each step asks the UNet for the noise of the CURRENT latent (at level ``t``) while telling it the
NEXT timestep ``t'``, then moves the clean estimate to the next level::

    eps = unet(x_t, t')
    x0  = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_t' = sqrt(a_t') x0 + sqrt(1 - a_t') eps

The host samples in ``x = x_vp / sqrt(a)``, ``sigma = sqrt((1 - a) / a)``, and its model scales its
input itself (``calculate_input``: ``x / sqrt(1 + sigma^2)`` for SD's eps and v models). To hand the
UNet the current latent unchanged at the next level, the latent is rescaled by
``scale(sigma) / scale(sigma')`` before the call. The update then reads
``x0 = x - sigma eps``, ``x' = x0 + sigma' eps``. Both start from sigma 0 (the clean latents);
Tune-A-Video starts from the alpha-bar of timestep 0 (0.99915 on the SD schedule), which moves the
inverted latent by under 1% of its spread (tests/test_inversion.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from ..model.config import LatentShiftSettings, SimDAConfig

DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``denoised = fn(x, sigma)``: the model's clean-latent estimate at noise level ``sigma``."""

StepReport = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``report(index, x, sigma, clean)``: after step ``index`` the latent ``x`` lies at ``sigma``;
``clean`` is the clean-latent estimate the step moved."""

INVERSION_KEY = "simda_inversion"
"""LATENT entry that marks DDIM-inverted noise: ``{"steps", "scheduler", "sampler", "simda"}`` it was
made with (:func:`inversion_record`)."""

INVERSION_SAMPLER = "ddim"
"""The host sampler whose step the inversion walks backwards (the record's ``sampler``)."""


def adapters_fingerprint(adapters: torch.nn.Module) -> str:
    """sha256 of the adapters' weights (names, dtypes, shapes, bytes): the same adapters loaded or
    tuned twice have the same fingerprint, other weights another."""
    digest = hashlib.sha256()
    for name, tensor in sorted(adapters.state_dict().items()):
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class SimDAState:
    """What of a MODEL's SimDA patch shapes its UNet's output, as an inversion record keeps it. A
    sampler walks an inversion back only through the same function: the same state."""

    latent_shift: LatentShiftSettings | None = None
    adapters: str | None = None
    """Fingerprint of the adapters that contribute (:func:`adapters_fingerprint`); None: none do."""
    strength: float | None = None
    """Their strength (None without adapters)."""
    frame_group_norm: bool = False
    loop: bool = False
    frames_per_clip: int = 0

    def differences(self, other: SimDAState) -> list[tuple[str, str]]:
        """``(this, other)`` in words, for each part that differs."""
        return [
            (_in_words(field.name, getattr(self, field.name)), _in_words(field.name, getattr(other, field.name)))
            for field in dataclasses.fields(self)
            if getattr(self, field.name) != getattr(other, field.name)
        ]


def _in_words(part: str, value) -> str:
    if part == "latent_shift":
        if value is None:
            return "no latent shift"
        settings = ", ".join(f"{f.name} {getattr(value, f.name)}" for f in dataclasses.fields(value))
        return f"latent shift ({settings})"
    if part == "adapters":
        return f"adapters {value[:12]}" if value else "no adapters"
    if part == "strength":
        return f"adapter strength {value:g}" if value is not None else "no adapter strength"
    if part == "frames_per_clip":
        return f"frames_per_clip {value}"
    return f"{part.replace('_', ' ')} {'on' if value else 'off'}"


def simda_state(config: SimDAConfig | None) -> SimDAState:
    """The :class:`SimDAState` of a MODEL with ``config`` (None: a MODEL without SimDA)."""
    if config is None:
        return SimDAState()
    adapters = config.active_adapters
    return SimDAState(
        latent_shift=config.latent_shift,
        adapters=adapters_fingerprint(adapters) if adapters is not None else None,
        strength=float(config.strength) if adapters is not None else None,
        frame_group_norm=config.uses_frame_group_norm,
        loop=config.loop,
        frames_per_clip=config.frames_per_clip,
    )


def inversion_record(steps: int, scheduler: str, state: SimDAState) -> dict:
    """What a sampler needs to walk an inversion back (the LATENT's ``simda_inversion`` entry): the
    same ``steps`` and ``scheduler``, the sampler whose step was inverted, and the SimDA ``state`` of
    the MODEL that inverted."""
    return {"steps": int(steps), "scheduler": str(scheduler), "sampler": INVERSION_SAMPLER, "simda": state}


def vp_input_scale(sigma: torch.Tensor) -> torch.Tensor:
    """The input scaling of SD's eps and v models: ``1 / sqrt(1 + sigma^2)`` (= sqrt(alpha-bar))."""
    return (1 + sigma**2).rsqrt()


def ddim_invert(
    denoise: DenoiseFn,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    callback: StepReport | None = None,
    input_scale: Callable[[torch.Tensor], torch.Tensor] = vp_input_scale,
) -> torch.Tensor:
    """``x0`` -> the latent at ``sigmas.max()``, in the host's parametrisation. ``sigmas``: the
    sampling schedule, either order, its trailing 0 included or not. ``input_scale(sigma)``: the
    factor the model applies to its input at ``sigma`` (the host's ``calculate_input`` of ones)."""
    levels = torch.sort(sigmas[sigmas > 0]).values
    x = x0
    previous = torch.zeros((), dtype=levels.dtype, device=levels.device)
    for index, sigma in enumerate(levels):
        x_in = x * (input_scale(previous) / input_scale(sigma))  # the UNet sees x as it is, told sigma
        eps = (x_in - denoise(x_in, sigma)) / sigma
        clean = x - previous * eps
        x = clean + sigma * eps
        previous = sigma
        if callback is not None:
            callback(index, x, sigma, clean)
    return x


