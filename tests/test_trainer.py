"""The collection trainer (``scripts/train_simda.py``) on the real host: its checkpoint loader, UNet,
ModelPatcher, VAE, CLIP and sampler, with ``torch.distributed`` (gloo) across real processes.

Runs, all from one seeded random SD1.5 checkpoint (a one-level 320-channel UNet the host detects
as SD1.5, full-size CLIP, TAESD) on synthetic clips (a moving square, 16 frames of 64x64, in
mp4/webm/gif/mkv, plus one clip too short to sample), 4 frames every 2nd at 48x32, lr 1e-3:

- ``straight``: 1 process, 2 clips per step, 4 steps, sample clips at steps 2 and 4 (in this process);
- ``two_processes``: ``torchrun --nproc_per_node 2`` (gloo), 1 clip per process: the same global batch;
- ``resumed``: the clips listed in a CSV, 2 steps, then ``--resume`` to 4 (in this process).

Tolerances: 1 vs 2 processes differ only by float summation order (batch size and thread count
change the kernels), so their per-step losses must agree to rtol 1e-4 and the trained adapters
to 1% of the norm of the trained output layers (measured with the same runs, checkpointing off:
losses equal to 6 digits, adapters 0.015%). A resumed run repeats the same arithmetic, so it must
match the straight run to rtol 1e-5. All runs use the default gradient checkpointing.
"""
from __future__ import annotations

import csv
import gc
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import live_server as server  # first: tests/live_server.py (it imports tests/host.py, which puts the host on sys.path)
import host
from host import HOST_DIR, PACK_DIR

import av
import comfy.model_management
import comfy.sd
import numpy as np
import pytest
import torch
from PIL import Image

from simda_pack.simda_core.formats import build_adapters, read_adapter_file
from simda_pack.simda_core.host.register import model_sites
from simda_pack.simda_core.training import video_data
from simda_pack.simda_core.training.video_data import ClipSampling, GlobalBatchPlan, VideoDataError

SCRIPT = PACK_DIR / "scripts" / "train_simda.py"
ONE_LEVEL_UNET = dict(
    server.SD15_TEST_UNET, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1]
)
"""tests/live_server.py's SD1.5 test UNet cut to one level: 26M parameters, still detected as SD1.5."""
CAPTIONS = ("a red square moving right", "a blue box sliding")
STEPS = 4
COMMON = [
    "--frames", "4", "--stride", "2", "--width", "48", "--height", "32", "--lr", "1e-3", "--seed", "7",
    "--workers", "0", "--save-every", "2", "--checkpoint-every", "2",
]


# -- fixtures ------------------------------------------------------------------------------------

def one_level_checkpoint() -> Path:
    """tests/live_server.py's random SD1.5 checkpoint with ONE_LEVEL_UNET, cached under .cache/."""
    key = hashlib.sha256(json.dumps([server.RECIPE_KEY, ONE_LEVEL_UNET], sort_keys=True).encode()).hexdigest()[:12]
    path = server.CACHE_DIR / f"simda_test_sd15_one_level_{key}.safetensors"
    if not path.is_file():
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(server, "SD15_TEST_UNET", ONE_LEVEL_UNET)
            server.random_sd15_checkpoint(path)
    return path


ENCODERS = {
    ".mp4": ("libx264", "yuv420p"), ".mkv": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p"),
    ".gif": ("gif", "rgb8"),
}


def write_clip(path: Path, frames: int = 16, size: int = 64, seed: int = 0, levels: bool = False) -> Path:
    """A synthetic clip with PyAV: a coloured square moving right over a dark background, or with
    ``levels`` plain grey frames whose brightness tells the frame index (16 + 12 * t)."""
    codec, pix_fmt = ENCODERS[path.suffix]
    rng = np.random.default_rng(seed)
    colour = rng.integers(80, 255, 3)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "0"} if levels else {}
        for t in range(frames):
            image = np.full((size, size, 3), 16 + 12 * t if levels else 30, np.uint8)
            if not levels:
                x = (3 * t + 7 * seed) % (size - 16)
                image[20:36, x:x + 16] = colour
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return one_level_checkpoint()


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    """Clips with side-car captions, and ``list.csv`` naming the same clips in the same order
    (WebVid-style header ``videoid``-less: ``Video,Name``) plus one file that does not exist."""
    folder = tmp_path_factory.mktemp("clips")
    rows = []
    for index, suffix in enumerate((".mp4", ".webm", ".gif", ".mkv")):
        clip = write_clip(folder / f"clip{index}{suffix}", seed=index)
        clip.with_suffix(".txt").write_text(CAPTIONS[index % 2] + "\n")
        rows.append((clip.name, CAPTIONS[index % 2]))
    short = write_clip(folder / "short.mp4", frames=3, seed=9)  # 3 frames: a sample needs 7
    short.with_suffix(".txt").write_text(CAPTIONS[0])
    rows.append((short.name, CAPTIONS[0]))
    rows.append(("not_downloaded.mp4", "a clip the download missed"))
    with open(folder / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Video", "Name"])
        writer.writerows(rows)
    return folder


def load_script():
    spec = importlib.util.spec_from_file_location("train_simda_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_here(argv: list[str]) -> int:
    """The command's ``main`` in this process (a 1-process run without torchrun's start-up cost)."""
    try:
        return load_script().main([str(a) for a in argv])
    finally:
        comfy.model_management.unload_all_models()
        gc.collect()


def command_env() -> dict:
    return dict(os.environ, COMFYUI_PATH=str(HOST_DIR), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


@dataclass
class Run:
    output: Path
    log: str = ""

    def state(self) -> dict:
        return torch.load(self.output / "training_state.pt", map_location="cpu", weights_only=True)

    def losses(self) -> list[float]:
        return self.state()["losses"]

    def adapters(self, step: int = STEPS) -> dict[str, torch.Tensor]:
        return read_adapter_file(self.output / f"simda_adapters_step{step:06d}.safetensors").tensors


@pytest.fixture(scope="module")
def straight(checkpoint, collection, tmp_path_factory) -> Run:
    output = tmp_path_factory.mktemp("straight") / "run"
    code = train_here([
        "--checkpoint", checkpoint, "--data", collection, "--output", output, "--steps", STEPS, "--batch", "2",
        "--sample-every", "2", "--sample-steps", "1", *COMMON,
    ])
    assert code == 0
    return Run(output)


@pytest.fixture(scope="module")
def two_processes(checkpoint, collection, tmp_path_factory) -> Run:
    output = tmp_path_factory.mktemp("two_processes") / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
        str(SCRIPT), "--checkpoint", str(checkpoint), "--data", str(collection), "--output", str(output),
        "--steps", str(STEPS), "--batch", "1", *COMMON,
    ]
    done = subprocess.run(command, cwd=PACK_DIR, env=command_env(), capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    return Run(output, log)


@pytest.fixture(scope="module")
def resumed(checkpoint, collection, tmp_path_factory) -> Run:
    output = tmp_path_factory.mktemp("resumed") / "run"
    argv = ["--checkpoint", checkpoint, "--csv", collection / "list.csv", "--output", output, "--batch", "2", *COMMON]
    assert train_here([*argv, "--steps", "2"]) == 0
    assert read_adapter_file(output / "simda_adapters_step000002.safetensors")
    assert train_here([*argv, "--steps", STEPS, "--resume"]) == 0
    return Run(output)


# -- data-parallel training ----------------------------------------------------------------------

def test_two_processes_follow_the_one_process_loss_trajectory(straight, two_processes):
    one, two = straight.losses(), two_processes.losses()
    assert len(one) == len(two) == STEPS
    assert two_processes.state()["world_size"] == 2 and straight.state()["world_size"] == 1
    assert two_processes.state()["global_batch"] == straight.state()["global_batch"] == 2
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-7)
    assert len(set(round(v, 6) for v in one)) == STEPS, f"the loss should change from step to step: {one}"

    a, b = straight.adapters(), two_processes.adapters()
    update = torch.cat([a[k].flatten() for k in sorted(a) if k.endswith(("fc2.weight", "up.weight"))])
    assert update.abs().max() > 1e-4, "the zero-initialised output layers should have trained"
    difference = torch.cat([(a[k] - b[k]).flatten() for k in sorted(a)]).norm()
    trained = torch.cat(
        [a[k].flatten() for k in sorted(a) if k.endswith(("fc2.weight", "fc2.bias", "up.weight", "up.bias"))]
    ).norm()
    assert difference <= 0.01 * trained, (float(difference), float(trained))

    log = two_processes.log
    assert log.count("global batch 2 = 1 per process x 2 processes") == 1, "only rank 0 logs"
    assert "skipping" in log and "'short.mp4' has 3 frames" in log, "the short clip is skipped with a warning"
    bar = r"SimDA training: +\d+%.*\| 4/4 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(s/step|step/s), loss=\d"
    assert re.search(bar, log), "a progress bar with rate, time left and loss: " + log[-2000:]


# -- resume --------------------------------------------------------------------------------------

def test_resume_continues_exactly_like_a_straight_run(straight, resumed):
    """2 steps, then --resume for 2 more (clips from the CSV this time) == 4 steps straight."""
    np.testing.assert_allclose(resumed.losses(), straight.losses(), rtol=1e-5)
    a, b = straight.adapters(), resumed.adapters()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    assert resumed.state()["step"] == STEPS


def test_resume_refuses_without_a_state_and_fresh_refuses_over_a_run(
    checkpoint, collection, straight, tmp_path, capsys
):
    common = ["--checkpoint", checkpoint, "--data", collection, "--steps", "1", *COMMON]
    assert train_here([*common, "--output", tmp_path / "none", "--resume"]) == 2
    assert "no training_state.pt" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    before = sorted(p.name for p in straight.output.iterdir())
    assert train_here([*common, "--output", straight.output]) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert train_here([*common, "--output", straight.output, "--resume"]) == 2  # steps 1 < 4 done
    assert "already trained 4 steps" in capsys.readouterr().err
    assert sorted(p.name for p in straight.output.iterdir()) == before


# -- outputs -------------------------------------------------------------------------------------

def test_outputs_are_usable(straight, checkpoint):
    output = straight.output
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    for step in (2, 4):
        adapter_file = read_adapter_file(output / f"simda_adapters_step{step:06d}.safetensors")
        assert adapter_file.family == "sd1" and adapter_file.source == "simda"
        assert adapter_file.frames_trained == 4 and adapter_file.metadata["training_steps"] == str(step)
        build_adapters(adapter_file, model_sites(model))  # fits the checkpoint's UNet
    with Image.open(output / "loss.png") as image:
        image.load()
        assert image.format == "PNG" and image.size[0] > 200
    rows = list(csv.DictReader(open(output / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    state = straight.state()
    assert state["step"] == STEPS and len(state["losses"]) == STEPS and state["family"] == "sd1"
    assert set(state["trainer"]) >= {"optimizer", "scaler", "steps_done"} and state["rng"]["torch"].dtype == torch.uint8
    for step in (2, 4):
        with Image.open(output / "samples" / f"step{step:06d}.webp") as clip:
            assert clip.n_frames == 4 and clip.size == (48, 32)
    assert not [p for p in output.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"], "temporary files left"


# -- bad input -----------------------------------------------------------------------------------

def test_empty_folder_is_refused_by_the_command(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    output = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--data", str(tmp_path / "empty"),
         "--output", str(output), "--steps", "1"],
        cwd=PACK_DIR, env=command_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "holds no clips" in done.stderr and "Traceback" not in done.stderr
    assert not output.exists()


def test_missing_caption_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    write_clip(tmp_path / "a.mp4").with_suffix(".txt").write_text("a clip")
    write_clip(tmp_path / "b.mp4", seed=1)
    (tmp_path / "c.txt").write_text("   \n")
    write_clip(tmp_path / "c.gif", seed=2)
    output = tmp_path / "out"
    assert train_here(["--checkpoint", checkpoint, "--data", tmp_path, "--output", output, "--steps", "1"]) == 2
    message = capsys.readouterr().err
    assert "2 of 3 clips" in message and "b.mp4" in message and "c.gif" in message and "no caption" in message
    assert not output.exists()


def test_csv_errors_name_what_to_fix(tmp_path):
    clip = write_clip(tmp_path / "a.mp4")
    (tmp_path / "no_caption.csv").write_text(f"path,caption\n{clip.name},\n")
    with pytest.raises(VideoDataError, match=r"rows of 'no_caption.csv' have no caption \(rows 2\)"):
        video_data.read_csv(tmp_path / "no_caption.csv")
    (tmp_path / "columns.csv").write_text(f"url,description\n{clip.name},x\n")
    with pytest.raises(VideoDataError, match="needs a clip column"):
        video_data.read_csv(tmp_path / "columns.csv")
    (tmp_path / "webvid.csv").write_text("videoid,name,page_dir\n7,a fox,part1\n")
    (tmp_path / "part1").mkdir()
    clip.rename(tmp_path / "part1" / "7.mp4")
    [entry] = video_data.read_csv(tmp_path / "webvid.csv")
    assert entry.path == tmp_path / "part1" / "7.mp4" and entry.caption == "a fox"


# -- clip sampling -------------------------------------------------------------------------------

def test_samples_take_every_stride_th_frame_from_a_seeded_start(tmp_path):
    clip = write_clip(tmp_path / "levels.mkv", frames=16, levels=True)
    sampling = ClipSampling(frames=4, stride=3, width=32, height=16, crop="random")
    starts = set()
    for seed in range(12):
        frames = video_data.load_sample(clip, sampling, seed)
        assert frames.shape == (4, 16, 32, 3) and frames.dtype == torch.float32
        assert 0 <= float(frames.min()) and float(frames.max()) <= 1
        index = ((frames.mean(dim=(1, 2, 3)) * 255 - 16) / 12).round().long().tolist()
        assert [b - a for a, b in zip(index, index[1:])] == [3, 3, 3], index
        assert 0 <= index[0] <= 16 - sampling.span
        starts.add(index[0])
        torch.testing.assert_close(video_data.load_sample(clip, sampling, seed), frames)  # same seed, same sample
    assert len(starts) > 1
    with pytest.raises(video_data.ClipTooShortError, match="needs 19"):
        video_data.load_sample(clip, ClipSampling(frames=4, stride=6, width=32, height=16), 0)


def test_crops_keep_the_target_aspect():
    assert video_data.crop_box(64, 64, 48 / 32, 0.5) == (10, 0, 43, 64)
    assert video_data.crop_box(40, 120, 2.0, 0.0) == (0, 0, 40, 80)
    assert video_data.crop_box(40, 120, 2.0, 1.0) == (0, 40, 40, 80)


def test_the_global_batch_does_not_depend_on_the_number_of_processes():
    plan = GlobalBatchPlan(clips=5, global_batch=4, seed=3)
    for step in range(4):
        whole = plan.shard(step, 0, 1)
        assert plan.shard(step, 0, 2) + plan.shard(step, 1, 2) == whole
        assert (
            plan.shard(step, 0, 4) + plan.shard(step, 1, 4) + plan.shard(step, 2, 4) + plan.shard(step, 3, 4) == whole
        )
    epoch = [plan.key(0, slot)[0] for slot in range(4)] + [plan.key(1, 0)[0]]
    assert sorted(epoch) == list(range(5)), "every clip once per epoch"
    with pytest.raises(VideoDataError, match="does not split evenly"):
        plan.shard(0, 0, 3)


# -- non-finite losses ----------------------------------------------------------------------------

def adapter_trainer(loss_scaling):
    """An AdapterTrainer of a host ModelPatcher with trained-looking adapters (every output non-zero)."""
    from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

    patcher = host.build_model(host.TINY_UNET, seed=1)
    adapters = initial_adapters(model_sites(patcher), seed=2)
    host.randomize_(adapters, 3)
    return AdapterTrainer(
        patcher, adapters, TuningRecipe(learning_rate=1e-3, mixed_precision=False), loss_scaling=loss_scaling
    )


def adapter_loss(trainer, poisoned: bool) -> torch.Tensor:
    """A loss through every adapter parameter; ``poisoned``: multiplied by NaN (all gradients NaN)."""
    loss = sum((p.float() ** 2).mean() for p in trainer.parameters)
    return loss * float("nan") if poisoned else loss


def snapshot(trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.parameters]


def test_loss_scaler_skips_a_non_finite_step_and_counts_it():
    trainer = adapter_trainer("cpu")
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0
    before = snapshot(trainer)
    assert trainer.backward_and_update(adapter_loss(trainer, poisoned=True)) is False
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trainer))), "a skipped step changed the adapters"
    assert (trainer.skipped_steps, trainer.skipped_in_a_row, trainer.scaler.get_scale()) == (1, 1, 32768.0)
    assert trainer.backward_and_update(adapter_loss(trainer, poisoned=False)) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))
    assert (trainer.skipped_steps, trainer.skipped_in_a_row, trainer.steps_done) == (1, 0, 2)
    state = trainer.state_dict()
    assert (state["skipped_steps"], state["skipped_in_a_row"]) == (1, 0)


def test_ten_skips_in_a_row_stop_training():
    trainer = adapter_trainer("cpu")
    for _ in range(trainer.MAX_SKIPPED_IN_A_ROW - 1):
        assert trainer.backward_and_update(adapter_loss(trainer, poisoned=True)) is False
    before = snapshot(trainer)
    with pytest.raises(FloatingPointError, match="skipped 10 steps in a row") as e:
        trainer.backward_and_update(adapter_loss(trainer, poisoned=True))
    assert "\n" not in str(e.value) and "lower the learning rate" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))


def test_without_loss_scaling_a_non_finite_step_stops_before_the_adapters_change():
    trainer = adapter_trainer(None)
    assert not trainer.scaler.is_enabled()
    before = snapshot(trainer)
    with pytest.raises(FloatingPointError, match="non-finite .* without loss scaling"):
        trainer.backward_and_update(adapter_loss(trainer, poisoned=True))
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot(trainer)))


def poisoning_trainer(monkeypatch, bad_calls: set[int], loss_scaling: str | None):
    """The command's own run module trains with an AdapterTrainer whose loss is NaN at ``bad_calls``
    (1-based), and with ``loss_scaling`` (the CPU loss scaler stands in for fp16 on CUDA)."""
    load_script().setup_host()
    import simda_core.training.collection.run as run_module  # the copy the command imports

    class Poisoning(run_module.AdapterTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, loss_scaling=loss_scaling, **kwargs)
            self.calls = 0

        def loss(self, *args, **kwargs):
            self.calls += 1
            value = super().loss(*args, **kwargs)
            return value * float("nan") if self.calls in bad_calls else value

    monkeypatch.setattr(run_module, "AdapterTrainer", Poisoning)


def test_collection_run_skips_and_counts_a_step_the_loss_scaler_rejects(
    checkpoint, collection, tmp_path, monkeypatch, caplog
):
    poisoning_trainer(monkeypatch, {2}, "cpu")
    output = tmp_path / "run"
    with caplog.at_level("INFO", logger="SimDA"):
        code = train_here(["--checkpoint", checkpoint, "--data", collection, "--output", output, "--steps", 3,
                           "--batch", "1", "--no-gradient-checkpointing", *COMMON])
    assert code == 0
    state = torch.load(output / "training_state.pt", map_location="cpu", weights_only=True)
    losses = state["losses"]
    assert len(losses) == 3 and math.isnan(losses[1]) and math.isfinite(losses[0]) and math.isfinite(losses[2])
    assert state["trainer"]["skipped_steps"] == 1 and state["trainer"]["steps_done"] == 3
    assert state["trainer"]["scaler"]["scale"] == 32768.0
    assert all(
        bool(torch.isfinite(t).all())
        for t in read_adapter_file(output / "simda_adapters_step000003.safetensors").tensors.values()
    )
    assert "1 update(s) skipped by the loss scaler" in caplog.text


def test_collection_run_without_loss_scaling_stops_at_a_non_finite_loss(
    checkpoint, collection, tmp_path, monkeypatch, capsys
):
    poisoning_trainer(monkeypatch, {2}, None)
    output = tmp_path / "run"
    code = train_here(["--checkpoint", checkpoint, "--data", collection, "--output", output, "--steps", 3,
                       "--batch", "1", "--no-gradient-checkpointing", "--no-mixed-precision", *COMMON])
    assert code == 3
    err = capsys.readouterr().err
    message = err[err.index("SimDA trainer: error:"):].splitlines()[0].strip()
    assert message.startswith("SimDA trainer: error: step 2: the gradients became non-finite"), message
    assert "--resume" in message and "--lr" in message and "--no-mixed-precision" not in message
