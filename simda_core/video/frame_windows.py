"""Which frames of a clip one UNet call holds.

The host's context windows publish the window as ``transformer_options["context_window"]``
(``index_list``; ComfyUI 0.33 adds the frame before the window, ``causal_anchor_index``, and the
whole clip's ``total_frames``); AnimateDiff-Evolved publishes ``transformer_options["ad_params"]``
(``sub_idxs``, ``full_length``; ``sub_idxs`` is None while it samples the whole clip at once).
What a window's call gets of the clip's per-frame conditioning and ControlNet hints is the host
side's job (``host.windows``).
"""
from __future__ import annotations


def host_window_indices(window) -> list[int]:
    """The frames a host context window hands the UNet, in order: its ``index_list``, after the
    frame before the window where the host adds one (0.33's ``causal_window_fix`` sets
    ``causal_anchor_index``; the host strips that frame's output again)."""
    indices = [int(i) for i in window.index_list]
    anchor = getattr(window, "causal_anchor_index", None)
    return ([int(anchor)] if anchor is not None and anchor >= 0 else []) + indices


def window_frames(transformer_options: dict, total_frames: int = 0) -> tuple[list[int], int] | None:
    """The current window's frame indices and the whole clip's length, or None when the call holds
    the whole clip. ``total_frames`` stands in for the length where the window does not carry it
    (the windows of ComfyUI 0.3.75); 0 when unknown."""
    window = transformer_options.get("context_window")
    if getattr(window, "index_list", None) is not None:
        return host_window_indices(window), int(getattr(window, "total_frames", 0) or total_frames)
    ad_params = transformer_options.get("ad_params")
    if isinstance(ad_params, dict) and ad_params.get("sub_idxs") is not None:
        full_length = int(ad_params.get("full_length") or total_frames)
        indices = [int(i) for i in ad_params["sub_idxs"]]
        if full_length and len(indices) >= full_length:
            return None  # ADE's one "window" over the whole clip
        return indices, full_length
    return None
