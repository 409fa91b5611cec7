"""``torch.compile`` of a SimDA UNet call: graph breaks (ours and the host's, counted apart) from
``torch._dynamo.explain``, and recompiles while context windows slide along a clip.

The UNet call is the one bench_unet makes (the host's UNet through a ModelPatcher clone with the
pack's patches, cond+uncond batch, ``torch.inference_mode``), with the host's PyTorch attention
(``--use-pytorch-cross-attention``: the host's default CPU attention, sub-quadratic, breaks the
graph through psutil). Breaks are attributed by the innermost frame of their stack that lies in
the pack (``simda_core``, ``nodes``) or in the host's folder; the plain MODEL's call is explained
too, so host breaks show as host breaks.

Window walk: the same call with ``transformer_options["context_window"]`` set to the host's own
``IndexListContextWindow`` for contiguous windows at successive positions; the count is the
graphs dynamo compiled after the first window (target: none per window position; the first
change of position may compile once more while dynamo makes the indices dynamic).

    python bench/bench_compile.py --mode cpu   # reduced-width UNet, dynamo only (backend "eager")
    python bench/bench_compile.py --mode gpu   # SD1.5 UNet fp16, inductor
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet  # noqa: E402
from bench_unet import HOST_DIR, PACK_DIR, device_name  # noqa: E402

SETTINGS = {
    # size px, frames per window, windows walked, backend
    "cpu": (64, 8, 6, "eager"),
    "gpu": (256, 16, 6, "inductor"),
}


def import_host_with_pytorch_attention(force_cpu: bool) -> None:
    for path in (str(PACK_DIR), str(HOST_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True  # before the host picks its attention
    bench_unet.import_host(force_cpu)
    import comfy.ldm.modules.attention as attention

    if attention.optimized_attention is not attention.attention_pytorch:
        raise RuntimeError(
            "the host had already chosen its attention before bench_compile set --use-pytorch-cross-attention: "
            "run bench_compile in a fresh process (or before other benchmarks import the host)"
        )


def _where(frame) -> str:
    name = str(Path(frame.filename).resolve())
    if name.startswith(str(PACK_DIR / "simda_core")) or name.startswith(str(PACK_DIR / "nodes")):
        return "simda"
    if name.startswith(str(HOST_DIR)):
        return "host"
    return "other"


def classify_breaks(explanation) -> dict:
    """Graph breaks by whose code they happen in: the innermost pack or host frame decides."""
    counts = {"simda": 0, "host": 0, "other": 0}
    reasons = []
    for reason in explanation.break_reasons:
        stack = list(getattr(reason, "user_stack", []) or [])
        owner = "other"
        for frame in reversed(stack):
            where = _where(frame)
            if where != "other":
                owner = where
                break
        counts[owner] += 1
        top = stack[-1] if stack else None
        reasons.append({
            "owner": owner, "reason": str(reason.reason)[:300],
            "at": f"{Path(top.filename).name}:{top.lineno}" if top else "",
        })
    return {"graphs": explanation.graph_count, "breaks": explanation.graph_break_count,
            "breaks_by_owner": counts, "reasons": reasons}


def window_options(patcher, indices) -> dict:
    """``transformer_options`` of one context window's UNet call, as the host's context handler
    sets them (its own IndexListContextWindow), made outside the compiled region as there."""
    import comfy.context_windows
    from simda_core.host.unet_call import call_options

    options = call_options(patcher, list(bench_unet.COND_OR_UNCOND))
    options["context_window"] = comfy.context_windows.IndexListContextWindow(list(indices))
    return options


def explain_and_walk(patcher, inputs, frames: int, windows: int, backend: str) -> dict:
    """The host compiles the whole diffusion model module (comfy_api torch_helpers
    ``set_torch_compile_wrapper``): so does this."""
    from torch._dynamo.utils import counters

    unet = patcher.model.diffusion_model

    def call(module, options):
        return module(inputs.x, timesteps=inputs.timesteps, context=inputs.context, transformer_options=options)

    patcher.patch_model(load_weights=False)
    try:
        call(unet, window_options(patcher, range(frames)))  # eager: fills the pack's caches
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(unet)(
            inputs.x, timesteps=inputs.timesteps, context=inputs.context,
            transformer_options=window_options(patcher, range(frames)),
        )
        result = classify_breaks(explanation)
        torch._dynamo.reset()
        compiled = torch.compile(unet, backend=backend)
        graphs = []
        for start in range(windows):
            options = window_options(patcher, range(start, start + frames))
            before = counters["stats"]["unique_graphs"]
            call(compiled, options)
            graphs.append(counters["stats"]["unique_graphs"] - before)
        result["graphs_compiled_per_window"] = graphs
        result["recompiles_after_second_window"] = sum(graphs[2:])
        return result
    finally:
        patcher.unpatch_model(unpatch_weights=False)


def run(device: torch.device | str = "cpu", mode: str | None = None) -> dict:
    device = torch.device(device)
    mode = mode or ("gpu" if device.type == "cuda" else "cpu")
    size, frames, windows, backend = SETTINGS[mode]
    import_host_with_pytorch_attention(force_cpu=device.type == "cpu")
    bench_mode = bench_unet.MODES[mode]
    print(f"building the {bench_mode.note} on {device_name(device)} ...", flush=True)
    base = bench_unet.build_unet(bench_mode, device)
    adapters = bench_unet.random_adapters(base, device)
    inputs = bench_unet.make_inputs(bench_mode, size, frames, device)
    result = {"device": device_name(device), "torch": torch.__version__, "mode": mode, "size": size,
              "frames": frames, "backend": backend, "attention": "host attention_pytorch"}
    with torch.inference_mode():
        for name in ("plain", "simda"):
            patcher = bench_unet.variant_patcher(base, bench_unet.VARIANTS[name], adapters)
            row = explain_and_walk(patcher, inputs, frames, windows, backend)
            print(f"  {name}: {row['graphs']} graphs, {row['breaks']} breaks {row['breaks_by_owner']}, "
                  f"graphs compiled per window {row['graphs_compiled_per_window']}", flush=True)
            result[name] = row
    return result


def main() -> None:
    bench_unet.run_command_line(__doc__, SETTINGS, run)


if __name__ == "__main__":
    main()
