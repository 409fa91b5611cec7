#!/usr/bin/env python
"""Peak memory of reading the adapters out of a full-size authors' SimDA checkpoint.

Writes, in a temporary folder, an SD1.5-shaped ``UNet3DConditionModel`` state dict with random fp32
weights in the authors' key layout (the standard diffusers SD1.5 UNet keys, which is what their
inflated 3-D UNet saves for its base, plus their ``adapter_s`` / ``adapter_ffn`` / ``temp_adapter``
keys), as ``unet/diffusion_pytorch_model.bin`` (``torch.save``, as their training script writes it)
and ``.safetensors``. Then, for each file, a fresh subprocess reads it with
``simda_core.formats.read_adapter_file`` and reports its peak resident memory (``VmHWM`` of
/proc/self/status, which counts the pages of a memory-mapped file it touches) above what it held
before the read; ``--whole`` adds the same for reading every tensor of the file as the previous
reader did (``torch.load`` without mmap; ``safe_open(...).get_tensor`` for every key).

    python bench/bench_authors_load.py [--keep DIR] [--json OUT]

Needs only torch and safetensors (no host). About 3.4 GB of disk and a minute on two cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]

BLOCK_CHANNELS = (320, 640, 1280, 1280)
LAYERS_PER_BLOCK = 2
CONTEXT_DIM = 768
TIME_DIM = 1280


def _linear(shapes: dict, key: str, out_features: int, in_features: int, bias: bool = True) -> None:
    shapes[f"{key}.weight"] = (out_features, in_features)
    if bias:
        shapes[f"{key}.bias"] = (out_features,)


def _conv(shapes: dict, key: str, out_channels: int, in_channels: int, kernel: int) -> None:
    shapes[f"{key}.weight"] = (out_channels, in_channels, kernel, kernel)
    shapes[f"{key}.bias"] = (out_channels,)


def _norm(shapes: dict, key: str, channels: int) -> None:
    shapes[f"{key}.weight"] = (channels,)
    shapes[f"{key}.bias"] = (channels,)


def _resnet(shapes: dict, key: str, in_channels: int, out_channels: int) -> None:
    _norm(shapes, f"{key}.norm1", in_channels)
    _conv(shapes, f"{key}.conv1", out_channels, in_channels, 3)
    _linear(shapes, f"{key}.time_emb_proj", out_channels, TIME_DIM)
    _norm(shapes, f"{key}.norm2", out_channels)
    _conv(shapes, f"{key}.conv2", out_channels, out_channels, 3)
    if in_channels != out_channels:
        _conv(shapes, f"{key}.conv_shortcut", out_channels, in_channels, 1)


def _transformer(shapes: dict, key: str, channels: int) -> None:
    """A Transformer3DModel with one block, and the SimDA spatial adapters inside the block."""
    _norm(shapes, f"{key}.norm", channels)
    _conv(shapes, f"{key}.proj_in", channels, channels, 1)
    block = f"{key}.transformer_blocks.0"
    for attention, kv_dim in (("attn1", channels), ("attn2", CONTEXT_DIM)):
        _linear(shapes, f"{block}.{attention}.to_q", channels, channels, bias=False)
        _linear(shapes, f"{block}.{attention}.to_k", channels, kv_dim, bias=False)
        _linear(shapes, f"{block}.{attention}.to_v", channels, kv_dim, bias=False)
        _linear(shapes, f"{block}.{attention}.to_out.0", channels, channels)
    for norm in ("norm1", "norm2", "norm3"):
        _norm(shapes, f"{block}.{norm}", channels)
    _linear(shapes, f"{block}.ff.net.0.proj", channels * 8, channels)
    _linear(shapes, f"{block}.ff.net.2", channels, channels * 4)
    for adapter in ("adapter_s", "adapter_ffn"):
        _linear(shapes, f"{block}.{adapter}.D_fc1", channels // 4, channels)
        _linear(shapes, f"{block}.{adapter}.D_fc2", channels, channels // 4)
    _conv(shapes, f"{key}.proj_out", channels, channels, 1)


def _temporal_adapter(shapes: dict, key: str, channels: int) -> None:
    half = channels // 2
    shapes[f"{key}.stadapt_down_1.weight"] = (half, channels, 1, 1, 1)
    shapes[f"{key}.stadapt_down_1.bias"] = (half,)
    shapes[f"{key}.stadapt_conv3d_1.weight"] = (half, 1, 3, 1, 1)
    shapes[f"{key}.stadapt_conv3d_1.bias"] = (half,)
    shapes[f"{key}.stadapt_up_1.weight"] = (channels, half, 1, 1, 1)
    shapes[f"{key}.stadapt_up_1.bias"] = (channels,)


def sd15_authors_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the authors' SD1.5 UNet3DConditionModel (adapters included)."""
    shapes: dict[str, tuple[int, ...]] = {}
    _conv(shapes, "conv_in", BLOCK_CHANNELS[0], 4, 3)
    _linear(shapes, "time_embedding.linear_1", TIME_DIM, BLOCK_CHANNELS[0])
    _linear(shapes, "time_embedding.linear_2", TIME_DIM, TIME_DIM)
    channels = BLOCK_CHANNELS[0]
    for i, out_channels in enumerate(BLOCK_CHANNELS):
        with_attention = i < 3
        for j in range(LAYERS_PER_BLOCK):
            _resnet(shapes, f"down_blocks.{i}.resnets.{j}", channels, out_channels)
            channels = out_channels
            if with_attention:
                _temporal_adapter(shapes, f"down_blocks.{i}.temp_adapter.{j}", channels)
                _transformer(shapes, f"down_blocks.{i}.attentions.{j}", channels)
        if i < 3:
            _conv(shapes, f"down_blocks.{i}.downsamplers.0.conv", channels, channels, 3)
    _resnet(shapes, "mid_block.resnets.0", channels, channels)
    _temporal_adapter(shapes, "mid_block.temp_adapter.0", channels)
    _transformer(shapes, "mid_block.attentions.0", channels)
    _resnet(shapes, "mid_block.resnets.1", channels, channels)
    reversed_channels = list(reversed(BLOCK_CHANNELS))
    for i, out_channels in enumerate(reversed_channels):
        with_attention = i > 0
        for j in range(LAYERS_PER_BLOCK + 1):
            # diffusers: the last ResNet of an up block takes the skip of the next level's width
            skip = out_channels if j < LAYERS_PER_BLOCK else reversed_channels[min(i + 1, 3)]
            _resnet(shapes, f"up_blocks.{i}.resnets.{j}", channels + skip, out_channels)
            channels = out_channels
            if with_attention:
                _temporal_adapter(shapes, f"up_blocks.{i}.temp_adapter.{j}", channels)
                _transformer(shapes, f"up_blocks.{i}.attentions.{j}", channels)
        if i < 3:
            _conv(shapes, f"up_blocks.{i}.upsamplers.0.conv", channels, channels, 3)
    _norm(shapes, "conv_norm_out", BLOCK_CHANNELS[0])
    _conv(shapes, "conv_out", 4, BLOCK_CHANNELS[0], 3)
    return shapes


def write_checkpoint(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The authors' run folder with random fp32 weights: ``unet/diffusion_pytorch_model.bin``
    (and the same tensors as ``.safetensors`` in ``unet_safetensors/``), ``unet/config.json``."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in sd15_authors_shapes().items():
        fan_in = max(1, int(torch.tensor(shape[1:]).prod())) if len(shape) > 1 else 1
        state[key] = torch.randn(shape, generator=generator) / fan_in**0.5
    config = {
        "_class_name": "UNet3DConditionModel", "_diffusers_version": "0.11.1",
        "block_out_channels": list(BLOCK_CHANNELS),
        "layers_per_block": LAYERS_PER_BLOCK, "cross_attention_dim": CONTEXT_DIM, "attention_head_dim": 8,
        "in_channels": 4, "out_channels": 4, "sample_size": 64,
    }
    paths = {}
    for kind, sub, name in (("bin", "unet", "diffusion_pytorch_model.bin"),
                            ("safetensors", "unet_safetensors/unet", "diffusion_pytorch_model.safetensors")):
        unet = folder / sub
        unet.mkdir(parents=True, exist_ok=True)
        (unet / "config.json").write_text(json.dumps(config))
        if kind == "bin":
            torch.save(state, unet / name)
        else:
            save_file(state, str(unet / name))
        paths[kind] = unet / name
    return paths


def measure(path: Path, whole: bool) -> dict:
    """Peak RSS of one read in a fresh process (``--child``)."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", str(path)] + (["--whole"] if whole else []),
        capture_output=True, text=True, check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would carry the parent's over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(path: Path, whole: bool) -> None:
    import torch  # noqa: F401  (imported before the baseline)

    sys.path.insert(0, str(PACK_DIR))
    from simda_core import formats

    baseline = peak_rss_bytes()
    started = time.perf_counter()
    if whole:
        if path.suffix == ".bin":
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    else:
        tensors = formats.read_adapter_file(path).tensors
    count = sum(t.numel() for t in tensors.values())
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    print(json.dumps({"parameters": count, "seconds": seconds, "baseline_bytes": baseline, "peak_bytes": peak}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", type=Path, help="Write the checkpoint here and keep it (default: a temporary folder)."
    )
    parser.add_argument("--json", type=Path, help="Write the figures as JSON here.")
    parser.add_argument("--whole", action="store_true", help="Also measure loading every tensor of each file.")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.whole)
        return 0

    with tempfile.TemporaryDirectory(prefix="simda_authors_full_") as tmp:
        folder = args.keep or Path(tmp)
        started = time.perf_counter()
        paths = write_checkpoint(folder)
        print(f"wrote the checkpoint in {time.perf_counter() - started:.0f} s")
        rows = []
        for kind, path in paths.items():
            for whole in ([False, True] if args.whole else [False]):
                figures = measure(path, whole)
                extra = figures["peak_bytes"] - figures["baseline_bytes"]
                size = path.stat().st_size
                row = {"file": kind, "read": "every tensor" if whole else "adapter keys", "file_bytes": size,
                       "peak_rss_above_baseline_bytes": extra, "ratio_to_file": extra / size, **figures}
                rows.append(row)
                print(f"{kind:12s} {row['read']:13s} file {size / 2**30:.2f} GiB, peak RSS +{extra / 2**20:.0f} MiB "
                      f"({extra / size:.1%} of the file), {figures['parameters'] / 1e6:.2f}M parameters, "
                      f"{figures['seconds']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
