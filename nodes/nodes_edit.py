"""SimDA One-Shot Tuner (trains the adapters on one source clip), the deprecated SimDA Edit Tuner
(the tuner and SimDA Invert in one node, as older workflows hold it) and Save SimDA Adapters."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, replace

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io

from ..simda_core.formats import AdapterFileError, save_adapters
from ..simda_core.host.register import apply_simda, get_config, model_sites
from ..simda_core.host.training import host_training_mode, loaded_for_training, training_patcher
from ..simda_core.host.unet_call import HostConditioning
from ..simda_core.model.adapters import SimDAAdapters
from ..simda_core.model.config import LatentShiftSettings, SimDAConfig
from ..simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters
from ..simda_core.video.clip_agreement import clip_mismatch
from .folders import save_folder
from .nodes_fit_frames import FRAME_RATE_TOOLTIP, SOURCE_FPS_TOOLTIP, fit_inputs, fitted_clip
from .nodes_invert import (
    check_inversion_inputs, empty_prompt, inversion_prompt_inputs, inversion_schedule_inputs, inverted_noise,
)
from .simda_model import check_image_family, simda_clone

log = logging.getLogger("SimDA")

SimDAAdaptersType = io.Custom("SIMDA_ADAPTERS")
TUNER = "SimDA One-Shot Tuner"
EDIT_TUNER = "SimDA Edit Tuner"


@dataclass
class TrainedAdapters:
    """What flows from the tuner to Save SimDA Adapters."""

    adapters: SimDAAdapters
    family: str
    frames_trained: int
    steps: int


@dataclass
class Tuning:
    """What the tuner gives: the tuned MODEL, the source clip's latents (VAE space) it trained on,
    the adapters and the loss of every step."""

    model: object
    latent: torch.Tensor
    trained: TrainedAdapters
    losses: list[float]


def tuning_strength(config: SimDAConfig, what: str) -> float:
    """The strength the adapters train and come out at: that of the adapters on the incoming MODEL,
    which are the starting point; fresh adapters (none on the MODEL, or its adapters at strength 0,
    which the MODEL samples without) train at 1. Logged when it is not 1."""
    if config.adapters is None:
        return 1.0
    if config.active_adapters is None:
        log.info("%s: the MODEL's adapters are at strength 0 (off): tuning starts from fresh adapters, at "
                 "strength 1.", what)
        return 1.0
    if config.strength != 1.0:
        log.info("%s: the MODEL's adapters are at strength %g: they are the starting point and train and come "
                 "out at that strength.", what, config.strength)
    return float(config.strength)


def trainable_adapters(model, device, seed: int) -> SimDAAdapters:
    """Fresh adapters (outputs zero, weights drawn from ``seed``), or an ordinary-tensor copy of
    those that contribute on the MODEL (none at strength 0)."""
    existing = (get_config(model) or SimDAConfig()).active_adapters
    sites = model_sites(model)
    if existing is None:
        # The host's layers skip weight initialisation (their weights would be uninitialised memory).
        return initial_adapters(sites, seed=seed, device=device)
    adapters = SimDAAdapters(sites, existing.spatial_ratio, existing.temporal_ratio, dtype=torch.float32, device=device)
    adapters.load_state_dict({k: v.detach().float() for k, v in existing.state_dict().items()})
    return adapters


LOSS_WINDOW = 10


def loss_text(losses: list[float], steps: int) -> str:
    """The line shown under the tuner while it trains: the step, its loss, and the mean of the
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


def checked_clip(model, source_frames, source_prompt, steps: int, learning_rate: float, frames: int,
                 start_frame: int, stride: int, width: int, height: int, what: str) -> torch.Tensor:
    """The fitted source clip (``nodes_fit_frames.fitted_clip``), once every setting has been
    checked, before any work."""
    check_image_family(model, what)
    if steps < 1:
        raise ValueError(f"{what}: steps is {steps}; train at least 1 step.")
    if not learning_rate > 0:
        raise ValueError(f"{what}: learning_rate must be above 0 (got {learning_rate}); the authors use 5e-5.")
    pixels = fitted_clip(source_frames, frames, start_frame, stride, width, height, what)
    config = get_config(model) or SimDAConfig()
    problem = clip_mismatch({"source_prompt": source_prompt}, pixels.shape[0], config.frames_per_clip)
    if problem:
        raise ValueError(f"{what}: {problem}.")
    return pixels


def train_adapters(training, adapters: SimDAAdapters, x0: torch.Tensor, source_prompt, steps: int,
                   recipe: TuningRecipe, seed: int, what: str, node_id: str | None) -> list[float]:
    """``steps`` AdamW steps of the adapters on ``x0`` under ``source_prompt``, through the loaded
    training clone, with the host's progress bar, the loss under the node and in the log; Cancel
    stops between steps. The loss of every step."""
    context = HostConditioning(training, source_prompt, x0, seed=seed)
    trainer = AdapterTrainer(training, adapters, recipe, seed=seed)
    progress = comfy.utils.ProgressBar(steps)
    losses = []
    for step in range(steps):
        comfy.model_management.throw_exception_if_processing_interrupted()
        losses.append(trainer.step(x0, context))
        progress.update_absolute(step + 1, steps)
        show_text(node_id, loss_text(losses, steps))
        if step == 0 or (step + 1) % max(1, steps // 10) == 0:
            log.info("%s: step %d/%d, loss %.5f", what, step + 1, steps, losses[-1])
    return losses


def tune(model, vae, pixels: torch.Tensor, source_prompt, steps: int, learning_rate: float, seed: int,
         gradient_checkpointing: bool, what: str, node_id: str | None) -> Tuning:
    """Encode the fitted clip, train the adapters on it (the MODEL's own, or fresh ones) with latent
    shift and frame-shared GroupNorm on, and put them on a clone of ``model``."""
    family = check_image_family(model, what)
    latent = vae.encode(pixels)
    config = get_config(model) or SimDAConfig()
    strength = tuning_strength(config, what)
    if config.latent_shift is None:
        config = replace(config, latent_shift=LatentShiftSettings())
    device = model.load_device

    with torch.inference_mode(False), torch.enable_grad(), host_training_mode():
        adapters = trainable_adapters(model, device, seed)
        training = training_patcher(model)
        apply_simda(
            training,
            replace(config, adapters=adapters, strength=strength, gradient_checkpointing=gradient_checkpointing),
        )
        with loaded_for_training(training):
            x0 = training.model.process_latent_in(latent.to(device).float())
            recipe = TuningRecipe(learning_rate=learning_rate)
            losses = train_adapters(training, adapters, x0, source_prompt, steps, recipe, seed, what, node_id)
        adapters.requires_grad_(False)

    tuned = simda_clone(model, replace(config, adapters=adapters, strength=strength, gradient_checkpointing=False))
    trained = TrainedAdapters(adapters, family, frames_trained=int(x0.shape[0]), steps=steps)
    return Tuning(tuned, latent, trained, losses)


LOSS_MAP = io.LossMap
"""The host's loss-history type (``{"loss": [one value per step]}``), drawn by its Plot Loss Graph node."""


def tuning_inputs() -> list:
    """The tuner's inputs (the deprecated Edit Tuner adds the inversion's among them)."""
    return [
        io.Model.Input(
            "model",
            tooltip=(
                "SD1.x, SD2.x or SDXL MODEL, plain or with SimDA adapters (they are the starting point, at their "
                "strength). It is not changed."
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
    ]


def training_inputs() -> list:
    return [
        io.Int.Input("steps", default=300, min=1, max=100000, tooltip="Training steps (the authors use 300)."),
        io.Float.Input(
            "learning_rate", default=5e-5, min=0.0, max=1.0, step=1e-6, round=1e-7,
            tooltip="AdamW learning rate (the authors use 5e-5).",
        ),
        io.Int.Input(
            "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
            tooltip="Seed of the training noise and timesteps.",
        ),
        *fit_inputs(),
        io.Boolean.Input(
            "gradient_checkpointing", default=True,
            tooltip=(
                "Recompute activations in the backward pass: far less "
                "memory, about 1.5x the time. Every adapter still trains."
            ),
        ),
    ]


def tuning_outputs(latent_output) -> list:
    """The tuner's outputs with ``latent_output`` second: the source latent (One-Shot Tuner) or the
    inverted noise (the deprecated Edit Tuner)."""
    return [
        io.Model.Output(
            display_name="tuned MODEL",
            tooltip="The MODEL with the tuned adapters, latent shift and frame-shared GroupNorm.",
        ),
        latent_output,
        SimDAAdaptersType.Output(display_name="adapters", tooltip="The tuned adapters, for Save SimDA Adapters."),
        io.Float.Output(display_name="frame_rate", tooltip=FRAME_RATE_TOOLTIP),
        LOSS_MAP.Output(
            display_name="loss_map",
            tooltip=(
                "The training loss of every step, for the host's Plot Loss Graph: whether the steps were "
                "enough. The node also shows the loss under itself while it trains."
            ),
        ),
    ]


TUNING_COST = (
    "300 steps by default. Measured on the CPU: 0.61 s per step for 4 frames of 64x64 on a 1/10-width SD1.5 UNet "
    "(bench/bench_pipelines.py); at full size on a GPU it is expected to take minutes, not yet measured "
    "(python bench/bench_pipelines.py --mode gpu --only tune)."
)
STRENGTH_RULE = (
    "Adapters already on the MODEL are the starting point and train and come out at their strength; at strength 0 "
    "(off) it starts from fresh adapters, at strength 1."
)


class SimDAOneShotTuner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAOneShotTuner",
            display_name=TUNER,
            category="SimDA",
            description=(
                "One-shot video editing: trains the SimDA adapters on one source clip (the UNet stays frozen) and "
                "outputs the tuned MODEL and the clip it trained on as a latent. Invert that latent with SimDA Invert "
                "on the tuned MODEL, then sample it with an edited prompt in SimDA Video Sampler; changing the "
                f"inversion or the prompt does not train again. {STRENGTH_RULE} {TUNING_COST}"
            ),
            inputs=[
                *tuning_inputs(),
                *training_inputs(),
                io.Float.Input("source_fps", default=24.0, min=0.01, max=1000.0, step=0.01, tooltip=SOURCE_FPS_TOOLTIP),
            ],
            outputs=tuning_outputs(io.Latent.Output(
                display_name="source latent",
                tooltip="The source clip as fitted, encoded and trained on (frame latents), for SimDA Invert.",
            )),
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, vae, source_frames, source_prompt, steps, learning_rate, seed, frames, start_frame, stride,
                width, height, gradient_checkpointing, source_fps=24.0) -> io.NodeOutput:
        pixels = checked_clip(model, source_frames, source_prompt, steps, learning_rate, frames, start_frame, stride,
                              width, height, TUNER)
        node_id = cls.hidden.unique_id if cls.hidden else None
        tuning = tune(model, vae, pixels, source_prompt, steps, learning_rate, seed, gradient_checkpointing, TUNER,
                      node_id)
        return io.NodeOutput(tuning.model, {"samples": tuning.latent}, tuning.trained, source_fps / stride,
                             {"loss": tuning.losses})


class SimDAEditTuner(io.ComfyNode):
    """The tuner and the inversion in one node, as workflows saved before the two were split hold
    it: made of the One-Shot Tuner's and SimDA Invert's steps, so it gives what they give."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAEditTuner",
            display_name=EDIT_TUNER,
            category="SimDA",
            description=(
                "Deprecated: use SimDA One-Shot Tuner -> SimDA Invert, which give the same result and let ComfyUI "
                "keep the training in its cache when only the inversion or the prompt changes (this node trains "
                "again whenever an inversion setting changes). Trains the SimDA adapters on one source clip, then "
                f"DDIM-inverts the clip with the tuned MODEL. {STRENGTH_RULE}"
            ),
            inputs=[
                *tuning_inputs(),
                *inversion_prompt_inputs(),
                *training_inputs(),
                *inversion_schedule_inputs("inversion_"),
                io.Float.Input("source_fps", default=24.0, min=0.01, max=1000.0, step=0.01, tooltip=SOURCE_FPS_TOOLTIP),
            ],
            outputs=tuning_outputs(io.Latent.Output(
                display_name="inverted noise",
                tooltip="The source clip's DDIM inversion: connect it to the Video Sampler's start_latent.",
            )),
            hidden=[io.Hidden.unique_id],
            is_deprecated=True,
        )

    @classmethod
    def execute(cls, model, vae, source_frames, source_prompt, steps, learning_rate, seed, frames, start_frame, stride,
                width, height, gradient_checkpointing, inversion_steps, inversion_scheduler, source_fps=24.0,
                clip=None, inversion_conditioning=None) -> io.NodeOutput:
        pixels = checked_clip(model, source_frames, source_prompt, steps, learning_rate, frames, start_frame, stride,
                              width, height, EDIT_TUNER)
        check_inversion_inputs(model, int(pixels.shape[0]), clip, inversion_conditioning, EDIT_TUNER)
        if inversion_conditioning is None:
            inversion_conditioning = empty_prompt(clip)
        node_id = cls.hidden.unique_id if cls.hidden else None
        tuning = tune(model, vae, pixels, source_prompt, steps, learning_rate, seed, gradient_checkpointing,
                      EDIT_TUNER, node_id)
        start = inverted_noise(
            tuning.model, tuning.latent, inversion_conditioning, inversion_steps, inversion_scheduler
        )
        return io.NodeOutput(tuning.model, start, tuning.trained, source_fps / stride, {"loss": tuning.losses})


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
                "metadata), atomically, as ComfyUI's own save nodes number their files: a run with any changed input "
                "adds a file and never overwrites one (an unchanged re-run is served from ComfyUI's cache and writes "
                "nothing, as Save Image does)."
            ),
            inputs=[
                SimDAAdaptersType.Input("adapters", tooltip="Adapters from SimDA One-Shot Tuner."),
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
