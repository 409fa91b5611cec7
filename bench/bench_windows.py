"""SimDA's own per-window work when the host slides context windows over a long clip, and the
frame operations against their permute-based form.

Part 1, "windows": 100 different contiguous 16-frame windows (cond+uncond), each as one UNet call
would see it: ``ClipLayout.from_batch`` from the window's frame indices, the latent-shift gather
index for every self-attention call of an SD1.5 UNet at that size (16 transformer blocks over
64x64, 32x32, 16x16 and 8x8 grids at 512 px), and the sigma-in-schedule check on a float.
Target: at most 0.5 ms per window on average on the CPU, one index build per window shape.

Part 2, "frame ops": latent-shift gather of k and v, frame-shared GroupNorm and the temporal
adapter against the same maths done the way the code did it before (``torch.stack([k, v])`` then
one gather; ``rearrange`` to ``[b, C, F, H, W]``, torch's GroupNorm / Conv3d, and back). Median
time, largest difference of the outputs (relative to the largest output), and on CUDA the peak
memory above the inputs.

    python bench/bench_windows.py --mode cpu    # 1 thread, CPU time
    python bench/bench_windows.py --mode gpu    # CUDA, fp16 frame ops, wall time after synchronize;
                                                # also checks that no call synchronises once indices exist
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_unet  # noqa: E402
from bench_unet import PACK_DIR, device_name  # noqa: E402

if str(PACK_DIR) not in sys.path:
    sys.path.insert(0, str(PACK_DIR))

from simda_core.model import latent_shift  # noqa: E402
from simda_core.model.adapters import TemporalAdapter  # noqa: E402
from simda_core.model.group_norm import frame_shared_group_norm  # noqa: E402
from simda_core.model.layout import ClipLayout  # noqa: E402

SD15_ATTENTION_GRIDS = (64, 64, 32, 32, 16, 16, 8, 16, 16, 16, 32, 32, 32, 64, 64, 64)
"""Latent grid side of each self-attention call in one SD1.5 UNet call at 512 px, 16 in all:
input blocks 1, 2 (64), 4, 5 (32), 7, 8 (16), the middle block (8), output blocks 3-5 (16),
6-8 (32), 9-11 (64)."""
WINDOW_TARGET_MS = 0.5


def clock_for(device: torch.device):
    if device.type == "cuda":
        return time.perf_counter
    return time.process_time


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def walk_windows(device: torch.device, windows: int = 100, length: int = 16, latent: int = 64) -> dict:
    """Per-window cost of SimDA's work outside the UNet for ``windows`` contiguous windows."""
    grids = [g * latent // 64 for g in SD15_ATTENTION_GRIDS]
    latent_shift._index_cache.clear()
    clock = clock_for(device)
    sigma, sigma_start, sigma_end = 3.5, float("inf"), 0.0
    times = []
    for start in range(windows):
        indices = list(range(start, start + length))
        sync(device)
        begin = clock()
        layout = ClipLayout.from_batch(2 * length, 2, 0, indices)
        active = sigma_end <= sigma <= sigma_start
        for g in grids:
            latent_shift.key_value_index(layout, g, g, device)
        sync(device)
        times.append(clock() - begin)
        assert active
    builds = len(latent_shift._index_cache)
    rest = times[1:]
    return {
        "windows": windows, "frames": length, "latent": latent, "index_calls_per_window": len(grids),
        "first_window_ms": 1000 * times[0], "mean_ms": 1000 * statistics.mean(times),
        "mean_after_first_ms": 1000 * statistics.mean(rest), "max_after_first_ms": 1000 * max(rest),
        "index_builds": builds, "target_ms": WINDOW_TARGET_MS,
        "ok": 1000 * statistics.mean(times) <= WINDOW_TARGET_MS,
    }


def no_sync_check(device: torch.device, length: int = 16, latent: int = 64, dim: int = 320) -> dict:
    """CUDA only: with the indices built, layouts, index look-ups and the gather of k and v for
    new window positions run with synchronisations treated as errors."""
    if device.type != "cuda":
        return {"checked": False, "why": "no CUDA device"}
    tokens = latent * latent
    k = torch.randn(2 * length, tokens, dim, device=device, dtype=torch.float16)
    v = torch.randn_like(k)
    latent_shift.key_value_index(ClipLayout.from_batch(2 * length, 2, 0, list(range(length))), latent, latent, device)
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for start in range(1, 20):
            layout = ClipLayout.from_batch(2 * length, 2, 0, list(range(start, start + length)))
            latent_shift.latent_shift_keys_values(k, v, layout, latent, latent)
    except RuntimeError as e:
        return {"checked": True, "synchronises": True, "error": str(e)[:200]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"checked": True, "synchronises": False}


# -- the permute-based forms the code used before, as baselines -------------------------------------

def stacked_gather(k, v, layout, h, w):
    index = latent_shift.key_value_index(layout, h, w, k.device)
    batch, tokens, dim = k.shape
    kv = torch.stack([k, v]).reshape(2, layout.clips, layout.frames * tokens, dim).index_select(2, index)
    kv = kv.reshape(2, batch, 2 * tokens, dim)
    return kv[0], kv[1]


def permuted_group_norm(x, layout, norm):
    b, f = layout.clips, layout.frames
    clip = x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
    out = F.group_norm(clip, norm.num_groups, norm.weight.to(x.dtype), norm.bias.to(x.dtype), norm.eps)
    return out.permute(0, 2, 1, 3, 4).reshape(x.shape)


def permuted_adapter(adapter, x, layout):
    b, f = layout.clips, layout.frames
    clip = x.reshape(b, f, *x.shape[1:]).permute(0, 2, 1, 3, 4)
    out = adapter.up(adapter.depthwise(adapter.down(clip)))
    return out.permute(0, 2, 1, 3, 4).reshape(x.shape)


def time_op(fn, device, repeats: int) -> dict:
    clock = clock_for(device)
    out = fn()  # warm-up (and the output)
    times, peaks = [], []
    for _ in range(repeats):
        sync(device)
        if device.type == "cuda":
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        begin = clock()
        fn()
        sync(device)
        times.append(clock() - begin)
        if device.type == "cuda":
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
    row = {"median_ms": 1000 * statistics.median(times)}
    if peaks:
        row["peak_mib"] = max(peaks)
    return row, out


def frame_ops(device: torch.device, dtype: torch.dtype, frames: int, latent: int, channels: int,
              heads_dim: int, repeats: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    layout = ClipLayout.contiguous(2, frames)
    tokens = latent * latent
    rows = []

    def compare(name, new, old, shape):
        new_row, new_out = time_op(new, device, repeats)
        old_row, old_out = time_op(old, device, repeats)
        new_out = new_out if isinstance(new_out, tuple) else (new_out,)
        old_out = old_out if isinstance(old_out, tuple) else (old_out,)
        change = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(new_out, old_out)
        )
        row = {"op": name, "shape": shape, "new_ms": new_row["median_ms"], "before_ms": old_row["median_ms"],
               "max_change": change}
        if "peak_mib" in new_row:
            row["new_peak_mib"], row["before_peak_mib"] = new_row["peak_mib"], old_row["peak_mib"]
        rows.append(row)
        print(f"  {name} {shape}: {row['new_ms']:.2f} ms (before {row['before_ms']:.2f} ms), change {change:.1e}",
              flush=True)

    with torch.inference_mode():
        def gather_rows():  # its k and v are freed when it returns
            k = torch.randn(2 * frames, tokens, heads_dim, generator=g, device=device).to(dtype)
            v = torch.randn(2 * frames, tokens, heads_dim, generator=g, device=device).to(dtype)
            compare("latent-shift gather", lambda: latent_shift.latent_shift_keys_values(k, v, layout, latent, latent),
                    lambda: stacked_gather(k, v, layout, latent, latent), f"k,v [{2 * frames}, {tokens}, {heads_dim}]")

        gather_rows()
        x = (torch.randn(2 * frames, channels, latent, latent, generator=g, device=device) * 2 + 0.5).to(dtype)
        norm = torch.nn.GroupNorm(32, channels).to(device)
        shape = f"x [{2 * frames}, {channels}, {latent}, {latent}]"
        compare("frame GroupNorm", lambda: frame_shared_group_norm(x, layout, norm),
                lambda: permuted_group_norm(x, layout, norm), shape)
        adapter = TemporalAdapter(channels).to(device=device, dtype=dtype)
        torch.nn.init.normal_(adapter.up.weight, 0, 0.02)
        compare("temporal adapter", lambda: adapter.delta(x, layout), lambda: permuted_adapter(adapter, x, layout),
                shape)
    return rows


MODES = {
    # dtype, frames, latent, channels, k/v width, repeats
    "cpu": (torch.float32, 16, 32, 320, 320, 5),
    "gpu": (torch.float16, 16, 64, 320, 320, 20),
}


def run(device: torch.device | str = "cpu", mode: str | None = None, windows: int = 100) -> dict:
    """Both parts on ``device``; ``mode`` picks the frame-op sizes (default: gpu on CUDA)."""
    device = torch.device(device)
    mode = mode or ("gpu" if device.type == "cuda" else "cpu")
    dtype, frames, latent, channels, dim, repeats = MODES[mode]
    print(f"windows on {device_name(device)} ...", flush=True)
    result = {"device": device_name(device), "torch": torch.__version__, "mode": mode}
    result["windows"] = walk_windows(device, windows)
    w = result["windows"]
    print(f"  {w['windows']} windows: {w['mean_ms']:.3f} ms per window on average "
          f"(first {w['first_window_ms']:.1f} ms, "
          f"then {w['mean_after_first_ms']:.4f} ms), {w['index_builds']} index builds", flush=True)
    result["no_sync"] = no_sync_check(device)
    result["frame_ops"] = frame_ops(device, dtype, frames, latent, channels, dim, repeats)
    return result


def main() -> None:
    bench_unet.run_command_line(
        __doc__, MODES, run, lambda parser: parser.add_argument("--windows", type=int, default=100)
    )


if __name__ == "__main__":
    main()
