"""Collection training: SimDA adapters trained on a folder (or CSV) of captioned clips, from an SD1.x,
SD2.x or SDXL checkpoint loaded with the host's own loader. ``scripts/train_simda.py`` is the command.
Given the SD x4 upscaler it trains super-resolution adapters (docs/METHOD.md §9): the clips'
frames are the targets, their 4x downscales the concat image (see :func:`conditioning.sr_conditioning`).

One step: this process's shard of the global batch (``video_data.GlobalBatchPlan``) -> frames to
latents with the checkpoint's VAE, captions to context with its CLIP -> the denoising loss of
``training.trainer.AdapterTrainer`` on the SimDA-patched host UNet -> gradients averaged over processes ->
clip, AdamW step. Every random draw of a sample (clip, start frame, crop, timestep, noise) comes from
the run's seed and the sample's number, so N processes with the same global batch train like one.

Under ``torchrun`` each process joins a ``torch.distributed`` group (nccl on CUDA, gloo on the CPU);
only rank 0 writes files, logs and the progress bar. Output folder:
- ``simda_adapters_step{N}.safetensors``  adapters every ``save_every`` steps and at the end
- ``training_state.pt``                  resume point (adapters, optimizer, scaler, step, RNG, losses)
- ``loss.png``, ``loss.csv``             the loss curve (mean over the global batch per step)
- ``samples/step{N}.webp``               sample clips every ``sample_every`` steps (if asked for)

Modules: ``options`` (what a run takes), ``data_parallel`` (torchrun group), ``state`` (output
folder, resume), ``conditioning`` (batch -> UNet inputs), ``reports`` (loss curve, sample clips),
``run`` (the loop). The training step itself is ``simda_core.training.trainer``, shared with the
One-Shot Tuner node.
"""
from __future__ import annotations

from .options import TrainingOptions, TrainingSetupError
from .run import main

__all__ = ["TrainingOptions", "TrainingSetupError", "main"]
