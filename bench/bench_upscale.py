"""Speed and peak memory of the SimDA Video Upscaler against upscaling frame by frame with the plain
x4 model, in one process on the same weights, frames, prompt and seed.

    python bench/bench_upscale.py --mode gpu   # full-size SD x4 upscaler (seeded random weights), fp16,
                                               # 16 frames 256 -> 1024, the card capped at 24 GiB
    python bench/bench_upscale.py --mode cpu   # the tests' reduced x4 checkpoint, 4 frames 32 -> 128:
                                               # runs anywhere, NOT the GPU targets

Rows:
- plain, frame by frame: per frame SD 4x Upscale Conditioning -> KSampler (comfy.sample.sample) -> VAE
  Decode, the plain x4 MODEL (what a user does without SimDA);
- SimDA, automatic: the Video Upscaler node, MODEL with random super-resolution adapters (latent
  shift added by the node, frame GroupNorm with the adapters), sizes from free memory;
- SimDA, fixed pieces, F/2 and F frames: the same node with one fixed group and tile size, for a
  clip half as long and the whole clip: peak memory must not grow with the clip.
Targets (GPU): SimDA automatic <= 1.3x the time of the plain frame-by-frame run, 16 frames
256 -> 1024 within 24 GiB, peak memory set by the piece size, not the clip length.
Time includes sampling and VAE decoding; peak is torch's most allocated memory during the row
(weights included), CUDA only.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench_unet import device_name  # noqa: E402  (one device description for every benchmark)
from bench_unet import seeded_weights_ as seeded_  # one weight recipe for every benchmark

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
TARGET_TIME_RATIO = 1.3
X4_FULL_UNET = dict(
    image_size=32, in_channels=7, out_channels=4, model_channels=256, channel_mult=[1, 2, 2, 4],
    num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[0, 0, 1, 1, 1, 1, 1, 1], transformer_depth_middle=1,
    transformer_depth_output=[0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # popped from the end: output_blocks 9-11 have none
    context_dim=1024, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
"""The SD x4 upscaler's UNet as the host builds it from x4-upscaler-ema.safetensors (473M parameters)."""
X4_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}


@dataclass(frozen=True)
class Mode:
    frames: int
    size: int
    """Input frame side in pixels (output = 4x)."""
    steps: int
    cfg: float
    fixed_group: int
    fixed_tile: int
    cap_gib: float | None
    """Per-process memory cap emulating a smaller card (None: none)."""
    threads: int | None
    clock: Callable[[], float]
    note: str


MODES = {
    "gpu": Mode(16, 256, 10, 7.0, 8, 128, 24.0, None, time.perf_counter,
                "full-size SD x4 upscaler (473M UNet, full KL VAE), seeded random weights, fp16, wall time"),
    "cpu": Mode(4, 32, 2, 2.0, 2, 16, None, 1, time.process_time,
                "CPU smoke run: the tests' reduced x4 checkpoint (53M UNet, full VAE), fp32, 1 thread, CPU time; "
                "NOT comparable with the GPU targets"),
}


def import_pack(cpu: bool):
    """The host (COMFYUI_PATH or the pinned copy) and the pack as ``simda_pack``, the way tests do."""
    if cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    sys.path.insert(0, str(PACK_DIR / "tests"))
    import host  # noqa: F401

    return host


def full_size_x4(device: torch.device):
    """``(MODEL, VAE)``: the full-size x4 upscaler built with the host's classes, random weights."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = comfy.supported_models.SD_X4Upscaler(dict(X4_FULL_UNET))
    model_config.set_inference_dtype(torch.float16, None)
    model = model_config.get_model({}, device=device)
    seeded_(model.diffusion_model, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=device, offload_device=comfy.model_management.unet_offload_device()
    )
    vae_module = AutoencoderKL(ddconfig=dict(X4_VAE), embed_dim=4).to(device)
    seeded_(vae_module, seed=2)
    vae = comfy.sd.VAE(sd={k: v.cpu() for k, v in vae_module.state_dict().items()})
    del vae_module
    return patcher, vae


def reduced_x4():
    """``(MODEL, VAE)``: the tests' cached reduced checkpoint, through the host's loader."""
    import comfy.sd
    from test_upscaler import CHECKPOINT, random_x4_checkpoint

    if not CHECKPOINT.is_file():
        random_x4_checkpoint(CHECKPOINT)
    model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(str(CHECKPOINT), output_vae=True, output_clip=False)
    return model, vae


def sr_adapters(model):
    """Random super-resolution adapters on a clone of ``model``, registered as the Adapter Loader does."""
    from simda_pack.simda_core.host.family import adapter_storage_dtype
    from simda_pack.simda_core.host.register import apply_simda, model_sites
    from simda_pack.simda_core.model.adapters import SimDAAdapters
    from simda_pack.simda_core.model.config import SimDAConfig

    adapters = SimDAAdapters(model_sites(model), dtype=adapter_storage_dtype(model),
                             device=model.load_device)
    seeded_(adapters, seed=1, scale=0.1)
    adapters.requires_grad_(False)
    return apply_simda(model.clone(), SimDAConfig(adapters=adapters, family="sd_x4_upscaler"))


def inputs(mode: Mode):
    generator = torch.Generator().manual_seed(0)
    coarse = torch.rand(mode.frames, 3, mode.size // 8, mode.size // 8, generator=generator)
    frames = torch.nn.functional.interpolate(coarse, size=(mode.size, mode.size), mode="bilinear").movedim(1, -1)
    positive = [[torch.randn(1, 77, 1024, generator=generator), {}]]
    negative = [[torch.randn(1, 77, 1024, generator=generator), {}]]
    return frames, positive, negative


def frame_by_frame(model, vae, frames, positive, negative, mode: Mode, seed: int) -> torch.Tensor:
    import comfy.sample
    from comfy_extras.nodes_sdupscale import SD_4XUpscale_Conditioning

    out = []
    for index in range(frames.shape[0]):
        pos, neg, latent = SD_4XUpscale_Conditioning.execute(frames[index:index + 1], positive, negative, 4.0, 0.0).args
        noise = comfy.sample.prepare_noise(latent["samples"], seed + index)
        samples = comfy.sample.sample(model, noise, mode.steps, mode.cfg, "dpmpp_2m", "karras", pos, neg,
                                      latent["samples"], seed=seed + index, disable_pbar=True)
        out.append(vae.decode(samples))
    return torch.cat(out)


def context(group: int) -> int:
    """Context frames per group: the node's default 2, fewer for groups of 2."""
    return min(2, group - 1) if group else 2


def simda_upscaler(
    model, vae, frames, positive, negative, mode: Mode, seed: int, group: int, tile: int
) -> torch.Tensor:
    from simda_pack.nodes.nodes_upscale import SimDAVideoUpscaler

    settings = dict(noise_augmentation=0.0, seed=seed, steps=mode.steps, cfg=mode.cfg, sampler_name="dpmpp_2m",
                    scheduler="karras", frames_per_group=group, context_frames=context(group), tile_size=tile,
                    tile_overlap=32 if tile != 16 else 8,
                    latent_shift=True)
    output = SimDAVideoUpscaler.execute(frames=[frames], model=[model], vae=[vae], positive=[positive],
                                        negative=[negative],
                                        **{k: [v] for k, v in settings.items()})
    return output[0]


def plan(model, frames: int, size: int, mode: Mode, group: int, tile: int) -> str:
    from simda_pack.nodes.nodes_upscale import Settings, piece_sizes, upscaler_model

    settings = Settings(
        0, mode.steps, mode.cfg, "dpmpp_2m", "karras", 0.0, group, context(group), tile, 32 if tile != 16 else 8
    )
    sizes, how = piece_sizes(upscaler_model(model, True), frames, size, size, settings)
    groups_tiles = sizes.pieces(
        frames, size, size, context(group), min(settings.tile_overlap, min(sizes.tile_height, sizes.tile_width) // 2)
    )
    return f"groups of {sizes.frames_per_group}, tiles {min(sizes.tile_width, size)}px, {groups_tiles} pieces ({how})"


def run_row(
    name: str, call: Callable[[], torch.Tensor], mode: Mode, device: torch.device, frames: int, detail: str
) -> dict:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = mode.clock()
    with torch.inference_mode():
        images = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row = {"variant": name, "frames": frames, "seconds": mode.clock() - start, "detail": detail,
           "shape": list(images.shape), "finite": bool(torch.isfinite(images).all())}
    if device.type == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(
        f"  {name}: {row['seconds']:.1f} s" + (f", peak {row['peak_mib']:.0f} MiB" if "peak_mib" in row else ""),
        flush=True,
    )
    return row


def markdown(rows: list[dict], mode: Mode, device: torch.device, seconds: float) -> str:
    cap = (
        f"card capped at {mode.cap_gib:g} GiB (torch.cuda.set_per_process_memory_fraction)"
        if mode.cap_gib and device.type == "cuda" else "no memory cap"
    )
    lines = [
        f"- device: {device_name(device)}; torch {torch.__version__}; {datetime.date.today().isoformat()}; {cap}",
        f"- {mode.note}; {mode.size} -> {4 * mode.size} px, {mode.steps} steps dpmpp_2m/karras, cfg {mode.cfg}; "
        f"time = sampling + VAE decode; whole run {seconds:.0f} s",
        "",
        "| variant | frames | pieces | s | x plain | peak MiB | x plain | finite |",
        "|---|---|---|---|---|---|---|---|",
    ]
    plain = rows[0]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | {row['frames']} | failed: {row['error'][:120]} | | | | | |")
            continue
        ratio = row["seconds"] / plain["seconds"] * plain["frames"] / row["frames"]
        mark = ""
        if row["variant"].startswith("SimDA, automatic") and device.type == "cuda":
            mark = " ok" if ratio <= TARGET_TIME_RATIO else f" (target {TARGET_TIME_RATIO})"
        peak = f"{row['peak_mib']:.0f} | {row['peak_mib'] / plain['peak_mib']:.2f}" if "peak_mib" in row else "- | -"
        lines.append(
            f"| {row['variant']} | {row['frames']} | {row['detail']} | {row['seconds']:.1f} | {ratio:.2f}{mark} "
            f"| {peak} | {row['finite']} |"
        )
    lines.append("")
    lines.append("x plain: time per frame against the plain frame-by-frame row (same frames, steps and seed).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--steps", type=int, help="sampling steps (default: the mode's)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    mode = MODES[args.mode]
    if args.steps:
        mode = Mode(**{**mode.__dict__, "steps": args.steps})
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs a CUDA device; use --mode cpu here")
    import_pack(cpu=args.mode == "cpu")
    if mode.threads:
        torch.set_num_threads(mode.threads)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    if mode.cap_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, mode.cap_gib * 2**30 / total), device)
    started = time.perf_counter()
    print(f"building the {mode.note} on {device_name(device)} ...", flush=True)
    model, vae = full_size_x4(device) if args.mode == "gpu" else reduced_x4()
    simda = sr_adapters(model)
    frames, positive, negative = inputs(mode)
    seed = 0
    rows = []
    todo = [
        ("plain, frame by frame", mode.frames, "1 frame x whole frame per call",
         lambda: frame_by_frame(model, vae, frames, positive, negative, mode, seed)),
        ("SimDA, automatic", mode.frames, plan(simda, mode.frames, mode.size, mode, 0, 0),
         lambda: simda_upscaler(simda, vae, frames, positive, negative, mode, seed, 0, 0)),
        (f"SimDA, fixed pieces, {mode.frames // 2} frames", mode.frames // 2,
         plan(simda, mode.frames // 2, mode.size, mode, mode.fixed_group, mode.fixed_tile),
         lambda: simda_upscaler(simda, vae, frames[: mode.frames // 2], positive, negative, mode, seed,
                                mode.fixed_group, mode.fixed_tile)),
        (f"SimDA, fixed pieces, {mode.frames} frames", mode.frames,
         plan(simda, mode.frames, mode.size, mode, mode.fixed_group, mode.fixed_tile),
         lambda: simda_upscaler(simda, vae, frames, positive, negative, mode, seed, mode.fixed_group, mode.fixed_tile)),
    ]
    for name, count, detail, call in todo:
        try:
            rows.append(run_row(name, call, mode, device, count, detail))
        except Exception as e:  # keep going: one failed row must not hide the others
            import traceback

            traceback.print_exc()
            rows.append({"variant": name, "frames": count, "error": f"{type(e).__name__}: {e}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = markdown(rows, mode, device, time.perf_counter() - started)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name(device), "torch": torch.__version__, "mode": args.mode}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
