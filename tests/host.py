"""The real ComfyUI host for tests: found through COMFYUI_PATH or the pinned copy that
scripts/setup_host.sh installs, imported from its own folder (never a copy of it)."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

PACK_DIR = Path(__file__).resolve().parents[1]
if str(PACK_DIR / "scripts") not in sys.path:
    sys.path.insert(0, str(PACK_DIR / "scripts"))

import pinned_hosts  # noqa: E402

HOST_DIR = pinned_hosts.host_dir()
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if not (HOST_DIR / "comfy").is_dir():
    raise RuntimeError(f"no ComfyUI at {HOST_DIR}: run scripts/setup_host.sh first (or set COMFYUI_PATH)")
if str(HOST_DIR) not in sys.path:
    sys.path.insert(0, str(HOST_DIR))

import comfy.cli_args  # noqa: E402


def _read_host_version() -> tuple[int, ...]:
    text = (HOST_DIR / "comfyui_version.py").read_text() if (HOST_DIR / "comfyui_version.py").is_file() else ""
    for line in text.splitlines():
        if line.startswith("__version__"):
            return tuple(int(part) for part in line.split("=")[1].strip().strip("\"'").split(".")[:3])
    return (0, 0, 0)


HOST_VERSION = _read_host_version()
"""The host's ``comfyui_version.py``, as a tuple (0, 3, 75) / (0, 33, 0)."""


def only_on_hosts_from(version: tuple[int, ...], reason: str):
    """Marks a test that applies only to ComfyUI ``version`` and newer: ``reason`` says why."""
    return pytest.mark.skipif(HOST_VERSION < version, reason=f"ComfyUI {'.'.join(map(str, version))}+ only: {reason}")


def only_on_hosts_before(version: tuple[int, ...], reason: str):
    """Marks a test that applies only to hosts older than ComfyUI ``version``: ``reason`` says why."""
    return pytest.mark.skipif(
        HOST_VERSION >= version, reason=f"ComfyUI before {'.'.join(map(str, version))} only: {reason}"
    )

if not torch.cuda.is_available():
    comfy.cli_args.args.cpu = True

import comfy.model_base  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.supported_models  # noqa: E402

TINY_UNET = dict(
    model_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=32, num_heads=8,
    use_linear_in_transformer=False, in_channels=4, out_channels=4, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
    image_size=32,
)
"""The authors' tiny fixture UNet in ComfyUI terms (tests/fixtures/simda_authors_tiny)."""


def build_model(unet_config: dict, config_class=comfy.supported_models.SD15, seed: int | None = 0, dtype=torch.float32):
    """A real host BaseModel + ModelPatcher for ``unet_config``, with seeded fan-in-scaled weights."""
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(dtype, None)
    model = comfy.model_base.BaseModel(model_config, device="cpu")
    if seed is not None:
        randomize_(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    return patcher


def checkpoint_state(model, clip_state: dict | None = None, vae_state: dict | None = None) -> dict:
    """A checkpoint's state dict from a host BaseModel, its CLIP's and its VAE's, through the host's
    ``BaseModel.state_dict_for_saving``: 0.3.75 reads the UNet itself; 0.33 takes the UNet state
    dict as its first argument (the CLIP's was first before)."""
    parameters = inspect.signature(model.state_dict_for_saving).parameters
    if "unet_state_dict" in parameters:
        return model.state_dict_for_saving(
            model.diffusion_model.state_dict(), clip_state_dict=clip_state, vae_state_dict=vae_state
        )
    return model.state_dict_for_saving(clip_state_dict=clip_state, vae_state_dict=vae_state)


def context_windows(model, length: int, overlap: int, schedule: str, stride: int = 1, closed_loop: bool = False):
    """``model`` with the host's Context Windows (Manual) over the frame batch (dim 0), pyramid fuse;
    on hosts whose node has FreeNoise, with it off."""
    from comfy_extras.nodes_context_windows import ContextWindowsManualNode

    options = dict(
        context_length=length, context_overlap=overlap, context_schedule=schedule, context_stride=stride,
        closed_loop=closed_loop, fuse_method="pyramid", dim=0,
    )
    if "freenoise" in inspect.signature(ContextWindowsManualNode.execute).parameters:
        options["freenoise"] = False
    output = ContextWindowsManualNode.execute(model, **options)
    return output.result[0] if hasattr(output, "result") else output[0]


def index_window(indices: list[int], total_frames: int):
    """The host's context window over ``indices`` of a clip of ``total_frames`` frames. 0.3.75's
    window takes no clip length: it is set on the window as 0.33's carry it, for UNet calls outside a
    sampling run (inside one, SimDA takes the length from the run's latent)."""
    import comfy.context_windows

    window_class = comfy.context_windows.IndexListContextWindow
    if "total_frames" in inspect.signature(window_class).parameters:
        return window_class(list(indices), total_frames=total_frames)
    window = window_class(list(indices))
    window.total_frames = total_frames
    return window


def randomize_(module: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


@contextlib.contextmanager
def patched(patcher):
    """The model as the host runs it while sampling with ``patcher`` (object patches on)."""
    patcher.patch_model()
    try:
        yield patcher.model
    finally:
        patcher.unpatch_model()


def unet_forward(patcher, x, timesteps, context, cond_or_uncond=(0,), **extra_options):
    """One UNet call the way the host's sampler makes it: the patcher's transformer_options,
    its wrappers, and ``cond_or_uncond`` describing the batch's groups."""
    options = copy.copy(patcher.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers)
    options["cond_or_uncond"] = list(cond_or_uncond)
    options.update(extra_options)
    with patched(patcher) as model, torch.no_grad():
        return model.diffusion_model(x, timesteps=timesteps, context=context, transformer_options=options)


def import_pack():
    """The pack, imported as the package ``simda_pack`` the way the host imports a custom node
    folder (tests use ``simda_pack.simda_core`` / ``simda_pack.nodes``, one copy of each module)."""
    if "simda_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "simda_pack", PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["simda_pack"] = module
        spec.loader.exec_module(module)
    return sys.modules["simda_pack"]


import_pack()


def pack_files() -> list[str]:
    """The pack's files as a commit of the working tree would hold them (tracked, and untracked ones git
    does not ignore; deleted ones left out), relative to the pack; the test is skipped outside a git
    checkout."""
    import subprocess

    try:
        listed = subprocess.run(
            ["git", "-C", str(PACK_DIR), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the pack is not a git checkout here, so its tracked files are unknown ({error})")
    return sorted(name for name in listed if name and (PACK_DIR / name).is_file())
