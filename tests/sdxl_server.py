"""The real ComfyUI server with an SDXL-family checkpoint: a random-weight checkpoint the host's
``CheckpointLoaderSimple`` detects as SDXL-family (Segmind Vega), random SimDA adapters for it,
and the host's own ``main.py`` on a temporary base folder (tests/live_server.py's harness).

Test files import what they use: ``from sdxl_server import sdxl_server, ...``.

- UNet: ``VEGA_TEST_UNET``, the smallest UNet 0.3.75's detection takes for SDXL-family (320
  channels, three levels of one width, Segmind Vega's transformer depths; about 103M parameters);
  the host's ``model_base.SDXL`` with its ADM (pooled CLIP-G text + size conditioning).
- Text encoders: full-size CLIP-L and CLIP-G from the host's ``SDXLClipModel`` (about 0.8B
  parameters), seeded: the SDXL text path (2048-wide context, 1280-wide pooled output) as the
  host runs it.
- VAE: the host's TAESD (detected by its ``taesd_decoder`` keys): 8x, 4 latent channels, like
  SDXL's KL VAE, at 1/40 of its size.

Everything is stored in float16 (CLIP-G alone is 1.4 GB so) and cached under ``<pack>/.cache/``,
keyed by a hash of the recipe.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import host  # first: it puts the host on sys.path and imports the pack as simda_pack

import comfy.model_detection
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import comfy.utils
from live_server import CACHE_DIR, make_base_dir, random_simda_adapters, serving

SDXL_COMMON = dict(
    in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False, num_classes="sequential",
    adm_in_channels=2816, context_dim=2048, use_linear_in_transformer=True, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32,
)
"""What every SDXL-family UNet of the host shares: a 2048-wide text context, a 2816-wide ADM vector
(1280 pooled text + 6 x 256 size embeddings), linear transformer projections."""

VEGA_TEST_UNET = dict(
    SDXL_COMMON, model_channels=320, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2], num_head_channels=64,
    transformer_depth=[0, 0, 1, 1, 2, 2], transformer_depth_middle=-1,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 2, 2, 2],
)
"""Segmind Vega's transformer depths on three levels of 320 channels: the host's detection needs
320 base channels and those depths, not SDXL's widths (about 103M parameters instead of 745M)."""

RECIPE = {
    "unet": VEGA_TEST_UNET,
    "config": "Segmind_Vega (host comfy.supported_models), model_base.SDXL, eps",
    "text_encoder": "CLIP-L + CLIP-G (host SDXLClipModel), full size",
    "vae": "TAESD (host comfy.taesd), 8x, 4 latent channels",
    "weights": "seeded, fan-in scaled, stored float16",
    "adapters": "SimDAAdapters for the UNet's sites, 0.02 * randn everywhere",
    "seed": 0,
    "version": 1,
}
RECIPE_KEY = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
CHECKPOINT_NAME = f"simda_test_sdxl_vega_{RECIPE_KEY}.safetensors"
ADAPTER_NAME = f"simda_test_random_sdxl_{RECIPE_KEY}.safetensors"


def random_taesd(seed: int) -> comfy.taesd.taesd.TAESD:
    """The host's TAESD with seeded random weights, unit scale, no shift, decoding to mid-grey
    rather than mostly clipped black; ``comfy.sd.VAE(sd=random_taesd(s).state_dict())`` loads it."""
    vae = comfy.taesd.taesd.TAESD()
    host.randomize_(vae, seed)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        vae.taesd_decoder[-1].bias.fill_(0.5)
    return vae


def random_sdxl_checkpoint(path: str | os.PathLike, seed: int = RECIPE["seed"]) -> Path:
    """Write a seeded random-weight checkpoint that ``CheckpointLoaderSimple`` loads as Segmind
    Vega (an SDXL-family model), with the host's own modules and key layout
    (``BaseModel.state_dict_for_saving``: SDXL's ``conditioner.embedders.0/1`` text encoders)."""
    path = Path(path)
    cpu = torch.device("cpu")
    model_config = comfy.supported_models.Segmind_Vega(dict(VEGA_TEST_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device=cpu)
    host.randomize_(model.diffusion_model, seed)

    clip = comfy.sd.CLIP(
        model_config.clip_target(),
        model_options={"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu},
    )
    host.randomize_(clip.cond_stage_model, seed + 1)

    vae = random_taesd(seed + 2)

    clip_state = {k: v.to(torch.float16) if v.is_floating_point() else v for k, v in clip.get_sd().items()}
    del clip
    state = host.checkpoint_state(model, clip_state, vae.state_dict())
    del clip_state, model
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}

    detected = comfy.model_detection.model_config_from_unet(
        state, comfy.model_detection.unet_prefix_from_state_dict(state)
    )
    if type(detected) is not comfy.supported_models.Segmind_Vega:
        raise RuntimeError(
            f"the random checkpoint is detected as {type(detected).__name__}, not Segmind_Vega; fix VEGA_TEST_UNET"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(state, str(tmp), metadata={"simda_test_recipe": json.dumps(RECIPE, sort_keys=True)})
    os.replace(tmp, path)
    return path


def cached_sdxl_models() -> tuple[Path, Path]:
    """``(checkpoint, adapters)`` under ``.cache/``, built on first use."""
    checkpoint = CACHE_DIR / CHECKPOINT_NAME
    adapters = CACHE_DIR / ADAPTER_NAME
    if not checkpoint.is_file():
        random_sdxl_checkpoint(checkpoint)
    if not adapters.is_file():
        random_simda_adapters(checkpoint, adapters, family="sdxl")
    return checkpoint, adapters


@pytest.fixture(scope="module")
def sdxl_server(tmp_path_factory):
    """A ComfyUI server for the module on a temporary base folder holding the random SDXL-family
    checkpoint (models/checkpoints) and random SDXL SimDA adapters (models/simda)."""
    checkpoint, adapters = cached_sdxl_models()
    base = tmp_path_factory.mktemp("comfyui_base_sdxl")
    make_base_dir(base, checkpoint, adapters)
    with serving(base) as server:
        server.checkpoint_name, server.adapter_name = CHECKPOINT_NAME, ADAPTER_NAME
        yield server
