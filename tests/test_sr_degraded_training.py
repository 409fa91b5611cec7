"""Super-resolution training on realistic degradations, on the real host (x4 checkpoint loader, SD 4x
Upscale Conditioning, ``extra_conds``, sampler), CPU: each clip's concat image is its own degraded
input; a run through ``scripts/train_simda.py`` with a held-out ``--sample-clip`` writes the
side-by-side pictures (low-res | plain x4 | SimDA | ground truth, PNG and MP4) and their quality
scores; bad degradation settings stop the run before anything is written.

Checkpoint: tests/test_upscaler.py's cached random x4 upscaler with a seeded random text encoder
(the pictures are noise; what is checked is what gets written and from which frames)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import host  # noqa: F401  (first: puts the host on sys.path and imports the pack as simda_pack)
from test_trainer import train_here, write_clip
from test_upscaler import one_thread  # noqa: F401  (autouse: one torch thread here too)
from test_upscaler import smooth_frames, x4_checkpoint_with_text_encoder

import av
import numpy as np
import comfy.sd
import pytest
import torch
from PIL import Image

from simda_pack.simda_core.formats import read_adapter_file
from simda_pack.simda_core.training.collection.conditioning import clip_degradations, low_resolution, sr_conditioning
from simda_pack.simda_core.training.degradations import DegradationConfig
from simda_pack.simda_core.training.video_data import ClipSampling, derived_seed, load_sample

SIZE, FRAMES = 64, 4


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return x4_checkpoint_with_text_encoder()


def test_each_clip_is_conditioned_on_its_own_degraded_input(checkpoint):
    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    frames = smooth_frames(2 * FRAMES, SIZE, seed=3).reshape(2, FRAMES, SIZE, SIZE, 3)
    x0 = torch.randn(2 * FRAMES, 4, SIZE // 4, SIZE // 4, generator=torch.Generator().manual_seed(1))
    config = DegradationConfig(blur_probability=1.0, noise_probability=1.0, jpeg_probability=1.0)
    degradations = clip_degradations(config, seed=7, step=3, slots=range(2))
    assert degradations[0] != degradations[1]
    assert clip_degradations(config, seed=7, step=3, slots=range(1, 2)) == degradations[1:]  # a shard's draws agree

    degraded = sr_conditioning(model, frames, x0, 7, [6, 7], (0.0, 0.0), degradations)
    clean = sr_conditioning(model, frames, x0, 7, [6, 7], (0.0, 0.0))
    for clip in range(2):
        expected = low_resolution(frames[clip], degradations[clip]).movedim(-1, 1) * 2 - 1
        torch.testing.assert_close(degraded["c_concat"][clip * FRAMES:(clip + 1) * FRAMES], expected)
    torch.testing.assert_close(
        clean["c_concat"], low_resolution(frames).reshape(-1, SIZE // 4, SIZE // 4, 3).movedim(-1, 1) * 2 - 1
    )
    assert float((degraded["c_concat"] - clean["c_concat"]).abs().mean()) > 0.02
    assert torch.equal(degraded["y"], clean["y"])


@pytest.fixture(scope="module")
def sr_run(checkpoint, tmp_path_factory):
    clips = tmp_path_factory.mktemp("clips")
    write_clip(clips / "train.mp4", seed=0).with_suffix(".txt").write_text("a red square moving right")
    held_out = write_clip(tmp_path_factory.mktemp("held_out") / "held_out.mp4", seed=5)
    output = tmp_path_factory.mktemp("run") / "run"
    code = train_here([
        "--checkpoint", checkpoint, "--data", clips, "--output", output, "--frames", FRAMES, "--stride", "2",
        "--width", SIZE, "--height", SIZE, "--steps", "1", "--batch", "1", "--lr", "1e-3", "--seed", "3",
        "--workers", "0",
        "--sample-every", "1", "--sample-steps", "1", "--sample-clip", held_out, "--jpeg-quality", "30", "60",
    ])
    assert code == 0
    return output, held_out


def test_a_run_writes_side_by_side_pictures_of_the_held_out_clip(sr_run):
    output, held_out = sr_run
    samples = output / "samples"
    with Image.open(samples / "step000001.png") as png:
        picture = torch.from_numpy(np.array(png.convert("RGB"))).float() / 255
    gap = 4
    top = picture.shape[0] - (FRAMES * (SIZE + gap) - gap)  # the caption and labels above the frames
    assert picture.shape[1] == 4 * (SIZE + gap) - gap and 30 <= top <= 200
    # Last column: the held-out clip itself (centre crop at the training size), frame 0 in the first row.
    truth = load_sample(held_out, ClipSampling(FRAMES, 2, SIZE, SIZE, "center"), derived_seed(3, "sample clip"))
    shown_truth = picture[top:top + SIZE, 3 * (SIZE + gap):]
    assert float((shown_truth - truth[0]).abs().max()) <= 1 / 255 + 1e-6
    # First column: its degraded 4x-smaller input, shown in 4x4 blocks.
    shown_input = picture[top:top + SIZE, :SIZE]
    assert torch.equal(shown_input[::4, ::4].repeat_interleave(4, 0).repeat_interleave(4, 1), shown_input)
    assert float((shown_input - truth[0]).abs().mean()) > 0.005

    with av.open(str(samples / "step000001.mp4")) as container:
        video = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(video) == FRAMES and video[0].shape == (SIZE, 4 * SIZE, 3)
    with Image.open(samples / "step000001.webp") as webp:
        assert webp.n_frames == FRAMES and webp.size == (3 * SIZE, SIZE)
    assert (output / "sr_sample.png").read_bytes() == (samples / "step000001.png").read_bytes()
    assert (output / "sr_sample.mp4").read_bytes() == (samples / "step000001.mp4").read_bytes()
    assert (output / "loss.png").is_file()

    with open(samples / "quality.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["step"] == "1"
    for name in ("plain_psnr", "plain_ssim", "plain_temporal_consistency", "simda_psnr", "simda_ssim",
                 "simda_temporal_consistency"):
        assert math.isfinite(float(rows[0][name])), name
    assert -1 <= float(rows[0]["simda_ssim"]) <= 1

    metadata = read_adapter_file(output / "simda_adapters_step000001.safetensors").metadata
    assert metadata["degradation"] == "realistic"
    state = torch.load(output / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["options"]["degradation"]["jpeg_quality"] in ([30.0, 60.0], (30.0, 60.0))


def test_bad_degradation_settings_stop_the_run_before_anything_is_written(checkpoint, tmp_path, capsys):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", seed=0).with_suffix(".txt").write_text("a square")
    common = ["--checkpoint", checkpoint, "--data", clips, "--frames", FRAMES, "--width", SIZE, "--height", SIZE,
              "--steps", "1", "--workers", "0"]
    assert train_here([*common, "--output", tmp_path / "a", "--jpeg-quality", "50", "120"]) == 2
    assert "--jpeg-quality must lie in 1..100" in capsys.readouterr().err
    assert train_here([*common, "--output", tmp_path / "b", "--blur-probability", "2"]) == 2
    assert "--blur-probability must lie in 0..1" in capsys.readouterr().err
    assert train_here([*common, "--output", tmp_path / "c", "--sample-clip", tmp_path / "missing.mp4"]) == 2
    assert "--sample-clip" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in "abc")
