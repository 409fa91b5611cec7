"""The state of one UNet call that SimDA's patches read: the clip layout of the batch and whether
latent shift is active at this step. Set by the per-call wrapper, cleared after the call."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint

from .config import SimDAConfig
from .layout import ClipLayout


class SimDARuntime:
    def __init__(self, config: SimDAConfig):
        self.config = config
        self.adapters = config.active_adapters
        self.strength = config.strength
        self.layout: ClipLayout | None = None
        self.shift_active = False

    def video_layout(self) -> ClipLayout | None:
        """The layout when the call holds clips of more than one frame (what latent shift and
        frame-shared GroupNorm need; over one frame both are the plain operation)."""
        layout = self.layout
        return layout if layout is not None and layout.is_video else None

    @contextlib.contextmanager
    def using(self, layout: ClipLayout | None, shift_active: bool):
        """Restore a call's state, e.g. while a checkpointed block is recomputed in backward."""
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
        layout, shift_active = self.layout, self.shift_active
        # The host keeps writing "block" and "block_index" into the live transformer_options as it
        # walks the UNet: the recomputation in backward must see this call's values.
        args = tuple(dict(a) if isinstance(a, dict) else a for a in args)

        def run(*inner):
            with self.using(layout, shift_active):
                return fn(*inner)

        return checkpoint(run, *args, use_reentrant=False)


RuntimeRef = Callable[[], "SimDARuntime | None"]
"""Object patches stay installed on the host's modules until the host next unpatches them, which
can be after the MODEL clone that owns them is gone. They reach the clone's runtime (and through
it the adapters) by weak reference only and act as the plain module once it is gone, so the host's
memory management sees the adapters freed with their clone."""
