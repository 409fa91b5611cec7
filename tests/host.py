"""The real ComfyUI host for tests: found through COMFYUI_PATH or the pinned copy that
scripts/setup_host.sh installs, imported from its own folder (never a copy of it)."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
import sys
from pathlib import Path

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
HOST_DIR = Path(os.environ.get("COMFYUI_PATH") or PACK_DIR / ".host" / "ComfyUI").resolve()
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if not (HOST_DIR / "comfy").is_dir():
    raise RuntimeError(f"no ComfyUI at {HOST_DIR}: run scripts/setup_host.sh first (or set COMFYUI_PATH)")
if str(HOST_DIR) not in sys.path:
    sys.path.insert(0, str(HOST_DIR))

import comfy.cli_args  # noqa: E402

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
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    return patcher


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
