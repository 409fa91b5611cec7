"""SimDA Video Upscaler on the real host, CPU.

A seeded random-weight SD x4 upscaler checkpoint (UNet cut to one ResBlock per level and 256 base
channels, which the host's detection still calls SD_X4Upscaler; its full-size 4x KL VAE; no text
encoder: conditioning is random 1024-wide tokens) is built once with the host's own modules,
cached in ``.cache/`` and loaded through ``comfy.sd.load_checkpoint_guess_config`` like a user's
file. Frames are small (16 -> 64, 32 -> 128 pixels): one CPU UNet step at 512 output takes tens of
seconds. Torch runs one thread here (two stall each other on a busy 2-core machine).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import host  # noqa: F401  (first: puts the host on sys.path and imports the pack as simda_pack)
from host import PACK_DIR

import comfy.model_base
import comfy.model_detection
import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import comfy.utils
import folder_paths
import pytest
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy_extras.nodes_sdupscale import SD_4XUpscale_Conditioning

from simda_pack.nodes.nodes_adapters import SimDAAdapterLoader
from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.nodes.nodes_upscale import (
    MAX_OUTPUT_SIDE, Settings, SimDAVideoUpscaler, upscale_latents, upscaler_model,
)
from simda_pack.simda_core.formats import build_adapters, read_adapter_file, save_adapters
from simda_pack.simda_core.host.family import model_family
from simda_pack.simda_core.host.register import apply_simda, get_config, model_sites
from simda_pack.simda_core.host.unet_call import call_options
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import SimDAConfig
from simda_pack.simda_core.video.clip_noise import clip_noise
from simda_pack.simda_core.video.tiling import (
    PieceSizes, choose_sizes, cosine_ramp, frame_groups, piece_mask, spatial_tiles,
)

CACHE_DIR = PACK_DIR / ".cache"
X4_TEST_UNET = dict(
    image_size=32, in_channels=7, out_channels=4, model_channels=256, channel_mult=[1, 1, 1, 1],
    num_res_blocks=[1, 1, 1, 1],
    transformer_depth=[0, 1, 1, 1], transformer_depth_middle=1, transformer_depth_output=[0, 0, 1, 1, 1, 1, 1, 1],
    context_dim=1024, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
"""The x4 upscaler's layout (256 base channels, 1024 context, linear projections, 7 input channels,
no transformer at the top level, real self-attention only at the lowest of 4 levels) with one
ResBlock per level and no channel growth: 53M UNet parameters instead of 473M."""
X4_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}
"""The x4 upscaler's KL VAE (three levels: 4x); the host reads no size from it, so it stays full size."""
RECIPE = {"unet": X4_TEST_UNET, "vae": X4_VAE, "weights": "seeded, fan-in scaled, float16", "seed": 0, "version": 1}
RECIPE_KEY = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
CHECKPOINT = CACHE_DIR / f"simda_test_x4_upscaler_{RECIPE_KEY}.safetensors"
TEXT = 1024
SHIFT_BLOCKS = {("input", 7, 0), ("middle", 0, 0), ("output", 0, 0), ("output", 1, 0)}
"""The test UNet's transformer blocks with real self-attention (its lowest level)."""
TRANSFORMERS = 10


# -- the checkpoint ------------------------------------------------------------------------------

def random_x4_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write the seeded random x4 upscaler checkpoint with the host's key layout, after checking
    that the host's detection calls it SD_X4Upscaler."""
    model_config = comfy.supported_models.SD_X4Upscaler(dict(X4_TEST_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    host.randomize_(model.diffusion_model, seed)
    vae = AutoencoderKL(ddconfig=dict(X4_VAE), embed_dim=4)
    host.randomize_(vae, seed + 2)
    state = host.checkpoint_state(model, None, vae.state_dict())
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    detected = comfy.model_detection.model_config_from_unet(
        state, comfy.model_detection.unet_prefix_from_state_dict(state)
    )
    if type(detected) is not comfy.supported_models.SD_X4Upscaler:
        raise RuntimeError(f"the random checkpoint is detected as {type(detected).__name__}; fix X4_TEST_UNET")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(state, str(tmp), metadata={"simda_test_recipe": json.dumps(RECIPE, sort_keys=True)})
    os.replace(tmp, path)
    return path


X4_CLIP_RECIPE = {"x4": RECIPE_KEY, "text_encoder": "host SD2ClipModel (OpenCLIP ViT-H), full size",
                  "weights": "seeded, fan-in scaled, float16", "seed": 3, "version": 1}
X4_CLIP_KEY = hashlib.sha256(json.dumps(X4_CLIP_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
X4_CLIP_CHECKPOINT = CACHE_DIR / f"simda_test_x4_upscaler_clip_{X4_CLIP_KEY}.safetensors"


def x4_checkpoint_with_text_encoder() -> Path:
    """The random x4 upscaler checkpoint plus a seeded random text encoder of its own kind (SD2's
    OpenCLIP ViT-H, full size: the host builds it from a fixed config; 354M parameters, 708 MB in
    fp16, built once in seconds), for what needs the x4 checkpoint's CLIP. Cached in .cache/."""
    path = X4_CLIP_CHECKPOINT
    if path.is_file():
        return path
    if not CHECKPOINT.is_file():
        random_x4_checkpoint(CHECKPOINT)
    state, metadata = comfy.utils.load_torch_file(str(CHECKPOINT), return_metadata=True)
    model_config = comfy.supported_models.SD_X4Upscaler(dict(X4_TEST_UNET))
    cpu = torch.device("cpu")
    clip = comfy.sd.CLIP(
        model_config.clip_target(),
        model_options={"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu},
    )
    host.randomize_(clip.cond_stage_model, X4_CLIP_RECIPE["seed"])
    clip_state = model_config.process_clip_state_dict_for_saving(clip.get_sd())
    # The host's loader must find every text-encoder weight again under the names it reads.
    wanted = {k for k in clip.get_sd() if not k.endswith((".logit_scale", ".text_projection.weight"))}
    found = set(model_config.process_clip_state_dict(dict(clip_state)))
    if wanted - found:
        raise RuntimeError(f"the host would not load these text-encoder weights: {sorted(wanted - found)[:5]}")
    state.update({k: v.to(torch.float16).contiguous() for k, v in clip_state.items()})
    del clip
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(
        state, str(tmp), metadata={**(metadata or {}), "simda_test_x4_clip": json.dumps(X4_CLIP_RECIPE)}
    )
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def x4():
    """``(MODEL, VAE)`` of the cached checkpoint, loaded by the host's checkpoint loader."""
    if not CHECKPOINT.is_file():
        random_x4_checkpoint(CHECKPOINT)
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(CHECKPOINT), output_vae=True, output_clip=False)
    return model, vae


@pytest.fixture(scope="module")
def sr_adapter_file(tmp_path_factory, x4):
    """Random (non-zero) super-resolution adapters for the x4 model, saved in our format into a
    folder registered as models/simda; also an SD1.x adapter file for the wrong-family checks."""
    folder = tmp_path_factory.mktemp("simda_models")
    adapters = random_adapters(model_sites(x4[0]), seed=5)
    save_adapters(adapters, folder / "sr.safetensors", family="sd_x4_upscaler", frames_trained=8)
    sd1 = host.build_model(host.TINY_UNET, seed=None)
    save_adapters(random_adapters(model_sites(sd1), seed=6), folder / "sd1.safetensors", family="sd1")
    folder_paths.add_model_folder_path("simda", str(folder))
    yield folder, adapters
    folder_paths.folder_names_and_paths["simda"][0].remove(str(folder))


@pytest.fixture
def progress():
    """Every (value, total) the host's progress hook receives during the test."""
    seen: list[tuple[int, int]] = []
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))

    comfy.utils.set_progress_bar_global_hook(hook)
    yield seen
    comfy.utils.set_progress_bar_global_hook(previous)


def random_adapters(sites, seed: int) -> SimDAAdapters:
    adapters = SimDAAdapters(sites)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    return adapters.requires_grad_(False)


def conditioning(seed: int, width: int = TEXT) -> list:
    return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), {}]]


def smooth_frames(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[count, size, size, 3]`` image-like frames: random colours at 1/4 resolution, bilinear up."""
    coarse = torch.rand(count, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear").movedim(1, -1)


DEFAULTS = dict(
    noise_augmentation=0.0, seed=3, steps=2, cfg=1.0, sampler_name="euler", scheduler="normal",
    frames_per_group=0, context_frames=2, tile_size=0, tile_overlap=8, latent_shift=True,
)


def upscale(model, vae, frames, positive=None, negative=None, **settings) -> torch.Tensor:
    """The node as the host's executor calls it (is_input_list: every input is a list)."""
    values = {**DEFAULTS, **settings}
    with torch.inference_mode():  # as the host's executor runs nodes
        output = SimDAVideoUpscaler.execute(
            frames=frames if isinstance(frames, list) else [frames], model=[model], vae=[vae],
            positive=[positive or conditioning(1)], negative=[negative or conditioning(2)],
            **{name: [value] for name, value in values.items()},
        )
    return output[0]


def latents(model, frames, frames_per_group, context, tile=None, overlap=8, **settings) -> torch.Tensor:
    """The node's sampling stage alone (no VAE decode): ``[F, 4, H, W]``."""
    values = {**DEFAULTS, **settings, "frames_per_group": frames_per_group, "context_frames": context,
              "tile_size": tile or frames.shape[1], "tile_overlap": overlap}
    values.pop("latent_shift")
    sizes = PieceSizes(frames_per_group, values["tile_size"], values["tile_size"])
    with torch.inference_mode():
        return upscale_latents(model, frames, conditioning(1), conditioning(2), Settings(**values), sizes)


# -- tiling (pure) -------------------------------------------------------------------------------

def test_frame_groups_make_every_frame_new_once_after_its_context():
    for frames, size, context in [(16, 16, 2), (16, 8, 2), (17, 5, 4), (3, 8, 0), (10, 3, 2), (9, 4, 0)]:
        groups = frame_groups(frames, size, context)
        new = [f for g in groups for f in range(g.start + g.context, g.stop)]
        assert new == list(range(frames)), (frames, size, context, groups)
        assert all(g.frames <= size for g in groups)
        assert groups[0].context == 0 and all(g.context == context for g in groups[1:])
        assert all(b.start == a.stop - context for a, b in zip(groups, groups[1:]))
    with pytest.raises(ValueError, match="fewer than the frames per group"):
        frame_groups(8, 2, 2)


def test_tiles_cover_the_latent_with_at_least_the_overlap():
    for height, width, tile, overlap in [
        (32, 32, 16, 8), (64, 40, 24, 8), (100, 100, 64, 8), (20, 20, 64, 8), (33, 17, 16, 4)
    ]:
        tiles = spatial_tiles(height, width, tile, tile, overlap)
        cover = torch.zeros(height, width, dtype=torch.int32)
        for t in tiles:
            cover[t.rows, t.cols] += 1
            assert t.top + t.height <= height and t.left + t.width <= width
            assert (t.known_top == 0) == (t.top == 0) and (t.known_left == 0) == (t.left == 0)
            assert t.known_top == 0 or t.known_top >= overlap
            assert t.known_left == 0 or t.known_left >= overlap
        assert bool((cover >= 1).all()), (height, width, tile, overlap)
    assert len(spatial_tiles(20, 20, 64, 64, 8)) == 1


def test_blend_masks_keep_finished_parts_and_fade_in_smoothly():
    ramp = cosine_ramp(8)
    assert bool((ramp > 0).all() and (ramp < 1).all() and (ramp[1:] > ramp[:-1]).all())
    torch.testing.assert_close(ramp + ramp.flip(0), torch.ones(8))  # symmetric: the two sides share evenly
    groups = frame_groups(6, 4, 2)
    tiles = spatial_tiles(32, 32, 16, 16, 8)
    assert piece_mask(tiles[0], groups[0]) is None  # the first piece: the plain sampling call
    mask = piece_mask(tiles[4], groups[1])  # the middle tile of a later group: [4 frames, 1, 16, 16]
    assert mask.shape == (4, 1, 16, 16)
    assert bool((mask[:2] == 0).all()), "context frames must stay as the previous group left them"
    new = mask[2:, 0]
    assert bool((new[:, :8, :] < 1).all() and (new[:, :, :8] < 1).all()), "the shared bands must fade in"
    assert bool((new[:, 8:, 8:] == 1).all()), "the rest of the tile is the new piece's"


def test_automatic_sizes_follow_the_memory_budget():
    per_pixel = 1000.0  # bytes per latent pixel of one frame
    frame = per_pixel * 256 * 256
    assert choose_sizes(16, 256, 256, 20 * frame, per_pixel, 8, 64) == PieceSizes(16, 256, 256)  # the whole clip fits
    # whole frames, groups
    assert choose_sizes(16, 256, 256, 10.5 * frame, per_pixel, 8, 64) == PieceSizes(10, 256, 256)
    small = choose_sizes(16, 256, 256, 2 * frame, per_pixel, 8, 64)  # not even 8 frames: 8-frame groups of tiles
    assert small.frames_per_group == 8 and small.tile_height == small.tile_width == 128
    assert 8 * per_pixel * small.tile_height * small.tile_width <= 2 * frame
    assert choose_sizes(16, 256, 256, 0.0, per_pixel, 8, 64) == PieceSizes(8, 64, 64)  # never below the smallest tile
    assert choose_sizes(3, 256, 256, 3 * frame, per_pixel, 8, 64) == PieceSizes(3, 256, 256)  # short clips stay whole


# -- the checkpoint and the model ----------------------------------------------------------------

def test_random_checkpoint_is_the_x4_upscaler_to_the_hosts_loader(x4):
    model, vae = x4
    state = comfy.utils.load_torch_file(str(CHECKPOINT))
    detected = comfy.model_detection.model_config_from_unet(state, "model.diffusion_model.")
    assert type(detected) is comfy.supported_models.SD_X4Upscaler
    assert type(model.model) is comfy.model_base.SD_X4Upscaler
    assert model_family(model) == "sd_x4_upscaler"
    assert vae.upscale_ratio == 4 and vae.downscale_ratio == 4
    sites = model_sites(model)
    assert len(sites) == TRANSFORMERS and min(s.level for s in sites) == 1  # no transformer at the top level
    assert {s.level for s in sites if any(s.self_attention)} == {3}


def test_adapters_and_group_norm_everywhere_latent_shift_only_on_real_self_attention(x4, sr_adapter_file):
    model, _ = x4
    loaded = SimDAAdapterLoader.execute(model, "sr.safetensors", 1.0)[0]
    sampling = upscaler_model(loaded, latent_shift=True)  # what the node samples with
    config = get_config(sampling)
    assert config.family == "sd_x4_upscaler" and config.adapters is not None and config.uses_frame_group_norm
    replaced = sampling.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert set(replaced) == SHIFT_BLOCKS
    keys = set(config.object_patch_keys)
    for site in model_sites(model):
        assert f"diffusion_model.{site.path}.forward" in keys  # temporal adapter
        assert f"diffusion_model.{site.block_path(0)}.ff.forward" in keys  # FFN adapter
    assert "diffusion_model.out.0.forward" in keys  # frame-shared GroupNorm, output norm
    assert "diffusion_model.input_blocks.1.0.in_layers.0.forward" in keys  # and the top-level ResBlocks


def test_sr_adapters_round_trip_in_our_format(x4, sr_adapter_file):
    model, _ = x4
    folder, adapters = sr_adapter_file
    read = read_adapter_file(folder / "sr.safetensors")
    assert read.family == "sd_x4_upscaler" and read.source == "simda" and read.frames_trained == 8
    assert read.sites == model_sites(model)  # paths, channels, levels and the self-attention flags
    rebuilt = build_adapters(read, model_sites(model))
    for key, tensor in adapters.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], tensor), key
    # The loader's MODEL computes what registering the adapters directly computes.
    loaded = SimDAAdapterLoader.execute(model, "sr.safetensors", 1.0)[0]
    direct = apply_simda(model.clone(), SimDAConfig(adapters=adapters, family="sd_x4_upscaler"))
    plain = model.clone()
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(3, 7, 16, 16, generator=generator)
    context = torch.randn(3, 77, TEXT, generator=generator)
    outputs = []
    for patcher in (loaded, direct, plain):
        with host.patched(patcher), torch.no_grad():
            outputs.append(patcher.model.diffusion_model(
                x, torch.full((3,), 500.0), context=context, y=torch.zeros(3, dtype=torch.long),
                transformer_options=call_options(patcher, [0])))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-3, "the loaded adapters changed nothing"


# -- the node: frames, order, size ---------------------------------------------------------------

def test_frames_come_back_4x_in_count_and_order(x4, progress):
    model, vae = x4
    clip = smooth_frames(4, 16, seed=1)
    changed = clip.clone()
    changed[1] = smooth_frames(1, 16, seed=99)[0]
    # Plain x4 model, latent shift off: each output frame depends on its own input frame alone, also
    # across the group borders (groups of 2 with 1 context frame: 3 groups).
    first = upscale(model, vae, clip, latent_shift=False, frames_per_group=2, context_frames=1)
    second = upscale(model, vae, changed, latent_shift=False, frames_per_group=2, context_frames=1)
    assert first.shape == (4, 64, 64, 3) and first.dtype == torch.float32
    assert bool(torch.isfinite(first).all()) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert float((first[0] - first[3]).abs().mean()) > 1e-3, "different frames came out alike"
    moved = [float((a - b).abs().max()) for a, b in zip(first, second)]
    assert moved[1] > 1e-3 and moved[0] == moved[2] == moved[3] == 0.0, f"max change per output frame: {moved}"
    assert progress[-1] == (3 * 2, 3 * 2)


# -- temporal context across group borders ------------------------------------------------------

def test_groups_continue_from_the_finished_frames_and_never_rewrite_them(x4):
    model = upscaler_model(x4[0], latent_shift=True)
    clip = smooth_frames(4, 16, seed=2)
    changed = clip.clone()
    changed[1] = smooth_frames(1, 16, seed=98)[0]

    def change(a, b):
        return [float((x - y).abs().max()) for x, y in zip(a, b)]

    # Groups [0, 2), [1, 3), [2, 4): frame 1 is the context of the second group. Latent shift is
    # causal (earlier frames only), so frame 0 cannot move; frames 2 and 3 see frame 1 only through
    # the group borders.
    with_context = latents(model, clip, 2, 1)
    moved = change(with_context, latents(model, changed, 2, 1))
    assert moved[0] == 0.0 and moved[1] > 1e-4 and moved[2] > 1e-4 and moved[3] > 1e-4, moved
    # Without context the groups [0, 2), [2, 4) are independent clips: frame 1 cannot reach 2 and 3.
    moved = change(latents(model, clip, 2, 0), latents(model, changed, 2, 0))
    assert moved[1] > 1e-4 and moved[2] == 0.0 and moved[3] == 0.0, moved
    # The context frames are the previous group's result, kept exactly.
    torch.testing.assert_close(with_context[:2], latents(model, clip[:2], 2, 0), rtol=0, atol=0)


# -- one piece is the untiled pass ---------------------------------------------------------------

def test_one_tile_and_one_group_reproduce_the_untiled_pass_exactly(x4, sr_adapter_file):
    model, vae = x4
    simda = SimDALatentShiftPatch.execute(
        SimDAAdapterLoader.execute(model, "sr.safetensors", 1.0)[0], frames_per_clip=0, full_resolution=True,
        half_resolution=True, quarter_resolution=True, eighth_resolution=True, start_percent=0.0, end_percent=1.0,
        frame_group_norm=False,
    )[0]
    clip = smooth_frames(3, 16, seed=3)
    positive, negative = conditioning(11), conditioning(12)
    settings = dict(noise_augmentation=0.1, seed=7, steps=2, cfg=2.5, sampler_name="euler", scheduler="normal")
    node = upscale(simda, vae, clip, positive, negative, frames_per_group=8, tile_size=64, **settings)

    # The untiled pass as a user wires it: SD 4x Upscale Conditioning -> KSampler -> VAE Decode,
    # with the clip's per-frame noise.
    with torch.inference_mode():
        cond_pos, cond_neg, empty = SD_4XUpscale_Conditioning.execute(
            clip, positive, negative, 4.0, settings["noise_augmentation"]
        ).args
        reference = comfy.sample.sample(
            simda, clip_noise(tuple(empty["samples"].shape), settings["seed"], 0.0), settings["steps"], settings["cfg"],
            settings["sampler_name"], settings["scheduler"], cond_pos, cond_neg, empty["samples"],
            seed=settings["seed"],
        )
        reference = vae.decode(reference)
    assert torch.equal(node, reference)


# -- several tiles: no seams ---------------------------------------------------------------------

def column_gradients(images: torch.Tensor) -> torch.Tensor:
    """Mean |I[x] - I[x-1]| per column boundary x = 1..W-1 of ``[F, H, W, C]`` images."""
    return (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(0, 1, 3)).detach()


def seam_ratio(images: torch.Tensor, lines: set[int], reach: int = 2) -> tuple[float, float]:
    """Image gradient across the column boundaries within ``reach`` pixels of ``lines``, against
    the other column boundaries: ``(mean there / mean elsewhere, max there / max elsewhere)``."""
    gradient = column_gradients(images)  # gradient[i]: between columns i and i + 1
    boundaries = torch.arange(1, images.shape[2])
    near = torch.zeros(len(gradient), dtype=torch.bool)
    for line in lines:
        near |= (boundaries - line).abs() <= reach
    there, elsewhere = gradient[near], gradient[~near]
    return float(there.mean() / elsewhere.mean()), float(there.max() / elsewhere.max())


def tile_lines(size: int, tile: int, overlap: int) -> set[int]:
    """Output-pixel columns where a tile begins or ends (inside the image)."""
    lines = set()
    for t in spatial_tiles(size, size, tile, tile, overlap):
        lines |= {4 * t.left, 4 * (t.left + t.width)}
    return {x for x in lines if 0 < x < 4 * size}


def test_several_tiles_leave_no_seam(x4, progress, record_property):
    model, vae = x4
    size, tile, overlap = 32, 16, 8  # 3 x 3 tiles of 16 input pixels, sharing 8
    clip = smooth_frames(2, size, seed=4)
    images = upscale(model, vae, clip, frames_per_group=4, tile_size=tile, tile_overlap=overlap)
    assert images.shape == (2, 4 * size, 4 * size, 3)
    assert progress[-1] == (9 * 2, 9 * 2), "one progress bar over every step of the 9 pieces"
    assert all(b[0] >= a[0] for a, b in zip(progress, progress[1:]))

    lines = tile_lines(size, tile, overlap)
    columns = seam_ratio(images, lines)
    rows = seam_ratio(images.transpose(1, 2), lines)
    record_property("seam_gradient_ratio_columns_mean_max", columns)
    record_property("seam_gradient_ratio_rows_mean_max", rows)
    print(f"tile-border gradient / elsewhere: columns mean {columns[0]:.3f} max {columns[1]:.3f}; "
          f"rows mean {rows[0]:.3f} max {rows[1]:.3f}")
    # With these inputs: columns mean 1.066 max 0.991, rows mean 1.032 max 0.968. The untiled image has
    # mean 1.064 / 0.998 at the same lines (they fall on the UNet's coarsest grid), max 0.92 / 0.99.
    assert columns[1] <= 1.05 and rows[1] <= 1.05, (columns, rows)
    assert columns[0] <= 1.1 and rows[0] <= 1.1, (columns, rows)

    # The measure sees a seam: the same frames with the right half taken from the other frame
    # (independent content meeting at column 64, as unblended tiles would) fail it (here: mean
    # 1.42, max 2.11; tiles sampled side by side without overlap gave rows mean 1.13, max 1.33).
    spliced = images.clone()
    spliced[0, :, 64:] = images[1, :, 64:]
    spliced[1, :, 64:] = images[0, :, 64:]
    seam = seam_ratio(spliced, {64})
    print(f"a hard seam: mean {seam[0]:.3f} max {seam[1]:.3f}")
    assert seam[0] > 1.1 and seam[1] > 1.05, seam


# -- Cancel --------------------------------------------------------------------------------------

def test_cancel_stops_between_pieces(x4):
    model, vae = x4
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value >= 1:  # the first step of the first piece is done: the user presses Cancel
            comfy.model_management.interrupt_current_processing(True)

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            upscale(model, vae, smooth_frames(1, 32, seed=5), steps=1, tile_size=16, tile_overlap=8)
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        comfy.model_management.interrupt_current_processing(False)
    assert max(seen) == 1, f"sampling went on after Cancel: progress {seen} of 9 pieces"


# -- bad input: clear errors before any work -----------------------------------------------------

def refuses(match: str, call) -> None:
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda *a, **k: seen.append(a))
    try:
        with pytest.raises(ValueError, match=match):
            call()
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
    assert not seen, "work started before the error"


def test_an_sd15_model_in_the_upscaler_and_the_x4_in_the_video_sampler_are_refused(x4):
    model, vae = x4
    sd15 = host.build_model(host.TINY_UNET, seed=None)
    refuses(r"needs the SD x4 upscaler MODEL.*connected MODEL is an SD1\.x UNet",
            lambda: upscale(sd15, vae, smooth_frames(2, 16)))
    refuses(r"SimDA Video Sampler samples with an SD1\.x, SD2\.x or SDXL MODEL; "
            r"the connected MODEL is the SD x4 upscaler",
            lambda: SimDAVideoSampler.execute(model, conditioning(1), conditioning(2), 2, 64, 64, 0, 2, 1.0, "euler",
                                              "normal", 1.0, 0.0))


def test_adapters_of_the_other_family_are_refused(x4, sr_adapter_file):
    model, _ = x4
    refuses(r"made for an SD1\.x UNet, but the connected MODEL is the SD x4 upscaler",
            lambda: SimDAAdapterLoader.execute(model, "sd1.safetensors", 1.0))
    sd15 = host.build_model(host.TINY_UNET, seed=None)
    refuses(r"made for the SD x4 upscaler, but the connected MODEL is an SD1\.x UNet",
            lambda: SimDAAdapterLoader.execute(sd15, "sr.safetensors", 1.0))


def test_frames_of_mixed_sizes_are_refused(x4):
    model, vae = x4
    frames = [smooth_frames(2, 16), smooth_frames(1, 24)]
    refuses(r"the frames have different sizes \(16x16, 24x24\)", lambda: upscale(model, vae, frames))


def test_output_over_the_stated_limit_is_refused(x4):
    model, vae = x4
    too_wide = torch.zeros(1, 16, MAX_OUTPUT_SIDE // 4 + 8, 3)
    refuses(rf"would become {4 * (MAX_OUTPUT_SIDE // 4 + 8)}x64; this node makes frames up to {MAX_OUTPUT_SIDE} pixels",
            lambda: upscale(model, vae, too_wide))


def test_a_vae_or_conditioning_of_another_model_is_refused(x4):
    model, vae = x4
    taesd = comfy.sd.VAE(sd=comfy.taesd.taesd.TAESD().state_dict())
    refuses(r"the connected VAE scales by 8", lambda: upscale(model, taesd, smooth_frames(1, 16)))
    refuses(r"768-wide text tokens, but the x4 upscaler reads 1024-wide",
            lambda: upscale(model, vae, smooth_frames(1, 16), positive=conditioning(1, width=768)))


def test_settings_out_of_range_are_refused(x4):
    model, vae = x4
    refuses(r"context_frames \(4\) must be fewer than frames_per_group \(4\)",
            lambda: upscale(model, vae, smooth_frames(1, 16), frames_per_group=4, context_frames=4))
    refuses(r"tile_overlap 40 is more than half of tile_size 64",
            lambda: upscale(model, vae, smooth_frames(1, 16), tile_size=64, tile_overlap=40))
