#!/usr/bin/env python
"""Train SimDA adapters on a collection of captioned clips (docs/TRAINING.md).

    python scripts/train_simda.py --checkpoint sd15.safetensors --data clips/ --output runs/simda
    torchrun --nproc_per_node 4 scripts/train_simda.py ...   (data-parallel, same flags)

The host ComfyUI is found through COMFYUI_PATH or the newest pinned copy in <pack>/.hosts/; the
checkpoint is loaded with its own loader.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]


RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest-exact")


def degradation_defaults():
    """``simda_core.training.degradations.DegradationConfig()``: the flags' defaults are the config's own."""
    if str(PACK_DIR) not in sys.path:
        sys.path.insert(0, str(PACK_DIR))
    from simda_core.training.degradations import DegradationConfig

    return DegradationConfig()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train_simda.py",
        description="Train SimDA adapters (the SD UNet stays frozen) on a folder of clips with .txt captions or a "
        "WebVid-style CSV. Run it under torchrun --nproc_per_node N for data-parallel training.",
    )
    io = p.add_argument_group("inputs and output")
    io.add_argument("--checkpoint", required=True, type=Path,
                    help="SD1.x, SD2.x or SDXL checkpoint (.safetensors/.ckpt) with UNet, CLIP and VAE; "
                    "the SD x4 upscaler (x4-upscaler-ema.safetensors) trains super-resolution adapters.")
    io.add_argument("--data", type=Path,
                    help="Folder of clips (mp4/webm/mov/mkv/avi/gif) with a .txt caption next to each; "
                    "with --csv: the folder the CSV's relative paths start from (default: the CSV's folder).")
    io.add_argument("--csv", type=Path,
                    help="CSV with a clip column (path/video/file, or WebVid's videoid [+page_dir]) "
                    "and a caption column (caption/name/text).")
    io.add_argument("--output", required=True, type=Path,
                    help="Folder for adapters, training state, loss curve and samples.")
    io.add_argument("--resume", action="store_true", help="Continue the run in --output from its training_state.pt.")

    clips = p.add_argument_group("clip sampling")
    clips.add_argument("--frames", type=int, default=16, help="Frames per training clip (default %(default)s).")
    clips.add_argument("--stride", type=int, default=2,
                       help="Take every n-th source frame; a clip needs (frames-1)*stride+1 frames "
                       "(default %(default)s).")
    clips.add_argument("--width", type=int, default=512,
                       help="Frame width in pixels, a multiple of 8; with the x4 upscaler the "
                       "output width, the input being a quarter of it (default %(default)s).")
    clips.add_argument("--height", type=int, default=512,
                       help="Frame height in pixels, a multiple of 8; with the x4 upscaler the "
                       "output height (default %(default)s).")
    clips.add_argument("--crop", choices=("random", "center"), default="random",
                       help="Window of the target aspect cut from each clip (default %(default)s).")
    clips.add_argument("--workers", type=int, default=2,
                       help="Data-loader processes per training process; 0 decodes in the main process "
                       "(default %(default)s).")

    train = p.add_argument_group("optimisation")
    train.add_argument("--steps", type=int, default=10000,
                       help="Total optimiser steps; a resumed run continues up to this (default %(default)s).")
    train.add_argument("--lr", type=float, default=5e-5,
                       help="AdamW learning rate, constant (default %(default)s, the authors' value).")
    train.add_argument("--batch", type=int, default=1,
                       help="Clips per step per process; global batch = batch x processes (default %(default)s).")
    train.add_argument("--seed", type=int, default=0,
                       help="Seed of the adapters' initial weights, data order, frame windows, crops, timesteps "
                       "and noise (default %(default)s).")
    train.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=True,
                       help="fp16 UNet with autocast and loss scaling on CUDA; ignored on the CPU (default on).")
    train.add_argument("--noise-augmentation", type=float, nargs=2, default=(0.0, 0.2), metavar=("MIN", "MAX"),
                       help="x4 upscaler only: each clip's noise augmentation of its low-resolution input "
                       "(as in SD 4x Upscale Conditioning, 0..1) is drawn uniformly from MIN..MAX (default 0 0.2).")
    train.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                       help="Recompute activations in backward: far less memory for about one extra forward pass "
                       "per step (default on).")

    sr = p.add_argument_group("super-resolution input (x4 upscaler only; docs/TRAINING.md)")
    d = degradation_defaults()
    sr.add_argument("--degradation", choices=("realistic", "bicubic"), default=d.kind,
                    help="How each clip's low-resolution input is made: realistic = blur, random resize, noise "
                    "and JPEG drawn once per clip (the same on all its frames); bicubic = the clean 4x downscale "
                    "(default %(default)s).")
    sr.add_argument("--blur-probability", type=float, default=d.blur_probability,
                    help="Share of clips blurred before the downscale (default %(default)s).")
    sr.add_argument("--blur-sigma", type=float, nargs=2, default=d.blur_sigma, metavar=("MIN", "MAX"),
                    help="Gaussian blur sigma per axis, in pixels of the training frames (default %(default)s).")
    sr.add_argument("--motion-blur-probability", type=float, default=d.motion_blur_probability,
                    help="Share of blurred clips that get a motion streak instead of a Gaussian (default %(default)s).")
    sr.add_argument("--motion-blur-length", type=int, nargs=2, default=d.motion_blur_length, metavar=("MIN", "MAX"),
                    help="Motion streak length in pixels of the training frames (default %(default)s).")
    sr.add_argument("--resize-modes", nargs="+", default=list(d.resize_modes), choices=RESIZE_MODES,
                    help="Downscale methods, one drawn per clip (default: %(default)s).")
    sr.add_argument("--noise-probability", type=float, default=d.noise_probability,
                    help="Share of clips with added noise (default %(default)s).")
    sr.add_argument("--poisson-probability", type=float, default=d.poisson_probability,
                    help="Share of noisy clips whose noise is Poisson-like (follows the signal) instead of Gaussian "
                    "(default %(default)s).")
    sr.add_argument("--gaussian-sigma", type=float, nargs=2, default=d.gaussian_sigma, metavar=("MIN", "MAX"),
                    help="Gaussian noise sigma on the 0..1 scale (default 1/255 15/255).")
    sr.add_argument("--poisson-peak", type=float, nargs=2, default=d.poisson_peak, metavar=("MIN", "MAX"),
                    help="Poisson-like noise: photon count of white, drawn log-uniformly; lower is noisier "
                    "(default %(default)s).")
    sr.add_argument("--gray-noise-probability", type=float, default=d.gray_noise_probability,
                    help="Share of noisy clips whose noise is the same on all channels (default %(default)s).")
    sr.add_argument("--jpeg-probability", type=float, default=d.jpeg_probability,
                    help="Share of clips JPEG-compressed (default %(default)s).")
    sr.add_argument("--jpeg-quality", type=float, nargs=2, default=d.jpeg_quality, metavar=("MIN", "MAX"),
                    help="JPEG quality 1..100 (default %(default)s).")
    sr.add_argument("--sample-clip", type=Path,
                    help="A held-out video for the sample pictures (low-res | plain x4 | SimDA | ground "
                    "truth, PNG and MP4); default: a fixed clip of the collection.")

    saves = p.add_argument_group("saving")
    saves.add_argument("--save-every", type=int, default=1000,
                       help="Save adapters every N steps and at the end; 0: only at the end (default %(default)s).")
    saves.add_argument("--checkpoint-every", type=int, default=500,
                       help="Write the resume state, loss.png and loss.csv every N steps and at the end; "
                       "0: only at the end (default %(default)s).")
    saves.add_argument("--sample-every", type=int, default=0,
                       help="Write a sample clip every N steps and at the end; 0: off (default %(default)s).")
    saves.add_argument("--sample-prompt", default="",
                       help="Prompt of the sample clips (default: the first clip's caption).")
    saves.add_argument("--sample-steps", type=int, default=25,
                       help="DDIM steps of a sample clip (default %(default)s).")
    saves.add_argument("--sample-cfg", type=float, default=7.5,
                       help="Guidance scale of a sample clip (default %(default)s).")
    return p


def setup_host() -> Path:
    """Put the host and the pack on ``sys.path`` (host first: its ``nodes`` module wins over the
    pack's ``nodes`` package) and pick the device before the host's memory manager starts."""
    import pinned_hosts

    host = pinned_hosts.host_dir()
    if not (host / "comfy").is_dir():
        sys.exit(f"train_simda.py: no ComfyUI at {host}: run scripts/setup_host.sh or set COMFYUI_PATH.")
    for path in (str(PACK_DIR), str(host)):
        if path in sys.path:
            sys.path.remove(path)
    sys.path[0:0] = [str(host), str(PACK_DIR)]

    import torch

    import comfy.cli_args

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        comfy.cli_args.args.cpu = True
    return host


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.data is None and args.csv is None:
        build_parser().error("give the clips: --data FOLDER (clips with .txt captions) or --csv FILE.")
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    setup_host()
    from simda_core.training.collection import TrainingOptions, main as train
    from simda_core.training.degradations import DegradationConfig

    degradation = DegradationConfig(
        kind=args.degradation, blur_probability=args.blur_probability, blur_sigma=tuple(args.blur_sigma),
        motion_blur_probability=args.motion_blur_probability, motion_blur_length=tuple(args.motion_blur_length),
        resize_modes=tuple(args.resize_modes), noise_probability=args.noise_probability,
        poisson_probability=args.poisson_probability, gaussian_sigma=tuple(args.gaussian_sigma),
        poisson_peak=tuple(args.poisson_peak), gray_noise_probability=args.gray_noise_probability,
        jpeg_probability=args.jpeg_probability, jpeg_quality=tuple(args.jpeg_quality),
    )

    return train(TrainingOptions(
        checkpoint=args.checkpoint, output=args.output, data=args.data, csv=args.csv,
        frames=args.frames, stride=args.stride, width=args.width, height=args.height, crop=args.crop,
        steps=args.steps, learning_rate=args.lr, batch_per_process=args.batch, seed=args.seed,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        save_every=args.save_every, checkpoint_every=args.checkpoint_every, sample_every=args.sample_every,
        sample_prompt=args.sample_prompt, sample_steps=args.sample_steps, sample_cfg=args.sample_cfg,
        workers=args.workers, resume=args.resume, noise_augmentation=tuple(args.noise_augmentation),
        degradation=degradation, sample_clip=args.sample_clip,
    ))


if __name__ == "__main__":
    sys.exit(main())
