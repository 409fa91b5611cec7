"""Which frames of a clip one UNet call holds, and the conditioning for exactly those frames.

The host's context windows publish the window as ``transformer_options["context_window"]``
(``index_list``); AnimateDiff-Evolved publishes ``transformer_options["ad_params"]``
(``sub_idxs``, ``full_length``; ``sub_idxs`` is None while it samples the whole clip at once).

Per-frame conditioning (SimDA Prompt Travel, ADE's prompt scheduling) is CONDITIONING whose tensors
have one row per frame of the clip. ADE cuts such rows to each window itself. The host's own
handler (ComfyUI 0.3.75) does not for windows over the batch dimension: its test for model conds
(``cond.ndim < dim``) never holds at ``dim`` 0, and the sampler then keeps the first rows, so every
window got the first window's prompts. ``window_conds`` cuts them for the Video Sampler's handler;
``window_context`` cuts a whole clip's per-frame context handed to a UNet call over one window.
"""
from __future__ import annotations

import torch


def host_window_indices(window) -> list[int]:
    """The frames a host context window hands the UNet, in order: its ``index_list``, after the
    frame before the window where the host adds one (0.33's ``causal_window_fix`` sets
    ``causal_anchor_index``; the host strips that frame's output again)."""
    indices = [int(i) for i in window.index_list]
    anchor = getattr(window, "causal_anchor_index", None)
    return ([int(anchor)] if anchor is not None and anchor >= 0 else []) + indices


def window_frames(transformer_options: dict) -> tuple[list[int], int] | None:
    """The current window's frame indices and the whole clip's length (0 when unknown), or None
    when the call holds the whole clip."""
    window = transformer_options.get("context_window")
    if getattr(window, "index_list", None) is not None:
        return host_window_indices(window), int(getattr(window, "total_frames", 0) or 0)
    ad_params = transformer_options.get("ad_params")
    if isinstance(ad_params, dict) and ad_params.get("sub_idxs") is not None:
        full_length = int(ad_params.get("full_length") or 0)
        indices = [int(i) for i in ad_params["sub_idxs"]]
        if full_length and len(indices) >= full_length:
            return None  # ADE's one "window" over the whole clip
        return indices, full_length
    return None


def window_context(context: torch.Tensor, transformer_options: dict, layout) -> torch.Tensor:
    """The cross-attention context for this call's frames: a context with one row per frame of the
    whole clip (``groups * full_length`` rows) cut to the window's frames in every cond/uncond
    group; any other context (one row per latent of the call, or a shared one) as it is."""
    frames = window_frames(transformer_options)
    if context is None or frames is None or layout is None:
        return context
    indices, full_length = frames
    groups = len(transformer_options.get("cond_or_uncond", [0])) or 1
    if not full_length or len(indices) >= full_length or context.shape[0] != groups * full_length:
        return context
    index = torch.tensor(indices, device=context.device)
    per_group = context.reshape(groups, full_length, *context.shape[1:])
    return per_group.index_select(1, index).reshape(groups * len(indices), *context.shape[1:])


def window_conds(resized: list[dict] | None, full_length: int, indices: list[int], device=None) -> list[dict] | None:
    """The host handler's conds for one window over the frames (``dim`` 0), with every model cond
    that holds one row per frame of the clip cut to the window's frames (prompt travel, per-frame
    ``y`` or concat images); everything else as the host resized it."""
    if resized is None or full_length <= len(indices):
        return resized
    out = []
    for cond in resized:
        model_conds = cond.get("model_conds")
        if isinstance(model_conds, dict):
            cut = dict(model_conds)
            for key, value in model_conds.items():
                tensor = getattr(value, "cond", None)
                if isinstance(tensor, torch.Tensor) and tensor.ndim >= 1 and tensor.shape[0] == full_length:
                    cut[key] = value._copy_with(tensor[indices].to(device))
            cond = dict(cond, model_conds=cut)
        out.append(cond)
    return out
