"""One sampling run of a SimDA MODEL, from its ``OUTER_SAMPLE`` wrapper: whichever host sampler runs
it (KSampler, SamplerCustomAdvanced, the Video Sampler, AnimateDiff-Evolved), this runs when sampling
starts, before the host loads anything.

- It checks that the run's parts agree on the clip (conditioning rows, ControlNet hint frames,
  ``frames_per_clip``: ``video.clip_agreement``) and that no other node sits in latent shift's
  self-attention slots (``host.attention_slots``): one sentence, or nothing.
- It resolves what depends on the schedule the run samples with: latent shift's start and end
  percents become sigmas of the MODEL's own ``model_sampling`` (so a ModelSampling node anywhere in
  the chain moves the range with the schedule).
- It keeps what a run needs in a :class:`SamplingRun` on the run's own copy of the model options
  (the host's guider copies them for each run), with the context-window parts of ``host.windows``:
  nothing goes on the MODEL, its runtime, or the context handler that other clones share.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..video.clip_agreement import clip_mismatch
from .attention_slots import resident_conflict
from .windows import run_handler, windows_wrapper

RUN_KEY = "simda_run"
"""Where a run's :class:`SamplingRun` sits in the run's ``transformer_options``."""
WRAPPER_KEY = "simda"


class SamplingRunError(RuntimeError):
    """The parts of a sampling run disagree; the message says how, in one sentence."""


@dataclass
class SamplingRun:
    total_frames: int
    """The clip's frame count (the latent's batch): the whole clip a context window is part of."""
    shift_sigmas: tuple[float, float] = (math.inf, 0.0)
    """Latent shift is active while the sigma lies in ``[end, start]`` (the whole schedule: inf, 0)."""
    window_hints: dict = field(default_factory=dict)
    """What each hint model computed for each context window, kept for the rest of the run."""


def run_of(model_options: dict) -> SamplingRun | None:
    return model_options.get("transformer_options", {}).get(RUN_KEY)


def start_run(guider, frames: int, runtime=None, shift_keys=()) -> SamplingRun:
    """Check the run and put its :class:`SamplingRun`, the per-window wrapper and the run's context
    handler on the guider's copy of the model options. ``runtime`` None: a MODEL without SimDA that
    only needs its context windows served (the Video Sampler's plain MODEL)."""
    options = guider.model_options
    transformer_options = options.setdefault("transformer_options", {})
    run = SamplingRun(total_frames=frames)
    if runtime is not None:
        config = runtime.config
        problem = clip_mismatch(getattr(guider, "conds", None) or {}, frames, config.frames_per_clip)
        if config.latent_shift is not None:
            problem = problem or resident_conflict(transformer_options, list(shift_keys))
        if problem:
            raise SamplingRunError(f"SimDA: {problem}.")
        if config.latent_shift is not None:
            sampling = guider.model_patcher.get_model_object("model_sampling")
            run.shift_sigmas = config.latent_shift.sigma_range(sampling.percent_to_sigma)
    transformer_options[RUN_KEY] = run
    _add_windows_wrapper(transformer_options)
    if "context_handler" in options:
        options["context_handler"] = run_handler(options["context_handler"])
    return run


def _add_windows_wrapper(transformer_options: dict) -> None:
    """The per-window wrapper, where the host has the ``CALC_COND_BATCH`` wrapper point (both tested
    hosts do; without it a window's call gets what the host gives it)."""
    import comfy.patcher_extension

    kind = getattr(comfy.patcher_extension.WrappersMP, "CALC_COND_BATCH", None)
    if kind is not None:
        comfy.patcher_extension.add_wrapper_with_key(kind, WRAPPER_KEY, windows_wrapper(run_of), transformer_options)


def sampling_wrapper(runtime=None, shift_keys=()):
    """The ``OUTER_SAMPLE`` wrapper: :func:`start_run` on the guider this run samples with."""

    def wrapper(executor, noise, latent_image, *args, **kwargs):
        guider = executor.class_obj
        start_run(guider, int(latent_image.shape[0]), runtime, shift_keys)
        return executor(noise, latent_image, *args, **kwargs)

    return wrapper
