"""SimDA on SDXL in the real ComfyUI server, over its HTTP API with API-format prompts, on the
random SDXL-family checkpoint of tests/sdxl_server.py (Segmind Vega UNet, full-size CLIP-L + CLIP-G):

- Load Checkpoint -> SimDA Latent-Shift Patch -> SimDA Video Sampler -> VAE Decode -> Create Video
  -> Save Video writes an mp4 of the clip's frames, size and rate;
- SDXL adapters (in our format) through the Adapter Loader; SD1.x adapters are refused;
- the Edit Tuner on a real clip (2 steps, tiny sizes), its adapters saved by Save SimDA Adapters
  and loaded back by the Adapter Loader.
"""
from __future__ import annotations

import re
import shutil
from fractions import Fraction

import numpy as np
import pytest

from live_server import ADAPTER_NAME as SD1_ADAPTER_NAME, cached_test_models, execution_error
from sdxl_server import sdxl_server  # noqa: F401  (a fixture)
from test_workflows import bigbuckbunny, decode_mp4

from simda_pack.simda_core.formats import read_adapter_file

FRAMES, WIDTH, HEIGHT, STEPS, FPS = 4, 64, 48, 2, 8.0
EDIT_SIZE = 64
"""The Edit Tuner trains at 64 px or more."""
SOURCE_CLIP = "e2e_sdxl_bigbuckbunny.mp4"

(
    CHECKPOINT, POSITIVE, NEGATIVE, ADAPTERS, SHIFT, SAMPLER, DECODE, VIDEO, SAVE, SOURCE, COMPONENTS, TUNER, KEEP
) = map(str, range(1, 14))


def text_encode(text: str) -> dict:
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [CHECKPOINT, 1]}}


def latent_shift(model: list) -> dict:
    return {
        "class_type": "SimDALatentShiftPatch",
        "inputs": {
            "model": model, "frames_per_clip": 0, "full_resolution": True, "half_resolution": True,
            "quarter_resolution": True, "eighth_resolution": True, "start_percent": 0.0, "end_percent": 1.0,
            "frame_group_norm": True,
        },
    }


def video_sampler(model: list, seed: int, **extra) -> dict:
    return {
        "class_type": "SimDAVideoSampler",
        "inputs": {
            "model": model, "positive": [POSITIVE, 0], "negative": [NEGATIVE, 0], "frames": FRAMES, "width": WIDTH,
            "height": HEIGHT, "seed": seed, "steps": STEPS, "cfg": 5.0, "sampler_name": "ddim",
            "scheduler": "ddim_uniform",
            "denoise": 1.0, "noise_shared": 0.0, **extra,
        },
    }


def save_video(prefix: str, fps) -> dict:
    return {
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [CHECKPOINT, 2]}},
        VIDEO: {"class_type": "CreateVideo", "inputs": {"images": [DECODE, 0], "fps": fps}},
        SAVE: {"class_type": "SaveVideo", "inputs": {
            "video": [VIDEO, 0], "filename_prefix": f"sdxl/{prefix}", "format": "mp4", "codec": "h264"}},
    }


def text_to_video(server, prefix: str, seed: int = 0, adapter_name: str | None = None) -> dict:
    """Load Checkpoint [-> SimDA Adapter Loader] -> Latent-Shift Patch -> Video Sampler -> VAE Decode
    -> Create Video -> Save Video."""
    prompt = {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        POSITIVE: text_encode("a red fox running through snow"),
        NEGATIVE: text_encode("blurry"),
    }
    model = [CHECKPOINT, 0]
    if adapter_name is not None:
        prompt[ADAPTERS] = {"class_type": "SimDAAdapterLoader", "inputs": {
            "model": model, "adapter_name": adapter_name, "strength": 1.0}}
        model = [ADAPTERS, 0]
    prompt[SHIFT] = latent_shift(model)
    prompt[SAMPLER] = video_sampler([SHIFT, 0], seed)
    prompt.update(save_video(prefix, FPS))
    return prompt


def run_ok(server, prompt: dict, timeout: float = 600) -> dict:
    entry = server.run_prompt(prompt, timeout=timeout)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"].get("completed"), entry["status"]
    return entry


def saved_mp4(server, entry: dict) -> tuple[np.ndarray, Fraction]:
    (item,) = entry["outputs"][SAVE]["images"]
    path = server.output_dir / item["subfolder"] / item["filename"]
    assert path.suffix == ".mp4" and path.is_file(), path
    return decode_mp4(path)


def test_text_to_video_on_sdxl_writes_the_clip(sdxl_server):
    entry = run_ok(sdxl_server, text_to_video(sdxl_server, "t2v"))
    frames, rate = saved_mp4(sdxl_server, entry)
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3), frames.shape
    assert rate == Fraction(FPS), rate
    assert frames.std() > 1, "the frames are flat"


def test_sdxl_adapters_load_and_sd1_adapters_are_refused(sdxl_server):
    server = sdxl_server
    entry = run_ok(server, text_to_video(server, "adapters", adapter_name=server.adapter_name))
    with_adapters, _ = saved_mp4(server, entry)
    plain, _ = saved_mp4(server, run_ok(server, text_to_video(server, "plain")))
    assert with_adapters.shape == plain.shape == (FRAMES, HEIGHT, WIDTH, 3)
    assert np.abs(with_adapters.astype(float) - plain.astype(float)).mean() > 1, "the adapters changed nothing"

    _, sd1_adapters = cached_test_models()
    shutil.copy2(sd1_adapters, server.simda_dir / SD1_ADAPTER_NAME)
    entry = server.run_prompt(text_to_video(server, "sd1_adapters", adapter_name=SD1_ADAPTER_NAME))
    message = execution_error(entry)
    assert message is not None and re.search(
        r"was made for an SD1\.x UNet, but the connected MODEL is an SDXL UNet", message
    ), message


@pytest.fixture(scope="module")
def source_clip(sdxl_server) -> Fraction:
    import av

    source = bigbuckbunny()
    shutil.copyfile(source, sdxl_server.input_dir / SOURCE_CLIP)
    with av.open(str(source)) as container:
        return Fraction(container.streams.video[0].average_rate)


def test_edit_tuner_on_sdxl_saves_adapters_the_loader_takes(sdxl_server, source_clip):
    server = sdxl_server
    stride = 2
    prompt = {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        POSITIVE: text_encode("a rabbit in a meadow"),
        NEGATIVE: text_encode("blurry"),
        SOURCE: {"class_type": "LoadVideo", "inputs": {"file": SOURCE_CLIP}},
        COMPONENTS: {"class_type": "GetVideoComponents", "inputs": {"video": [SOURCE, 0]}},
        TUNER: {
            "class_type": "SimDAEditTuner",
            "inputs": {
                "model": [CHECKPOINT, 0], "vae": [CHECKPOINT, 2], "source_frames": [COMPONENTS, 0],
                "source_prompt": [POSITIVE, 0],
                "clip": [CHECKPOINT, 1], "steps": 2, "learning_rate": 1e-4, "seed": 0, "frames": FRAMES,
                "start_frame": 0,
                "stride": stride, "width": EDIT_SIZE, "height": EDIT_SIZE, "gradient_checkpointing": True,
                "inversion_steps": STEPS,
                "inversion_scheduler": "ddim_uniform", "source_fps": [COMPONENTS, 2],
            },
        },
        KEEP: {"class_type": "SimDASaveAdapters", "inputs": {
            "adapters": [TUNER, 2], "filename_prefix": "e2e_sdxl_edit"}},
        SAMPLER: video_sampler([TUNER, 0], 0, start_latent=[TUNER, 1], width=EDIT_SIZE, height=EDIT_SIZE),
    }
    prompt.update(save_video("edit", [TUNER, 3]))
    saved = server.simda_dir / "e2e_sdxl_edit_00001.safetensors"
    assert not saved.exists()
    log_start = len(server.log_path.read_text(errors="replace"))

    entry = run_ok(server, prompt)
    log = server.log_path.read_text(errors="replace")[log_start:]
    losses = [float(x) for x in re.findall(r"SimDA Edit Tuner: step \d+/2, loss (\S+)", log)]
    assert len(losses) == 2 and np.isfinite(losses).all(), log[-3000:]
    frames, rate = saved_mp4(server, entry)
    assert frames.shape == (FRAMES, EDIT_SIZE, EDIT_SIZE, 3), frames.shape
    assert rate == source_clip / stride, rate
    adapter_file = read_adapter_file(saved)
    assert adapter_file.family == "sdxl" and adapter_file.frames_trained == FRAMES

    frames, _ = saved_mp4(server, run_ok(server, text_to_video(server, "edit_loaded", adapter_name=saved.name)))
    assert frames.shape == (FRAMES, HEIGHT, WIDTH, 3) and frames.std() > 1


@pytest.mark.parametrize("switch", ["full_resolution", "eighth_resolution"])
def test_a_level_choice_that_shifts_nothing_on_sdxl_is_refused(sdxl_server, switch):
    """SDXL has no transformer at the full-resolution level, and its middle block is at the quarter
    level: either switch alone would register no latent shift at all. The prompt is refused with
    the levels this MODEL does have, and nothing is saved."""
    prompt = text_to_video(sdxl_server, f"levels_{switch}", seed=31)
    for name in ("full_resolution", "half_resolution", "quarter_resolution", "eighth_resolution"):
        prompt[SHIFT]["inputs"][name] = name == switch
    entry = sdxl_server.run_prompt(prompt)
    error = execution_error(entry)
    assert error is not None and f"no self-attention transformer at {switch}" in error, error
    assert "its transformers sit at half_resolution, quarter_resolution" in error, error
    assert not list((sdxl_server.output_dir / "sdxl").glob(f"levels_{switch}*"))
