"""The state of one UNet call that SimDA's hook functions read (see :class:`SimDARuntime`)."""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .config import SimDAConfig
from .layout import ClipLayout


class SimDARuntime:
    """What SimDA's hook functions read during one UNet call: the config's adapters and strength,
    the clip layout of the batch, and whether latent shift is active at this step.

    Owner: one registration (``host.register.apply_simda``) makes one runtime for the MODEL clone it
    patches. The clone's wrappers and attention patches hold it, and so do the host's later clones of
    that MODEL, which copy those options and carry the same config. The object patches, which stay on
    the shared UNet's modules until the host next unpatches them, reach it only by weak reference
    (:data:`RuntimeRef`) and act as the plain module once it is gone, so the adapters are freed with
    the last MODEL that holds them.

    Lifetime of the per-call fields: ``layout`` and ``shift_active`` are set only inside
    :meth:`using`, which the ``DIFFUSION_MODEL`` wrapper enters for one UNet call (and a checkpointed
    block re-enters for its recomputation in backward); outside a call they are ``None`` and ``False``.

    ``fallback_shift_sigmas`` is the latent-shift range resolved against the schedule of the MODEL
    the registration was made on: what a UNet call outside a sampling run (training) uses. A sampling
    run resolves the range again when it starts, from the schedule it samples with, and keeps it
    with the run (``host.sampling_run``), never here.
    """

    def __init__(self, config: SimDAConfig, fallback_shift_sigmas: tuple[float, float] = (math.inf, 0.0)):
        self.config = config
        self.adapters = config.active_adapters
        self.strength = config.strength
        self.fallback_shift_sigmas = fallback_shift_sigmas
        self.layout: ClipLayout | None = None
        self.shift_active = False

    def video_layout(self) -> ClipLayout | None:
        """The layout when the call holds clips of more than one frame (what latent shift and
        frame-shared GroupNorm need; over one frame both are the plain operation)."""
        layout = self.layout
        return layout if layout is not None and layout.is_video else None

    @contextlib.contextmanager
    def using(self, layout: ClipLayout | None, shift_active: bool):
        """Set one call's state (and restore the previous one after it, e.g. while a checkpointed
        block is recomputed in backward)."""
        saved = (self.layout, self.shift_active)
        self.layout, self.shift_active = layout, shift_active
        try:
            yield
        finally:
            self.layout, self.shift_active = saved

    def checkpointed(self, fn: Callable, *args):
        """``fn(*args)``, recomputed in the backward pass under the same call state when
        gradient checkpointing is on and gradients are being recorded."""
        if not (self.config.gradient_checkpointing and torch.is_grad_enabled()):
            return fn(*args)
        state = (self.layout, self.shift_active)
        # The host keeps writing "block" and "block_index" into the live transformer_options as it
        # walks the UNet: the recomputation in backward must see this call's values.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)

        def run(*inner):
            with self.using(*state):
                return fn(*inner)

        return checkpoint(run, *args, use_reentrant=False)


RuntimeRef = Callable[[], "SimDARuntime | None"]
"""A weak reference to a :class:`SimDARuntime`, as object patches hold it."""
