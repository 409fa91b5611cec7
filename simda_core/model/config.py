"""What SimDA adds to one MODEL: a frozen description the nodes derive from each other (an Adapter
Loader followed by a Latent-Shift Patch yields both), kept on the MODEL as an attachment."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from .adapters import SimDAAdapters


@dataclass(frozen=True)
class LatentShiftSettings:
    levels: frozenset[int] | None = None
    """Resolution levels (0 = the latent's own size) that get latent shift; None = all."""
    start_percent: float = 0.0
    """Latent shift is active from this part of the sampling schedule (0 = the first step) ..."""
    end_percent: float = 1.0
    """... to this one (1 = the last step). Percents become sigmas of the schedule the MODEL samples
    with when a sampling run starts (:meth:`sigma_range`), so a ModelSampling node anywhere in the
    MODEL's chain moves the range with the schedule."""

    @property
    def whole_schedule(self) -> bool:
        """Active at every sigma: the call needs not read the current sigma at all."""
        return self.start_percent <= 0.0 and self.end_percent >= 1.0

    def sigma_range(self, percent_to_sigma: Callable[[float], float]) -> tuple[float, float]:
        """``(sigma_start, sigma_end)``: latent shift is active while the current sigma lies in
        ``[sigma_end, sigma_start]``. ``percent_to_sigma`` is the schedule's own conversion (the
        host's ``model_sampling.percent_to_sigma``)."""
        start = math.inf if self.start_percent <= 0.0 else float(percent_to_sigma(self.start_percent))
        end = 0.0 if self.end_percent >= 1.0 else float(percent_to_sigma(self.end_percent))
        return start, end


@dataclass(frozen=True)
class SimDAConfig:
    adapters: SimDAAdapters | None = None
    adapter_name: str = ""
    family: str = ""
    strength: float = 1.0
    """Scale of every adapter's output; 0 turns the adapters (and the frame GroupNorm they bring) off."""
    latent_shift: LatentShiftSettings | None = None
    frame_group_norm: bool = False
    frames_per_clip: int = 0
    loop: bool = False
    """The clip is a loop: latent shift and the temporal adapter wrap from the last frame to the first."""
    gradient_checkpointing: bool = False
    """Recompute each ResBlock and transformer in the backward pass (training only): every
    adapter inside them still gets its gradient."""
    object_patch_keys: tuple[str, ...] = field(default=())

    @property
    def active_adapters(self) -> SimDAAdapters | None:
        """The adapters that contribute to the output (none at strength 0)."""
        return self.adapters if self.adapters is not None and self.strength > 0 else None

    @property
    def uses_frame_group_norm(self) -> bool:
        """Adapters were trained with frame-shared statistics: on whenever they contribute."""
        return self.frame_group_norm or self.active_adapters is not None
