"""The MODEL a SimDA node receives: its family checked against what the node or its adapters were
made for, and SimDA registered on a clone of it with the error a user sees."""
from __future__ import annotations

from ..simda_core.formats import FAMILIES
from ..simda_core.host.family import model_family
from ..simda_core.host.register import SimDAPatchError, apply_simda
from ..simda_core.model.config import SimDAConfig


def check_family(model, wanted: str, what: str) -> str:
    """The MODEL's family, or a clear error when it is not the family ``what`` was made for."""
    family = model_family(model)
    if family not in FAMILIES:
        raise ValueError(
            f"{what} needs an SD1.x, SD2.x or SDXL model (or the SD x4 upscaler); the connected MODEL is {family}. "
            "Connect a Load Checkpoint with an SD1.5, SD2.x or SDXL base checkpoint."
        )
    if wanted and family != wanted:
        raise ValueError(
            f"{what} was made for {FAMILIES[wanted]}, but the connected MODEL is {FAMILIES[family]}; "
            "load adapters trained for this model, or connect the matching checkpoint."
        )
    return family


def check_image_family(model, what: str) -> str:
    """The MODEL's family for a node that samples or tunes frames (SD1.x, SD2.x or SDXL): the SD x4
    upscaler is refused, naming the node that takes it."""
    family = check_family(model, "", what)
    if family == "sd_x4_upscaler":
        raise ValueError(
            f"{what} works with an SD1.x, SD2.x or SDXL MODEL; the connected MODEL is the SD x4 upscaler: connect "
            "the upscaler to SimDA Video Upscaler instead."
        )
    return family


def simda_clone(model, config: SimDAConfig):
    """A clone of ``model`` with ``config`` registered; ``model`` itself is never changed. A patch
    that cannot coexist with SimDA is reported as the node's error, before any work."""
    patched = model.clone()
    try:
        apply_simda(patched, config)
    except SimDAPatchError as e:
        raise ValueError(str(e)) from None
    return patched


