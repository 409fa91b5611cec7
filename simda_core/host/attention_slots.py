"""Self-attention slots shared with other nodes: where latent shift and another pack's attention
patch meet on one MODEL.

The host runs one ``patches_replace["attn1"]`` function per transformer block: the one at
``(block, id, index)`` if there is one, else the one at ``(block, id)`` (``BasicTransformerBlock``
``forward``). Latent shift sits at ``(block, id, index)``. Another node's replacement is

- **refused** when it is on the MODEL itself (set when the graph is built, as Self-Attention
  Guidance does): it would take latent shift's slot on every call. The check runs when SimDA is
  registered and when a sampling run starts, before the host loads anything, and on every UNet
  call outside a sampling run;
- **composed** when it appears inside a sampling run only, on one guidance pass (Perturbed-Attention
  Guidance adds its replacement to a copy of the call's options after CFG): that pass runs the other
  node's attention at the blocks it names, and latent shift everywhere else. Where the other node
  names ``(block, id)``, SimDA's ``(block, id, index)`` entries of that block are dropped from a
  per-call copy of the options, so the host falls back to the other node's function.

An ``attn1_patch`` (run on the tokens before self-attention) composes when it keeps each frame's
token grid, as a hypernetwork does; one that re-tiles the tokens (HyperTile) is refused by the grid
check of every call (``model.patch_functions.check_token_grid``).
"""
from __future__ import annotations

import re

from ..model.patch_functions import is_simda

Key = tuple


def describe(fn) -> str:
    """A patch function as a user can find it: its name and module (the host loads its extra nodes and
    custom node packs by file path: a path module is named by its folder and file, e.g.
    ``comfy_extras.nodes_hypertile``)."""
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if "/" in module or "\\" in module:
        module = ".".join(re.split(r"[\\/]", module.rstrip("/\\"))[-2:])
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{name} (from {module})"


def foreign_replacements(transformer_options: dict) -> dict[Key, object]:
    """Other nodes' self-attention replacements on these options, by key."""
    replaced = transformer_options.get("patches_replace", {}).get("attn1", {})
    return {key: fn for key, fn in replaced.items() if not is_simda(fn)}


def shadowed_keys(foreign: dict[Key, object], shift_keys: list[Key]) -> dict[Key, tuple[Key, object]]:
    """SimDA's keys whose block another node's replacement takes: at the same ``(block, id, index)``,
    or at ``(block, id)`` for every index of that block. Maps each to the other node's key and function."""
    taken = {}
    for key in shift_keys:
        for theirs in (key, tuple(key[:2])):
            if theirs in foreign:
                taken[key] = (theirs, foreign[theirs])
                break
    return taken


def resident_conflict(transformer_options: dict, shift_keys: list[Key]) -> str | None:
    """A sentence naming another node's replacement that sits on the MODEL at a latent-shift block,
    or None."""
    taken = shadowed_keys(foreign_replacements(transformer_options), shift_keys)
    if not taken:
        return None
    key, fn = next(iter(taken.values()))
    return (
        f"another node replaces self-attention at {key} on this MODEL ({describe(fn)}, e.g. Self-Attention "
        "Guidance); SimDA's latent-shift attention needs that block on every call: use one of the two on this "
        "MODEL, not both, or switch latent shift off at that level"
    )


def options_for_call(transformer_options: dict, shift_keys: list[Key]) -> dict:
    """The options a UNet call inside a sampling run hands the UNet: as they are, or a copy without
    SimDA's entries at the blocks another node's ``(block, id)`` replacement asks for on this call."""
    replaced = transformer_options.get("patches_replace", {}).get("attn1", {})
    foreign = foreign_replacements(transformer_options)
    drop = [key for key in shadowed_keys(foreign, shift_keys) if key in replaced and is_simda(replaced[key])]
    if not drop:
        return transformer_options
    attn1 = {key: fn for key, fn in replaced.items() if key not in drop}
    patches_replace = dict(transformer_options["patches_replace"], attn1=attn1)
    return dict(transformer_options, patches_replace=patches_replace)


def token_grid_refusal(transformer_options: dict, error: Exception) -> str:
    """The sentence for a call whose token grid another patch changed (``check_token_grid``'s error),
    naming the other nodes' ``attn1_patch`` functions on the call; named only when it happens."""
    named = [describe(p) for p in transformer_options.get("patches", {}).get("attn1_patch", []) if not is_simda(p)]
    who = ", ".join(named) or "a patch before SimDA's self-attention"
    return f"another patch changes the self-attention token grid ({who}, e.g. HyperTile): {error}"
