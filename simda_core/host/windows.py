"""The host's context windows over the frames of a clip (the batch dimension), as every sampler path
serves them to a SimDA MODEL: KSampler, SamplerCustomAdvanced and the Video Sampler all go through
the run's ``OUTER_SAMPLE`` wrapper (``host.sampling_run``), which puts what is here on the run's own
copy of the model options, never on the MODEL or the handler other clones share.

- **Each window's conditioning rows.** Per-frame conditioning (Prompt Travel) has one row per frame
  of the clip. ComfyUI 0.33 cuts model conds to the window's frames itself; 0.3.75 does not at the
  batch dimension. :func:`window_rows` cuts what the host left whole, so it does nothing where the
  host already did.
- **Each window's ControlNet hints.** The host computes a ControlNet's hint once per shape and keeps
  it on the ControlNet (``cond_hint``), so every window of the same size would read the first
  window's hint frames. :func:`window_hints` gives the hint models of a window's call that window's
  frames for the call (``window.get_tensor``, the frame before the window included where 0.33 adds
  one), keeps what each computes per window for the rest of the run, and puts the originals back.
- **The step of a window.** ComfyUI 0.3.75's handler finds the current step by comparing the whole
  timestep tensor with the schedule, which over the batch dimension holds one entry per frame and
  only lines up when the clip has one frame more than the schedule has steps. Where the host's
  ``set_step`` fails that way (tried on a copy, :func:`steps_by_frame`), the run gets a copy of the
  handler whose ``set_step`` reads the first frame's timestep (all frames share one sigma).
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch

from ..video.clip_agreement import conditioning_controls
from ..video.frame_windows import host_window_indices

WINDOW_STATE = ("cond_hint", "control_input")
"""What a hint model computes from its hint images and keeps between calls (ControlNet: the resized
hint; T2I adapter: also its features)."""


def window_of(model_options: dict):
    """The host context window of this call when it splits the frames of the batch, else None."""
    window = model_options.get("transformer_options", {}).get("context_window")
    if getattr(window, "index_list", None) is None or getattr(window, "dim", 0) != 0:
        return None
    return window


def window_rows(conds: list, window, total_frames: int) -> list:
    """``conds`` (the host's list of conditionings, each a list of cond dicts) with every model cond
    that still holds one row per frame of the whole clip cut to the window's frames."""
    cut = []
    for conditioning in conds:
        if conditioning is None:
            cut.append(None)
            continue
        entries = []
        for entry in conditioning:
            model_conds = entry.get("model_conds") if isinstance(entry, dict) else None
            if isinstance(model_conds, dict):
                whole = {
                    key: value for key, value in model_conds.items()
                    if isinstance(getattr(value, "cond", None), torch.Tensor) and value.cond.ndim >= 1
                    and value.cond.shape[0] == total_frames
                }
                if whole:
                    windowed = {
                        key: value._copy_with(window.get_tensor(value.cond, dim=0)) for key, value in whole.items()
                    }
                    entry = dict(entry, model_conds=dict(model_conds, **windowed))
            entries.append(entry)
        cut.append(entries)
    return cut


@contextlib.contextmanager
def window_hints(conds: list, window, frames: tuple[int, ...], total_frames: int, kept: dict):
    """For one window's call (``frames``: the frames it holds, ``host_window_indices``): each hint model
    with one hint image per frame of the clip holds the window's images, and what it computed for this
    window before (``kept``, one run's store); after the call its originals are back and what it
    computed is kept."""
    swapped = []
    for conditioning in conds:
        for control in conditioning_controls(conditioning):
            hint = getattr(control, "cond_hint_original", None)
            if not isinstance(hint, torch.Tensor) or hint.shape[0] != total_frames or hint.shape[0] == 1:
                continue
            if any(c is control for c, _ in swapped):
                continue
            state = {name: getattr(control, name) for name in WINDOW_STATE if hasattr(control, name)}
            swapped.append((control, state))
            control.cond_hint_original = window.get_tensor(hint, dim=0)
            for name, value in kept.get((id(control), frames), dict.fromkeys(state)).items():
                setattr(control, name, value)
            state["cond_hint_original"] = hint
    try:
        yield
    finally:
        for control, state in swapped:
            kept[(id(control), frames)] = {name: getattr(control, name) for name in WINDOW_STATE if name in state}
            for name, value in state.items():
                setattr(control, name, None if name in WINDOW_STATE else value)


def windows_wrapper(run_of):
    """``CALC_COND_BATCH`` wrapper of a sampling run: a host context window's call gets its own
    frames' conditioning rows and hints. ``run_of(model_options)`` gives the run (its clip length and
    its store of per-window hints), or None outside one."""

    def wrapper(executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
        window = window_of(model_options)
        run = run_of(model_options)
        frames = tuple(host_window_indices(window)) if window is not None else ()
        if run is None or not frames or len(frames) >= run.total_frames:
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)
        conds = window_rows(conds, window, run.total_frames)
        with window_hints(conds, window, frames, run.total_frames, run.window_hints):
            return executor(model, conds, x_in, timestep, model_options, *args, **kwargs)

    return wrapper


# -- the step of a window (ComfyUI 0.3.75) ------------------------------------------------------------

@functools.cache
def steps_by_frame(handler_class) -> bool:
    """Whether the host handler's ``set_step`` fails on a timestep with one entry per frame of a
    batch-dimension window (ComfyUI 0.3.75 compares the whole tensor with the schedule). Tried once
    per handler class on a bare instance, which nothing else sees."""
    probe = handler_class.__new__(handler_class)
    probe._step = 0
    schedule = {"transformer_options": {"sample_sigmas": torch.tensor([3.0, 2.0, 1.0, 0.0])}}
    try:
        handler_class.set_step(probe, torch.full([6], 2.0), schedule)
    except Exception:  # noqa: BLE001 - whatever the host raises for it, that is the failure probed for
        return True
    return False


def _set_step_by_first_frame(host_set_step, timestep, *args, **kwargs):
    return host_set_step(timestep[:1], *args, **kwargs)


def run_handler(handler):
    """The context handler a sampling run uses: the MODEL's own where its step lookup serves a
    batch-dimension window, else a copy (callbacks copied too) whose ``set_step`` reads the first
    frame's timestep."""
    if handler is None or getattr(handler, "dim", None) != 0 or not hasattr(handler, "set_step"):
        return handler
    if not steps_by_frame(type(handler)):
        return handler
    fixed = copy.copy(handler)
    fixed.callbacks = {kind: {key: list(fns) for key, fns in by_key.items()}
                       for kind, by_key in getattr(handler, "callbacks", {}).items()}
    fixed.set_step = functools.partial(_set_step_by_first_frame, type(handler).set_step.__get__(fixed))
    return fixed
