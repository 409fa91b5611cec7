"""SimDA Video Upscaler on the real host, CPU.

A seeded random-weight SD x4 upscaler checkpoint (UNet cut to one ResBlock per level and 256 base
channels, which the host's detection still calls SD_X4Upscaler; its full-size 4x KL VAE; no text
encoder: conditioning is random 1024-wide tokens) is built once with the host's own modules,
cached in ``.cache/`` and loaded through ``comfy.sd.load_checkpoint_guess_config`` like a user's
file. Frames are small (16 -> 64, 32 -> 128 pixels): one CPU UNet step at 512 output takes tens of
seconds. Torch runs one thread here (two stall each other on a busy 2-core machine).

The last part drives the node over HTTP on the real server (a looped clip in one group and in
several, a list input, per-frame conditioning rows), watching from outside the pack through the
test-only nodes of tests/fixtures/recording_nodes: which frames and conditioning rows each UNet call
received, and the upscaled frames as tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

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

from live_server import cached_test_models, execution_error, make_base_dir, serving
from node_info import widget_values
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
    FrameGroup, PieceSizes, choose_sizes, cosine_ramp, frame_groups, piece_conditioning, piece_mask, spatial_tiles,
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


def test_a_looped_clip_in_several_groups_ends_with_its_first_frames_and_no_group_repeats_a_frame():
    cases = [(7, 3, 1), (16, 8, 2), (10, 8, 3), (13, 8, 3), (17, 5, 4), (10, 3, 0), (12, 4, 2), (9, 3, 2)]
    for frames, size, context in cases:
        groups = frame_groups(frames, size, context, loop=True)
        assert len(groups) > 1
        new = [f for g in groups for f in range(g.start + g.context, g.stop)]
        assert new == list(range(frames)), (frames, size, context, groups)
        assert all(g.frames <= size for g in groups), groups
        assert all(len(set(g.indices)) == len(g.indices) for g in groups), f"a group holds a frame twice: {groups}"
        assert all(g.closing == 0 for g in groups[:-1])
        last = groups[-1]
        closing = min(context, size - context - 1)  # room for at least one new frame
        # The last call runs ..., F-1 and on into 0, 1, ...: time goes round the loop once.
        assert last.indices[last.stop - last.start - 1:] == [frames - 1] + list(range(closing)), groups
    # Worked by hand: 6 frames in groups of 4 sharing 1 frame; the last group ends with frame 0.
    assert [g.indices for g in frame_groups(6, 4, 1, loop=True)] == [[0, 1, 2, 3], [3, 4, 5, 0]]
    # 7 frames in groups of 3 sharing 1: the open layout's last group [4, 7) is full, so it is cut to
    # [4, 6) and a final group takes 5 (context), 6 and then 0.
    assert [g.indices for g in frame_groups(7, 3, 1, loop=True)] == [[0, 1, 2], [2, 3, 4], [4, 5], [5, 6, 0]]
    # 13 frames in groups of 8 sharing 3: the open layout's last group [5, 13) is full, so it is cut
    # to [5, 11) and a final group takes 8..12 (3 of them context) and then 0, 1, 2.
    assert [g.indices for g in frame_groups(13, 8, 3, loop=True)] == [
        [0, 1, 2, 3, 4, 5, 6, 7], [5, 6, 7, 8, 9, 10], [8, 9, 10, 11, 12, 0, 1, 2]]
    assert frame_groups(8, 8, 2, loop=True) == [FrameGroup(0, 8, 0)], "a loop that fits one group is one call"
    # The closing frames are known latents: mask 0, like the context frames.
    last = frame_groups(6, 4, 1, loop=True)[-1]
    mask = piece_mask(spatial_tiles(8, 8, 8, 8, 0)[0], last)
    assert mask.shape[0] == 4 and mask[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0, 0.0]


def test_per_frame_rows_are_cut_to_each_groups_frames():
    rows = torch.arange(6.0)[:, None, None].expand(6, 3, 2).clone()  # row f holds the value f
    pooled = torch.arange(6.0)[:, None] * 10
    shared = torch.full((1, 3, 2), 7.0)
    conditioning = [[rows, {"pooled_output": pooled, "strength": 0.5}], [shared, {}]]
    piece = piece_conditioning(conditioning, [4, 5, 0], 6)
    assert piece[0][0][:, 0, 0].tolist() == [4.0, 5.0, 0.0]
    assert piece[0][1]["pooled_output"][:, 0].tolist() == [40.0, 50.0, 0.0]
    assert piece[0][1]["strength"] == 0.5 and piece[1][0] is shared
    assert conditioning[0][0].shape[0] == 6 and conditioning[0][1]["pooled_output"].shape[0] == 6, "input changed"


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
    refuses(r"SimDA Video Sampler works with an SD1\.x, SD2\.x or SDXL MODEL; "
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


# -- over HTTP, on the real server: loops, lists, per-frame rows ---------------------------------

RECORDING_NODES = PACK_DIR / "tests" / "fixtures" / "recording_nodes"
"""Test-only nodes (Record UNet Calls, Save Tensor) linked into the server's custom_nodes/: what each
UNet call receives and what the upscaler put out, seen from outside the pack."""
SR_ADAPTERS = "sr.safetensors"
FRAME_RED, RED_STEP = 40, 30
"""Frame i of a test clip is flat red at FRAME_RED + RED_STEP * i (its green and blue hold image-like
content): the x4 model's concatenated low-resolution image tells which frames a UNet call holds."""


@pytest.fixture(scope="module")
def x4_server(tmp_path_factory, sr_adapter_file):
    """The real ComfyUI server with the SD1.5 test checkpoint and adapters of tests/live_server.py,
    the x4 upscaler checkpoint with its text encoder, the random super-resolution adapters
    (models/simda/sr.safetensors) and the recording nodes."""
    checkpoint, adapters = cached_test_models()
    base = tmp_path_factory.mktemp("comfyui_base_x4")
    make_base_dir(base, checkpoint, adapters)
    x4_file = x4_checkpoint_with_text_encoder()
    (base / "models" / "checkpoints" / x4_file.name).symlink_to(x4_file)
    (base / "models" / "simda" / SR_ADAPTERS).symlink_to(sr_adapter_file[0] / SR_ADAPTERS)
    (base / "custom_nodes" / RECORDING_NODES.name).symlink_to(RECORDING_NODES, target_is_directory=True)
    with serving(base) as server:
        yield server


@pytest.fixture(scope="module")
def info(x4_server):
    return x4_server.object_info()


def id_frames(count: int, size: int = 16, seed: int = 0, redrawn: int | None = None) -> np.ndarray:
    """``[count, size, size, 3]`` uint8 frames, frame i flat red at FRAME_RED + RED_STEP * i with
    smooth content in green and blue; ``redrawn``: that frame's content drawn anew (its red kept)."""
    content = smooth_frames(count, size, seed)
    if redrawn is not None:
        content[redrawn] = smooth_frames(1, size, seed + 100)[0]
    frames = (content * 255).round().to(torch.uint8).numpy()
    frames[..., 0] = (FRAME_RED + RED_STEP * np.arange(count))[:, None, None]
    return frames


def put_clip(server, name: str, frames: np.ndarray) -> str:
    """The frames as one animated PNG in the server's input folder, which Load Image reads as a batch."""
    path = server.input_dir / name
    images = [Image.fromarray(frame) for frame in frames]
    images[0].save(path, format="PNG", save_all=True, append_images=images[1:])
    with Image.open(path) as written:
        back = np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(written)])
    assert np.array_equal(back, frames), "the animated PNG does not hold the frames"
    return name


def call_frames(calls: list[dict]) -> list[list[int]]:
    """The clip frames each recorded UNet call held, from the red of its concatenated image."""
    return [[round(((c[0] + 1) / 2 * 255 - FRAME_RED) / RED_STEP) for c in call["concat"]] for call in calls]


def recorded_calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class UpscalerRun:
    """API prompts for the upscaler on the x4 checkpoint: frames from an animated PNG, positive from
    CLIP Text Encode (or ``positive``: a node given by the test), the MODEL through SR adapters, the
    Latent-Shift Patch and the recorder where asked; the output saved as a tensor."""

    def __init__(self, server, info, tmp_path: Path):
        self.server, self.info, self.tmp, self.runs = server, info, tmp_path, 0

    def prompt(self, clip_name: str, *, loop: bool | None = None, adapters: bool = False, record: bool = True,
               positive: dict | None = None, extra: dict | None = None, **settings) -> dict:
        self.runs += 1
        self.output = self.tmp / f"upscaled_{self.runs}.pt"
        self.record = self.tmp / f"calls_{self.runs}.jsonl"
        prompt = {
            "x4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": X4_CLIP_CHECKPOINT.name}},
            "clip": {"class_type": "LoadImage", "inputs": {"image": clip_name}},
            "positive": positive or {"class_type": "CLIPTextEncode",
                                     "inputs": {"text": "a red fox in the snow", "clip": ["x4", 1]}},
            "negative": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["x4", 1]}},
            **(extra or {}),
        }
        model = ["x4", 0]
        if adapters:
            prompt["adapters"] = {"class_type": "SimDAAdapterLoader", "inputs": {
                **widget_values(self.info["SimDAAdapterLoader"]), "model": model, "adapter_name": SR_ADAPTERS}}
            model = ["adapters", 0]
        if loop is not None:
            prompt["shift"] = {"class_type": "SimDALatentShiftPatch", "inputs": {
                **widget_values(self.info["SimDALatentShiftPatch"]), "model": model, "loop": loop}}
            model = ["shift", 0]
        if record:
            prompt["record"] = {"class_type": "TestRecordUNetCalls",
                                "inputs": {"model": model, "path": str(self.record)}}
            model = ["record", 0]
        prompt["upscale"] = {"class_type": "SimDAVideoUpscaler", "inputs": {
            **widget_values(self.info["SimDAVideoUpscaler"]),
            "frames": ["clip", 0], "model": model, "vae": ["x4", 2], "positive": ["positive", 0],
            "negative": ["negative", 0], "seed": 3, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "normal", "tile_overlap": 8, **settings,
        }}
        prompt["save"] = {"class_type": "TestSaveTensor", "inputs": {"value": ["upscale", 0], "path": str(self.output)}}
        return prompt

    def images(self, clip_name: str, **options) -> torch.Tensor:
        """The upscaled frames ``[F, H, W, 3]``; the UNet calls are in ``self.calls``."""
        entry = self.server.run_prompt(self.prompt(clip_name, **options), timeout=600)
        assert execution_error(entry) is None, execution_error(entry)
        self.calls = recorded_calls(self.record)
        return torch.load(self.output)

    def refusal(self, clip_name: str, **options) -> str:
        """The one sentence the prompt was refused with; nothing was sampled or saved."""
        entry = self.server.run_prompt(self.prompt(clip_name, **options), timeout=600)
        error = execution_error(entry)
        assert error is not None, "the prompt ran"
        assert "\n" not in error and error.endswith("."), error
        assert recorded_calls(self.record) == [], "the UNet ran before the refusal"
        assert not self.output.exists()
        return error


@pytest.fixture
def run(x4_server, info, tmp_path):
    return UpscalerRun(x4_server, info, tmp_path)


def moved(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Largest change of each frame between two runs."""
    return [float((x - y).abs().max()) for x, y in zip(a, b)]


def test_a_looped_clip_that_fits_one_group_stays_a_loop(x4_server, run):
    """Plain x4 model, latent shift only: latent shift reads earlier frames only, so in an open clip
    the first frame cannot see the last one; in a loop it does (it follows the last frame)."""
    clip = put_clip(x4_server, "loop_one_group.png", id_frames(4, seed=11))
    redrawn = put_clip(x4_server, "loop_one_group_last_redrawn.png", id_frames(4, seed=11, redrawn=3))
    changes = {}
    for loop in (False, True):
        first = run.images(clip, loop=loop, frames_per_group=4, context_frames=1)
        assert call_frames(run.calls) == [[0, 1, 2, 3]] * 2, "one call per step, holding the whole clip"
        changes[loop] = moved(first, run.images(redrawn, loop=loop, frames_per_group=4, context_frames=1))
    assert changes[False][0] == 0.0 and changes[False][3] > 1e-3, f"open clip: {changes[False]}"
    assert changes[True][0] > 1e-3, f"looped clip: frame 0 does not see the last frame ({changes[True]})"


def test_a_looped_clip_in_several_groups_lays_its_loop_over_the_groups(x4_server, run):
    """SR adapters (their temporal adapter looks at both neighbours) and latent shift; 6 frames in
    groups of 4 sharing 1 frame. Looped, the last group runs on from frame 5 into frame 0 (finished
    by the first group): the end is sampled next to the start. No group wraps onto its own first
    frames: the first group is the same call as in the open clip, so its frames come out the same."""
    clip = put_clip(x4_server, "loop_groups.png", id_frames(6, seed=12))
    settings = dict(adapters=True, frames_per_group=4, context_frames=1)
    open_clip = run.images(clip, loop=False, **settings)
    assert call_frames(run.calls) == [[0, 1, 2, 3]] * 2 + [[3, 4, 5]] * 2
    looped = run.images(clip, loop=True, **settings)
    assert call_frames(run.calls) == [[0, 1, 2, 3]] * 2 + [[3, 4, 5, 0]] * 2
    change = moved(open_clip, looped)
    assert change[:4] == [0.0] * 4, f"a group wrapped onto itself: the first group's frames moved by {change[:4]}"
    assert change[4] > 1e-3 and change[5] > 1e-3, f"the last group did not meet the first frames: {change}"


def test_a_list_of_frames_is_one_clip_and_a_list_of_another_input_is_refused(x4_server, run):
    clip = put_clip(x4_server, "list_input.png", id_frames(4, seed=13))
    whole = run.images(clip, record=False, latent_shift=True)
    as_list = {"frame_list": {"class_type": "RebatchImages", "inputs": {"images": ["clip", 0], "batch_size": 1}}}
    listed = run.prompt(clip, record=False, latent_shift=True, extra=as_list)
    listed["upscale"]["inputs"]["frames"] = ["frame_list", 0]
    entry = x4_server.run_prompt(listed, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    assert torch.equal(torch.load(run.output), whole), "four 1-frame items are not the same clip as the batch"

    # Two conditionings: SD 4x Upscale Conditioning mapped over a list of two 2-frame batches.
    two = {
        "halves": {"class_type": "RebatchImages", "inputs": {"images": ["clip", 0], "batch_size": 2}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["x4", 1]}},
    }
    conditioned = {"class_type": "SD_4XUpscale_Conditioning", "inputs": {
        "images": ["halves", 0], "positive": ["text", 0], "negative": ["text", 0], "scale_ratio": 4.0,
        "noise_augmentation": 0.0}}
    error = run.refusal(clip, positive=conditioned, extra=two)
    assert error.startswith("SimDA Video Upscaler: 'positive' brings 2 values"), error


def travel(frames: int) -> dict:
    return {"class_type": "SimDAPromptTravel", "inputs": {
        "clip": ["x4", 1], "prompts": "0: a red fox in the snow\n-1: a grey wolf on a beach", "frames": frames}}


def row_fingerprints(conditioning) -> torch.Tensor:
    """``[rows, 8]``: per row, the token mean of the first 8 context channels (as the recorder takes it)."""
    return conditioning[0][0][:, :, :8].float().mean(dim=1)


@pytest.mark.parametrize("latent_shift", [False, True])
def test_per_frame_rows_go_with_their_frames_into_every_group(x4_server, run, latent_shift):
    """5 frames, a 5-row Prompt Travel schedule, groups of 2 sharing 1 frame: every UNet call holds
    the schedule's rows of exactly its frames (plain x4 model, with and without latent shift)."""
    clip = put_clip(x4_server, "rows.png", id_frames(5, seed=14))
    rows_file = run.tmp / "rows.pt"
    extra = {"rows": {"class_type": "TestSaveTensor", "inputs": {"value": ["positive", 0], "path": str(rows_file)}}}
    run.images(clip, positive=travel(5), extra=extra, latent_shift=latent_shift, frames_per_group=2,
               context_frames=1)
    schedule = row_fingerprints(torch.load(rows_file))
    assert schedule.shape[0] == 5 and float(torch.cdist(schedule, schedule).add(torch.eye(5)).min()) > 1e-3
    frames = call_frames(run.calls)
    assert frames == [f for g in ([0, 1], [1, 2], [2, 3], [3, 4]) for f in (g, g)], frames
    for call, held in zip(run.calls, frames):
        seen = torch.tensor(call["context"])
        assert seen.shape[0] == len(held)
        torch.testing.assert_close(seen, schedule[held], rtol=1e-4, atol=1e-5, msg=f"the call of frames {held}")


@pytest.mark.parametrize("latent_shift", [False, True])
def test_rows_of_another_length_are_refused_for_the_whole_clip_before_any_work(x4_server, run, latent_shift):
    clip = put_clip(x4_server, "rows_wrong.png", id_frames(5, seed=15))
    error = run.refusal(clip, positive=travel(6), latent_shift=latent_shift, frames_per_group=2, context_frames=1)
    assert error == (  # the Video Sampler's sentence, for the upscaler's whole clip
        "SimDA Video Upscaler: the positive conditioning holds 6 rows, one per frame of a 6-frame prompt schedule, "
        "but the clip has 5 frames; set SimDA Prompt Travel's frames to 5, or use a conditioning with one row."
    ), error
