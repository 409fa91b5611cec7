"""A long clip sampled in context windows: SimDA against the plain model, as a ratio in one run.

64 frames in windows of 16 with overlap 4, through the host's sampler (``comfy.sample.sample_custom``
with a host KSAMPLER that runs the first few Euler steps of a 63-step schedule, see
``first_steps_sampler``; cfg 5: a cond+uncond batch per window) with
- the host's context windows (what ContextWindowsManual sets: an ``IndexListContextHandler`` in
  ``model_options["context_handler"]`` and its prepare-sampling wrapper), schedules
  ``standard_static`` and ``standard_uniform``, pyramid fusing;
- AnimateDiff-Evolved's standard uniform context options through its Use Evolved Sampling, when
  ADE is installed in the host's custom_nodes/ (scripts/setup_packs.sh); without it that row
  says so.
Variants: plain (the MODEL without SimDA) and simda (random adapters + latent shift + frame
GroupNorm, as bench_unet builds them). Runs alternate plain / simda so load drift hits both.

    python bench/bench_longclip.py --mode cpu   # reduced-width UNet, 64 px, 2 steps, 1 thread, CPU time
    python bench/bench_longclip.py --mode gpu   # SD1.5 UNet fp16, 512 px, 4 steps (target: <= 1.25x plain)
"""
from __future__ import annotations

import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet  # noqa: E402
from bench_unet import HOST_DIR, device_name  # noqa: E402

FRAMES, WINDOW, OVERLAP = 64, 16, 4
TARGET = 1.25
SETTINGS = {
    # size px, steps, timed runs per variant (after one warm-up run)
    "cpu": (64, 2, 2),
    "gpu": (512, 4, 2),
}
ADE_DIR = HOST_DIR / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved"


def host_windows(patcher, schedule: str):
    """A clone with the host's context windows, as the ContextWindowsManual node makes it."""
    import comfy.context_windows as cw

    clone = patcher.clone()
    clone.model_options["context_handler"] = cw.IndexListContextHandler(
        context_schedule=cw.get_matching_context_schedule(schedule),
        fuse_method=cw.get_matching_fuse_method(cw.ContextFuseMethods.PYRAMID),
        context_length=WINDOW, context_overlap=OVERLAP, context_stride=1, closed_loop=False, dim=0,
    )
    cw.create_prepare_sampling_wrapper(clone)
    return clone


def ade_nodes():
    """ADE's node classes, imported from the host's custom_nodes/ the way the host imports a pack,
    or None when it is not installed."""
    if not (ADE_DIR / "__init__.py").is_file():
        return None
    name = "bench_ade"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, ADE_DIR / "__init__.py", submodule_search_locations=[str(ADE_DIR)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].NODE_CLASS_MAPPINGS


def ade_uniform(patcher, ade):
    options = ade["ADE_StandardUniformContextOptions"]().create_options(WINDOW, 1, OVERLAP)[0]
    settings = ade["ADE_AnimateDiffSamplingSettings"]().create_settings(0, "default", "comfy", 0)[0]
    return ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(
        patcher, "autoselect", context_options=options, sample_settings=settings
    )[0]


def conditioning(mode, device):
    g = torch.Generator().manual_seed(7)
    dim = mode.unet["context_dim"]
    positive = [[torch.randn(1, bench_unet.TEXT_TOKENS, dim, generator=g).to(mode.dtype), {}]]
    negative = [[torch.randn(1, bench_unet.TEXT_TOKENS, dim, generator=g).to(mode.dtype), {}]]
    return positive, negative


def count_unet_calls(patcher):
    import comfy.patcher_extension

    calls = []

    def count(executor, x, *args, **kwargs):
        calls.append(x.shape[0])
        return executor(x, *args, **kwargs)

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_count", count)
    return calls


def first_steps_sampler(steps: int):
    """The host's KSAMPLER running Euler for the first ``steps`` steps of its schedule only.

    The host's context windows in ComfyUI 0.3.75 compare the per-frame timesteps with the whole
    schedule (``IndexListContextHandler.set_step``), so with frames in the batch the schedule must
    hold frames - 1 steps; this evaluates the model on the first few of them (see
    tests/test_host_patch.py, test_host_context_windows_on_frames_need_steps_plus_one_frames)."""
    import comfy.samplers

    def euler_first_steps(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(steps):
            denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
        return x

    return comfy.samplers.KSAMPLER(euler_first_steps)


def sample(patcher, size: int, steps: int, conds, device, clock) -> tuple[float, torch.Tensor]:
    import comfy.sample
    import comfy.samplers

    latent = torch.zeros(FRAMES, 4, size // 8, size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", FRAMES - 1)
    bench_unet.synchronize(device)
    start = clock()
    with torch.inference_mode():  # as the host runs its nodes
        out = comfy.sample.sample_custom(patcher, noise, 5.0, first_steps_sampler(steps), sigmas, conds[0], conds[1],
                                         latent, disable_pbar=True, seed=0)
    bench_unet.synchronize(device)
    return clock() - start, out


def run(device: torch.device | str = "cpu", mode: str | None = None, contexts: list[str] | None = None) -> dict:
    device = torch.device(device)
    mode = mode or ("gpu" if device.type == "cuda" else "cpu")
    size, steps, repeats = SETTINGS[mode]
    bench_unet.import_host(force_cpu=device.type == "cpu")
    import comfy.context_windows as cw
    import comfy.model_management

    bench_mode = bench_unet.MODES[mode]
    clock = bench_mode.clock
    print(f"building the {bench_mode.note} on {device_name(device)} ...", flush=True)
    base = bench_unet.build_unet(bench_mode, device)
    adapters = bench_unet.random_adapters(base, device)
    conds = conditioning(bench_mode, device)
    variants = {
        name: bench_unet.variant_patcher(base, bench_unet.VARIANTS[name], adapters) for name in ("plain", "simda")
    }
    makers = {
        "host standard_static": lambda p: host_windows(p, cw.ContextSchedules.STATIC_STANDARD),
        "host standard_uniform": lambda p: host_windows(p, cw.ContextSchedules.UNIFORM_STANDARD),
        "ADE standard uniform": None,
    }
    result = {"device": device_name(device), "torch": torch.__version__, "mode": mode, "frames": FRAMES,
              "window": WINDOW, "overlap": OVERLAP, "size": size, "steps": steps, "repeats": repeats,
              "clock": "CPU time" if clock is time.process_time else "wall time", "rows": []}
    for name in contexts or list(makers):
        row = {"context": name}
        result["rows"].append(row)
        maker = makers[name]
        if name.startswith("ADE"):
            try:
                ade = ade_nodes()
            except Exception as e:  # ADE present but not importable here: say so, keep the other rows
                ade, row["error"] = None, f"ADE import failed: {type(e).__name__}: {e}"
            if ade is None:
                row.setdefault("error", f"AnimateDiff-Evolved is not installed at {ADE_DIR}")
                print(f"  {name}: {row['error']}", flush=True)
                continue
            maker = lambda p, ade=ade: ade_uniform(p, ade)  # noqa: E731
        models = {v: maker(p) for v, p in variants.items()}
        calls = {v: count_unet_calls(m) for v, m in models.items()}
        times = {v: [] for v in models}
        outputs = {}
        for round_ in range(repeats + 1):
            for v, model in models.items():
                seconds, outputs[v] = sample(model, size, steps, conds, device, clock)
                if round_:
                    times[v].append(seconds)
                comfy.model_management.soft_empty_cache()
        for v in models:
            row[f"{v}_s"] = statistics.median(times[v])
            row[f"{v}_unet_calls"] = len(calls[v]) // (repeats + 1)
        row["ratio"] = row["simda_s"] / row["plain_s"]
        row["output_change"] = float((outputs["simda"] - outputs["plain"]).abs().max() / outputs["plain"].abs().max())
        if device.type == "cuda":
            row["target"] = TARGET
            row["ok"] = row["ratio"] <= TARGET
        print(f"  {name}: plain {row['plain_s']:.2f} s, simda {row['simda_s']:.2f} s, x{row['ratio']:.3f} "
              f"({row['plain_unet_calls']} UNet calls per run)", flush=True)
    return result


def main() -> None:
    bench_unet.run_command_line(__doc__, SETTINGS, run)


if __name__ == "__main__":
    main()
