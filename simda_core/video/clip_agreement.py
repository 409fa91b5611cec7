"""Checks that the parts of one sampling run agree on the clip: per-frame conditioning rows,
ControlNet hint frames and ``frames_per_clip`` against the clip's frame count. Each returns one
sentence naming both values, or None; the nodes raise it before any work, and the SimDA MODEL's
sampling wrapper raises it for the host's samplers (KSampler, AnimateDiff-Evolved).

The host repeats a conditioning's rows up to the batch (``repeat_to_batch_size``): a schedule of 4
rows on a 6-frame clip would silently give frames 4-5 the rows of frames 0-1, and a longer one
would be cut off. So a conditioning may hold 1 row, one row per frame of the clip, or one row per
frame of each ``frames_per_clip`` clip; nothing else. A ControlNet's hint images are rows of the clip
the same way (the host tiles or cuts them to the batch, ``broadcast_image_to``): 1 image for every
frame, or one per frame.
"""
from __future__ import annotations

import torch


def conditioning_rows(conditioning) -> list[int]:
    """Rows of each entry's text context (and pooled text, where it has one) that differ from 1:
    entries as nodes pass them (``[tensor, options]``) or as the host's guider holds them
    (dicts with ``cross_attn``)."""
    rows = []
    for entry in conditioning or []:
        if isinstance(entry, dict):
            tensors = (entry.get("cross_attn"), entry.get("pooled_output"))
        else:
            tensors = (entry[0], entry[1].get("pooled_output") if len(entry) > 1 else None)
        rows += [int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.ndim >= 2 and t.shape[0] != 1]
    return rows


def conditioning_mismatch(conditionings: dict[str, list], frames: int, frames_per_clip: int = 0) -> str | None:
    """The first conditioning (by name: positive, negative, ...) whose rows fit neither one row nor
    one per frame of the ``frames``-frame clip (or of each ``frames_per_clip`` clip)."""
    allowed = {frames} | ({frames_per_clip} if frames_per_clip else set())
    for name, conditioning in conditionings.items():
        for rows in conditioning_rows(conditioning):
            if rows not in allowed:
                per_clip = f" (or {frames_per_clip} per clip)" if frames_per_clip and frames_per_clip != frames else ""
                return (
                    f"the {name} conditioning holds {rows} rows, one per frame of a {rows}-frame prompt schedule, but "
                    f"the clip has {frames} frames{per_clip}; set SimDA Prompt Travel's frames to {frames}, or use a "
                    "conditioning with one row"
                )
    return None


def control_chain(control) -> list:
    """A ControlNet (or T2I adapter, ...) and the ones it was applied after (``previous_controlnet``)."""
    chain, seen = [], set()
    while control is not None and id(control) not in seen:
        seen.add(id(control))
        chain.append(control)
        control = getattr(control, "previous_controlnet", None)
    return chain


def conditioning_controls(conditioning) -> list:
    """Every hint model applied to a conditioning's entries (node form ``[tensor, options]`` or the
    guider's dicts), each once."""
    controls, seen = [], set()
    for entry in conditioning or []:
        options = entry if isinstance(entry, dict) else (entry[1] if len(entry) > 1 else {})
        for control in control_chain(options.get("control")):
            if id(control) not in seen:
                seen.add(id(control))
                controls.append(control)
    return controls


def hint_frames(control) -> int | None:
    """How many hint images a hint model holds (``cond_hint_original``), or None when it holds none."""
    hint = getattr(control, "cond_hint_original", None)
    return int(hint.shape[0]) if isinstance(hint, torch.Tensor) and hint.ndim == 4 else None


def hint_mismatch(conditionings: dict[str, list], frames: int, frames_per_clip: int = 0) -> str | None:
    """The first ControlNet hint whose images are neither 1 nor one per frame of the clip (or of each
    ``frames_per_clip`` clip)."""
    allowed = {1, frames} | ({frames_per_clip} if frames_per_clip else set())
    for name, conditioning in conditionings.items():
        for control in conditioning_controls(conditioning):
            images = hint_frames(control)
            if images is not None and images not in allowed:
                return (
                    f"the {type(control).__name__} on the {name} conditioning has {images} hint images, but the clip "
                    f"has {frames} frames; give it one image for every frame or {frames} images, one per frame"
                )
    return None


def frames_per_clip_mismatch(frames: int, frames_per_clip: int) -> str | None:
    """Whether ``frames`` split into whole clips of ``frames_per_clip`` (0: the whole batch is one clip)."""
    if frames_per_clip and frames % frames_per_clip:
        return (
            f"the clip has {frames} frames, which do not split into clips of frames_per_clip = {frames_per_clip} (set "
            f"in the Latent-Shift Patch); use a multiple of {frames_per_clip} frames, or set frames_per_clip to 0"
        )
    return None


def clip_mismatch(conditionings: dict[str, list], frames: int, frames_per_clip: int = 0) -> str | None:
    """The checks of a sampling or tuning run, ``frames_per_clip`` first: one sentence, or None."""
    return (
        frames_per_clip_mismatch(frames, frames_per_clip)
        or conditioning_mismatch(conditionings, frames, frames_per_clip)
        or hint_mismatch(conditionings, frames, frames_per_clip)
    )
