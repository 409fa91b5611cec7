"""SimDA beside AnimateDiff-Evolved's motion module: time and peak memory of a sampling step.

The same clip is sampled by ``comfy.sample.sample`` (DDIM, cfg 7.5, a cond+uncond batch) four ways,
on one full-width SD1.5 UNet with seeded random weights:

    plain      the UNet alone (every frame an independent image)
    simda      SimDA's full call: random non-zero adapters + latent shift + frame GroupNorm (``apply_simda``)
    ade        ADE's motion module in the layout of mm_sd_v15_v2, with seeded random weights, loaded from
               a file by ADE's own nodes: Load AnimateDiff Model -> Apply AnimateDiff Model -> Use Evolved Sampling
    ade+shift  that ADE MODEL with SimDA's Latent-Shift-only config applied on top

ADE's motion module only runs inside its evolved sampling (the host injects it when it loads the MODEL; ADE's
OUTER_SAMPLE wrapper sets its frame count), so every variant is timed inside a real sampling run: a DIFFUSION_MODEL
wrapper times the UNet calls of each step, forward hooks count the motion module's calls.

    python bench/bench_vs_ade.py --mode cpu   # 256x256 px (32x32 latents), 8 frames, fp32, 1 thread, CPU time
    python bench/bench_vs_ade.py --mode gpu   # 512x512 px, 16 frames, fp16, wall time after synchronize + peak

ADE must be installed in the host's ``custom_nodes/`` (scripts/setup_packs.sh). The motion-module file (453M
parameters, float16, about 0.9 GB) is made once, seeded, under ``<pack>/.cache/animatediff_models/``
(git-ignored) and registered as an ``animatediff_models`` folder, so ADE's loader finds it by name.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet as unet_bench  # noqa: E402  (the host import, the UNet, the adapters, SimDA's variants)

PACK_DIR = unet_bench.PACK_DIR
HOST_DIR = unet_bench.HOST_DIR
ADE_FOLDER = "ComfyUI-AnimateDiff-Evolved"
MOTION_MODELS_DIR = PACK_DIR / ".cache" / "animatediff_models"
CFG, SAMPLER, SCHEDULER, SEED = 7.5, "ddim", "ddim_uniform", 0


@dataclass(frozen=True)
class Setting:
    size: int
    """Pixels per side; the latent is size / 8."""
    frames: int
    dtype: torch.dtype
    steps: int
    """Sampling steps per run: one UNet call each where the host batches cond and uncond."""
    rounds: int
    """Sampling runs per variant, variants interleaved round by round."""
    warmup: int
    """Sampling steps of each variant dropped before the median."""
    threads: int | None
    clock: Callable[[], float]
    note: str
    one_batch: bool = False
    """Keep each step's cond+uncond in one UNet call: the host splits them when it finds too little
    free memory, which on a shared CPU machine depends on the other jobs of the moment."""


SETTINGS = {
    "cpu": Setting(
        256, 8, torch.float32, steps=1, rounds=2, warmup=0, threads=1, clock=time.process_time, one_batch=True,
        note="CPU run: full-width SD1.5 UNet, 256x256 (32x32 latents), fp32, 1 thread, CPU time; "
             "NOT comparable with GPU figures",
    ),
    "gpu": Setting(
        512, 16, torch.float16, steps=4, rounds=3, warmup=2, threads=None, clock=time.perf_counter,
        note="full-width SD1.5 UNet, 512x512 (64x64 latents), fp16, wall time per UNet call after a synchronize",
    ),
}

VARIANTS = ("plain", "simda", "ade", "ade+shift")
LEGEND = (
    "simda = random adapters + latent shift + frame GroupNorm (the full SimDA call); ade = AnimateDiff-Evolved "
    "with an mm_sd_v15_v2-shaped motion module (random weights); ade+shift = that ADE MODEL with SimDA's "
    "latent shift on top"
)


# -- the motion module file -------------------------------------------------------------------------

LEVEL_CHANNELS = (320, 640, 1280, 1280)
"""Channels of the SD1.5 UNet's four levels; mm_sd_v15_v2 has temporal transformers of these widths."""
MIDDLE_CHANNELS = 1280
POSITION_FRAMES = 32
"""Rows of v2's sinusoidal position tables: ADE reads its frame limit (32) from them."""
FFN_MULT = 4
"""The temporal transformer's GEGLU feed-forward: C -> 2 x 4C (value and gate) -> C."""
MOTION_RECIPE = {
    "layout": "mm_sd_v15_v2 (AnimateDiff v2, SD1.5): 2 temporal transformers per down level, 3 per up level, "
              "1 in the middle",
    "weights": "seeded normal, fan-in scaled; norm scales 1 + 0.1 n; biases 0.02 n; sinusoidal position tables",
    "dtype": "float16",
    "seed": 7,
}


def motion_module_layout() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of an AnimateDiff v2 motion module for SD1.5, as in mm_sd_v15_v2.

    Each temporal transformer (width C): GroupNorm, ``proj_in``, one block of two temporal
    self-attentions (q/k/v without bias, ``to_out.0`` with bias, each with a ``[1, 32, C]`` position
    table and a LayerNorm before it), a LayerNorm + GEGLU feed-forward, ``proj_out``. The middle block
    is what makes ADE read it as v2."""
    transformers = [(f"down_blocks.{level}.motion_modules.{k}", width)
                    for level, width in enumerate(LEVEL_CHANNELS) for k in range(2)]
    transformers += [(f"up_blocks.{level}.motion_modules.{k}", width)
                     for level, width in enumerate(reversed(LEVEL_CHANNELS)) for k in range(3)]
    transformers.append(("mid_block.motion_modules.0", MIDDLE_CHANNELS))
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, c in transformers:
        t = f"{prefix}.temporal_transformer"
        block = f"{t}.transformer_blocks.0"
        shapes.update({f"{t}.norm.weight": (c,), f"{t}.norm.bias": (c,), f"{t}.proj_in.weight": (c, c),
                       f"{t}.proj_in.bias": (c,), f"{t}.proj_out.weight": (c, c), f"{t}.proj_out.bias": (c,)})
        for index in range(2):
            attention = f"{block}.attention_blocks.{index}"
            shapes.update({f"{attention}.{name}.weight": (c, c) for name in ("to_q", "to_k", "to_v", "to_out.0")})
            shapes.update({f"{attention}.to_out.0.bias": (c,), f"{attention}.pos_encoder.pe": (1, POSITION_FRAMES, c),
                           f"{block}.norms.{index}.weight": (c,), f"{block}.norms.{index}.bias": (c,)})
        shapes.update({
            f"{block}.ff.net.0.proj.weight": (2 * FFN_MULT * c, c), f"{block}.ff.net.0.proj.bias": (2 * FFN_MULT * c,),
            f"{block}.ff.net.2.weight": (c, FFN_MULT * c), f"{block}.ff.net.2.bias": (c,),
            f"{block}.ff_norm.weight": (c,), f"{block}.ff_norm.bias": (c,),
        })
    return shapes


def sinusoidal_positions(frames: int, channels: int) -> torch.Tensor:
    """``[1, frames, channels]``: sin in the even channels, cos in the odd ones, wavelengths
    growing geometrically from 2 pi to 10000 x 2 pi (the Transformer's table)."""
    position = torch.arange(frames, dtype=torch.float64)[:, None]
    rate = torch.exp(-math.log(10000.0) * torch.arange(0, channels, 2, dtype=torch.float64) / channels)
    table = torch.zeros(frames, channels, dtype=torch.float64)
    table[:, 0::2], table[:, 1::2] = torch.sin(position * rate), torch.cos(position * rate)
    return table[None].float()


def random_motion_module(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in motion_module_layout().items():
        if name.endswith("pos_encoder.pe"):
            value = sinusoidal_positions(shape[1], shape[2])
        elif len(shape) == 2:
            value = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        elif name.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        tensors[name] = value.to(torch.float16)
    return tensors


def motion_module_file() -> str:
    """The file name (in MOTION_MODELS_DIR) of the seeded motion module, written on first use."""
    import safetensors.torch

    digest = hashlib.sha256(json.dumps(MOTION_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    name = f"simda_bench_random_mm_sd_v15_v2_{digest}.safetensors"
    path = MOTION_MODELS_DIR / name
    if not path.is_file():
        print(f"writing the seeded motion module {path} (once) ...", flush=True)
        MOTION_MODELS_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        safetensors.torch.save_file(random_motion_module(MOTION_RECIPE["seed"]), str(partial),
                                    metadata={"recipe": json.dumps(MOTION_RECIPE)})
        partial.replace(path)
    return name


# -- ADE, as the host imports it -------------------------------------------------------------------

def import_ade() -> dict:
    """ADE's node classes, imported from the host's custom_nodes/ the way the host imports a pack,
    after registering MOTION_MODELS_DIR as an ``animatediff_models`` folder (as extra_model_paths does)."""
    import folder_paths

    path = HOST_DIR / "custom_nodes" / ADE_FOLDER
    if not (path / "__init__.py").is_file():
        sys.exit(f"AnimateDiff-Evolved is not installed in {path.parent}: run scripts/setup_packs.sh first")
    folder_paths.add_model_folder_path("animatediff_models", str(MOTION_MODELS_DIR))
    spec = importlib.util.spec_from_file_location("simda_bench_ade", path / "__init__.py",
                                                  submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.NODE_CLASS_MAPPINGS


def ade_model(ade: dict, base, motion_file: str):
    """``base`` through ADE's Gen2 nodes: Load AnimateDiff Model (the file, via ADE's loader) -> Apply
    AnimateDiff Model -> Use Evolved Sampling (beta schedule autoselect, no context windows). Returns
    the MODEL and the loaded motion model (a ModelPatcher around ADE's AnimateDiffModel)."""
    (motion_model,) = ade["ADE_LoadAnimateDiffModel"]().load_motion_model(motion_file)
    (m_models,) = ade["ADE_ApplyAnimateDiffModelSimple"]().apply_motion_model(motion_model)
    (model,) = ade["ADE_UseEvolvedSampling"]().use_evolved_sampling(base, "autoselect", m_models=m_models)
    return model, motion_model


def shift_on(model):
    """SimDA's Latent-Shift-only config (every level, the whole schedule) on a clone of ``model``."""
    from simda_core.host.register import apply_simda
    from simda_core.model.config import LatentShiftSettings, SimDAConfig

    return apply_simda(model.clone(), SimDAConfig(latent_shift=LatentShiftSettings()))


class MotionModuleCounter:
    """Counts forward calls of the motion model's temporal modules (forward hooks, removed by ``close``)."""

    def __init__(self, motion_model):
        self.count = 0
        modules = [m for m in motion_model.model.modules() if type(m).__name__ == "VanillaTemporalModule"]
        self.modules = len(modules)
        self.handles = [m.register_forward_hook(self._seen) for m in modules]

    def _seen(self, *_):
        self.count += 1

    def close(self):
        for handle in self.handles:
            handle.remove()


# -- timing inside sampling ------------------------------------------------------------------------

class StepTimer:
    """A DIFFUSION_MODEL wrapper (registered on the base MODEL first, so the outermost one on every
    clone) and the sampler's step callback: the UNet time of each sampling step, summed over its calls
    (the host splits a step's cond+uncond batch into several calls when it finds too little free
    memory), the calls' batches and, on CUDA, the most memory allocated during a call above what was
    allocated when it started."""

    def __init__(self, setting: Setting, device: torch.device):
        self.setting, self.device = setting, device
        self.start_run()

    def start_run(self) -> None:
        self.steps: list[dict] = []
        self.current = {"seconds": 0.0, "batches": [], "cond_or_uncond": []}

    def step_done(self, *_) -> None:
        self.steps.append(self.current)
        self.current = {"seconds": 0.0, "batches": [], "cond_or_uncond": []}

    def __call__(self, executor, x, *args, **kwargs):
        options = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})
        unet_bench.synchronize(self.device)
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = self.setting.clock()
        out = executor(x, *args, **kwargs)
        unet_bench.synchronize(self.device)
        step = self.current
        step["seconds"] += self.setting.clock() - start
        step["batches"].append(int(x.shape[0]))
        step["cond_or_uncond"].append(list(options.get("cond_or_uncond", [])))
        if self.device.type == "cuda":
            above = (torch.cuda.max_memory_allocated(self.device) - before) / 2**20
            step["above_start_mib"] = max(step.get("above_start_mib", 0.0), above)
        return out


def conditioning(seed: int) -> list:
    """A CONDITIONING of random text tokens (one row: the host repeats it for every frame)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, unet_bench.TEXT_TOKENS, unet_bench.SD15_UNET["context_dim"], generator=generator), {}]]


def no_memory_estimate(*_, **__) -> int:
    """``BaseModel.memory_required`` for ``Setting.one_batch``: the host then always batches cond and uncond."""
    return 0


def weights_mib(module: torch.nn.Module) -> float:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def sample_once(model, setting: Setting, timer: StepTimer) -> torch.Tensor:
    """One sampling run of the clip, as a KSampler makes it (same noise, seed and prompts every time)."""
    import comfy.sample

    latent = torch.zeros(setting.frames, 4, setting.size // 8, setting.size // 8)
    noise = comfy.sample.prepare_noise(latent, SEED)
    return comfy.sample.sample(model, noise, setting.steps, CFG, SAMPLER, SCHEDULER, conditioning(1),
                               conditioning(2), latent, callback=timer.step_done, disable_pbar=True, seed=SEED)


def run(setting: Setting, device: torch.device, ade: dict, motion_file: str) -> tuple[list[dict], dict]:
    mode = unet_bench.Mode({**unet_bench.SD15_UNET}, setting.dtype, (setting.size,), setting.frames, setting.rounds,
                           setting.warmup, setting.threads, setting.clock, setting.note)
    print(f"building the full-width SD1.5 UNet ({setting.dtype}) on {unet_bench.device_name(device)} ...", flush=True)
    base = unet_bench.build_unet(mode, device)
    timer = StepTimer(setting, device)
    import comfy.patcher_extension

    base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "bench_vs_ade_timer", timer)
    if setting.one_batch:  # an object patch on every variant (they are clones of base), gone when unloaded
        base.add_object_patch("memory_required", no_memory_estimate)
    adapters = unet_bench.random_adapters(base, device)
    models, errors, counter = {}, {}, None
    models["plain"] = unet_bench.variant_patcher(base, None, adapters)
    models["simda"] = unet_bench.variant_patcher(base, unet_bench.VARIANTS["simda"], adapters)
    try:
        models["ade"], motion_model = ade_model(ade, base, motion_file)
        counter = MotionModuleCounter(motion_model)
    except Exception as e:  # keep going: the SimDA rows still say something
        traceback.print_exc()
        errors["ade"] = errors["ade+shift"] = f"{type(e).__name__}: {e}"
    if "ade" in models:
        try:
            models["ade+shift"] = shift_on(models["ade"])
        except Exception as e:
            traceback.print_exc()
            errors["ade+shift"] = f"{type(e).__name__}: {e}"
    mib = {"unet": weights_mib(base.model.diffusion_model), "adapters": weights_mib(adapters),
           "motion_module": weights_mib(motion_model.model) if counter else 0.0}
    extra = {"plain": 0.0, "simda": mib["adapters"], "ade": mib["motion_module"], "ade+shift": mib["motion_module"]}

    rows = {name: {"variant": name, "runs": []} for name in VARIANTS}
    for name, error in errors.items():
        rows[name]["error"] = error
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        for round_index in range(setting.rounds):
            for name in VARIANTS:
                if "error" in rows[name]:
                    continue
                timer.start_run()
                seen_before = counter.count if counter else 0
                unet_bench.synchronize(device)
                start = setting.clock()
                try:
                    out = sample_once(models[name], setting, timer)
                except Exception as e:
                    traceback.print_exc()
                    rows[name]["error"] = f"{type(e).__name__}: {e}"
                    continue
                unet_bench.synchronize(device)
                whole = setting.clock() - start
                motion_calls = (counter.count - seen_before) if counter else 0
                rows[name]["runs"].append({"sample_seconds": whole, "steps": timer.steps,
                                           "motion_module_calls": motion_calls})
                outputs[name].append(out.to("cpu", torch.float32))
                unet_ms = [round(1000 * step["seconds"]) for step in timer.steps]
                print(f"  round {round_index + 1} {name}: UNet ms per step {unet_ms}, whole run "
                      f"{1000 * whole / setting.steps:.0f} ms per step, UNet batches "
                      f"{[step['batches'] for step in timer.steps]}, {motion_calls} motion-module calls", flush=True)
    if counter:
        counter.close()
    summaries = [summarize(rows[name], outputs[name], setting, mib["unet"] + extra[name]) for name in VARIANTS]
    add_ratios(summaries, {name: out[-1] for name, out in outputs.items() if out})
    meta = {"weights_mib": mib, "motion_module_file": str(MOTION_MODELS_DIR / motion_file),
            "motion_module_dtype": str(next(motion_model.model.parameters()).dtype) if counter else None,
            "temporal_transformers": counter.modules if counter else 0}
    return summaries, meta


def summarize(row: dict, outputs: list[torch.Tensor], setting: Setting, weights_in_use: float) -> dict:
    """Median UNet time per step (warm-up steps dropped), the whole run's time per step, the calls'
    batches, motion-module calls, and on CUDA the peak: the weights this variant uses plus the most
    allocated above a call's start (so what another variant left loaded does not count)."""
    runs = row.pop("runs")
    steps = [step for run in runs for step in run["steps"]]
    timed = steps[setting.warmup:]
    if "error" in row or not timed:
        row.setdefault("error", "no sampling step was timed")
        return row
    calls = sum(len(step["batches"]) for step in steps)
    row["unet_ms_per_step"] = [1000 * step["seconds"] for step in timed]
    row["median_ms"] = statistics.median(row["unet_ms_per_step"])
    row["whole_run_ms_per_step"] = [1000 * run["sample_seconds"] / setting.steps for run in runs]
    row["unet_calls_per_step"] = calls / len(steps)
    row["batches"] = sorted({batch for step in steps for batch in step["batches"]})
    row["cond_or_uncond"] = steps[0]["cond_or_uncond"]
    row["motion_module_calls"] = sum(run["motion_module_calls"] for run in runs)
    row["motion_module_calls_per_unet_call"] = row["motion_module_calls"] / calls
    row["finite"] = all(bool(torch.isfinite(out).all()) for out in outputs)
    row["same_output_every_round"] = all(torch.equal(out, outputs[0]) for out in outputs)
    if "above_start_mib" in timed[0]:
        row["peak_mib"] = weights_in_use + max(step["above_start_mib"] for step in timed)
    return row


def add_ratios(rows: list[dict], last_outputs: dict[str, torch.Tensor]) -> None:
    """Each variant against plain: UNet time per step, the whole run per step, peak, and how far its
    sampled latents lie from plain's (largest difference / largest plain value)."""
    plain = rows[0]
    for row in rows[1:]:
        if "error" in row or "error" in plain:
            continue
        row["time_ratio"] = row["median_ms"] / plain["median_ms"]
        row["whole_run_ratio"] = (statistics.median(row["whole_run_ms_per_step"])
                                  / statistics.median(plain["whole_run_ms_per_step"]))
        if "peak_mib" in row:
            row["peak_ratio"] = row["peak_mib"] / plain["peak_mib"]
        row["output_change"] = relative_change(last_outputs[row["variant"]], last_outputs["plain"])
    combined, ade = rows[-1], rows[-2]
    if "error" not in combined and "error" not in ade:
        combined["output_change_vs_ade"] = relative_change(last_outputs["ade+shift"], last_outputs["ade"])


def relative_change(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out - reference).abs().max() / reference.abs().max())


# -- report ----------------------------------------------------------------------------------------

def host_version() -> str:
    path = HOST_DIR / "comfyui_version.py"
    text = path.read_text() if path.is_file() else ""
    versions = [line.split("=", 1)[1].strip().strip("\"'") for line in text.splitlines()
                if line.startswith("__version__")]
    return versions[0] if versions else "unknown"


def ade_version() -> str:
    path = HOST_DIR / "custom_nodes" / ADE_FOLDER / "pyproject.toml"
    text = path.read_text() if path.is_file() else ""
    versions = [line.split("=", 1)[1].strip().strip('"') for line in text.splitlines() if line.startswith("version")]
    return versions[0] if versions else "unknown"


def motion_module_check(rows: list[dict], meta: dict) -> str:
    """One line saying whether ADE's motion module ran in the ADE runs and only there."""
    by_name = {row["variant"]: row for row in rows}
    ade = by_name["ade"]
    if "error" in ade:
        return f"ADE's motion module did not run: {ade['error']}"
    others = {name: row.get("motion_module_calls", 0) for name, row in by_name.items() if not name.startswith("ade")}
    line = (
        f"ADE's motion module ran: {ade['motion_module_calls']} temporal-transformer calls in the ade runs, "
        f"{ade['motion_module_calls_per_unet_call']:.0f} per UNet call ({meta['temporal_transformers']} in the "
        f"module: 8 down, 12 up, 1 middle); calls in the other runs: "
        + ", ".join(f"{name} {count}" for name, count in others.items())
    )
    combined = by_name["ade+shift"]
    if "output_change_vs_ade" in combined:
        line += (f"; ade+shift: {combined['motion_module_calls_per_unet_call']:.0f} per UNet call, its latents differ "
                 f"from ade's by {combined['output_change_vs_ade']:.2e} (latent shift acting)")
    return line


def markdown(rows: list[dict], meta: dict, setting: Setting, device: torch.device, seconds: float) -> str:
    clock = "CPU time" if setting.clock is time.process_time else "wall time"
    lines = [
        f"- device: {unet_bench.device_name(device)}; torch {torch.__version__}; ComfyUI {host_version()}; "
        f"AnimateDiff-Evolved {ade_version()}; {datetime.date.today().isoformat()}",
        f"- {setting.note}; {setting.frames} frames, comfy.sample.sample with {SAMPLER}/{SCHEDULER}, cfg {CFG}, "
        f"{setting.steps} step(s) per run, {setting.rounds} run(s) per variant, variants interleaved round by round; "
        f"median {clock} in the UNet per step after {setting.warmup} warm-up step(s); whole run {seconds:.0f} s wall",
        f"- motion module {meta['motion_module_dtype']}, {meta['weights_mib']['motion_module']:.0f} MiB; "
        f"UNet {meta['weights_mib']['unet']:.0f} MiB; SimDA adapters {meta['weights_mib']['adapters']:.0f} MiB",
        f"- {LEGEND}",
        "- UNet per step = the UNet calls of one sampling step (cond+uncond; the host splits them into two calls "
        "when it finds too little free memory"
        + ("; kept in one call here by an object patch of BaseModel.memory_required on every variant"
           if setting.one_batch else "")
        + "); whole run = the sampling run (host loading, ADE's set-up) / steps; peak = the weights the variant "
        "uses + the most allocated above a UNet call's start",
        f"- {motion_module_check(rows, meta)}",
        "",
        "| variant | UNet per step ms (min-max) | x plain | UNet calls per step (batch) | whole run per step ms "
        "| x plain | peak MiB | x plain | motion-module calls per UNet call | output change vs plain | finite |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | does not run: {row['error'][:300]} | | | | | | | | | |")
            continue
        spread = f"{min(row['unet_ms_per_step']):.0f}-{max(row['unet_ms_per_step']):.0f}"
        calls = f"{row['unet_calls_per_step']:.2g} ({', '.join(map(str, row['batches']))})"
        whole = f"{statistics.median(row['whole_run_ms_per_step']):.0f} | {row.get('whole_run_ratio', 1):.3f}"
        peak = f"{row['peak_mib']:.0f} | {row.get('peak_ratio', 1):.3f}" if "peak_mib" in row else "- | -"
        change = f"{row['output_change']:.2e}" if "output_change" in row else "-"
        lines.append(
            f"| {row['variant']} | {row['median_ms']:.0f} ({spread}) | {row.get('time_ratio', 1):.3f} | {calls} "
            f"| {whole} | {peak} | {row['motion_module_calls_per_unet_call']:.0f} | {change} | {row['finite']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=SETTINGS, required=True)
    parser.add_argument("--steps", type=int, help="sampling steps per run (one UNet call each)")
    parser.add_argument("--rounds", type=int, help="sampling runs per variant")
    parser.add_argument("--warmup", type=int, help="sampling steps of each variant dropped before the median")
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    setting = SETTINGS[args.mode]
    overrides = {k: getattr(args, k) for k in ("steps", "rounds", "warmup") if getattr(args, k) is not None}
    setting = Setting(**{**setting.__dict__, **overrides})
    if args.mode == "gpu" and not torch.cuda.is_available():
        sys.exit("--mode gpu needs a CUDA device; use --mode cpu here")

    unet_bench.import_host(force_cpu=args.mode == "cpu")
    if setting.threads:
        torch.set_num_threads(setting.threads)
    import comfy.model_management

    started = time.perf_counter()
    motion_file = motion_module_file()  # before ADE's import, which looks for motion models
    ade = import_ade()
    device = comfy.model_management.get_torch_device()
    rows, meta = run(setting, device, ade, motion_file)
    table = markdown(rows, meta, setting, device, time.perf_counter() - started)
    print("\n" + table)
    combined = next(row for row in rows if row["variant"] == "ade+shift")
    if "error" in combined:
        print(f"\nADE + SimDA latent shift do not combine: {combined['error']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta.update(device=unet_bench.device_name(device), torch=torch.__version__, comfyui=host_version(),
                    ade=ade_version(), mode=args.mode, setting={k: str(v) for k, v in setting.__dict__.items()})
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
