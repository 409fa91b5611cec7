"""Super-resolution training: the collection trainer (``scripts/train_simda.py``) given the SD x4
upscaler, on the real host (its checkpoint loader, UNet, ModelPatcher, VAE, text encoder, SD 4x
Upscale Conditioning, ``SD_X4Upscaler.extra_conds`` and sampler), CPU.

The checkpoint is tests/test_upscaler.py's cached random x4 upscaler with a seeded random text
encoder (``x4_checkpoint_with_text_encoder``). The host builds the x4 model's OpenCLIP ViT-H text
encoder from a fixed configuration, so it cannot be cut down the way the UNet is: 354M parameters,
708 MB in fp16, built once and cached; encoding a caption takes about 1.5 s here. A checkpoint
without a text encoder is refused by the trainer, as for SD1.x: adapters trained on a context that
the user's CLIP Text Encode never makes would not fit sampling.

One run, in this process: 2 synthetic clips (a moving square, 64x64), 4 frames every 2nd at a
64x64 output (16x16 input, 16x16 latent), 2 clips per step, 2 steps, lr 1e-3, noise augmentation
0..0.3, gradient checkpointing on (the default), a 1-step sample clip at the end.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import host  # noqa: F401  (first: puts the host on sys.path and imports the pack as simda_pack)
from test_trainer import train_here, write_clip
from test_upscaler import one_thread  # noqa: F401  (autouse: one torch thread here too)
from test_upscaler import conditioning, smooth_frames, upscale, x4_checkpoint_with_text_encoder

import comfy.sd
import folder_paths
import pytest
import torch
from PIL import Image

from simda_pack.nodes.nodes_adapters import SimDAAdapterLoader
from simda_pack.simda_core.formats import build_adapters, read_adapter_file, save_adapters
from simda_pack.simda_core.host.family import model_family
from simda_pack.simda_core.host.register import model_sites
from simda_pack.simda_core.host.unet_call import call_options, denoising_target, unet_output
from simda_pack.simda_core.training.collection.conditioning import low_resolution, sr_conditioning
from simda_pack.simda_core.training.trainer import initial_adapters

CAPTIONS = ("a red square moving right", "a blue box sliding")
STEPS = 2
NOISE_RANGE = (0.0, 0.3)


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return x4_checkpoint_with_text_encoder()


@pytest.fixture(scope="module")
def x4(checkpoint):
    """``(MODEL, VAE)`` of the checkpoint through the host's loader (the text encoder left out)."""
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=False)
    return model, vae


@pytest.fixture(scope="module")
def sr_run(checkpoint, tmp_path_factory) -> Path:
    clips = tmp_path_factory.mktemp("sr_clips")
    for index, caption in enumerate(CAPTIONS):
        write_clip(clips / f"clip{index}.mp4", seed=index).with_suffix(".txt").write_text(caption)
    output = tmp_path_factory.mktemp("sr_run") / "run"
    code = train_here([
        "--checkpoint", checkpoint, "--data", clips, "--output", output, "--frames", "4", "--stride", "2",
        "--width", "64", "--height", "64", "--steps", STEPS, "--batch", "2", "--lr", "1e-3", "--seed", "7",
        "--workers", "0", "--save-every", STEPS, "--checkpoint-every", STEPS, "--sample-every", STEPS,
        "--sample-steps", "1",
        "--noise-augmentation", *NOISE_RANGE,
    ])
    assert code == 0
    return output


# -- the training call is the host's sampling call -----------------------------------------------

def test_sr_conditioning_is_the_hosts_and_the_training_call_is_apply_model(x4):
    model, _ = x4
    base = model.model
    frames = smooth_frames(8, 64, seed=3).reshape(2, 4, 64, 64, 3)  # 2 clips of 4 frames at the output size
    low = low_resolution(frames)
    assert low.shape == (2, 4, 16, 16, 3) and 0 <= float(low.min()) and float(low.max()) <= 1
    x0 = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    rng = torch.get_rng_state()
    clean = sr_conditioning(model, frames, x0, seed=7, sample_numbers=[0, 1], noise_augmentation=(0.0, 0.0))
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG must be left as it was"
    assert set(clean) == {"c_concat", "y"}
    assert clean["c_concat"].shape == (8, 3, 16, 16) and clean["y"].shape == (8,) and not clean["y"].is_floating_point()
    # No augmentation: the concat image is the downscaled clip in -1..1, as SD 4x Upscale Conditioning makes it.
    torch.testing.assert_close(clean["c_concat"], low.reshape(8, 16, 16, 3).movedim(-1, 1) * 2 - 1)
    assert bool((clean["y"] == 0).all())

    augmented = sr_conditioning(model, frames, x0, seed=7, sample_numbers=[0, 1], noise_augmentation=(0.1, 0.3))
    levels = augmented["y"].reshape(2, 4)
    assert bool((levels == levels[:, :1]).all()), "one noise level per clip"
    assert all(35 <= int(v) <= 105 for v in levels[:, 0]), levels  # round(350 * 0.1..0.3), the host's scale
    assert int(levels[0, 0]) != int(levels[1, 0]), "each clip draws its own level"
    assert float((augmented["c_concat"] - clean["c_concat"]).abs().mean()) > 0.01
    again = sr_conditioning(model, frames[1:], x0[4:], seed=7, sample_numbers=[1], noise_augmentation=(0.1, 0.3))
    for name in augmented:  # a clip's draws depend on its sample number alone (data-parallel shards agree)
        assert torch.equal(again[name], augmented[name][4:]), name

    # The trainer's UNet call is the host's BaseModel.apply_model with these conds: its raw output is
    # the one that denoises to what apply_model returns.
    generator = torch.Generator().manual_seed(2)
    sigma = base.model_sampling.sigmas[torch.tensor([300, 800])].repeat_interleave(4)
    x_noisy = base.model_sampling.noise_scaling(sigma, torch.randn(x0.shape, generator=generator), x0)
    context = torch.randn(8, 77, 1024, generator=generator)
    with torch.no_grad():
        out = unet_output(model, x_noisy, sigma, context, groups=2, conds=augmented)
        hosts = base.apply_model(x_noisy, sigma, c_concat=augmented["c_concat"], c_crossattn=context, y=augmented["y"],
                                 transformer_options=call_options(model, [0, 0]))
    torch.testing.assert_close(out, denoising_target(base.model_sampling, sigma, x_noisy, hosts), rtol=0, atol=0)


# -- a run and what it writes --------------------------------------------------------------------

def test_sr_run_writes_x4_adapters_that_the_video_upscaler_uses(sr_run, x4, tmp_path):
    model, vae = x4
    assert model_family(model) == "sd_x4_upscaler"
    state = torch.load(sr_run / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["family"] == "sd_x4_upscaler" and len(state["losses"]) == STEPS
    assert all(math.isfinite(v) and v > 0 for v in state["losses"]), state["losses"]

    path = sr_run / f"simda_adapters_step{STEPS:06d}.safetensors"
    adapter_file = read_adapter_file(path)
    assert (
        adapter_file.family == "sd_x4_upscaler" and adapter_file.source == "simda" and adapter_file.frames_trained == 4
    )
    assert adapter_file.metadata["resolution"] == "64x64" and adapter_file.metadata["input_resolution"] == "16x16"
    assert adapter_file.metadata["noise_augmentation"] == "0..0.3"
    trained = build_adapters(adapter_file, model_sites(model))  # fits the x4 UNet's sites
    outputs = [t for k, t in trained.state_dict().items() if k.endswith(("fc2.weight", "up.weight"))]
    assert outputs and all(float(t.abs().max()) > 1e-4 for t in outputs), "every zero-initialised output layer trains"

    # The sample: low-resolution input | upscaled | original, 4 frames at the output size each.
    with Image.open(sr_run / "samples" / f"step{STEPS:06d}.webp") as sample:
        assert sample.n_frames == 4 and sample.size == (3 * 64, 64)

    # The trained file through SimDA Adapter Loader and the Video Upscaler, against zero (fresh) adapters.
    folder = tmp_path / "simda"
    folder.mkdir()
    shutil.copy(path, folder / "sr_trained.safetensors")
    save_adapters(initial_adapters(model_sites(model)), folder / "sr_zero.safetensors", family="sd_x4_upscaler")
    folder_paths.add_model_folder_path("simda", str(folder))
    try:
        clip = smooth_frames(4, 16, seed=4)
        images = {}
        for name in ("sr_trained", "sr_zero"):
            loaded = SimDAAdapterLoader.execute(model, f"{name}.safetensors", 1.0)[0]
            images[name] = upscale(loaded, vae, clip, conditioning(1), conditioning(2), steps=2, noise_augmentation=0.1)
    finally:
        folder_paths.folder_names_and_paths["simda"][0].remove(str(folder))
    assert images["sr_trained"].shape == (4, 64, 64, 3) and bool(torch.isfinite(images["sr_trained"]).all())
    change = float((images["sr_trained"] - images["sr_zero"]).abs().max())
    assert change > 1e-3, f"the trained adapters did not change the upscaled frames ({change})"
