"""Every check that needs an NVIDIA GPU, in one run (a few minutes on an H100/H200).

    python bench/gpu_check.py            # on the GPU machine; writes $OUT/gpu_check.json (or bench/out/)
    python bench/gpu_check.py --cpu      # the same code on the CPU at tiny sizes: proves the script runs

    COMFYUI_PATH=.hosts/0.33.0/ComfyUI python bench/gpu_check.py --dynamic-vram   # 0.33 with Dynamic VRAM on

It installs nothing. On a GPU machine with torch + CUDA and no internet, copy a pinned host
(``.hosts/0.3.75/ComfyUI``, 26 MB, or ``.hosts/0.33.0/ComfyUI``, 31 MB) and the pure-Python packages
the host's sampling code imports (``pip install --target .gpu_deps torchsde trampoline einops
safetensors``; ``PYTHONPATH=.gpu_deps``). 0.33 also imports ``comfy_kitchen`` (a 58 MB wheel, 227 MB
unpacked) and ``comfy_aimdo`` (under 1 MB) unconditionally; a wheel is a zip, so it can be unpacked
into ``.gpu_deps`` on that machine. Checks that need a missing package report it instead of failing
the run.

Checks (each a row of the printed table):
- the authors' tiny fixture on CUDA in fp16 and bf16 against its fp32 CPU reference outputs;
- adapter training on host-loaded (inference-tensor) weights, gradient checkpointing on and off:
  finite losses, gradient cosine similarity >= 0.999, every adapter tensor changes, the UNet's
  parameter objects and the host's pinned-memory bookkeeping unchanged;
- the Video Sampler and the Video Upscaler's automatic-size path;
- SimDA's time and memory ratios on the full-size SDXL UNet at 1024^2 with 16 frames
  (``bench/bench_unet.py --mode sdxl-gpu``);
- SimDA's per-call work without device synchronisation (``torch.cuda.set_sync_debug_mode("error")``),
  and ``bench/bench_unet.py``, ``bench/bench_windows.py`` and ``bench/bench_longclip.py``'s ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
PACK_DIR = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import bench_unet  # noqa: E402  (puts the host and the pack on sys.path)

FIXTURE = PACK_DIR / "tests" / "fixtures" / "simda_authors_tiny"
FIXTURE_CASES = ("io_f6_16x16", "io_f3_16x16", "io_f8_12x12", "io_f1_16x16", "io_f2_12x12")
TINY_UNET = dict(
    model_channels=32, channel_mult=[1, 1, 1, 1], num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], context_dim=32, num_heads=8,
    use_linear_in_transformer=False, in_channels=4, out_channels=4, use_spatial_transformer=True,
    legacy=False, adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False, image_size=32,
)
"""The authors' tiny fixture UNet in the host's terms (as tests/host.py has it)."""


def tiny_patcher(device: torch.device, dtype: torch.dtype = torch.float32, inference: bool = False):
    import comfy.model_base
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.SD15(dict(TINY_UNET))
    config.set_inference_dtype(dtype, None)
    with torch.inference_mode(inference):
        model = comfy.model_base.BaseModel(config, device=device)
        bench_unet.seeded_weights_(model.diffusion_model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def unet_call(patcher, x, timesteps, context):
    from simda_core.host.unet_call import call_options

    patcher.patch_model()
    try:
        with torch.inference_mode():
            return patcher.model.diffusion_model(
                x, timesteps, context=context, transformer_options=call_options(patcher, [0])
            )
    finally:
        patcher.unpatch_model()


def fixture_precision(device: torch.device) -> dict:
    import comfy.utils
    from simda_core import formats
    from simda_core.host.register import apply_simda, model_sites
    from simda_core.model.config import LatentShiftSettings, SimDAConfig

    state = torch.load(FIXTURE / "unet" / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    mapping = comfy.utils.unet_to_diffusers(dict(TINY_UNET))
    result = {}
    for dtype in (torch.float16, torch.bfloat16):
        base = tiny_patcher(device, dtype)
        base.model.diffusion_model.load_state_dict(
            {ldm: state[key].to(dtype) for key, ldm in mapping.items() if key in state}, strict=True
        )
        adapters = formats.build_adapters(
            formats.read_adapter_file(FIXTURE), model_sites(base), dtype=dtype, device=device
        )
        patched = apply_simda(base.clone(), SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings()))
        errors = {}
        for name in FIXTURE_CASES:
            case = torch.load(FIXTURE / f"{name}.pt", map_location="cpu", weights_only=True)
            frames = case["frames"]
            x = case["sample"][0].permute(1, 0, 2, 3).contiguous().to(device, dtype)
            y = unet_call(
                patched, x, case["timestep"].repeat(frames).to(device),
                case["context"].repeat(frames, 1, 1).to(device, dtype),
            )
            y = y.float().cpu().permute(1, 0, 2, 3).unsqueeze(0)
            errors[name] = float((y - case["output"]).norm() / case["output"].norm())
        result[str(dtype).removeprefix("torch.")] = errors
    return result


def tuning(device: torch.device, steps: int = 3) -> dict:
    """Adapter training on inference-tensor weights (as the host loads them) with and without
    gradient checkpointing, from the same adapters and batch."""
    import comfy.model_management as mm
    from simda_core.host.register import apply_simda, model_sites
    from simda_core.host.training import training_patcher
    from simda_core.model.config import LatentShiftSettings, SimDAConfig
    from simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

    base = tiny_patcher(device, inference=True)
    params_before = {n: p for n, p in base.model.diffusion_model.named_parameters()}
    pinned_before = (set(base.pinned), mm.TOTAL_PINNED_MEMORY, len(mm.PINNED_MEMORY))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 32, 32, generator=g)
    context = torch.randn(8, 8, TINY_UNET["context_dim"], generator=g)
    runs = {}
    for checkpointing in (False, True):
        adapters = initial_adapters(model_sites(base), seed=1, device=device)
        with torch.no_grad():  # make every output layer non-zero, so every tensor has a gradient on step 1
            for name, p in adapters.named_parameters():
                if ".up." in name or ".fc2." in name:
                    p.normal_(0, 1e-3, generator=torch.Generator(device=device).manual_seed(2))
        start = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
        training = training_patcher(base)
        apply_simda(
            training,
            SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), gradient_checkpointing=checkpointing),
        )
        mm.load_models_gpu([training])
        trainer = AdapterTrainer(training, adapters, TuningRecipe(learning_rate=1e-3), seed=3)
        with torch.inference_mode(False), torch.enable_grad():
            loss = trainer.loss(
                x0, context, clips=1, timesteps=torch.tensor([500]),
                noise=torch.randn(x0.shape, generator=g.manual_seed(4)),
            )
            loss.backward()
            grad = torch.cat([p.grad.float().flatten() for p in adapters.parameters()])
            trainer.optimizer.zero_grad(set_to_none=True)
            losses = [trainer.step(x0, context) for _ in range(steps)]
        changed = sum(not torch.equal(start[k], v) for k, v in adapters.state_dict().items())
        runs[checkpointing] = {"grad": grad, "losses": losses, "changed": changed, "tensors": len(start)}
        mm.unload_all_models()
    cosine = float(torch.nn.functional.cosine_similarity(runs[False]["grad"], runs[True]["grad"], dim=0))
    params_after = dict(base.model.diffusion_model.named_parameters())
    return {
        "gradient_cosine": cosine,
        "losses_finite": all(torch.isfinite(torch.tensor(r["losses"])).all() for r in runs.values()),
        "adapters_changed": {str(k): f"{r['changed']}/{r['tensors']}" for k, r in runs.items()},
        "unet_parameters_unchanged": all(params_after[n] is p for n, p in params_before.items()),
        "pinned_unchanged": (set(base.pinned), mm.TOTAL_PINNED_MEMORY, len(mm.PINNED_MEMORY)) == pinned_before,
    }


def import_pack() -> None:
    """The pack as the host imports it, as ``simda_pack`` (its nodes/ beside the host's nodes.py)."""
    import importlib.util

    import comfy.sample  # noqa: F401  (needs the host's sampling dependencies)

    if "simda_pack" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "simda_pack", PACK_DIR / "__init__.py", submodule_search_locations=[str(PACK_DIR)]
        )
        sys.modules["simda_pack"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["simda_pack"])


def sampler_and_upscaler(device: torch.device) -> dict:
    """One short clip through the Video Sampler, and the Upscaler's memory budget for it."""
    import_pack()
    from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
    from simda_pack.nodes.nodes_upscale import sampling_budget
    from simda_pack.simda_core.host.register import apply_simda
    from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

    base = tiny_patcher(device)
    patched = apply_simda(base.clone(), SimDAConfig(latent_shift=LatentShiftSettings(), frame_group_norm=True))
    cond = [[torch.randn(1, 8, TINY_UNET["context_dim"]), {}]]
    (latent,) = SimDAVideoSampler.execute(
        patched, cond, cond, 8, 128, 128, 0, 4, 5.0, "ddim", "ddim_uniform", 1.0, 0.0
    ).result
    samples = latent["samples"]
    return {"sampled": list(samples.shape), "finite": bool(torch.isfinite(samples).all()),
            "upscaler_budget_gib": sampling_budget(patched) / 2**30}


def no_device_sync(device: torch.device) -> dict:
    import bench_windows

    return bench_windows.no_sync_check(device)


def bench_scripts(device: torch.device, out: Path, cpu: bool) -> dict:
    rows = {}
    unet_json = out / "bench_unet.json"
    command = [
        sys.executable, str(BENCH_DIR / "bench_unet.py"), "--mode", "cpu" if cpu else "gpu", "--out", str(unet_json)
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240)
    rows["bench_unet"] = (
        json.loads(unet_json.read_text())["rows"] if completed.returncode == 0 else completed.stderr[-2000:]
    )
    import bench_longclip
    import bench_windows

    rows["bench_windows"] = bench_windows.run(device)
    rows["bench_longclip"] = bench_longclip.run(device, mode="cpu" if cpu else "gpu")
    rows["bench_vs_ade"] = beside_ade(out) if not cpu else "not run with --cpu (bench_vs_ade.py --mode cpu: ~7 min)"
    return rows


ADE_BENCH_TIMEOUT_S = 360
"""bench_vs_ade.py --mode gpu: plain, SimDA, ADE, ADE + latent shift, 512x512, 16 frames, fp16."""


def beside_ade(out: Path):
    """SimDA beside AnimateDiff-Evolved's motion module (``bench_vs_ade.py --mode gpu``), when ADE is
    installed in the host's custom_nodes: its rows, or why it did not run."""
    ade_json = out / "bench_vs_ade.json"
    command = [sys.executable, str(BENCH_DIR / "bench_vs_ade.py"), "--mode", "gpu", "--out", str(ade_json)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=ADE_BENCH_TIMEOUT_S)
    return json.loads(ade_json.read_text()) if completed.returncode == 0 else completed.stderr[-2000:]


SDXL_BENCH_TIMEOUT_S = 480
"""bench_unet.py --mode sdxl-gpu: 5 variants x 7 calls of the full SDXL UNet, 2 x 16 frames at 1024^2."""


def sdxl_ratios(device: torch.device) -> dict:
    """SimDA's cost on the full-size SDXL UNet at 1024^2 with 16 frames (``bench/bench_unet.py --mode
    sdxl-gpu``; ``sdxl-cpu``, the SDXL layout at 1/10 width, on the CPU): per variant, time and
    peak-memory ratios to the plain UNet call, the output change, and whether the output is finite."""
    mode = "sdxl-cpu" if device.type == "cpu" else "sdxl-gpu"
    out = Path(os.environ.get("OUT") or BENCH_DIR / "out") / "bench_unet_sdxl.json"
    command = [sys.executable, str(BENCH_DIR / "bench_unet.py"), "--mode", mode, "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=SDXL_BENCH_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(
            f"bench_unet.py --mode {mode} exited with {completed.returncode}: {completed.stderr[-2000:]}"
        )
    rows = json.loads(out.read_text())["rows"]
    keys = ("median_ms", "time_ratio", "peak_mib", "peak_ratio", "output_change", "finite", "error")
    return {"mode": mode, **{f"{r['size']}px {r['variant']}": {k: r[k] for k in keys if k in r} for r in rows}}


def start_dynamic_vram() -> str:
    """The first half of how ComfyUI 0.33's ``main.py`` switches Dynamic VRAM on (lines in
    docs/HOST_COMPAT.md): ``comfy_aimdo.control.init`` before the host's model management is imported."""
    try:
        import comfy_aimdo.control
    except ImportError as error:
        return f"unavailable: {error}"
    for arguments in ({"simple_vram_headroom": None, "nvml_pressure": True}, {"simple_vram_headroom": None}, {}):
        try:
            comfy_aimdo.control.init(**arguments)
            return "initialised"
        except TypeError:  # older comfy-aimdo protocols take fewer arguments
            continue
    return "comfy_aimdo.control.init refused every protocol"


def finish_dynamic_vram() -> bool:
    """The second half (``main.py``'s ``init_devices`` call): aimdo takes the devices, and the host's core
    patcher becomes ``ModelPatcherDynamic``."""
    import comfy.memory_management
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy_aimdo.control

    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        return False
    devices = [device for device in mm.get_all_torch_devices() if device.type == "cuda"]
    if not devices:  # main.py switches it on only for NVIDIA (and new AMD) devices
        return False
    try:
        ready = comfy_aimdo.control.init_devices((d.index, 0) for d in devices)
    except TypeError:
        ready = comfy_aimdo.control.init_devices(d.index for d in devices)
    if ready:
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return bool(ready)


def dynamic_vram(device: torch.device, steps: int = 3) -> dict:
    """ComfyUI 0.33+ with Dynamic VRAM on (``--dynamic-vram``): a full-size random SD1.5 UNet saved
    and loaded by the host's own UNet loader (which sets ``cached_patcher_init``); SimDA adapters on
    it; the One-Shot Tuner's training path through the non-dynamic delegate (finite losses, every
    adapter changes, the delegate holds another model); the SimDA clone samples a clip; a dynamic
    MODEL without ``cached_patcher_init`` gets SimDA's sentence; the Upscaler's memory budget."""
    import comfy.memory_management
    import comfy.model_base
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    import_pack()
    if not getattr(comfy.memory_management, "aimdo_enabled", False):
        return {"dynamic_vram": "off (needs CUDA, comfy-aimdo and a 0.33+ host; run with --dynamic-vram)"}
    from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
    from simda_pack.nodes.nodes_upscale import sampling_budget
    from simda_pack.simda_core.host.register import apply_simda, model_sites
    from simda_pack.simda_core.host.training import training_patcher
    from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
    from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters
    config = comfy.supported_models.SD15(dict(bench_unet.SD15_UNET))
    config.set_inference_dtype(torch.float16, None)
    base = comfy.model_base.BaseModel(config, device="cpu")
    bench_unet.seeded_weights_(base.diffusion_model, seed=0)
    path = Path(os.environ.get("OUT") or BENCH_DIR / "out") / "dynamic_vram_unet.safetensors"
    comfy.utils.save_torch_file({k: v.half() for k, v in base.diffusion_model.state_dict().items()}, str(path))
    model = comfy.sd.load_diffusion_model(str(path))
    report = {"patcher": type(model).__name__, "is_dynamic": bool(model.is_dynamic())}

    bare = comfy.model_patcher.ModelPatcherDynamic(base, device, torch.device("cpu"))
    try:
        training_patcher(bare)
        report["no_cached_patcher_init"] = "no error"
    except RuntimeError as error:
        report["no_cached_patcher_init"] = str(error)

    adapters = initial_adapters(model_sites(model), seed=1, device=device)
    start = {k: v.detach().clone() for k, v in adapters.state_dict().items()}
    training = training_patcher(model)
    report["delegate_has_another_model"] = training.model is not model.model
    apply_simda(
        training, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), gradient_checkpointing=True)
    )
    mm.load_models_gpu([training])
    trainer = AdapterTrainer(training, adapters, TuningRecipe(learning_rate=1e-3), seed=3)
    g = torch.Generator().manual_seed(0)
    x0, context = torch.randn(8, 4, 32, 32, generator=g), torch.randn(8, 77, 768, generator=g)
    with torch.inference_mode(False), torch.enable_grad():
        losses = [float(trainer.step(x0, context)) for _ in range(steps)]
    report["losses"] = losses
    report["adapters_changed"] = (
        f"{sum(not torch.equal(start[k], v) for k, v in adapters.state_dict().items())}/{len(start)}"
    )
    mm.unload_all_models()

    clone = apply_simda(
        model.clone(), SimDAConfig(adapters=adapters.requires_grad_(False), latent_shift=LatentShiftSettings())
    )
    cond = [[torch.randn(1, 77, 768, generator=g), {}]]
    (latent,) = SimDAVideoSampler.execute(
        clone, cond, cond, 8, 256, 256, 0, 4, 5.0, "ddim", "ddim_uniform", 1.0, 0.0
    ).result
    report["sampled_finite"] = bool(torch.isfinite(latent["samples"]).all())
    report["upscaler_budget_gib"] = sampling_budget(clone) / 2**30
    report["patcher_free_gib"] = float(clone.get_free_memory(device)) / 2**30
    report["torch_free_gib"] = float(mm.get_free_memory(device)) / 2**30
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true",
                        help="run on the CPU at tiny sizes (proves the script, measures nothing)")
    parser.add_argument("--skip-bench", action="store_true", help="only the correctness checks")
    parser.add_argument("--dynamic-vram", action="store_true",
                        help="switch Dynamic VRAM on as ComfyUI 0.33's main.py does (0.33+ host with comfy-aimdo)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("gpu_check needs a CUDA device; use --cpu to run the same code on the CPU")
    if args.dynamic_vram:
        sys.path.insert(0, str(bench_unet.HOST_DIR))
        aimdo = start_dynamic_vram()
    bench_unet.import_host(force_cpu=args.cpu)
    if args.dynamic_vram:
        aimdo = f"{aimdo}; devices taken: {finish_dynamic_vram()}" if aimdo == "initialised" else aimdo
    device = torch.device("cpu") if args.cpu else torch.device("cuda")
    out = Path(os.environ.get("OUT") or BENCH_DIR / "out")
    out.mkdir(parents=True, exist_ok=True)
    checks = [("fixture fp16/bf16", fixture_precision), ("tuning", tuning),
              ("sampler + upscaler size", sampler_and_upscaler),
              ("SDXL ratios 1024^2 x 16 frames", sdxl_ratios)]
    if not args.cpu:
        checks.append(("no device sync", no_device_sync))
    if args.dynamic_vram:
        checks.insert(0, ("Dynamic VRAM (0.33+)", dynamic_vram))
    report = {"device": bench_unet.device_name(device), "torch": torch.__version__, "host": str(bench_unet.HOST_DIR)}
    if args.dynamic_vram:
        report["aimdo"] = aimdo
    started = time.perf_counter()
    for name, check in checks:
        began = time.perf_counter()
        try:
            report[name] = check(device)
        except Exception as e:  # a missing package or a failed check: reported, the run goes on
            report[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=3)}
        print(f"| {name} | {time.perf_counter() - began:.1f} s | {json.dumps(report[name], default=str)[:300]} |",
              flush=True)
    if not args.skip_bench:
        try:
            report["bench"] = bench_scripts(device, out, args.cpu)
        except Exception as e:
            report["bench"] = {"error": f"{type(e).__name__}: {e}"}
        print(f"| bench | {json.dumps(report['bench'], default=str)[:600]} |")
    report["seconds"] = time.perf_counter() - started
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"written {out / 'gpu_check.json'} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
