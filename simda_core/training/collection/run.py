"""The run: options checked, the collection listed, the checkpoint loaded with the host's loader,
adapters made (or resumed), then the step loop with its saves, checkpoints and samples."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ...formats import AdapterFileError, save_adapters
from ...host.family import model_family
from ...host.loaders import load_checkpoint
from ...host.memory import load
from ...host.register import apply_simda, model_sites
from ...host.training import host_training_mode, training_patcher
from ...model.adapters import SimDAAdapters
from ...model.config import LatentShiftSettings, SimDAConfig
from ..trainer import AdapterTrainer, TuningRecipe, initial_adapters
from ..video_data import (
    ClipSampling,
    GlobalBatchPlan,
    ShardSampler,
    VideoClipDataset,
    VideoDataError,
    collate_clips,
    derived_seed,
    find_clips,
    read_csv,
)
from .conditioning import CaptionEncoder, SR_SCALE, clip_degradations, encode_frames, sample_draws, sr_conditioning
from .data_parallel import Processes, init_processes
from .options import SR_FAMILY, TRAINABLE_FAMILIES, TrainingOptions, TrainingSetupError
from .reports import LOSS_CSV, LOSS_PNG, UpscalingSamples, plot_loss, sample_clip, write_animation, write_loss_csv
from .state import (
    ADAPTER_PREFIX,
    STATE_NAME,
    adapter_file_name,
    check_output,
    load_state,
    restore_rng_states,
    resume_differences,
    save_state,
)

log = logging.getLogger("SimDA")


def load_collection(options: TrainingOptions):
    if options.csv is not None:
        return read_csv(options.csv, options.data)
    return find_clips(options.data)


def load_host_model(options: TrainingOptions):
    """MODEL, CLIP and VAE from the checkpoint, through the host's own loader, and the family."""
    try:
        model, clip, vae = load_checkpoint(str(options.checkpoint), options.mixed_precision)
    except RuntimeError as e:
        reason = " ".join(str(e).split()).removeprefix("ERROR: ")
        raise TrainingSetupError(
            f"ComfyUI could not load '{options.checkpoint}' ({reason}); pass an SD1.x, SD2.x or SDXL checkpoint (or "
            "the SD x4 upscaler) with UNet, text encoder and VAE in one file."
        ) from None
    if model is None or clip is None or vae is None:
        raise TrainingSetupError(
            f"'{Path(options.checkpoint).name}' lacks a UNet, text encoder or VAE; the trainer needs a full SD1.x, "
            "SD2.x or SDXL checkpoint (or the full SD x4 upscaler, e.g. x4-upscaler-ema.safetensors)."
        )
    family = model_family(model)
    if family not in TRAINABLE_FAMILIES:
        raise TrainingSetupError(
            f"'{Path(options.checkpoint).name}' is a {family} checkpoint; SimDA adapters train on an SD1.x, SD2.x or "
            "SDXL UNet, super-resolution adapters on the SD x4 upscaler: "
            "pass such a base checkpoint or x4-upscaler-ema.safetensors."
        )
    return model, clip, vae, family


def prepare_training(model, family: str, options: TrainingOptions, state: dict | None, processes: Processes):
    """A SimDA-patched clone of ``model`` (latent shift on) with trainable adapters, fresh or from
    ``state``, the same in every process, loaded by the host and ready for backward; its trainer."""
    device = model.load_device
    adapters = initial_adapters(model_sites(model), derived_seed(options.seed, "adapters"), device)
    if state:
        try:
            adapters.load_file_state_dict({k: v.to(device) for k, v in state["adapters"].items()})
        except KeyError as e:
            raise TrainingSetupError(
                f"--resume: the saved adapters do not fit this checkpoint's UNet ({e.args[0]}); resume with the "
                "checkpoint the run started from."
            ) from None
    processes.broadcast_(adapters)
    training = training_patcher(model)
    apply_simda(training, SimDAConfig(
        adapters=adapters, family=family, latent_shift=LatentShiftSettings(),
        gradient_checkpointing=options.gradient_checkpointing,
    ))
    load(training)
    recipe = TuningRecipe(learning_rate=options.learning_rate, mixed_precision=options.mixed_precision)
    trainer = AdapterTrainer(training, adapters, recipe, seed=options.seed)
    if state:
        trainer.load_state_dict(state["trainer"])
        restore_rng_states(state["rng"])
    return training, adapters, trainer


def resume_point(options: TrainingOptions) -> tuple[dict | None, int]:
    """The saved state to resume from (None for a fresh run) and the step it reached; refuses a run
    that has already trained ``--steps``."""
    state_path = check_output(options)
    state = load_state(state_path) if options.resume else None
    start_step = int(state["step"]) if state else 0
    if start_step >= options.steps:
        raise TrainingSetupError(
            f"the run in '{options.output}' has already trained {start_step} steps (--steps {options.steps}); "
            "pass a larger --steps to continue it."
        )
    return state, start_step


def log_plan(options: TrainingOptions, processes: Processes, clips: int, global_batch: int, start_step: int,
             state: dict | None) -> None:
    """The run's plan, and what a resumed run changes, in the main process's log."""
    log.info("SimDA trainer: %d clips; global batch %d = %d per process x %d process%s; %d frames every %d at "
             "%dx%d; steps %d -> %d", clips, global_batch, options.batch_per_process, processes.world,
             "es" if processes.world > 1 else "", options.frames, options.stride, options.width, options.height,
             start_step, options.steps)
    if state:
        changed = resume_differences(state.get("options", {}), options)
        if changed:
            log.warning("SimDA trainer: resuming with changed settings (%s).", "; ".join(changed))
        if int(state.get("global_batch", global_batch)) != global_batch:
            log.warning("SimDA trainer: the global batch changes from %s to %d; the data order changes with it.",
                        state.get("global_batch"), global_batch)


@dataclass
class TrainingRun:
    """What the steps of one run share once the host has loaded the checkpoint."""

    options: TrainingOptions
    processes: Processes
    family: str
    model: Any
    """The checkpoint's MODEL as the host loaded it (the super-resolution samples' plain x4 upscale)."""
    vae: Any
    training: Any
    """The SimDA-patched clone of ``model`` that trains (:func:`prepare_training`)."""
    adapters: SimDAAdapters
    trainer: AdapterTrainer
    losses: list[float]
    output: Path

    @property
    def super_resolution(self) -> bool:
        return self.family == SR_FAMILY


def start_run(options: TrainingOptions, processes: Processes, state: dict | None, start_step: int):
    """The checkpoint loaded, the adapters made or resumed and ready to train, the output folder
    made; returns the run and the checkpoint's CLIP."""
    model, clip, vae, family = load_host_model(options)
    training, adapters, trainer = prepare_training(model, family, options, state, processes)
    losses = [float(v) for v in state["losses"]][:start_step] if state else []
    the_run = TrainingRun(options, processes, family, model, vae, training, adapters, trainer, losses,
                          Path(options.output))
    if processes.is_main:
        the_run.output.mkdir(parents=True, exist_ok=True)
        log.info("SimDA trainer: %s UNet, %.1fM adapter parameters, output in %s", family,
                 adapters.trainable_parameters() / 1e6, the_run.output)
        if the_run.super_resolution:
            log.info("SimDA trainer: super-resolution: %dx%d frames from their %dx%d downscale, noise augmentation "
                     "%g..%g", options.width, options.height, options.width // SR_SCALE, options.height // SR_SCALE,
                     *options.noise_augmentation)
    return the_run, clip


def clip_loader(dataset: VideoClipDataset, plan: GlobalBatchPlan, processes: Processes, start_step: int,
                options: TrainingOptions) -> torch.utils.data.DataLoader:
    """This process's batches of the steps from ``start_step`` on."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShardSampler(plan, processes.rank, processes.world, start_step, options.steps),
        num_workers=options.workers,
        collate_fn=collate_clips,
    )


def adapter_metadata(options: TrainingOptions, global_batch: int, super_resolution: bool) -> dict[str, str]:
    """What every saved adapter file records about the run."""
    metadata = {
        "base_checkpoint": Path(options.checkpoint).name,
        "global_batch": str(global_batch),
        "learning_rate": str(options.learning_rate),
        "frame_stride": str(options.stride),
        "resolution": f"{options.width}x{options.height}",
    }
    if super_resolution:
        metadata["input_resolution"] = f"{options.width // SR_SCALE}x{options.height // SR_SCALE}"
        metadata["noise_augmentation"] = "{:g}..{:g}".format(*options.noise_augmentation)
        metadata["degradation"] = options.degradation.kind
    return metadata


class StepOutputs:
    """What the main process writes after a step: adapter files, the resume state with the loss
    plot and table, and sample clips, each at its own interval and after the last step."""

    def __init__(self, the_run: TrainingRun, captions: CaptionEncoder, metadata: dict[str, str], sample_prompt: str,
                 upscaling_samples: UpscalingSamples | None):
        self.run, self.captions, self.metadata = the_run, captions, metadata
        self.sample_prompt, self.upscaling_samples = sample_prompt, upscaling_samples

    def write(self, done: int, progress) -> None:
        options = self.run.options
        last = done == options.steps
        if (options.save_every and done % options.save_every == 0) or last:
            progress.write(f"SimDA trainer: step {done}: saved {self.save_adapters(done).name}")
        if (options.checkpoint_every and done % options.checkpoint_every == 0) or last:
            self.save_checkpoint(done)
        if options.sample_every and (done % options.sample_every == 0 or last):
            path = self.write_sample(done)
            progress.write(f"SimDA trainer: step {done}: sample clip {path.relative_to(self.run.output)}")

    def save_adapters(self, done: int) -> Path:
        the_run = self.run
        path = adapter_file_name(the_run.output, done)
        if path.stem != f"{ADAPTER_PREFIX}{done:06d}":
            log.warning("SimDA trainer: %s exists already (an earlier run passed this step); saving as %s.",
                        f"{ADAPTER_PREFIX}{done:06d}.safetensors", path.name)
        save_adapters(the_run.adapters, path, the_run.family, frames_trained=the_run.options.frames,
                      extra_metadata={**self.metadata, "training_steps": str(done)})
        return path

    def save_checkpoint(self, step: int) -> None:
        the_run = self.run
        save_state(the_run.output / STATE_NAME, step, the_run.adapters, the_run.trainer, the_run.losses,
                   the_run.options, the_run.family, the_run.processes)
        plot_loss(the_run.losses, the_run.output / LOSS_PNG)
        write_loss_csv(the_run.losses, the_run.output / LOSS_CSV)

    def write_sample(self, done: int) -> Path:
        the_run, options = self.run, self.run.options
        if the_run.super_resolution:
            return self.upscaling_samples.write(the_run.model, the_run.training, self.captions, the_run.vae, done)
        clip_frames = sample_clip(the_run.training, self.captions, the_run.vae, self.sample_prompt, options.frames,
                                  options.width, options.height, options.sample_steps, options.sample_cfg,
                                  options.seed)
        return write_animation(clip_frames, the_run.output / "samples" / f"step{done:06d}.webp")


def train_step(the_run: TrainingRun, captions: CaptionEncoder, plan: GlobalBatchPlan, slots, step: int,
               batch: dict) -> tuple[float, bool]:
    """One step on this process's ``batch``: the loss, backward, the gradients averaged across
    processes and the update. Returns the loss averaged across processes and whether the adapters
    were updated (the loss scaler skips non-finite steps)."""
    options, training = the_run.options, the_run.training
    frames = batch["frames"]
    clips = frames.shape[0]
    x0 = encode_frames(the_run.vae, training, frames)
    context = captions.context(batch["captions"], options.frames)
    numbers = [plan.sample_number(step, slot) for slot in slots]
    timesteps, noise = sample_draws(options.seed, numbers, (options.frames, *x0.shape[1:]))
    load(training)  # no-op unless encoding moved it out
    if the_run.super_resolution:
        conds = sr_conditioning(training, frames, x0, options.seed, numbers, options.noise_augmentation,
                                clip_degradations(options.degradation, options.seed, step, slots))
    else:  # SDXL's ADM vector y (pooled text + frame size); nothing for SD1.x/SD2.x
        conds = captions.model_conds(training, batch["captions"], options.frames, options.width, options.height)
    loss = the_run.trainer.loss(x0, context, clips, timesteps=timesteps, noise=noise, conds=conds)
    try:
        updated = the_run.trainer.backward_and_update(loss, reduce_gradients=the_run.processes.average_gradients)
    except FloatingPointError as e:
        raise FloatingPointError(
            f"step {step + 1}: {e} Continue from the last checkpoint with --resume and a lower --lr"
            f"{' or --no-mixed-precision' if options.mixed_precision else ''}."
        ) from None
    return the_run.processes.mean(loss), updated


def log_summary(the_run: TrainingRun, trained: int, elapsed: float) -> None:
    log.info("SimDA trainer: %d steps in %.1f s (%.2f s/step), final loss %.5f, %d update(s) skipped by the loss "
             "scaler; output in %s", trained, elapsed, elapsed / max(1, trained),
             the_run.losses[-1] if the_run.losses else float("nan"), the_run.trainer.skipped_steps, the_run.output)


def run(options: TrainingOptions, processes: Processes) -> Path:
    """Train as ``options`` say; returns the output folder."""
    options.check()
    entries = load_collection(options)
    sampling = ClipSampling(options.frames, options.stride, options.width, options.height, options.crop)
    state, start_step = resume_point(options)
    global_batch = options.batch_per_process * processes.world
    if processes.is_main:
        log_plan(options, processes, len(entries), global_batch, start_step, state)

    from tqdm import tqdm

    the_run, clip = start_run(options, processes, state, start_step)
    del state

    dataset = VideoClipDataset(entries, sampling)
    plan = GlobalBatchPlan(len(entries), global_batch, options.seed)
    loader = clip_loader(dataset, plan, processes, start_step, options)
    slots = plan.slots(processes.rank, processes.world)
    captions = CaptionEncoder(clip)
    outputs = StepOutputs(
        the_run, captions, adapter_metadata(options, global_batch, the_run.super_resolution),
        options.sample_prompt or entries[0].caption,
        UpscalingSamples(options, dataset, the_run.output) if the_run.super_resolution else None,
    )

    progress = tqdm(total=options.steps, initial=start_step, desc="SimDA training", unit="step",
                    disable=not processes.is_main, dynamic_ncols=True, smoothing=0.05, file=sys.stderr)
    started = time.monotonic()
    step = start_step
    for step, batch in enumerate(loader, start=start_step):
        value, updated = train_step(the_run, captions, plan, slots, step, batch)
        the_run.losses.append(value)
        if processes.is_main:
            if not updated:
                progress.write(f"SimDA trainer: step {step + 1}: loss {value:.4g}, the loss scaler skipped the "
                               f"update ({the_run.trainer.skipped_steps} skipped so far).")
            progress.set_postfix(loss=f"{value:.4f}", skipped=the_run.trainer.skipped_steps, refresh=False)
            progress.update(1)
            outputs.write(step + 1, progress)
    progress.close()
    processes.barrier()
    if processes.is_main:
        log_summary(the_run, max(0, step + 1 - start_step), time.monotonic() - started)
    return the_run.output


def main(options: TrainingOptions) -> int:
    """Run the trainer in this process (one of ``torchrun``'s, or alone). Returns the exit code:
    0 done; 2 the run could not start (nothing was written) or no clip of the collection could be
    sampled; 3 the loss diverged (resume from the last checkpoint). The message says which."""
    processes = init_processes()
    try:
        with host_training_mode():
            run(options, processes)
        return 0
    except (TrainingSetupError, VideoDataError, AdapterFileError, FloatingPointError) as e:
        if processes.is_main:
            print(f"SimDA trainer: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, FloatingPointError) else 2
    finally:
        if processes.distributed and dist.is_initialized():
            dist.destroy_process_group()

