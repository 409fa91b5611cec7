"""Adapter files: ours (``.safetensors`` with metadata) and the authors' (a whole diffusers
``UNet3DConditionModel``, ``.bin`` or ``.safetensors``, of which only the adapter keys are used).

Nothing here executes pickle code: ``.bin`` files go through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import SPATIAL_RATIO, TEMPORAL_RATIO, AdapterSite, SimDAAdapters

FORMAT_NAME = "simda-adapters"
FORMAT_VERSION = 1
FAMILIES = {
    "sd1": "an SD1.x UNet",
    "sd2": "an SD2.x UNet",
    "sd_x4_upscaler": "the SD x4 upscaler",
    "sdxl": "an SDXL UNet",
}


class AdapterFileError(ValueError):
    """An adapter file that cannot be used, with a sentence that says what to do."""


@dataclass
class AdapterFile:
    """Adapter tensors keyed as :meth:`SimDAAdapters.file_state_dict` names them."""

    tensors: dict[str, torch.Tensor]
    family: str
    source: str
    """``simda`` (our format) or ``authors`` (the authors' diffusers UNet)."""
    name: str
    """The file's name, for messages."""
    sites: list[AdapterSite] | None = None
    spatial_ratio: float = SPATIAL_RATIO
    temporal_ratio: float = TEMPORAL_RATIO
    frames_trained: int = 0
    metadata: dict[str, str] = field(default_factory=dict)

    def family_label(self) -> str:
        return FAMILIES.get(self.family, self.family)


# -- our format ---------------------------------------------------------------------------------

def adapter_metadata(
    adapters: SimDAAdapters, family: str, frames_trained: int = 0, extra: dict[str, str] | None = None
) -> dict[str, str]:
    from .unet_sites import level_channels

    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "base_family": family,
        "level_channels": json.dumps(level_channels(adapters.sites)),
        "spatial_ratio": str(adapters.spatial_ratio),
        "temporal_ratio": str(adapters.temporal_ratio),
        "frames_trained": str(int(frames_trained)),
        "sites": json.dumps([site.__dict__ for site in adapters.sites]),
    }
    meta.update(extra or {})
    return meta


def save_adapters(
    adapters: SimDAAdapters,
    path: str | os.PathLike,
    family: str,
    frames_trained: int = 0,
    overwrite: bool = False,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write our ``.safetensors`` atomically (a temporary file in the same folder, then a rename);
    an existing file is kept unless ``overwrite``."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterFileError(f"'{path.name}': SimDA adapters are saved as .safetensors; change the file name.")
    if path.exists() and not overwrite:
        raise AdapterFileError(f"'{path}' already exists; choose another name (existing adapters are never overwritten).")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapters.file_state_dict().items()}
    meta = adapter_metadata(adapters, family, frames_trained, extra_metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the name was taken meanwhile: nothing is ever silently replaced.
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise AdapterFileError(f"'{path}' already exists; choose another name.") from None
            except OSError:
                os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _sites_from_metadata(meta: dict[str, str]) -> list[AdapterSite] | None:
    raw = meta.get("sites")
    if not raw:
        return None
    return [AdapterSite(**{**d, "self_attention": tuple(d.get("self_attention", ()))}) for d in json.loads(raw)]


# -- the authors' format ------------------------------------------------------------------------

_AUTHORS_SPATIAL = re.compile(
    r"^(?P<where>down_blocks\.(?P<down>\d+)|up_blocks\.(?P<up>\d+)|mid_block)"
    r"\.attentions\.(?P<j>\d+)\.transformer_blocks\.(?P<d>\d+)"
    r"\.(?P<kind>adapter_s|adapter_ffn)\.D_(?P<fc>fc1|fc2)\.(?P<param>weight|bias)$"
)
_AUTHORS_TEMPORAL = re.compile(
    r"^(?P<where>down_blocks\.(?P<down>\d+)|up_blocks\.(?P<up>\d+)|mid_block)"
    r"\.temp_adapter\.(?P<j>\d+)\.(?P<layer>stadapt_down_1|stadapt_conv3d_1|stadapt_up_1)\.(?P<param>weight|bias)$"
)
_TEMPORAL_LAYER = {"stadapt_down_1": "down", "stadapt_conv3d_1": "depthwise", "stadapt_up_1": "up"}
_SPATIAL_KIND = {"adapter_s": "attn_adapter", "adapter_ffn": "ffn_adapter"}


def _layers_per_block(state: dict[str, torch.Tensor]) -> int:
    resnets = {int(m.group(1)) for k in state if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    return max(resnets) + 1 if resnets else 2


def _authors_site_path(match: re.Match, layers_per_block: int) -> str:
    j = int(match.group("j"))
    if match.group("down") is not None:
        return f"input_blocks.{1 + int(match.group('down')) * (layers_per_block + 1) + j}.1"
    if match.group("up") is not None:
        return f"output_blocks.{int(match.group('up')) * (layers_per_block + 1) + j}.1"
    return "middle_block.1"


def convert_authors_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter tensors of an authors' UNet3DConditionModel state dict, under our keys."""
    layers = _layers_per_block(state)
    out = {}
    for key, tensor in state.items():
        if m := _AUTHORS_SPATIAL.match(key):
            site = _authors_site_path(m, layers)
            out[f"{site}.transformer_blocks.{m.group('d')}.{_SPATIAL_KIND[m.group('kind')]}.{m.group('fc')}.{m.group('param')}"] = tensor
        elif m := _AUTHORS_TEMPORAL.match(key):
            site = _authors_site_path(m, layers)
            out[f"{site}.temporal_adapter.{_TEMPORAL_LAYER[m.group('layer')]}.{m.group('param')}"] = tensor
    return out


# -- reading any adapter file -------------------------------------------------------------------

def _authors_weights_file(path: Path) -> Path:
    """A diffusers folder (the training output or its ``unet/``) -> its UNet weights file."""
    for folder in (path / "unet", path):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            if (folder / name).is_file():
                return folder / name
    raise AdapterFileError(
        f"'{path.name}' is a folder without unet/diffusion_pytorch_model.safetensors or .bin; "
        "point the loader at a SimDA .safetensors file or at the authors' training output folder."
    )


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    name = path.name
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AdapterFileError(
                f"'{name}' is not a readable safetensors file (truncated or corrupt: {e}); download or export it again."
            ) from None
        return tensors, meta
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
        except Exception as e:  # weights_only refuses code; a cut file fails to unpickle
            text = str(e)
            if "Weights only load failed" in text or "weights_only" in text:
                raise AdapterFileError(
                    f"'{name}' is a pickle that holds more than tensors (it would run code when loaded), so it is refused; "
                    "convert it to .safetensors with a tool you trust, or re-export it from training."
                ) from None
            raise AdapterFileError(
                f"'{name}' could not be read as a PyTorch weights file (truncated or corrupt: {type(e).__name__}); "
                "download or export it again."
            ) from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFileError(f"'{name}' does not hold a dictionary of tensors; it is not an adapter or UNet checkpoint.")
        return state, {}
    raise AdapterFileError(f"'{name}': unknown adapter file type '{path.suffix}'; use .safetensors (or the authors' .bin).")


def _check_finite(tensors: dict[str, torch.Tensor], name: str) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise AdapterFileError(
                f"'{name}' has NaN or infinite values in '{key}'; the training run that made it diverged, "
                "so use an earlier checkpoint of it."
            )


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Read and check an adapter file of either format. Raises :class:`AdapterFileError`."""
    path = Path(path)
    if path.is_dir():
        path = _authors_weights_file(path)
    if not path.is_file():
        raise AdapterFileError(f"'{path}' does not exist; put adapter files in the models/simda folder.")
    tensors, meta = _read_tensors(path)
    name = path.name if path.parent.name != "unet" else f"{path.parent.parent.name}/unet/{path.name}"

    if meta.get("format") == FORMAT_NAME:
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise AdapterFileError(
                f"'{name}' uses SimDA adapter format {version}, newer than this pack reads ({FORMAT_VERSION}); update the pack."
            )
        adapter = AdapterFile(
            tensors=tensors,
            family=meta.get("base_family", "sd1"),
            source="simda",
            name=name,
            sites=_sites_from_metadata(meta),
            spatial_ratio=float(meta.get("spatial_ratio", SPATIAL_RATIO)),
            temporal_ratio=float(meta.get("temporal_ratio", TEMPORAL_RATIO)),
            frames_trained=int(meta.get("frames_trained", "0")),
            metadata=meta,
        )
    else:
        converted = convert_authors_state_dict(tensors)
        if not converted:
            raise AdapterFileError(
                f"'{name}' holds no SimDA adapter weights (no adapter_s / adapter_ffn / temp_adapter keys); "
                "it is not a SimDA checkpoint: pick a file trained with SimDA."
            )
        adapter = AdapterFile(tensors=converted, family="sd1", source="authors", name=name, metadata=meta)
    if not adapter.tensors:
        raise AdapterFileError(f"'{name}' holds no adapter tensors; pick a file saved by SimDA training.")
    _check_finite(adapter.tensors, name)
    return adapter


def build_adapters(adapter_file: AdapterFile, sites: list[AdapterSite], dtype=None, device=None) -> SimDAAdapters:
    """Adapters for a UNet with these ``sites``, filled from the file; a file made for another
    UNet layout gets an :class:`AdapterFileError` that names both."""
    file_sites = {(s.path, s.channels) for s in adapter_file.sites} if adapter_file.sites else None
    model_sites = {(s.path, s.channels) for s in sites}
    if file_sites is not None and file_sites != model_sites:
        raise AdapterFileError(
            f"'{adapter_file.name}' was trained for a UNet with transformers at "
            f"{_describe_sites(adapter_file.sites)}, but the connected model has {_describe_sites(sites)}; "
            "use adapters trained for this model family."
        )
    adapters = SimDAAdapters(
        sites, adapter_file.spatial_ratio, adapter_file.temporal_ratio, dtype=torch.float32, device="cpu"
    )
    expected = adapters.file_keys_to_module_keys()
    module_state = adapters.state_dict()
    missing = [k for k in expected if k not in adapter_file.tensors]
    wrong = [
        k for k in expected
        if k in adapter_file.tensors and tuple(adapter_file.tensors[k].shape) != tuple(module_state[expected[k]].shape)
    ]
    if missing or wrong:
        raise AdapterFileError(
            f"'{adapter_file.name}' does not fit the connected model ({len(missing)} adapter tensors missing, "
            f"{len(wrong)} of another shape, e.g. {(missing + wrong)[:2]}); it was made for another UNet "
            f"({adapter_file.family_label()} layout expected {_describe_sites(sites)})."
        )
    adapters.load_file_state_dict({k: adapter_file.tensors[k] for k in expected})
    return adapters.to(dtype=dtype, device=device) if (dtype or device) else adapters


def _describe_sites(sites: list[AdapterSite]) -> str:
    channels = sorted({s.channels for s in sites})
    return f"{len(sites)} places with {'/'.join(map(str, channels))} channels"


def adapter_parameter_count(tensors: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in tensors.values())
