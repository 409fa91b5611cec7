"""Two ways to train adapters through a UNet whose weights the host loaded as inference tensors
(which backward cannot save), without changing the host's shared UNet:

- ``weight_wrappers``: the training clone puts an identity weight wrapper on every host layer
  (``host.training.training_patcher``), so each layer computes with a per-call copy;
- ``private_copy``: the training clone runs on a private deep copy of the UNet made of ordinary tensors.

Each runs in its own process (peak RSS is per process), on the same seeded UNet and batch:

    python bench/bench_training_base.py       # CPU: SD1.5-width UNet at 2 levels, 4 frames of 32x32 latents
    python bench/bench_training_base.py --gpu # CUDA: full SD1.5 UNet, fp16 autocast, 16 frames 64x64 (peak CUDA memory)
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import bench_unet  # noqa: E402

CPU_UNET = dict(bench_unet.SD15_UNET, channel_mult=[1, 2], num_res_blocks=[1, 1], transformer_depth=[1, 1],
                transformer_depth_output=[1, 1, 1, 1])
METHODS = ("weight_wrappers", "private_copy")


def one_method(method: str, gpu: bool, steps: int) -> dict:
    bench_unet.import_host(force_cpu=not gpu)
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from simda_core.host.register import apply_simda, model_sites
    from simda_core.host.training import training_patcher
    from simda_core.model.config import LatentShiftSettings, SimDAConfig
    from simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

    device = torch.device("cuda" if gpu else "cpu")
    config = comfy.supported_models.SD15(dict(bench_unet.SD15_UNET if gpu else CPU_UNET))
    config.set_inference_dtype(torch.float16 if gpu else torch.float32, None)
    with torch.inference_mode():  # as the host's loader makes them
        model = comfy.model_base.BaseModel(config, device=device)
        bench_unet.seeded_weights_(model.diffusion_model, 0)
    base = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    if method == "weight_wrappers":
        training = training_patcher(base)
    else:
        training = base.clone()
        with torch.inference_mode(False):
            private = copy.copy(model)
            private._modules = dict(model._modules)
            private.diffusion_model = copy.deepcopy(model.diffusion_model).requires_grad_(False)
        training.model = private
    frames, latent = (16, 64) if gpu else (4, 32)
    adapters = initial_adapters(model_sites(training), seed=0, device=device)
    apply_simda(
        training, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), gradient_checkpointing=True)
    )
    mm.load_models_gpu([training])
    trainer = AdapterTrainer(training, adapters, TuningRecipe(), seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(frames, 4, latent, latent, generator=g)
    context = torch.randn(frames, 77, 768, generator=g)
    with torch.inference_mode(False), torch.enable_grad():
        trainer.step(x0, context)  # warm-up
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        for _ in range(steps):
            trainer.step(x0, context)
        if gpu:
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / steps
    peak = torch.cuda.max_memory_allocated() if gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "step_s": seconds, "peak_bytes": peak, "device": bench_unet.device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, help="(internal) run one method in this process")
    args = parser.parse_args()
    if args.method:
        print(json.dumps(one_method(args.method, args.gpu, args.steps)))
        return
    rows = []
    for method in METHODS:
        command = [sys.executable, __file__, "--method", method, "--steps", str(args.steps)] + (
            ["--gpu"] if args.gpu else []
        )
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    reference = rows[0]
    print(f"| method | step (s) | peak {'CUDA memory' if args.gpu else 'RSS'} (MiB) | time vs weight_wrappers | "
          "peak vs weight_wrappers |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['step_s']:.3f} | {row['peak_bytes'] / 2**20:.0f} | "
              f"{row['step_s'] / reference['step_s']:.2f}x | {row['peak_bytes'] / reference['peak_bytes']:.2f}x |")
    print(f"device: {reference['device']}, torch {torch.__version__}")


if __name__ == "__main__":
    main()
