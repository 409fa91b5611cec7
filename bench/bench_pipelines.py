"""Whole-pipeline benchmarks: text-to-video sampling and One-Shot Tuner training.

    python bench/bench_pipelines.py --mode gpu   # SD1.5 UNet (seeded random weights), fp16
    python bench/bench_pipelines.py --mode cpu   # 1/10-width UNet, tiny sizes: runs anywhere, NOT the GPU targets

t2v:  a 50-step DDIM, 16-frame, 512x512, cfg 7.5 run with adapters + latent shift + frame GroupNorm
      against the plain model sampling the same 16 frames as independent images, in the same process
      (target <= 1.22x; the paper reports 11.2 s per video on an A100).
tune: One-Shot Tuner training steps (docs/METHOD.md §7) on 24 frames at 512x512 with per-block
      gradient checkpointing; time per step, 300 steps extrapolated, peak memory
      (target <= 90 s for 300 steps on an H100/H200).
Only the host's model and sampling code is imported, and ``simda_core`` as a top-level package.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet as unet_bench  # noqa: E402  (shares the host import, the UNet and the adapters)


@dataclass(frozen=True)
class Setting:
    unet_mode: str
    frames: int
    size: int
    steps: int
    tune_frames: int
    tune_size: int
    tune_steps: int


SETTINGS = {
    "gpu": Setting("gpu", frames=16, size=512, steps=50, tune_frames=24, tune_size=512, tune_steps=20),
    "cpu": Setting("cpu", frames=4, size=64, steps=3, tune_frames=4, tune_size=64, tune_steps=3),
}


def conditioning(mode, device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randn(1, unet_bench.TEXT_TOKENS, mode.unet["context_dim"], generator=generator, device=device)
    return [[tokens.to(mode.dtype), {}]]


def sample_seconds(patcher, setting: Setting, mode, device) -> tuple[float, float]:
    import comfy.sample

    latent = torch.zeros(setting.frames, 4, setting.size // 8, setting.size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    positive, negative = conditioning(mode, device, 1), conditioning(mode, device, 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    unet_bench.synchronize(device)
    start = mode.clock()
    comfy.sample.sample(patcher, noise, setting.steps, 7.5, "ddim", "ddim_uniform", positive, negative, latent,
                        disable_pbar=True, seed=0)
    unet_bench.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return mode.clock() - start, peak


def bench_t2v(base, adapters, setting: Setting, mode, device) -> list[str]:
    plain = unet_bench.variant_patcher(base, None, adapters)
    simda = unet_bench.variant_patcher(base, unet_bench.VARIANTS["simda"], adapters)
    sample_seconds(plain, Setting(**{**setting.__dict__, "steps": 2}), mode, device)  # warm-up
    sample_seconds(simda, Setting(**{**setting.__dict__, "steps": 2}), mode, device)
    t_plain, m_plain = sample_seconds(plain, setting, mode, device)
    t_simda, m_simda = sample_seconds(simda, setting, mode, device)
    return [
        f"| t2v plain (independent frames) | {setting.frames} x {setting.size}^2, {setting.steps} steps "
        f"| {t_plain:.2f} s | 1.00 | {m_plain:.2f} |",
        f"| t2v SimDA (adapters + shift + GN) | same | {t_simda:.2f} s | {t_simda / t_plain:.2f} | {m_simda:.2f} |",
    ]


def bench_tune(base, setting: Setting, mode, device) -> list[str]:
    from simda_core.host.register import apply_simda, model_sites
    from simda_core.host.training import training_patcher
    from simda_core.model.config import LatentShiftSettings, SimDAConfig
    from simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

    rows = []
    for checkpointing in (True, False):
        adapters = initial_adapters(model_sites(base), seed=0, device=device)
        clone = training_patcher(base)
        apply_simda(
            clone,
            SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), gradient_checkpointing=checkpointing),
        )
        trainer = AdapterTrainer(clone, adapters, TuningRecipe(), seed=0)
        latent = setting.tune_size // 8
        x0 = torch.randn(setting.tune_frames, 4, latent, latent, device=device)
        context = conditioning(mode, device, 3)[0][0].repeat(setting.tune_frames, 1, 1)
        clone.patch_model()
        try:
            trainer.step(x0, context)  # warm-up
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            unet_bench.synchronize(device)
            start = mode.clock()
            for _ in range(setting.tune_steps):
                trainer.step(x0, context)
            unet_bench.synchronize(device)
            per_step = (mode.clock() - start) / setting.tune_steps
        except torch.OutOfMemoryError as e:
            rows.append(
                f"| tune, checkpointing {checkpointing} | {setting.tune_frames} x {setting.tune_size}^2 "
                f"| out of memory: {e} | | |"
            )
            continue
        finally:
            clone.unpatch_model()
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        rows.append(
            f"| tune, checkpointing {'on' if checkpointing else 'off'} "
            f"| {setting.tune_frames} x {setting.tune_size}^2 | "
            f"{per_step * 1000:.0f} ms/step, 300 steps = {per_step * 300:.1f} s | | {peak:.2f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(SETTINGS), default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", choices=["t2v", "tune"], default=None)
    args = parser.parse_args()
    setting = SETTINGS[args.mode]
    mode = unet_bench.MODES[setting.unet_mode]
    unet_bench.import_host(force_cpu=args.mode == "cpu")
    if mode.threads:
        torch.set_num_threads(mode.threads)
    device = torch.device("cuda" if args.mode == "gpu" else "cpu")
    base = unet_bench.build_unet(mode, device)
    adapters = unet_bench.random_adapters(base, device)
    rows = ["| run | size | time | x plain | peak GiB |", "|---|---|---|---|---|"]
    if args.only in (None, "t2v"):
        rows += bench_t2v(base, adapters, setting, mode, device)
    if args.only in (None, "tune"):
        rows += bench_tune(base, setting, mode, device)
    print(f"device: {unet_bench.device_name(device)}; torch {torch.__version__}; {mode.note}")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
