"""Adapter files: ours (``.safetensors`` with metadata) and the authors' (a whole diffusers
``UNet3DConditionModel``, ``.bin`` or ``.safetensors``, of which only the adapter keys are used).

Nothing here executes pickle code: ``.bin`` files go through ``torch.load(weights_only=True)``.
Of an authors' UNet only the adapter keys are read: per key from ``.safetensors``, from a memory map
of ``.bin`` (``bench/bench_authors_load.py`` measures the peak memory on a full-size SD1.5 run).
That is why these files are not read with the host's ``comfy.utils.load_torch_file``, which loads
every tensor of a file (the whole 3.4 GB UNet) and unwraps one-key dictionaries its own way.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model.adapters import AdapterSite, SPATIAL_RATIO, SimDAAdapters, TEMPORAL_RATIO

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
    from .model.unet_sites import level_channels

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
        raise AdapterFileError(
            f"'{path}' already exists; choose another name (existing adapters are never overwritten)."
        )
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


def _metadata_error(name: str, key: str, what: str) -> AdapterFileError:
    return AdapterFileError(
        f"'{name}' has broken metadata: '{key}' {what}; the file was not written by this pack's Save SimDA Adapters "
        "or was edited: save the adapters again from training."
    )


def _metadata_number(meta: dict[str, str], key: str, default: float, name: str) -> float:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise _metadata_error(name, key, f"is {raw!r}, not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise _metadata_error(name, key, f"is {raw!r}, not a positive number")
    return value


def _metadata_count(meta: dict[str, str], key: str, default: int, name: str) -> int:
    raw = meta.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise _metadata_error(name, key, f"is {raw!r}, not a whole number") from None
    if value < 0:
        raise _metadata_error(name, key, f"is {raw!r}, below 0")
    return value


def _sites_from_metadata(meta: dict[str, str], name: str) -> list[AdapterSite] | None:
    raw = meta.get("sites")
    if not raw:
        return None
    try:
        entries = json.loads(raw)
    except (TypeError, ValueError):
        raise _metadata_error(name, "sites", "is not valid JSON") from None
    if not isinstance(entries, list):
        raise _metadata_error(name, "sites", "is not a list of transformer places")
    sites = []
    for entry in entries:
        try:
            site = AdapterSite(**{**entry, "self_attention": tuple(entry.get("self_attention", ()))})
        except (TypeError, AttributeError, ValueError):
            raise _metadata_error(
                name, "sites", f"has an entry that is not a transformer place ({str(entry)[:80]})"
            ) from None
        if not (isinstance(site.path, str) and all(
            isinstance(getattr(site, f), int) and not isinstance(getattr(site, f), bool)
            for f in ("channels", "inner_dim", "depth", "level")
        )):
            raise _metadata_error(name, "sites", f"has an entry with fields of the wrong type ({str(entry)[:80]})")
        sites.append(site)
    return sites


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


def _authors_site_path(match: re.Match, layers_per_block: int) -> str:
    j = int(match.group("j"))
    if match.group("down") is not None:
        return f"input_blocks.{1 + int(match.group('down')) * (layers_per_block + 1) + j}.1"
    if match.group("up") is not None:
        return f"output_blocks.{int(match.group('up')) * (layers_per_block + 1) + j}.1"
    return "middle_block.1"


def is_authors_adapter_key(key: str) -> bool:
    return bool(_AUTHORS_SPATIAL.match(key) or _AUTHORS_TEMPORAL.match(key))


def convert_authors_state_dict(
    state: dict[str, torch.Tensor], layers_per_block: int | None = None
) -> dict[str, torch.Tensor]:
    """The adapter tensors of an authors' UNet3DConditionModel state dict, under our keys.
    ``layers_per_block``: ResNets per down block, found from the keys of ``state`` unless given
    (when ``state`` holds only the adapter keys)."""
    layers = layers_per_block or _keys_layers_per_block(state)
    out = {}
    for key, tensor in state.items():
        if m := _AUTHORS_SPATIAL.match(key):
            site = _authors_site_path(m, layers)
            out[
                f"{site}.transformer_blocks.{m.group('d')}.{_SPATIAL_KIND[m.group('kind')]}"
                f".{m.group('fc')}.{m.group('param')}"
            ] = tensor
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


AUTHORS_CONFIG = "config.json"
SD2_CONTEXT_DIM = 1024
"""The cross-attention width of SD2.x (OpenCLIP ViT-H); SD1.x has 768."""
_CONTEXT_PROBE = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
"""An authors' UNet key whose shape ``[inner, context_dim]`` tells the text width when there is no config."""
NON_ADAPTER_FOLDERS = frozenset({
    "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "scheduler", "safety_checker",
    "feature_extractor", "image_encoder", "inv_latents", "samples",
})
"""Folders of an authors' training output (a diffusers pipeline) that hold no adapters."""
TRAINING_STATE_FILES = frozenset({"optimizer.bin", "scheduler.bin", "scaler.pt"})
"""What ``accelerate`` saves next to a checkpoint's weights (``checkpoint-N/``)."""
ADAPTER_SUFFIXES = (".safetensors", ".bin")


def is_adapter_candidate(relative_path: str) -> bool:
    """Whether a file under ``models/simda`` may hold SimDA adapters: ours, or an authors' run's
    ``unet/`` weights, but not its text encoder, VAE, tokenizer or optimizer state."""
    parts = Path(relative_path.replace("\\", "/")).parts
    if not parts or not parts[-1].endswith(ADAPTER_SUFFIXES):
        return False
    return not any(part in NON_ADAPTER_FOLDERS for part in parts[:-1]) and parts[-1] not in TRAINING_STATE_FILES


@dataclass
class _FileContents:
    tensors: dict[str, torch.Tensor]
    """Ours: every tensor. The authors': the adapter tensors only, under their keys."""
    metadata: dict[str, str]
    layers_per_block: int = 2
    context_dim: int | None = None
    """The authors' UNet's cross-attention width, where its weights tell it."""


def _keys_layers_per_block(keys) -> int:
    resnets = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    return max(resnets) + 1 if resnets else 2


def _read_safetensors(path: Path, name: str) -> _FileContents:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            keys = list(f.keys())
            wanted = keys if meta.get("format") == FORMAT_NAME else [k for k in keys if is_authors_adapter_key(k)]
            tensors = {k: f.get_tensor(k) for k in wanted}
            context = f.get_slice(_CONTEXT_PROBE).get_shape() if _CONTEXT_PROBE in keys else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AdapterFileError(
            f"'{name}' is not a readable safetensors file (truncated or corrupt: {e}); download or export it again."
        ) from None
    return _FileContents(
        tensors, meta, _keys_layers_per_block(keys), context[1] if context and len(context) == 2 else None
    )


def _read_pickle(path: Path, name: str) -> _FileContents:
    try:
        # A zip-format file (torch.save since 1.6) is memory-mapped: only the adapter tensors are read from disk.
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
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
        raise AdapterFileError(
            f"'{name}' does not hold a dictionary of tensors; it is not an adapter or UNet checkpoint."
        )
    # still mapped: only these pages are read
    tensors = {k: v for k, v in state.items() if isinstance(k, str) and is_authors_adapter_key(k)}
    probe = state.get(_CONTEXT_PROBE)
    return _FileContents(
        tensors, {}, _keys_layers_per_block(state), probe.shape[1] if probe is not None and probe.ndim == 2 else None
    )


def _read_tensors(path: Path, name: str) -> _FileContents:
    if path.suffix == ".safetensors":
        return _read_safetensors(path, name)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_pickle(path, name)
    raise AdapterFileError(
        f"'{name}': unknown adapter file type '{path.suffix}'; use .safetensors (or the authors' .bin)."
    )


def _authors_family(weights: Path, context_dim: int | None, name: str) -> str:
    """SD2.x when the run's ``unet/config.json`` (else its attn2 weights) has a 1024-wide text context."""
    config_path = weights.parent / AUTHORS_CONFIG
    if config_path.is_file():
        label = f"{config_path.parent.name}/{AUTHORS_CONFIG}"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise AdapterFileError(
                f"'{name}': its {label} is not readable JSON; restore it from the training output (or delete it)."
            ) from None
        if not isinstance(config, dict):
            raise AdapterFileError(
                f"'{name}': its {label} is not a UNet configuration; restore it from the training output."
            )
        dim = config.get("cross_attention_dim", context_dim)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise AdapterFileError(
                f"'{name}': its {label} gives cross_attention_dim {dim!r}, "
                "not a whole number; restore it from the training output."
            )
        context_dim = dim
    return "sd2" if context_dim == SD2_CONTEXT_DIM else "sd1"


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
    name = path.name if path.parent.name != "unet" else f"{path.parent.parent.name}/unet/{path.name}"
    contents = _read_tensors(path, name)
    meta = contents.metadata

    if meta.get("format") == FORMAT_NAME:
        version = _metadata_count(meta, "format_version", 0, name)
        if version > FORMAT_VERSION:
            raise AdapterFileError(
                f"'{name}' uses SimDA adapter format {version}, newer than "
                f"this pack reads ({FORMAT_VERSION}); update the pack."
            )
        adapter = AdapterFile(
            tensors=contents.tensors,
            family=meta.get("base_family", "sd1"),
            source="simda",
            name=name,
            sites=_sites_from_metadata(meta, name),
            spatial_ratio=_metadata_number(meta, "spatial_ratio", SPATIAL_RATIO, name),
            temporal_ratio=_metadata_number(meta, "temporal_ratio", TEMPORAL_RATIO, name),
            frames_trained=_metadata_count(meta, "frames_trained", 0, name),
            metadata=meta,
        )
    else:
        converted = convert_authors_state_dict(contents.tensors, contents.layers_per_block)
        if not converted:
            raise AdapterFileError(
                f"'{name}' holds no SimDA adapter weights (no adapter_s / adapter_ffn / temp_adapter keys); "
                "it is not a SimDA checkpoint: pick a file trained with SimDA."
            )
        family = _authors_family(path, contents.context_dim, name)
        adapter = AdapterFile(tensors=converted, family=family, source="authors", name=name, metadata=meta)
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
