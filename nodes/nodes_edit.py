"""SimDA Edit Tuner (one-shot video editing) and Save SimDA Adapters."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace

import comfy.model_management
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..simda_core.formats import AdapterFileError, save_adapters
from ..simda_core.host.memory import unloaded_on_failure
from ..simda_core.host.register import apply_simda, get_config, model_sites
from ..simda_core.host.samplers import host_sampler_inversion
from ..simda_core.host.training import host_training_mode, loaded_for_training, training_patcher
from ..simda_core.host.unet_call import HostConditioning
from ..simda_core.model.adapters import SimDAAdapters
from ..simda_core.model.config import LatentShiftSettings, SimDAConfig
from ..simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters
from ..simda_core.training.video_data import fit_frames
from ..simda_core.video.clip_agreement import clip_mismatch
from ..simda_core.video.inversion import INVERSION_KEY, inversion_record
from .folders import save_folder
from .simda_model import check_image_family, simda_clone

log = logging.getLogger("SimDA")

SimDAAdaptersType = io.Custom("SIMDA_ADAPTERS")


@dataclass
class TrainedAdapters:
    """What flows from the Edit Tuner to Save SimDA Adapters."""

    adapters: SimDAAdapters
    family: str
    frames_trained: int
    steps: int


def select_frames(images: torch.Tensor, frames: int, start_frame: int, stride: int) -> torch.Tensor:
    """``frames`` frames from ``start_frame`` every ``stride``-th (fewer if the clip is shorter)."""
    picked = images[start_frame::stride][:frames]
    if picked.shape[0] < 2:
        raise ValueError(
            f"SimDA Edit Tuner: the source clip gives {picked.shape[0]} frame(s) from frame {start_frame} every "
            f"{stride}; a video edit needs at least 2 (the clip has "
            f"{images.shape[0]} frames): lower start_frame or stride."
        )
    return picked


def trainable_adapters(model, device, seed: int) -> SimDAAdapters:
    """Fresh adapters (outputs zero, weights drawn from ``seed``), or an ordinary-tensor copy of
    those already on the MODEL."""
    existing = (get_config(model) or SimDAConfig()).adapters
    sites = model_sites(model)
    if existing is None:
        # The host's layers skip weight initialisation (their weights would be uninitialised memory).
        return initial_adapters(sites, seed=seed, device=device)
    adapters = SimDAAdapters(sites, existing.spatial_ratio, existing.temporal_ratio, dtype=torch.float32, device=device)
    adapters.load_state_dict({k: v.detach().float() for k, v in existing.state_dict().items()})
    return adapters


def invert_clip(model, latent: torch.Tensor, conditioning, steps: int, scheduler: str) -> torch.Tensor:
    """DDIM inversion through the host's guider; returns LATENT samples (VAE space)."""
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    callback = latent_preview.prepare_callback(model, steps)
    return guider.sample(
        torch.zeros_like(latent), latent, host_sampler_inversion(), torch.flip(sigmas, [0]),
        callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=0,
    ).to(comfy.model_management.intermediate_device())


LOSS_MAP = getattr(io, "LossMap", None) or io.Custom("LOSS_MAP")
"""The host's loss-history type (``{"loss": [one value per step]}``), drawn by its Plot Loss Graph node."""
LOSS_WINDOW = 10


def loss_text(losses: list[float], steps: int) -> str:
    """The line shown under the Edit Tuner while it trains: the step, its loss, and the mean of the
    last ten steps' (single steps' losses jump with their random timesteps)."""
    recent = losses[-LOSS_WINDOW:]
    return (
        f"step {len(losses)}/{steps}: loss {losses[-1]:.4f}, "
        f"mean of the last {len(recent)} {sum(recent) / len(recent):.4f}"
    )


def show_text(node_id: str | None, text: str) -> None:
    """``text`` under the node in the frontend (the host's ``send_progress_text``), when a server runs it."""
    if node_id is None:
        return
    from server import PromptServer

    server = getattr(PromptServer, "instance", None)
    if server is not None:
        server.send_progress_text(text, node_id)


class SimDAEditTuner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAEditTuner",
            display_name="SimDA Edit Tuner",
            category="SimDA",
            description=(
                "One-shot video editing: trains the SimDA adapters on one source clip (the UNet stays frozen), then "
                "DDIM-inverts the clip. Sample the inverted noise with an edited prompt in SimDA Video Sampler. "
                "Trains on the GPU in minutes (300 steps); on the CPU only tiny sizes are practical."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=(
                        "SD1.x, SD2.x or SDXL MODEL, plain or with SimDA adapters "
                        "(they are the starting point). It is not changed."
                    ),
                ),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE, to encode the source frames."),
                io.Image.Input(
                    "source_frames",
                    tooltip="The source clip as frames (Load Video -> Get Video Components, or any image batch).",
                ),
                io.Conditioning.Input(
                    "source_prompt", tooltip="The text that describes the source clip (CLIP Text Encode).",
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip=(
                        "The checkpoint's CLIP: encodes the empty inversion "
                        "prompt when no inversion conditioning is connected."
                    ),
                ),
                io.Conditioning.Input(
                    "inversion_conditioning", optional=True,
                    tooltip="Conditioning for the DDIM inversion; default: the empty prompt.",
                ),
                io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Training steps (the authors use 300)."),
                io.Float.Input(
                    "learning_rate", default=5e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
                    tooltip="AdamW learning rate (the authors use 5e-5).",
                ),
                io.Int.Input(
                    "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                    tooltip="Seed of the training noise and timesteps.",
                ),
                io.Int.Input("frames", default=24, min=2, max=4096, tooltip="Frames of the source clip to use."),
                io.Int.Input("start_frame", default=0, min=0, max=1000000, tooltip="First source frame to use."),
                io.Int.Input("stride", default=2, min=1, max=1000, tooltip="Use every n-th frame (the authors use 2)."),
                io.Int.Input(
                    "width", default=512, min=64, max=4096, step=64,
                    tooltip="Training width in pixels (frames are centre-cropped to this aspect).",
                ),
                io.Int.Input("height", default=512, min=64, max=4096, step=64, tooltip="Training height in pixels."),
                io.Boolean.Input(
                    "gradient_checkpointing", default=True,
                    tooltip=(
                        "Recompute activations in the backward pass: far less "
                        "memory, about 1.5x the time. Every adapter still trains."
                    ),
                ),
                io.Int.Input(
                    "inversion_steps", default=50, min=1, max=1000,
                    tooltip="DDIM inversion steps; the Video Sampler must use the same steps.",
                ),
                io.Combo.Input(
                    "inversion_scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                    tooltip="Schedule of the inversion; the Video Sampler must use the same.",
                ),
                io.Float.Input(
                    "source_fps", default=24.0, min=0.01, max=1000.0, step=0.01,
                    tooltip=(
                        "Frame rate of the source clip (connect Get Video Components' "
                        "fps); the edited clip's frame rate is this divided by stride."
                    ),
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="tuned MODEL", tooltip="The MODEL with the tuned adapters, for SimDA Video Sampler.",
                ),
                io.Latent.Output(
                    display_name="inverted noise",
                    tooltip="The source clip's DDIM inversion: connect it to the Video Sampler's start_latent.",
                ),
                SimDAAdaptersType.Output(
                    display_name="adapters", tooltip="The tuned adapters, for Save SimDA Adapters.",
                ),
                io.Float.Output(
                    display_name="frame_rate",
                    tooltip="Frame rate of the edited clip (source_fps / stride), for Create Video.",
                ),
                LOSS_MAP.Output(
                    display_name="loss_map",
                    tooltip=(
                        "The training loss of every step, for the host's Plot Loss Graph: whether the steps were "
                        "enough. The node also shows the loss under itself while it trains."
                    ),
                ),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, source_frames, source_prompt, steps, learning_rate, seed, frames, start_frame, stride,
                width, height, gradient_checkpointing, inversion_steps, inversion_scheduler, source_fps=24.0,
                clip=None, inversion_conditioning=None) -> io.NodeOutput:
        family = check_image_family(model, "SimDA Edit Tuner")
        if steps < 1:
            raise ValueError(f"SimDA Edit Tuner: steps is {steps}; train at least 1 step.")
        if not learning_rate > 0:
            raise ValueError(
                f"SimDA Edit Tuner: learning_rate must be above 0 (got {learning_rate}); the authors use 5e-5."
            )
        if width % 8 or height % 8:
            raise ValueError(f"SimDA Edit Tuner: {width}x{height} is not a multiple of 8 on both sides.")
        if inversion_conditioning is None and clip is None:
            raise ValueError(
                "SimDA Edit Tuner: connect the checkpoint's CLIP (it encodes "
                "the empty inversion prompt) or an inversion conditioning."
            )
        picked = select_frames(source_frames, frames, start_frame, stride)
        config = get_config(model) or SimDAConfig()
        conditionings = {"source_prompt": source_prompt, "inversion": inversion_conditioning}
        problem = clip_mismatch(conditionings, picked.shape[0], config.frames_per_clip)
        if problem:
            raise ValueError(f"SimDA Edit Tuner: {problem}.")
        pixels = fit_frames(picked, width, height)
        if inversion_conditioning is None:
            inversion_conditioning = clip.encode_from_tokens_scheduled(clip.tokenize(""))

        latent = vae.encode(pixels)
        if config.latent_shift is None:
            config = replace(config, latent_shift=LatentShiftSettings())
        device = model.load_device
        recipe = TuningRecipe(learning_rate=learning_rate)

        with torch.inference_mode(False), torch.enable_grad(), host_training_mode():
            adapters = trainable_adapters(model, device, seed)
            training = training_patcher(model)
            apply_simda(
                training,
                replace(config, adapters=adapters, strength=1.0, gradient_checkpointing=gradient_checkpointing),
            )
            with loaded_for_training(training):
                x0 = training.model.process_latent_in(latent.to(device).float())
                context = HostConditioning(training, source_prompt, x0, seed=seed)
                trainer = AdapterTrainer(training, adapters, recipe, seed=seed)
                progress = comfy.utils.ProgressBar(steps)
                losses = []
                for step in range(steps):
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    losses.append(trainer.step(x0, context))
                    progress.update_absolute(step + 1, steps)
                    show_text(cls.hidden.unique_id if cls.hidden else None, loss_text(losses, steps))
                    if step == 0 or (step + 1) % max(1, steps // 10) == 0:
                        log.info("SimDA Edit Tuner: step %d/%d, loss %.5f", step + 1, steps, losses[-1])
            adapters.requires_grad_(False)

        tuned = simda_clone(model, replace(config, adapters=adapters, strength=1.0, gradient_checkpointing=False))
        with unloaded_on_failure(tuned):
            inverted = invert_clip(tuned, latent, inversion_conditioning, inversion_steps, inversion_scheduler)
        result = TrainedAdapters(adapters, family, frames_trained=int(x0.shape[0]), steps=steps)
        start = {"samples": inverted, INVERSION_KEY: inversion_record(inversion_steps, inversion_scheduler)}
        return io.NodeOutput(tuned, start, result, source_fps / stride, {"loss": losses})


SAVE_ATTEMPTS = 100


def prefix_parts(filename_prefix: str) -> tuple[str, str]:
    """``(folder inside models/simda, file name stem)`` of a prefix such as ``simda_edit`` or
    ``edits/cat``; anything that would leave models/simda is refused."""
    prefix = filename_prefix.strip().replace("\\", "/")
    parts = [part for part in prefix.split("/") if part]
    if not parts or prefix.startswith("/") or any(part in (".", "..") or part.startswith(".") for part in parts):
        raise ValueError(
            f"Save SimDA Adapters: '{filename_prefix}' is not a file name prefix inside models/simda; use letters, "
            "digits, '-', '_' and optionally a subfolder ('edits/cat')."
        )
    return os.path.join(*parts[:-1]) if len(parts) > 1 else "", parts[-1]


def next_adapter_path(filename_prefix: str) -> str:
    """``models/simda/<prefix>_<counter>.safetensors`` with the counter after the highest one already
    there, as the host's own save nodes number their files."""
    folder, stem = prefix_parts(filename_prefix)
    directory = os.path.join(save_folder(), folder)
    numbered = re.compile(re.escape(stem) + r"_(\d{5})\.safetensors")
    names = os.listdir(directory) if os.path.isdir(directory) else []
    taken = [int(match.group(1)) for match in map(numbered.fullmatch, names) if match]
    return os.path.join(directory, f"{stem}_{max(taken, default=0) + 1:05d}.safetensors")


class SimDASaveAdapters(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDASaveAdapters",
            display_name="Save SimDA Adapters",
            category="SimDA",
            description=(
                "Writes tuned SimDA adapters to models/simda as <prefix>_00001.safetensors, _00002, ... (with their "
                "metadata), atomically, as ComfyUI's own save nodes number their files: running the workflow again "
                "adds a file and never overwrites one."
            ),
            inputs=[
                SimDAAdaptersType.Input("adapters", tooltip="Adapters from SimDA Edit Tuner."),
                io.String.Input(
                    "filename_prefix", default="simda_edit", optional=True,
                    tooltip=(
                        "File name prefix in models/simda (a subfolder is allowed: "
                        "'edits/cat'); a counter and .safetensors are added."
                    ),
                ),
                io.String.Input(
                    "filename", optional=True, force_input=True,
                    tooltip="The file name input of older workflows; when given, it is used as the prefix.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None, filename=None):
        for value in (filename_prefix, filename):
            if isinstance(value, str):
                try:
                    prefix_parts(value.removesuffix(".safetensors"))
                except ValueError as e:
                    return str(e)
        return True

    @classmethod
    def execute(cls, adapters, filename_prefix="simda_edit", filename=None) -> io.NodeOutput:
        prefix = (filename if filename else filename_prefix).removesuffix(".safetensors")
        for _ in range(SAVE_ATTEMPTS):  # another run may take the same number at the same moment
            path = next_adapter_path(prefix)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                save_adapters(adapters.adapters, path, adapters.family, frames_trained=adapters.frames_trained,
                              extra_metadata={"tuning_steps": str(adapters.steps)})
                break
            except AdapterFileError as e:
                if not os.path.exists(path):
                    raise ValueError(f"Save SimDA Adapters: {e}") from None
        else:
            raise ValueError(f"Save SimDA Adapters: no free file name for the prefix '{prefix}' in models/simda.")
        log.info("SimDA: saved adapters to %s", path)
        return io.NodeOutput()
