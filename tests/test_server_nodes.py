"""SimDA's nodes in the real ComfyUI server, driven over its HTTP API with API-format prompts:
Load Checkpoint -> SimDA Adapter Loader -> SimDA Latent-Shift Patch -> the host's KSampler on a
batch of frames -> VAE Decode -> Save Image.

One server for the module (tests/live_server.py); a random SD1.5 checkpoint and random SimDA adapters
keep it quick on a CPU. Bad adapter files are written into the server's models/simda folder
before the prompt that names them is queued (the host validates a combo value against the folder).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from live_server import cached_nodes, comfy_server, execution_error  # noqa: F401  (comfy_server is a fixture)

FRAMES = 4
SIZE = 64
STEPS = 2
SIMDA_NODES = ("SimDAAdapterLoader", "SimDALatentShiftPatch")

CHECKPOINT, POSITIVE, NEGATIVE, LATENT, ADAPTERS, SHIFT, SAMPLER, DECODE, SAVE = map(str, range(1, 10))


def video_prompt(server, *, seed: int, prefix: str, adapter_name: str | None = None, strength: float = 1.0,
                 latent_shift: bool = True, size: int = SIZE, steps: int = STEPS, cfg: float = 5.0) -> dict:
    """An API-format prompt: FRAMES frames of ``size`` x ``size`` in one batch, sampled in ``steps``
    steps (``cfg`` 1 samples the positive prompt alone, otherwise cond and uncond share a batch);
    with ``adapter_name`` the MODEL goes through the Adapter Loader, with ``latent_shift``
    through the Latent-Shift Patch, and with neither it is the plain checkpoint."""
    prompt = {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        POSITIVE: {"class_type": "CLIPTextEncode", "inputs": {
            "text": "a red fox running through snow", "clip": [CHECKPOINT, 1]}},
        NEGATIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [CHECKPOINT, 1]}},
        LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": FRAMES}},
    }
    model = [CHECKPOINT, 0]
    if adapter_name is not None:
        prompt[ADAPTERS] = {
            "class_type": "SimDAAdapterLoader",
            "inputs": {"model": model, "adapter_name": adapter_name, "strength": strength},
        }
        model = [ADAPTERS, 0]
    if latent_shift:
        prompt[SHIFT] = {
            "class_type": "SimDALatentShiftPatch",
            "inputs": {
                "model": model, "frames_per_clip": 0, "full_resolution": True, "half_resolution": True,
                "quarter_resolution": True, "eighth_resolution": True, "start_percent": 0.0, "end_percent": 1.0,
                "frame_group_norm": False,
            },
        }
        model = [SHIFT, 0]
    prompt[SAMPLER] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "positive": [POSITIVE, 0], "negative": [NEGATIVE, 0], "latent_image": [LATENT, 0], "denoise": 1.0,
        },
    }
    prompt[DECODE] = {"class_type": "VAEDecode", "inputs": {"samples": [SAMPLER, 0], "vae": [CHECKPOINT, 2]}}
    prompt[SAVE] = {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": prefix}}
    return prompt


def frames_of(server, entry, size: int = SIZE) -> np.ndarray:
    """The saved frames ``[F, H, W, 3]`` (uint8) of a finished prompt."""
    paths = server.output_images(entry)
    assert len(paths) == FRAMES, f"expected {FRAMES} saved frames, got {paths}"
    for path in paths:
        assert path.is_file(), f"{path} was reported but not written"
    frames = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])
    assert frames.shape == (FRAMES, size, size, 3), frames.shape
    return frames


def run_simda(server, seed: int, prefix: str, **options) -> np.ndarray:
    entry = server.run_prompt(
        video_prompt(server, seed=seed, prefix=prefix, adapter_name=server.adapter_name, **options)
    )
    assert execution_error(entry) is None, execution_error(entry)
    return frames_of(server, entry, options.get("size", SIZE))


def assert_still_serving(server, seed: int) -> None:
    """After a refused prompt: the process lives and a good SimDA prompt (a fresh seed, so the
    host samples again rather than answering from its cache) completes. Kept cheap: small frames,
    one step, the positive prompt alone (the clip layout of one group rather than cond + uncond)."""
    assert server.alive(), server.fail("the server died after a bad prompt")
    run_simda(server, seed=seed, prefix=f"after_bad_{seed}", size=32, steps=1, cfg=1.0)


@pytest.fixture(scope="module", autouse=True)
def plain_baseline(comfy_server):
    """The plain checkpoint's frames (seed 0), made before any SimDA node has run in the server;
    its Load Checkpoint output stays in the host's cache and is reused by every later prompt."""
    entry = comfy_server.run_prompt(video_prompt(comfy_server, seed=0, prefix="plain_before", latent_shift=False))
    assert execution_error(entry) is None, execution_error(entry)
    return frames_of(comfy_server, entry)


def test_object_info_describes_the_simda_nodes(comfy_server):
    info = comfy_server.object_info()
    for node_id in SIMDA_NODES:
        assert node_id in info, f"{node_id} is not registered; server log:\n{comfy_server.log_tail()}"
        node = info[node_id]
        assert node["description"].strip(), f"{node_id} has no description"
        assert node["category"].startswith("SimDA"), node["category"]
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs
        for name, (_, options) in inputs.items():
            assert options.get("tooltip", "").strip(), f"{node_id}.{name} has no tooltip"
        assert all(tip.strip() for tip in node["output_tooltips"]), f"{node_id} has an output without a tooltip"
    adapter_combo = info["SimDAAdapterLoader"]["input"]["required"]["adapter_name"]
    options = adapter_combo[1]["options"] if adapter_combo[0] == "COMBO" else adapter_combo[0]
    assert comfy_server.adapter_name in options


def test_simda_prompt_saves_the_frames(comfy_server, plain_baseline):
    frames = run_simda(comfy_server, seed=0, prefix="simda_video")
    assert sorted(p.name for p in comfy_server.output_dir.glob("simda_video_*.png")) == [
        f"simda_video_{i:05d}_.png" for i in range(1, FRAMES + 1)
    ]
    # Same seed and prompt as the plain baseline: only SimDA differs, and it must show.
    difference = np.abs(frames.astype(int) - plain_baseline.astype(int))
    assert difference.mean() > 2, f"SimDA did not change the frames (mean |diff| {difference.mean():.3f})"
    assert frames.std() > 1, "the frames are flat"


def test_strength_out_of_range_is_refused(comfy_server):
    prompt = video_prompt(
        comfy_server, seed=1, prefix="bad_strength", adapter_name=comfy_server.adapter_name, strength=5.0
    )
    status, answer = comfy_server.queue_prompt(prompt)
    if status == 400:  # the host's validation, against the widget's max
        errors = answer["node_errors"][ADAPTERS]["errors"]
        text = " ".join(f"{e['message']} {e['details']}" for e in errors)
        assert "strength" in text and "5.0" in text and "max" in text, text
    else:  # our own check, before any work
        assert status == 200, answer
        entry = comfy_server.wait_history(answer["prompt_id"])
        message = execution_error(entry) or ""
        assert "strength 5.0 is out of range" in message and "use a value from" in message, message
        assert comfy_server.output_images(entry) == []
    assert not list(comfy_server.output_dir.glob("bad_strength_*"))
    assert_still_serving(comfy_server, seed=101)


# -- bad adapter files ---------------------------------------------------------------------------

def _read_ours(path):
    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def truncated(good, folder):
    path = folder / "bad_truncated.safetensors"
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, ["bad_truncated.safetensors", "truncated or corrupt", "download or export it again"]


def no_adapter_keys(good, folder):
    path = folder / "bad_no_adapters.bin"
    torch.save({"conv_in.weight": torch.randn(320, 4, 3, 3), "conv_in.bias": torch.zeros(320)}, path)
    return path, ["bad_no_adapters.bin", "holds no SimDA adapter weights", "pick a file trained with SimDA"]


def nan_weights(good, folder):
    path = folder / "bad_nan.safetensors"
    tensors, meta = _read_ours(good)
    key = sorted(tensors)[0]
    tensors[key][..., 0] = float("nan")
    save_file(tensors, str(path), metadata=meta)
    return path, ["bad_nan.safetensors", "NaN or infinite", key, "use an earlier checkpoint"]


class _RunsCode:
    """Unpickling this creates ``marker``: the kind of payload a malicious .bin carries."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def pickle_that_runs_code(good, folder):
    path = folder / "bad_runs_code.bin"
    marker = folder.parent.parent / "PICKLE_CODE_RAN"
    torch.save(
        {"state_dict": {"down_blocks.0.attentions.0.transformer_blocks.0.adapter_s.D_fc1.weight": _RunsCode(marker)}},
        path,
    )
    # The payload is live: a plain unpickling runs it.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, ["bad_runs_code.bin", "would run code", "refused", "convert it to .safetensors"], marker


def made_for(family, label):
    def write(good, folder):
        path = folder / f"bad_family_{family}.safetensors"
        tensors, meta = _read_ours(good)
        save_file(tensors, str(path), metadata={**meta, "base_family": family})
        return path, [path.name, f"was made for {label}", "the connected MODEL is an SD1.x UNet",
                      "load adapters trained for this model"]

    write.__name__ = f"made_for_{family}"
    return write


BAD_FILES = [truncated, no_adapter_keys, nan_weights, pickle_that_runs_code, made_for("sd2", "an SD2.x UNet"),
             made_for("sd_x4_upscaler", "the SD x4 upscaler")]


@pytest.mark.parametrize("write_bad_file", BAD_FILES, ids=lambda f: f.__name__)
def test_bad_adapter_file_fails_clearly_and_the_server_keeps_serving(comfy_server, write_bad_file):
    written = write_bad_file(comfy_server.simda_dir / comfy_server.adapter_name, comfy_server.simda_dir)
    path, expected, marker = (*written, None) if len(written) == 2 else written
    prefix = f"bad_{path.stem}"
    entry = comfy_server.run_prompt(video_prompt(comfy_server, seed=2, prefix=prefix, adapter_name=path.name))
    message = execution_error(entry)
    assert message is not None, f"the prompt with {path.name} ran"
    for words in expected:
        assert words in message, f"{words!r} not in the error: {message}"
    assert message.startswith("SimDA"), message
    assert not list(comfy_server.output_dir.glob(f"{prefix}_*"))
    if marker is not None:
        assert not marker.exists(), "loading the pickle ran its code"
    assert_still_serving(comfy_server, seed=200 + BAD_FILES.index(write_bad_file))


def test_nothing_is_left_behind_on_the_checkpoint(comfy_server, plain_baseline):
    """The plain checkpoint after SimDA prompts gives the same pixels as before any of them ran,
    from the same cached MODEL object (SimDA patches clones; unpatching must restore the UNet)."""
    run_simda(comfy_server, seed=3, prefix="simda_before_plain_again")
    entry = comfy_server.run_prompt(video_prompt(comfy_server, seed=0, prefix="plain_after", latent_shift=False))
    assert execution_error(entry) is None, execution_error(entry)
    cached = cached_nodes(entry)
    assert CHECKPOINT in cached, "the checkpoint was loaded again, so this compares nothing"
    assert SAMPLER not in cached, "the host answered the sampler from its cache, so this compares nothing"
    frames = frames_of(comfy_server, entry)
    np.testing.assert_array_equal(frames, plain_baseline)


def test_the_host_sees_no_leaked_simda_model(comfy_server):
    """A dropped SimDA MODEL releases its adapters: the patches the host may keep installed on the
    cached UNet until its next load reach them by weak reference only."""
    run_simda(comfy_server, seed=300, prefix="simda_then_leak_check", size=32, steps=1, cfg=1.0)
    log_start = len(comfy_server.log_path.read_text(errors="replace"))
    # Any prompt makes the host check its loaded models first. This one keeps the checkpoint (its
    # cached loader output) but drops the SimDA MODEL and does not sample: a user's next prompt
    # after changing a SimDA setting, or one that fails before sampling, is in the same place.
    entry = comfy_server.run_prompt({
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [LATENT, 0], "vae": [CHECKPOINT, 2]}},
        SAVE: {"class_type": "PreviewImage", "inputs": {"images": [DECODE, 0]}},
    })
    assert execution_error(entry) is None, execution_error(entry)
    log = comfy_server.log_path.read_text(errors="replace")[log_start:]
    assert "memory leak with model SimDAAdapters" not in log, log


def test_plain_sampling_is_bit_identical_after_a_tuning_run(comfy_server, plain_baseline):
    """An Edit Tuner run trains through the cached checkpoint's UNet; the plain checkpoint
    afterwards gives exactly the frames it gave before (the tuner trains on a clone through weight
    wrappers and never replaces or changes the shared UNet's weights)."""
    tuner = "20"
    prompt = {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        POSITIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": "a grey clip", "clip": [CHECKPOINT, 1]}},
        "21": {"class_type": "EmptyImage", "inputs": {
            "width": SIZE, "height": SIZE, "batch_size": FRAMES, "color": 0x808080}},
        tuner: {"class_type": "SimDAEditTuner", "inputs": {
            "model": [CHECKPOINT, 0], "vae": [CHECKPOINT, 2], "source_frames": ["21", 0],
            "source_prompt": [POSITIVE, 0],
            "clip": [CHECKPOINT, 1], "steps": 2, "learning_rate": 1e-3, "seed": 0, "frames": FRAMES, "start_frame": 0,
            "stride": 1, "width": SIZE, "height": SIZE, "gradient_checkpointing": True, "inversion_steps": 2,
            "inversion_scheduler": "ddim_uniform", "source_fps": 8.0,
        }},
        DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [tuner, 1], "vae": [CHECKPOINT, 2]}},
        SAVE: {"class_type": "SaveImage", "inputs": {"images": [DECODE, 0], "filename_prefix": "tuned_inversion"}},
    }
    entry = comfy_server.run_prompt(prompt, timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    assert tuner not in cached_nodes(entry), "the tuner did not run"
    entry = comfy_server.run_prompt(video_prompt(comfy_server, seed=0, prefix="plain_after_tuning", latent_shift=False))
    assert execution_error(entry) is None, execution_error(entry)
    assert CHECKPOINT in cached_nodes(entry), "the checkpoint was loaded again, so this compares nothing"
    assert SAMPLER not in cached_nodes(entry), "the host answered the sampler from its cache, so this compares nothing"
    np.testing.assert_array_equal(frames_of(comfy_server, entry), plain_baseline)
