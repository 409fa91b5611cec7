"""The run: options checked, the collection listed, the checkpoint loaded with the host's loader,
adapters made (or resumed), then the step loop with its saves, checkpoints and samples."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ...formats import AdapterFileError, save_adapters
from ...host.family import model_family
from ...host.loaders import load_checkpoint
from ...host.memory import load
from ...host.register import apply_simda, model_sites
from ...host.training import host_training_mode, training_patcher
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


def run(options: TrainingOptions, processes: Processes) -> Path:
    """Train as ``options`` say; returns the output folder."""
    options.check()
    entries = load_collection(options)
    sampling = ClipSampling(options.frames, options.stride, options.width, options.height, options.crop)
    state_path = check_output(options)
    state = load_state(state_path) if options.resume else None
    start_step = int(state["step"]) if state else 0
    if start_step >= options.steps:
        raise TrainingSetupError(
            f"the run in '{options.output}' has already trained {start_step} steps (--steps {options.steps}); "
            "pass a larger --steps to continue it."
        )
    global_batch = options.batch_per_process * processes.world
    if processes.is_main:
        log.info("SimDA trainer: %d clips; global batch %d = %d per process x %d process%s; %d frames every %d at "
                 "%dx%d; steps %d -> %d", len(entries), global_batch, options.batch_per_process, processes.world,
                 "es" if processes.world > 1 else "", options.frames, options.stride, options.width, options.height,
                 start_step, options.steps)
        if state:
            changed = resume_differences(state.get("options", {}), options)
            if changed:
                log.warning("SimDA trainer: resuming with changed settings (%s).", "; ".join(changed))
            if int(state.get("global_batch", global_batch)) != global_batch:
                log.warning("SimDA trainer: the global batch changes from %s to %d; the data order changes with it.",
                            state.get("global_batch"), global_batch)

    from tqdm import tqdm

    model, clip, vae, family = load_host_model(options)
    super_resolution = family == SR_FAMILY
    training, adapters, trainer = prepare_training(model, family, options, state, processes)
    losses = [float(v) for v in state["losses"]][:start_step] if state else []
    del state

    output = Path(options.output)
    if processes.is_main:
        output.mkdir(parents=True, exist_ok=True)
        log.info("SimDA trainer: %s UNet, %.1fM adapter parameters, output in %s", family,
                 adapters.trainable_parameters() / 1e6, output)
        if super_resolution:
            log.info("SimDA trainer: super-resolution: %dx%d frames from their %dx%d downscale, noise augmentation "
                     "%g..%g", options.width, options.height, options.width // SR_SCALE, options.height // SR_SCALE,
                     *options.noise_augmentation)

    dataset = VideoClipDataset(entries, sampling)
    plan = GlobalBatchPlan(len(entries), global_batch, options.seed)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=ShardSampler(plan, processes.rank, processes.world, start_step, options.steps),
        num_workers=options.workers,
        collate_fn=collate_clips,
    )
    slots = plan.slots(processes.rank, processes.world)
    captions = CaptionEncoder(clip)
    sample_prompt = options.sample_prompt or entries[0].caption
    extra_metadata = {
        "base_checkpoint": Path(options.checkpoint).name,
        "global_batch": str(global_batch),
        "learning_rate": str(options.learning_rate),
        "frame_stride": str(options.stride),
        "resolution": f"{options.width}x{options.height}",
    }
    if super_resolution:
        extra_metadata["input_resolution"] = f"{options.width // SR_SCALE}x{options.height // SR_SCALE}"
        extra_metadata["noise_augmentation"] = "{:g}..{:g}".format(*options.noise_augmentation)
        extra_metadata["degradation"] = options.degradation.kind
    upscaling_samples = UpscalingSamples(options, dataset, output) if super_resolution else None

    def save_checkpoint(step: int) -> None:
        save_state(output / STATE_NAME, step, adapters, trainer, losses, options, family, processes)
        plot_loss(losses, output / LOSS_PNG)
        write_loss_csv(losses, output / LOSS_CSV)

    progress = tqdm(total=options.steps, initial=start_step, desc="SimDA training", unit="step",
                    disable=not processes.is_main, dynamic_ncols=True, smoothing=0.05, file=sys.stderr)
    started = time.monotonic()
    step = start_step
    for step, batch in enumerate(loader, start=start_step):
        frames = batch["frames"]
        clips = frames.shape[0]
        x0 = encode_frames(vae, training, frames)
        context = captions.context(batch["captions"], options.frames)
        numbers = [plan.sample_number(step, slot) for slot in slots]
        timesteps, noise = sample_draws(options.seed, numbers, (options.frames, *x0.shape[1:]))
        load(training)  # no-op unless encoding moved it out
        if super_resolution:
            conds = sr_conditioning(training, frames, x0, options.seed, numbers, options.noise_augmentation,
                                    clip_degradations(options.degradation, options.seed, step, slots))
        else:  # SDXL's ADM vector y (pooled text + frame size); nothing for SD1.x/SD2.x
            conds = captions.model_conds(training, batch["captions"], options.frames, options.width, options.height)
        loss = trainer.loss(x0, context, clips, timesteps=timesteps, noise=noise, conds=conds)
        done = step + 1
        try:
            updated = trainer.backward_and_update(loss, reduce_gradients=processes.average_gradients)
        except FloatingPointError as e:
            raise FloatingPointError(
                f"step {done}: {e} Continue from the last checkpoint with --resume and a lower --lr"
                f"{' or --no-mixed-precision' if options.mixed_precision else ''}."
            ) from None
        value = processes.mean(loss)
        losses.append(value)
        if not updated and processes.is_main:
            progress.write(f"SimDA trainer: step {done}: loss {value:.4g}, the loss scaler skipped the update "
                           f"({trainer.skipped_steps} skipped so far).")
        if processes.is_main:
            progress.set_postfix(loss=f"{value:.4f}", skipped=trainer.skipped_steps, refresh=False)
            progress.update(1)
            last = done == options.steps
            if (options.save_every and done % options.save_every == 0) or last:
                path = adapter_file_name(output, done)
                if path.stem != f"{ADAPTER_PREFIX}{done:06d}":
                    log.warning("SimDA trainer: %s exists already (an earlier run passed this step); saving as %s.",
                                f"{ADAPTER_PREFIX}{done:06d}.safetensors", path.name)
                save_adapters(adapters, path, family, frames_trained=options.frames,
                              extra_metadata={**extra_metadata, "training_steps": str(done)})
                progress.write(f"SimDA trainer: step {done}: saved {path.name}")
            if (options.checkpoint_every and done % options.checkpoint_every == 0) or last:
                save_checkpoint(done)
            if options.sample_every and (done % options.sample_every == 0 or last):
                if super_resolution:
                    path = upscaling_samples.write(model, training, captions, vae, done)
                else:
                    clip_frames = sample_clip(training, captions, vae, sample_prompt, options.frames, options.width,
                                              options.height, options.sample_steps, options.sample_cfg, options.seed)
                    path = write_animation(clip_frames, output / "samples" / f"step{done:06d}.webp")
                progress.write(f"SimDA trainer: step {done}: sample clip {path.relative_to(output)}")
    progress.close()
    processes.barrier()
    if processes.is_main:
        elapsed = time.monotonic() - started
        trained = max(0, step + 1 - start_step)
        log.info("SimDA trainer: %d steps in %.1f s (%.2f s/step), final loss %.5f, %d update(s) skipped by the loss "
                 "scaler; output in %s", trained, elapsed, elapsed / max(1, trained),
                 losses[-1] if losses else float("nan"), trainer.skipped_steps, output)
    return output


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

