"""SimDA next to the two video packs most users have, with their real code: ComfyUI-VideoHelperSuite
(VHS) and ComfyUI-AnimateDiff-Evolved (ADE) at the commits scripts/setup_packs.sh pins, installed into
the host's custom_nodes/ the way ComfyUI-Manager does (git clone, or offline the archives in
SIMDA_PACKS_DIR; .ci/run points it at ../shared/packs).

Through the real server (tests/live_server.py ``comfy_server_with_packs``): the three packs load
together; VHS Load Video -> Edit Tuner -> Video Sampler -> VHS Video Combine writes an mp4 of the
right length and frame rate; ADE's Use Evolved Sampling runs a SimDA MODEL through KSampler and the
Video Sampler with its context options and FreeNoise on a clip longer than a window.
In this process, with ADE imported from the host's custom_nodes/ as the host imports it: SimDA
reads ADE's window frame indices (``ad_params["sub_idxs"]``), so a window's UNet call gives what the
same call gives under the host's own context window; ADE's prompt scheduling drives a SimDA MODEL
frame by frame.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from fractions import Fraction

import av
import pytest
import torch

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
from host import HOST_DIR
from live_server import VIDEO_PACKS, comfy_server_with_packs, execution_error, installed_video_packs  # noqa: F401

import comfy.context_windows
import comfy.model_management
import comfy.patcher_extension
import comfy.sample
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.simda_core.host.register import apply_simda, model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from test_prompt_travel import checkpoint, cond_rows, encode, record_cross_attention, simda_model  # noqa: F401
from test_workflows import bigbuckbunny, decode_mp4

pytestmark = pytest.mark.usefixtures("unload_host_models")

DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
FRAMES, SIZE, STEPS = 10, 64, 2
"""ADE clips: 10 frames in windows of 4 (overlap 2), 64x64, two steps."""


def result(output):
    return (output.result if hasattr(output, "result") else output)[0]


# -- through the server ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(comfy_server_with_packs):
    return comfy_server_with_packs


@pytest.fixture(scope="module")
def info(server) -> dict:
    return server.object_info()


def test_the_three_packs_load_together(server, info):
    for node in ("VHS_LoadVideo", "VHS_VideoCombine", "VHS_VideoInfoLoaded", "ADE_UseEvolvedSampling",
                 "ADE_StandardUniformContextOptions", "ADE_PromptScheduling", "SimDAVideoSampler", "SimDAEditTuner",
                 "SimDAPromptTravel", "SimDAKeyframes", "SimDALatentShiftPatch", "SimDAAdapterLoader"):
        assert node in info, f"{node} is not registered"
    log = server.log_path.read_text(errors="replace").splitlines()
    import_lines = [line for line in log if "seconds" in line and "custom_nodes" in line]
    for pack in ("simda", *VIDEO_PACKS):
        (line,) = [line for line in import_lines if line.rstrip().endswith(f"/custom_nodes/{pack}")]
        assert "IMPORT FAILED" not in line, line
    ours = [line for line in log if ("simda" in line.lower() or "SimDA" in line) and line not in import_lines
            and "web root" not in line]
    assert not ours, ours  # not a warning, error or traceback line of ours


def ckpt_nodes(server, adapters: bool = True) -> dict:
    prompt = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a red panda walking"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "shift": {"class_type": "SimDALatentShiftPatch", "inputs": {
            "model": ["adapters", 0] if adapters else ["ckpt", 0], "frames_per_clip": 0, "full_resolution": True,
            "half_resolution": True, "quarter_resolution": True, "eighth_resolution": True, "start_percent": 0.0,
            "end_percent": 1.0, "frame_group_norm": False}},
    }
    if adapters:
        prompt["adapters"] = {"class_type": "SimDAAdapterLoader", "inputs": {
            "model": ["ckpt", 0], "adapter_name": server.adapter_name, "strength": 1.0}}
    return prompt


CONTEXTS = {
    "uniform": ("ADE_StandardUniformContextOptions", {"context_stride": 2}),
    "static": ("ADE_StandardStaticContextOptions", {}),
    "looped": ("ADE_LoopedUniformContextOptions", {"context_stride": 1, "closed_loop": True}),
}


@pytest.mark.parametrize("sampler", ["KSampler", "SimDAVideoSampler"])
@pytest.mark.parametrize(
    "context, noise_type", [("uniform", "FreeNoise"), ("static", "default"), ("looped", "FreeNoise")]
)
def test_ade_evolved_sampling_on_a_simda_model_samples_a_long_clip(server, sampler, context, noise_type):
    prompt = ckpt_nodes(server)
    node, extra = CONTEXTS[context]
    prompt["context"] = {"class_type": node, "inputs": {
        "context_length": 4, "context_overlap": 2, "fuse_method": "pyramid", "use_on_equal_length": False,
        "start_percent": 0.0, "guarantee_steps": 1, **extra}}
    prompt["settings"] = {"class_type": "ADE_AnimateDiffSamplingSettings", "inputs": {
        "batch_offset": 0, "noise_type": noise_type, "seed_gen": "comfy", "seed_offset": 0}}
    prompt["evolved"] = {"class_type": "ADE_UseEvolvedSampling", "inputs": {
        "model": ["shift", 0], "beta_schedule": "autoselect", "context_options": ["context", 0],
        "sample_settings": ["settings", 0]}}
    common = {"model": ["evolved", 0], "positive": ["pos", 0], "negative": ["neg", 0], "seed": 5, "steps": STEPS,
              "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    if sampler == "KSampler":
        prompt["latent"] = {"class_type": "EmptyLatentImage", "inputs": {
            "width": SIZE, "height": SIZE, "batch_size": FRAMES}}
        prompt["sample"] = {"class_type": "KSampler", "inputs": {**common, "latent_image": ["latent", 0]}}
    else:
        prompt["sample"] = {"class_type": "SimDAVideoSampler", "inputs": {
            **common, "frames": FRAMES, "width": SIZE, "height": SIZE, "noise_shared": 0.0}}
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    prompt["save"] = {"class_type": "SaveImage", "inputs": {
        "images": ["decode", 0], "filename_prefix": f"simda/ade_{sampler}_{context}"}}
    before = len(server.log_path.read_text(errors="replace"))
    entry = server.run_prompt(prompt, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(server.output_images(entry)) == FRAMES
    log = server.log_path.read_text(errors="replace")[before:]
    assert "Sliding context window sampling activated" in log, log[-2000:]


def test_vhs_load_video_edit_tuner_video_sampler_vhs_video_combine(server):
    """VHS loads every 2nd frame (select_every_nth), the tuner takes every 2nd of those (stride): the
    edited clip holds frames 4 source frames apart, so its frame rate is the source's / 4 (VHS's
    loaded fps / the tuner's stride) and it plays at the source's speed."""
    source = bigbuckbunny()
    shutil.copyfile(source, server.input_dir / "vhs_source.mp4")
    with av.open(str(source)) as container:
        source_fps = Fraction(container.streams.video[0].average_rate)
    tuned_frames = 4
    prompt = ckpt_nodes(server, adapters=False)
    del prompt["shift"]
    prompt.update({
        "load": {"class_type": "VHS_LoadVideo", "inputs": {
            "video": "vhs_source.mp4", "force_rate": 0, "custom_width": 0, "custom_height": 0, "frame_load_cap": 12,
            "skip_first_frames": 0, "select_every_nth": 2, "format": "None"}},
        "info": {"class_type": "VHS_VideoInfoLoaded", "inputs": {"video_info": ["load", 3]}},
        "empty": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": ""}},
        "tuner": {"class_type": "SimDAEditTuner", "inputs": {
            "model": ["ckpt", 0], "vae": ["ckpt", 2], "source_frames": ["load", 0], "source_prompt": ["pos", 0],
            "steps": 2, "learning_rate": 5e-5, "seed": 0, "frames": tuned_frames, "start_frame": 0, "stride": 2,
            "width": SIZE, "height": SIZE, "gradient_checkpointing": True, "inversion_steps": STEPS,
            "inversion_scheduler": "ddim_uniform", "source_fps": ["info", 0], "clip": ["ckpt", 1]}},
        "sample": {"class_type": "SimDAVideoSampler", "inputs": {
            "model": ["tuner", 0], "positive": ["pos", 0], "negative": ["empty", 0], "frames": tuned_frames,
            "width": SIZE,
            "height": SIZE, "seed": 0, "steps": STEPS, "cfg": 7.5, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0, "noise_shared": 0.0, "start_latent": ["tuner", 1]}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
        "combine": {"class_type": "VHS_VideoCombine", "inputs": {
            "images": ["decode", 0], "frame_rate": ["tuner", 3], "loop_count": 0, "filename_prefix": "simda/vhs_edit",
            "format": "video/h264-mp4", "pingpong": False, "save_output": True, "pix_fmt": "yuv420p", "crf": 19,
            "save_metadata": True, "trim_to_audio": False}},
    })
    entry = server.run_prompt(prompt, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    files = [f for f in entry["outputs"]["combine"]["gifs"] if f["filename"].endswith(".mp4")]
    assert files, entry["outputs"]["combine"]
    path = server.output_dir / files[0]["subfolder"] / files[0]["filename"]
    frames, rate = decode_mp4(path)
    assert frames.shape[0] == tuned_frames and frames.shape[1:3] == (SIZE, SIZE)
    assert abs(float(rate) - float(source_fps) / 4) < 0.01, (rate, source_fps)


# -- ADE in this process -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ade():
    """ADE's node classes, the pack imported from the host's custom_nodes/ as the host imports it."""
    installed_video_packs()
    path = HOST_DIR / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved"
    if "simda_test_ade" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "simda_test_ade", path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["simda_test_ade"] = module
        spec.loader.exec_module(module)
    return sys.modules["simda_test_ade"].NODE_CLASS_MAPPINGS



def evolved(ade, model, context: str, noise_type: str = "default", length: int = 4, stride: int = 1):
    options = {"uniform": ade["ADE_StandardUniformContextOptions"]().create_options(length, stride, 2),
               "looped": ade["ADE_LoopedUniformContextOptions"]().create_options(length, stride, 2, closed_loop=True),
               "static": ade["ADE_StandardStaticContextOptions"]().create_options(length, 2)}[context][0]
    settings = ade["ADE_AnimateDiffSamplingSettings"]().create_settings(0, noise_type, "comfy", 0)[0]
    return ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(
        model, "autoselect", context_options=options, sample_settings=settings
    )[0]


_g = torch.Generator().manual_seed(5)
POSITIVE = [[torch.randn(1, 8, 32, generator=_g), {}]]
NEGATIVE = [[torch.randn(1, 8, 32, generator=_g), {}]]


@pytest.mark.parametrize("context, stride", [("uniform", 2), ("looped", 1)])
def test_simda_sees_ade_windows_at_their_real_frame_positions(ade, context, stride):
    """Each UNet call ADE makes for a window gives exactly what the same call gives under the host's
    own context window over those frames; for strided windows that differs from a contiguous clip."""
    base = host.build_model(host.TINY_UNET, seed=0)
    adapters = SimDAAdapters(model_sites(base))
    host.randomize_(adapters, 3)
    adapters.requires_grad_(False)
    patched = base.clone()
    apply_simda(patched, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), frame_group_norm=True))
    calls = []

    def probe(executor, x, timesteps, context, *args, **kwargs):
        options = args[2] if len(args) > 2 else kwargs["transformer_options"]
        out = executor(x, timesteps, context, *args, **kwargs)
        calls.append((x.clone(), timesteps.clone(), context.clone(), list(options["cond_or_uncond"]),
                      list(options["ad_params"]["sub_idxs"] or []), options["ad_params"]["full_length"], out.clone()))
        return out

    windowed = evolved(ade, patched.clone(), context, stride=stride)
    windowed.add_wrapper_with_key(DIFFUSION_MODEL, "test_probe", probe)
    latent = torch.zeros(12, 4, 8, 8)
    comfy.sample.sample(windowed, comfy.sample.prepare_noise(latent, 0), 2, 4.0, "euler", "normal", POSITIVE, NEGATIVE,
                        latent, disable_pbar=True, seed=0)
    windows = [c for c in calls if c[4]]
    assert windows and {c[5] for c in windows} == {12}
    assert all(len(c[4]) == 4 and c[0].shape[0] == 4 * len(c[3]) for c in windows)
    if stride > 1:
        assert any(b - a == 2 for c in windows for a, b in zip(c[4], c[4][1:])), "no strided window was sampled"
    else:
        assert any(c[4][0] > c[4][-1] for c in windows), "no window wrapped around"
    differs = 0
    for x, t, ctx, cond_or_uncond, sub_idxs, full_length, out in windows:
        host_window = host.index_window(sub_idxs, full_length)
        expected = host.unet_forward(patched, x, t, ctx, cond_or_uncond=cond_or_uncond, context_window=host_window)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
        contiguous = host.unet_forward(patched, x, t, ctx, cond_or_uncond=cond_or_uncond)
        differs += not torch.allclose(out, contiguous, atol=1e-4)
    if stride > 1:
        assert differs > 0, "the frame positions made no difference: the test would not see them being ignored"


def test_ade_prompt_scheduling_drives_a_simda_model(ade, checkpoint):  # noqa: F811
    model, clip = checkpoint
    schedule = ade["ADE_PromptScheduling"]().create_schedule(
        '"0": "a cat walking", "9": "a tiger walking"', clip, max_length=FRAMES
    )[0]
    per_frame = schedule[0][0]
    assert per_frame.shape[0] == FRAMES  # ADE's format: one row per frame, as SimDA Prompt Travel's
    negative = [[encode(clip, "blurry")[0], {}]]
    for windows in (False, True):
        patched = simda_model(model)
        if windows:
            patched = evolved(ade, patched, "uniform", "FreeNoise")
        seen = record_cross_attention(patched)
        SimDAVideoSampler.execute(
            patched, schedule, negative, FRAMES, SIZE, SIZE, 0, STEPS, 5.0, "euler", "normal", 1.0, 0.0
        )
        assert seen
        for window, cond_or_uncond, context in seen:
            frames = list(window) if window is not None else list(range(FRAMES))
            assert (window is not None) == windows and len(frames) == (4 if windows else FRAMES)
            torch.testing.assert_close(
                cond_rows((window, cond_or_uncond, context)), per_frame[frames].to(context.dtype), rtol=1e-3, atol=1e-3
            )


@pytest.mark.parametrize("sampler", ["KSampler", "SimDAVideoSampler"])
def test_simda_prompt_travel_under_ade_windows(ade, checkpoint, sampler):  # noqa: F811
    """SimDA Prompt Travel's per-frame CONDITIONING under ADE's Use Evolved Sampling (windows of 4
    over 10 frames), through KSampler and the Video Sampler: each window's cross-attention sees
    its own frames' rows of the travel."""
    from nodes import KSampler

    from simda_pack.nodes.nodes_prompts import SimDAPromptTravel

    model, clip = checkpoint
    (travel,) = SimDAPromptTravel.execute(clip, "0: a cat walking\n9: a tiger walking", FRAMES).result
    per_frame = travel[0][0]
    assert per_frame.shape[0] == FRAMES
    negative = [[encode(clip, "blurry")[0], {}]]
    patched = evolved(ade, simda_model(model), "uniform")
    seen = record_cross_attention(patched)
    if sampler == "KSampler":
        latent = {"samples": torch.zeros(FRAMES, 4, SIZE // 8, SIZE // 8)}
        KSampler().sample(patched, 0, STEPS, 5.0, "euler", "normal", travel, negative, latent)
    else:
        SimDAVideoSampler.execute(
            patched, travel, negative, FRAMES, SIZE, SIZE, 0, STEPS, 5.0, "euler", "normal", 1.0, 0.0
        )
    assert seen and all(window is not None and len(window) == 4 for window, _, _ in seen)
    for window, cond_or_uncond, context in seen:
        torch.testing.assert_close(
            cond_rows((window, cond_or_uncond, context)), per_frame[list(window)].to(context.dtype),
            rtol=1e-3, atol=1e-3,
        )
