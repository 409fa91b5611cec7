"""Speed and peak memory of a SimDA UNet call against the plain UNet call.

One UNet call as the sampler makes it: a cond+uncond batch (``cond_or_uncond=[1, 0]``, 2 groups
x F frames), the MODEL's ``transformer_options`` and wrappers, under ``torch.inference_mode``.
Variants run in one process on the same inputs and the same host model; ratios are variant / plain.

    python bench/bench_unet.py --mode gpu   # SD1.5 UNet (seeded random weights), fp16, 16 frames, 256 and 512 px
    python bench/bench_unet.py --mode cpu   # reduced-width UNet at small sizes: runs anywhere, NOT the GPU targets
    python bench/bench_unet.py --mode sdxl-gpu   # SDXL UNet (model_base.SDXL with its ADM), fp16, 16 frames, 1024 px
    python bench/bench_unet.py --mode sdxl-cpu   # SDXL layout at reduced width, small sizes (CPU ratios only)

GPU targets: SimDA <= 1.15x at 256x256, <= 1.22x at 512x512, peak memory <= 1.05x.
Only the host's model code is imported (HOST_MODULES) and ``simda_core`` as a top-level package;
ComfyUI is found through COMFYUI_PATH or the newest pinned host in ``.hosts/``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "scripts"))
import pinned_hosts  # noqa: E402

HOST_DIR = pinned_hosts.host_dir()
COND_OR_UNCOND = (1, 0)
"""A cond+uncond batch: 2 groups, each the F frames of one clip."""
TIME_TARGETS = {256: 1.15, 512: 1.22}
PEAK_TARGET = 1.05
"""The GPU targets for the full SimDA call, as multiples of the plain call."""
TEXT_TOKENS = 77
HOST_MODULES = ("comfy.model_base", "comfy.supported_models", "comfy.model_patcher", "comfy.patcher_extension",
                "comfy.ops", "comfy.model_management")
"""All of the host this imports (no server, aiohttp, folder_paths or nodes.py)."""

SD15_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    # popped from the end by the host: output_blocks 0-2 (lowest level) have no transformer, 3-11 one each
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    context_dim=768, num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False, image_size=32,
    use_checkpoint=False,
)
"""The host's SD1.5 UNet (model_detection's SD15 layout): 16 transformers, 860M parameters."""

SDXL_UNET = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2],
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    context_dim=2048, num_head_channels=64, use_linear_in_transformer=True, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, use_temporal_attention=False, use_temporal_resblock=False,
    image_size=32, use_checkpoint=False,
)
"""The host's SDXL base UNet (model_detection's SDXL layout): no transformer at the top level, 2 then
10 blocks per transformer below, linear projections, a 2048 context and a 2816-wide ADM; 2.6B parameters."""


@dataclass(frozen=True)
class Mode:
    unet: dict
    dtype: torch.dtype
    sizes: tuple[int, ...]
    frames: int
    repeats: int
    warmup: int
    threads: int | None
    """CPU threads (None: torch's default)."""
    clock: Callable[[], float]
    """GPU: wall time after a synchronize. CPU: the process's CPU time, so other load on a shared
    machine does not enter the ratios (one thread: no spinning workers counted)."""
    note: str
    config_class: str = "SD15"
    """The host's ``comfy.supported_models`` class; its ``get_model`` makes the model (SDXL: with its ADM)."""


MODES = {
    "gpu": Mode(SD15_UNET, torch.float16, (256, 512), 16, 10, 3, None, time.perf_counter, "full-size SD1.5 UNet, fp16"),
    "cpu": Mode(
        {**SD15_UNET, "model_channels": 32}, torch.float32, (64, 128), 8, 5, 1, 1, time.process_time,
        "CPU smoke run: SD1.5 layout at 1/10 width (32 channels), fp32, 1 thread, CPU time per call; "
        "NOT comparable with the GPU targets",
    ),
    "sdxl-gpu": Mode(
        SDXL_UNET, torch.float16, (1024,), 16, 5, 2, None, time.perf_counter, "full-size SDXL UNet, fp16", "SDXL"
    ),
    "sdxl-cpu": Mode(
        {**SDXL_UNET, "model_channels": 32, "num_head_channels": 32}, torch.float32, (64, 128), 8, 3, 1, 1,
        time.process_time,
        "CPU smoke run: SDXL layout (depths 2/10, linear proj, 2048 context, ADM) at 1/10 width (32 channels), fp32, "
        "1 thread, CPU time per call; NOT comparable with the GPU runs", "SDXL",
    ),
}

VARIANTS = {
    "plain": None,
    "simda": dict(adapters=True, shift=True),
    "shift": dict(shift=True),
    "adapters+gn": dict(adapters=True),
    "gn": dict(group_norm=True),
}
"""Variant -> what SimDA adds (None: the unpatched MODEL). Adapters always bring frame GroupNorm."""
LEGEND = (
    "simda = random adapters + latent shift + frame GroupNorm (the full SimDA call); shift = latent shift only; "
    "adapters+gn = adapters with their frame GroupNorm, no shift; gn = frame GroupNorm only"
)


def import_host(force_cpu: bool) -> None:
    """Put the host and the pack on ``sys.path`` (host first: its ``nodes.py`` must win over our
    ``nodes/``) and import only the host's model code."""
    if not (HOST_DIR / "comfy").is_dir():
        sys.exit(f"no ComfyUI at {HOST_DIR}: run scripts/setup_host.sh first or set COMFYUI_PATH")
    for path in (str(PACK_DIR), str(HOST_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args

    if force_cpu or not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    for name in HOST_MODULES:
        importlib.import_module(name)


def seeded_weights_(module: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Fan-in-scaled normal weights, norm scales near 1, small biases; drawn on the module's device."""
    device = next(module.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, device=device)
            if param.ndim >= 2:
                param.copy_(scale * noise / param[0].numel() ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            else:
                param.copy_(0.1 * scale * noise)


def build_unet(mode: Mode, device: torch.device):
    """The host's BaseModel + ModelPatcher for the mode's UNet, weights made on ``device``."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    model_config = getattr(comfy.supported_models, mode.config_class)(dict(mode.unet))
    model_config.set_inference_dtype(mode.dtype, None)
    if mode.config_class == "SD15":
        model = comfy.model_base.BaseModel(model_config, device=device)
    else:
        model = model_config.get_model({}, device=device)
    seeded_weights_(model.diffusion_model, seed=0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def random_adapters(patcher, device: torch.device):
    """Adapters for every site of the UNet, built as the Adapter Loader builds them (host casting
    layers, the UNet's dtype) and filled with seeded non-zero weights so every branch computes."""
    from simda_core.host.family import adapter_storage_dtype
    from simda_core.host.register import model_sites
    from simda_core.model.adapters import SimDAAdapters

    adapters = SimDAAdapters(
        model_sites(patcher), dtype=adapter_storage_dtype(patcher), device=device
    )
    seeded_weights_(adapters, seed=1, scale=0.1)
    return adapters.requires_grad_(False)


def variant_patcher(base, spec: dict | None, adapters):
    """A clone of ``base`` carrying what ``spec`` asks for, registered by the pack's apply_simda."""
    from simda_core.host.register import apply_simda
    from simda_core.model.config import LatentShiftSettings, SimDAConfig

    patcher = base.clone()
    if spec is None:
        return patcher
    config = SimDAConfig(
        adapters=adapters if spec.get("adapters") else None,
        latent_shift=LatentShiftSettings() if spec.get("shift") else None,
        frame_group_norm=bool(spec.get("group_norm")),
    )
    return apply_simda(patcher, config)


@dataclass
class Inputs:
    x: torch.Tensor  # [groups * F, 4, h, w] latents
    timesteps: torch.Tensor  # [groups * F]
    context: torch.Tensor  # [groups * F, 77, context_dim] text tokens
    y: torch.Tensor | None = None  # [groups * F, adm_in_channels] ADM vector (SDXL: pooled text + size)


def make_inputs(mode: Mode, size: int, frames: int, device: torch.device) -> Inputs:
    generator = torch.Generator(device=device).manual_seed(size)
    batch, latent = len(COND_OR_UNCOND) * frames, size // 8

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device).to(mode.dtype)

    timesteps = torch.full((batch,), 500.0, device=device)
    adm = mode.unet.get("adm_in_channels")
    return Inputs(randn(batch, 4, latent, latent), timesteps, randn(batch, TEXT_TOKENS, mode.unet["context_dim"]),
                  randn(batch, adm) if adm else None)


def unet_call(patcher, inputs: Inputs) -> torch.Tensor:
    """The diffusion model called the way the host's sampler calls it (options, wrappers, groups)."""
    from simda_core.host.unet_call import call_options

    options = call_options(patcher, list(COND_OR_UNCOND))
    extra = {} if inputs.y is None else {"y": inputs.y}
    return patcher.model.diffusion_model(
        inputs.x, timesteps=inputs.timesteps, context=inputs.context, transformer_options=options, **extra
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(patcher, inputs: Inputs, mode: Mode, device: torch.device, call: Callable) -> dict:
    """Time, (CUDA) peak memory and output of one UNet call with ``patcher``'s object patches on.
    The weights stay put (all variants are clones of one model): only SimDA's patches switch."""
    patcher.patch_model(load_weights=False)
    try:
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = mode.clock()
        out = call(patcher, inputs)
        synchronize(device)
        result = {"seconds": mode.clock() - start, "output": out}
        if device.type == "cuda":
            result["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        return result
    finally:
        patcher.unpatch_model(unpatch_weights=False)


def call_order(names: list[str], rounds: int, compiled: bool) -> list[str]:
    """Variants interleaved round by round, so drift in the machine's load hits all alike; one
    block per variant when compiling (each compiled once, after a dynamo reset)."""
    if compiled:
        return [name for name in names for _ in range(rounds)]
    return [name for _ in range(rounds) for name in names]


def compiled_unet_call(patcher, inputs: Inputs, mode: Mode, device: torch.device, compile_mode: str) -> Callable:
    """``torch.compile`` of the call for one variant, after a dynamo reset. One eager call first
    fills the pack's caches (latent-shift gather indices), which dynamo would otherwise trace."""
    torch._dynamo.reset()
    timed_call(patcher, inputs, mode, device, unet_call)
    return torch.compile(unet_call, mode=None if compile_mode == "default" else compile_mode)


def bench_size(base, adapters, size: int, mode: Mode, args, device: torch.device) -> list[dict]:
    inputs = make_inputs(mode, size, args.frames, device)
    rows = {name: {"size": size, "variant": name, "calls": []} for name in args.variants}
    patchers, calls, outputs = {}, {}, {}
    for name in args.variants:
        spec = VARIANTS[name]
        try:
            patchers[name], calls[name] = variant_patcher(base, spec, adapters), unet_call
        except Exception as e:  # keep going: one broken variant must not hide the others
            traceback.print_exc()
            rows[name]["error"] = f"{type(e).__name__}: {e}"
    with torch.inference_mode():
        for name in call_order(list(patchers), mode.warmup + args.repeats, bool(args.compile)):
            row = rows[name]
            if "error" in row:
                continue
            try:
                if args.compile and not row["calls"]:
                    calls[name] = compiled_unet_call(patchers[name], inputs, mode, device, args.compile)
                result = timed_call(patchers[name], inputs, mode, device, calls[name])
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"{type(e).__name__}: {e}"
                continue
            outputs[name] = result.pop("output").to("cpu", torch.float32)  # off the device: not in later peaks
            row["calls"].append(result)
    summaries = [summarize(rows[name], mode.warmup, outputs) for name in args.variants]
    adapters_mib = sum(p.numel() * p.element_size() for p in adapters.parameters()) / 2**20
    for row in summaries:  # the adapters' weights sit on the device throughout: count them where used
        if "peak_mib" in row and not (VARIANTS[row["variant"]] or {}).get("adapters"):
            row["peak_mib"] -= adapters_mib
    plain = summaries[0]
    for row in summaries[1:]:
        if "error" in row or "error" in plain:
            continue
        row["time_ratio"] = row["median_ms"] / plain["median_ms"]
        if "peak_mib" in row:
            row["peak_ratio"] = row["peak_mib"] / plain["peak_mib"]
        change = (outputs[row["variant"]] - outputs["plain"]).abs().max() / outputs["plain"].abs().max()
        row["output_change"] = float(change)
    return summaries


def summarize(row: dict, warmup: int, outputs: dict) -> dict:
    """Median time and largest peak of the timed calls (warm-up dropped)."""
    calls = row.pop("calls")[warmup:]
    if "error" in row or not calls:
        return row
    timed_ms = [1000 * c["seconds"] for c in calls]
    row.update(
        median_ms=statistics.median(timed_ms), all_ms=timed_ms,
        finite=bool(torch.isfinite(outputs[row["variant"]]).all()),
    )
    if "peak_mib" in calls[0]:
        row["peak_mib"] = max(c["peak_mib"] for c in calls)
    print(f"  {row['size']}px {row['variant']}: {row['median_ms']:.1f} ms", flush=True)
    return row


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else 'CPU'} ({os.cpu_count()} cores, torch using {torch.get_num_threads()} threads)"


def markdown(rows: list[dict], mode: Mode, args, device: torch.device, seconds: float) -> str:
    clock = "CPU time" if mode.clock is time.process_time else "wall time"
    lines = [
        f"- device: {device_name(device)}; torch {torch.__version__}; {datetime.date.today().isoformat()}",
        f"- {mode.note}; batch {len(COND_OR_UNCOND)} x {args.frames} frames (cond_or_uncond={list(COND_OR_UNCOND)}); "
        f"median {clock} of {args.repeats} calls after {mode.warmup} warm-up, "
        f"{'one block per variant' if args.compile else 'variants interleaved'}; "
        f"compile: {args.compile or 'off'}; whole run {seconds:.0f} s wall",
        f"- {LEGEND}",
        "- peak = most memory allocated during a call, weights included (the adapters' only where used)",
        "",
        "| size | variant | median ms (min-max) | x plain | peak MiB | x plain | max output change | finite |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['variant']} | failed: {row['error'][:100]} | | | | | |")
            continue
        ratio = f"{row.get('time_ratio', 1):.3f}"
        target = TIME_TARGETS.get(row["size"]) if device.type == "cuda" and row["variant"] == "simda" else None
        if target and "time_ratio" in row:
            ratio += " ok" if row["time_ratio"] <= target else f" (target {target})"
        peak = f"{row['peak_mib']:.0f} | {row.get('peak_ratio', 1):.3f}" if "peak_mib" in row else "- | -"
        if "peak_ratio" in row and row["variant"] == "simda":
            peak += " ok" if row["peak_ratio"] <= PEAK_TARGET else f" (target {PEAK_TARGET})"
        change = f"{row['output_change']:.2e}" if "output_change" in row else "-"
        spread = f"{min(row['all_ms']):.0f}-{max(row['all_ms']):.0f}"
        lines.append(
            f"| {row['size']} | {row['variant']} | {row['median_ms']:.1f} ({spread}) | {ratio} | {peak} | {change} "
            f"| {row['finite']} |"
        )
    return "\n".join(lines)


def run_command_line(doc: str, modes, run: Callable, add_arguments: Callable | None = None) -> None:
    """The command line of a bench module whose ``run(device, mode, **options)`` returns a dict:
    ``--mode`` (``gpu`` needs CUDA; ``cpu`` runs on one thread), ``--out`` (the result as JSON),
    and what ``add_arguments(parser)`` adds (passed to ``run`` by name)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--mode", choices=modes, required=True)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs a CUDA device; use --mode cpu here")
    if args.mode == "cpu":
        torch.set_num_threads(1)
    options = {k: v for k, v in vars(args).items() if k not in ("mode", "out")}
    result = run(torch.device("cuda" if args.mode == "gpu" else "cpu"), args.mode, **options)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", help="pixel sizes (latent = size / 8)")
    parser.add_argument("--frames", type=int, help="frames per clip (batch = 2 x frames)")
    parser.add_argument("--repeats", type=int, help="timed calls per variant (median reported)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run (plain always runs first: the ratios' reference)")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--compile", nargs="?", const="default", choices=["default", "reduce-overhead", "max-autotune"],
                        help="torch.compile the UNet call (reduce-overhead = CUDA graphs)")
    args = parser.parse_args()
    mode = MODES[args.mode]
    args.sizes, args.frames = args.sizes or mode.sizes, args.frames or mode.frames
    args.repeats = args.repeats or mode.repeats
    args.variants = ["plain"] + [name for name in dict.fromkeys(args.variants) if name != "plain"]
    if args.mode.endswith("gpu") and not torch.cuda.is_available():
        sys.exit("--mode gpu needs a CUDA device; use --mode cpu here")

    import_host(force_cpu=args.mode.endswith("cpu"))
    if mode.threads:
        torch.set_num_threads(mode.threads)
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    started = time.perf_counter()
    print(f"building the {mode.note} on {device_name(device)} ...", flush=True)
    base = build_unet(mode, device)
    adapters = random_adapters(base, device)
    rows = []
    for size in args.sizes:
        rows += bench_size(base, adapters, size, mode, args, device)
    table = markdown(rows, mode, args, device, time.perf_counter() - started)
    print("\n" + table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"device": device_name(device), "torch": torch.__version__, "mode": args.mode, "frames": args.frames}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
