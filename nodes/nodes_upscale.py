"""SimDA Video Upscaler: temporally consistent x4 super-resolution of a clip's frames with the SD x4
upscaler (docs/METHOD.md §9: the paper's second stage, 256x256 -> 1024x1024).

Each (frame group, spatial tile) piece is sampled by the host's own KSampler (``comfy.sample.sample``)
with the x4 model's concat conditioning made by the host's ``SD_4XUpscale_Conditioning`` for that
piece's low-resolution frames, and the piece's own rows of per-frame conditioning. Pieces that share
frames or pixels with finished pieces get those as known latents through the host's denoise mask
(``simda_core/video/tiling.py`` explains how, and how a looped clip's groups are laid out), so group
borders keep their temporal context and tile borders leave no seam.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
import torch
from comfy_api.latest import io

from ..simda_core.formats import FAMILIES
from ..simda_core.host.family import compute_dtype
from ..simda_core.host.memory import free_device_memory, is_dynamic, resident_weight_bytes, unloaded_on_failure
from ..simda_core.host.register import get_config
from ..simda_core.host.x4 import x4_conditioning
from ..simda_core.model.config import LatentShiftSettings, SimDAConfig
from ..simda_core.video.clip_agreement import clip_mismatch
from ..simda_core.video.clip_noise import clip_noise
from ..simda_core.video.tiling import (
    FrameGroup, PieceSizes, Tile, blend_piece_, choose_sizes, frame_groups, piece_conditioning, piece_mask,
    spatial_tiles,
)
from .simda_model import check_family, simda_clone

log = logging.getLogger("SimDA")

NODE = "SimDA Video Upscaler"
FAMILY = "sd_x4_upscaler"
SCALE = 4
"""Output pixels per input pixel; the x4 upscaler's latent has the input frame's size."""
MAX_OUTPUT_SIDE = 4096
"""Largest output side this node makes (input frames up to 1024 pixels a side)."""
MIN_TILE = 16
"""Smallest tile side, in input pixels (the x4 UNet downsamples three times)."""
AUTO_MIN_GROUP = 8
"""Automatic sizes keep whole frames while at least this many frames fit in one call."""
AUTO_MIN_TILE = 64
SAMPLING_FLOATS_PER_PIXEL = 3600 * 1.4
"""Activations of one x4 UNet call, in values per latent pixel of one frame: 3600 measured as the
slope of peak memory over latent size for the full-size x4 UNet (473M, fp32, CPU, 32^2 and 64^2
latents: 14.4 KB per pixel-frame), times 1.4 for SimDA's frame-GroupNorm copies, the temporal
adapters and convolution workspaces. Sizes come from this times the UNet's dtype size."""
MEMORY_SAFETY = 0.85


# -- input checks (all before any sampling) ------------------------------------------------------

def clip_frames(frames) -> torch.Tensor:
    """One ``[F, H, W, 3]`` clip from an IMAGE batch or a list of IMAGE batches of one size."""
    parts = list(frames) if isinstance(frames, (list, tuple)) else [frames]
    if not parts or any(not isinstance(p, torch.Tensor) or p.ndim not in (3, 4) for p in parts):
        raise ValueError(
            f"{NODE}: 'frames' must be IMAGE frames [F, H, W, C]; connect "
            "the clip's frames (e.g. VAE Decode or Get Video Components)."
        )
    parts = [p if p.ndim == 4 else p[None] for p in parts]
    sizes = sorted({(int(p.shape[2]), int(p.shape[1])) for p in parts})
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for w, h in sizes[:6])
        raise ValueError(
            f"{NODE}: the frames have different sizes ({shown}); the frames of a clip must share one size. "
            "Resize them to one size first (e.g. Upscale Image to the same width and height)."
        )
    clip = torch.cat(parts) if len(parts) > 1 else parts[0]
    if clip.shape[0] < 1 or clip.shape[-1] < 3:
        raise ValueError(
            f"{NODE}: got {clip.shape[0]} frames with {clip.shape[-1]} channels; the upscaler needs RGB frames."
        )
    height, width = int(clip.shape[1]), int(clip.shape[2])
    if min(height, width) < 8:
        raise ValueError(f"{NODE}: the frames are {width}x{height}; the x4 upscaler needs at least 8 pixels a side.")
    if max(height, width) * SCALE > MAX_OUTPUT_SIDE:
        raise ValueError(
            f"{NODE}: {width}x{height} frames would become {width * SCALE}x{height * SCALE}; this node makes frames up "
            f"to {MAX_OUTPUT_SIDE} pixels a side (input up to "
            f"{MAX_OUTPUT_SIDE // SCALE}). Downscale or crop the frames first."
        )
    return clip[..., :3]


def check_model(model) -> None:
    family = check_family(model, "", NODE)
    if family != FAMILY:
        raise ValueError(
            f"{NODE} needs the SD x4 upscaler MODEL (e.g. x4-upscaler-ema.safetensors from Load Checkpoint); "
            f"the connected MODEL is {FAMILIES.get(family, family)}. Use SimDA Video Sampler for that model, and "
            "load the x4 upscaler for this node."
        )
    config = get_config(model)
    if config is not None and config.adapters is not None and config.family not in ("", FAMILY):
        raise ValueError(
            f"{NODE}: the MODEL carries SimDA adapters made for {FAMILIES.get(config.family, config.family)}, "
            "not for the x4 upscaler; load super-resolution adapters trained on the x4 upscaler."
        )


def check_vae(vae) -> None:
    ratio = getattr(vae, "upscale_ratio", None)
    if ratio != SCALE or getattr(vae, "latent_channels", 4) != 4:
        raise ValueError(
            f"{NODE}: the connected VAE scales by {ratio} (it is not the x4 upscaler's VAE, which scales by {SCALE}); "
            "connect the VAE output of the Load Checkpoint that loads the x4 upscaler."
        )


def check_conditioning(model, positive, negative, frames: int) -> None:
    """Text tokens of the x4 upscaler's width, and rows that fit the clip (one, or one per frame:
    the Video Sampler's check, ``clip_mismatch``), for the whole clip before any piece is sampled."""
    wanted = model.model.model_config.unet_config.get("context_dim")
    for name, conditioning in (("positive", positive), ("negative", negative)):
        if not conditioning:
            raise ValueError(f"{NODE}: '{name}' is empty; connect a CLIP Text Encode made with the x4 upscaler's CLIP.")
        width = int(conditioning[0][0].shape[-1])
        if wanted and width != wanted:
            raise ValueError(
                f"{NODE}: the '{name}' conditioning has {width}-wide text tokens, but the x4 upscaler reads "
                f"{wanted}-wide ones (its own OpenCLIP text encoder); encode the "
                "prompt with the CLIP output of the x4 upscaler's Load Checkpoint."
            )
    problem = clip_mismatch({"positive": positive, "negative": negative}, frames)
    if problem:
        raise ValueError(f"{NODE}: {problem}.")


@dataclass(frozen=True)
class Settings:
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    noise_augmentation: float
    frames_per_group: int
    """0: automatic."""
    context_frames: int
    tile_size: int
    """In input pixels; 0: automatic."""
    tile_overlap: int

    def check(self) -> None:
        if self.steps < 1:
            raise ValueError(f"{NODE}: steps is {self.steps}; sample at least 1 step.")
        if not 0.0 <= self.noise_augmentation <= 1.0:
            raise ValueError(f"{NODE}: noise_augmentation {self.noise_augmentation} must lie between 0 and 1.")
        if self.frames_per_group < 0 or self.context_frames < 0 or self.tile_overlap < 0:
            raise ValueError(f"{NODE}: frames_per_group, context_frames and tile_overlap cannot be negative.")
        if self.frames_per_group and self.context_frames >= self.frames_per_group:
            raise ValueError(
                f"{NODE}: context_frames ({self.context_frames}) must be fewer than frames_per_group "
                f"({self.frames_per_group}): each group needs new frames to upscale."
            )
        if self.tile_size and (self.tile_size < MIN_TILE or self.tile_size % 8):
            raise ValueError(
                f"{NODE}: tile_size {self.tile_size} must be 0 (automatic) or a multiple of 8 of at least {MIN_TILE}."
            )
        if self.tile_size and self.tile_overlap * 2 > self.tile_size:
            raise ValueError(
                f"{NODE}: tile_overlap {self.tile_overlap} is more than half of "
                f"tile_size {self.tile_size}; use at most {self.tile_size // 2}."
            )


# -- the MODEL -----------------------------------------------------------------------------------

def upscaler_model(model, latent_shift: bool, straight: bool = False):
    """The MODEL as the upscaler samples it: latent shift added when asked for and missing (it only
    lands on blocks with real self-attention), each call's frames one clip (frames_per_clip 0).
    ``straight``: a looped clip cut into several groups, whose loop the groups' layout carries
    (``frame_groups``); each call is then a straight piece of it and must not wrap onto itself."""
    config = get_config(model) or SimDAConfig()
    wanted = config
    if latent_shift and wanted.latent_shift is None:
        wanted = replace(wanted, latent_shift=LatentShiftSettings())
    if straight and wanted.loop:
        wanted = replace(wanted, loop=False)
    if wanted.frames_per_clip:
        log.info(
            "%s: frames_per_clip %d on the MODEL is ignored; each frame group is one clip.", NODE,
            wanted.frames_per_clip,
        )
        wanted = replace(wanted, frames_per_clip=0)
    if wanted == config:
        if get_config(model) is None:
            log.info("%s: no SimDA adapters and latent shift off: the frames are upscaled independently.", NODE)
        return model
    return simda_clone(model, replace(wanted, family=wanted.family or FAMILY))


# -- sizes ---------------------------------------------------------------------------------------

def sampling_budget(model) -> float:
    """Bytes one sampling call may use for activations: the device's free memory once the host has
    made room for this MODEL alone (other models' weights are unloaded when sampling starts), minus
    this MODEL's resident weights and the host's inference reserve (see simda_core/host/memory.py). A streamed
    (dynamic) model's device buffers are not added back: the newest ModelPatcher's free-memory
    query already counts them as free (0.33 ``get_free_memory`` adds aimdo's reclaimable vbars, and
    ``ModelPatcherDynamic.loaded_size`` is those same vbars)."""
    mm = comfy.model_management
    device = model.load_device
    free = free_device_memory(model, device)
    held = 0.0
    for loaded in list(mm.current_loaded_models):
        if loaded.device == device and loaded.model is not None and not is_dynamic(loaded.model):
            held += loaded.model_loaded_memory()
    weights = resident_weight_bytes(model)
    return MEMORY_SAFETY * max(0.0, free + held - weights - mm.minimum_inference_memory())


def bytes_per_pixel(model, cfg: float) -> float:
    """Sampling memory per latent pixel of one frame, cond and uncond batched when cfg != 1."""
    dtype = compute_dtype(model)
    groups = 1 if cfg == 1.0 else 2
    return SAMPLING_FLOATS_PER_PIXEL * comfy.model_management.dtype_size(dtype) * groups


def piece_sizes(model, frames: int, height: int, width: int, settings: Settings) -> tuple[PieceSizes, str]:
    """Group and tile sizes: the settings where given, the rest from free memory."""
    if settings.frames_per_group and settings.tile_size:
        return PieceSizes(min(settings.frames_per_group, frames), settings.tile_size, settings.tile_size), "as set"
    budget = sampling_budget(model)
    per_pixel = bytes_per_pixel(model, settings.cfg)
    how = f"automatic, from {budget / 2**30:.1f} GiB usable"
    if settings.tile_size:  # frames from memory, at the given tile
        tile_pixels = min(settings.tile_size, height) * min(settings.tile_size, width)
        fit = int(budget // (per_pixel * tile_pixels))
        return PieceSizes(max(1, min(frames, fit)), settings.tile_size, settings.tile_size), how
    group = min(settings.frames_per_group or frames, frames)
    sizes = choose_sizes(group, height, width, budget, per_pixel, min_group=settings.frames_per_group or AUTO_MIN_GROUP,
                         min_tile=AUTO_MIN_TILE)
    return sizes, how


# -- sampling ------------------------------------------------------------------------------------

class PieceProgress:
    """One progress bar (with previews) over every step of every piece."""

    def __init__(self, model, pieces: int, steps: int):
        self.total = pieces * steps
        self.steps = steps
        self.done = 0
        self.bar = comfy.utils.ProgressBar(self.total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(self, step: int, x0: torch.Tensor, x: torch.Tensor, total_steps: int) -> None:
        preview = self.previewer.decode_latent_to_preview_image("JPEG", x0) if self.previewer else None
        self.bar.update_absolute(self.done + min(step + 1, self.steps), self.total, preview)

    def piece_done(self) -> None:
        self.done += self.steps
        self.bar.update_absolute(self.done, self.total)


def sample_piece(model, pixels: torch.Tensor, positive, negative, latent: torch.Tensor, noise: torch.Tensor,
                 mask: torch.Tensor | None, settings: Settings, callback) -> torch.Tensor:
    """One piece through the host's KSampler: ``pixels`` ``[f, h, w, 3]`` low-resolution frames,
    ``latent``/``noise`` ``[f, 4, h, w]``, conditionings with one row or one per frame of the piece;
    returns the sampled latents (VAE space)."""
    conditioned = x4_conditioning().execute(pixels, positive, negative, float(SCALE), settings.noise_augmentation)
    piece_positive, piece_negative = conditioned[0], conditioned[1]
    return comfy.sample.sample(
        model, noise, settings.steps, settings.cfg, settings.sampler_name, settings.scheduler,
        piece_positive, piece_negative, latent, denoise=1.0, noise_mask=mask, callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=settings.seed,
    )


def upscale_latents(
    model, frames: torch.Tensor, positive, negative, settings: Settings, sizes: PieceSizes, loop: bool = False
) -> torch.Tensor:
    """The clip's upscaled latents ``[F, 4, H, W]`` (H, W: the input frames' size), sampled piece by
    piece: frame groups in order (``loop``: the last one carries the clip's first frames after its
    end), tiles in raster order within each group. Per-frame conditioning rows go with their frames."""
    count, height, width = frames.shape[0], frames.shape[1], frames.shape[2]
    context = min(settings.context_frames, sizes.frames_per_group - 1)
    groups: list[FrameGroup] = frame_groups(count, sizes.frames_per_group, context, loop)
    tiles: list[Tile] = spatial_tiles(height, width, sizes.tile_height, sizes.tile_width, settings.tile_overlap)
    channels = model.get_model_object("latent_format").latent_channels
    noise = clip_noise((count, channels, height, width), settings.seed, 0.0)  # [F, C, H, W], per-frame seeded
    canvas = torch.zeros(count, channels, height, width, device=comfy.model_management.intermediate_device())
    progress = PieceProgress(model, len(groups) * len(tiles), settings.steps)
    for group in groups:
        index = torch.tensor(group.indices)
        group_positive = piece_conditioning(positive, group.indices, count)
        group_negative = piece_conditioning(negative, group.indices, count)
        for tile in tiles:
            comfy.model_management.throw_exception_if_processing_interrupted()
            mask = piece_mask(tile, group)
            sampled = sample_piece(
                model,
                frames[index][:, tile.rows, tile.cols],
                group_positive, group_negative,
                latent=canvas[index.to(canvas.device)][:, :, tile.rows, tile.cols].contiguous(),
                noise=noise[index][:, :, tile.rows, tile.cols].contiguous(),
                mask=mask,
                settings=settings,
                callback=progress.callback,
            )
            blend_piece_(canvas, sampled, mask, group, tile)
            progress.piece_done()
    return canvas


class SimDAVideoUpscaler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAVideoUpscaler",
            display_name=NODE,
            category="SimDA",
            description=(
                "Upscales a clip's frames 4x with the SD x4 upscaler, keeping them consistent in time: frames are "
                "sampled together as a clip (latent shift, and SimDA super-resolution adapters when the MODEL carries "
                "them). Long or large clips are cut into overlapping frame groups and spatial tiles sized to the "
                "card's free memory; each group continues from the frames the previous one finished and each tile "
                "grows out of its finished neighbours, so there are no jumps or seams. A looped clip (the "
                "Latent-Shift Patch's loop) stays one: the last group runs on into the first frames. The paper's "
                "second stage: 256x256 -> 1024x1024."
            ),
            is_input_list=True,
            inputs=[
                io.Image.Input(
                    "frames",
                    tooltip=(
                        "The clip's frames (e.g. VAE Decode of the Video Sampler's "
                        "output), all of one size, at most 1024 pixels a side."
                    ),
                ),
                io.Model.Input(
                    "model",
                    tooltip=(
                        "The SD x4 upscaler (x4-upscaler-ema.safetensors), plain or from SimDA "
                        "Adapter Loader with super-resolution adapters. It is not changed."
                    ),
                ),
                io.Vae.Input(
                    "vae", tooltip="The x4 upscaler's VAE (from the same Load Checkpoint); it decodes the 4x frames.",
                ),
                io.Conditioning.Input(
                    "positive",
                    tooltip=(
                        "What the clip shows, encoded with the x4 upscaler's CLIP (CLIP Text Encode, or "
                        "SimDA Prompt Travel for one row per frame)."
                    ),
                ),
                io.Conditioning.Input("negative", tooltip="What to avoid, encoded with the x4 upscaler's CLIP."),
                io.Float.Input(
                    "noise_augmentation", default=0.0, min=0.0, max=1.0, step=0.001,
                    tooltip=(
                        "Noise added to the low-resolution frames, as in SD 4x Upscale Conditioning: 0 "
                        "follows them closely; 0.05-0.2 invents more detail and hides their artifacts."
                    ),
                ),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the noise; each frame's noise depends on the seed and its index only."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Sampling steps of every piece."),
                io.Float.Input(
                    "cfg", default=7.0, min=0.0, max=100.0, step=0.1, round=0.01,
                    tooltip="Classifier-free guidance scale (1 skips the negative prompt and halves the work).",
                ),
                io.Combo.Input(
                    "sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                    tooltip="The host's sampler.",
                ),
                io.Combo.Input(
                    "scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                    tooltip="The host's noise schedule.",
                ),
                io.Int.Input(
                    "frames_per_group", default=0, min=0, max=4096,
                    tooltip=(
                        "Frames sampled together in one call. 0: automatic, as many "
                        "as the free memory holds (the whole clip when it fits)."
                    ),
                ),
                io.Int.Input(
                    "context_frames", default=2, min=0, max=64,
                    tooltip=(
                        "Frames each group takes over, finished, from the group before; the new "
                        "frames continue from them. More: smoother group borders, more work."
                    ),
                ),
                io.Int.Input(
                    "tile_size", default=0, min=0, max=MAX_OUTPUT_SIDE // SCALE, step=8,
                    tooltip=(
                        "Side of the square spatial tiles, in input pixels (the output "
                        "tile is 4x). 0: automatic, whole frames when they fit in memory."
                    ),
                ),
                io.Int.Input(
                    "tile_overlap", default=32, min=0, max=512, step=8,
                    tooltip=(
                        "Input pixels that neighbouring tiles share; the later "
                        "tile fades in over the finished one across this band."
                    ),
                ),
                io.Boolean.Input(
                    "latent_shift", default=True,
                    tooltip=(
                        "Add latent-shift attention if the MODEL has none (it lands "
                        "only in the x4 UNet's blocks with real self-attention)."
                    ),
                ),
            ],
            outputs=[
                io.Image.Output(
                    display_name="IMAGE", tooltip="The frames at 4x the width and height, same count and order.",
                )
            ],
        )

    @classmethod
    def execute(cls, frames, model, vae, positive, negative, noise_augmentation, seed, steps, cfg, sampler_name,
                scheduler, frames_per_group, context_frames, tile_size, tile_overlap, latent_shift) -> io.NodeOutput:
        # is_input_list: every input arrives as a list (so frames from a list of images form one clip).
        inputs = single_values(dict(
            model=model, vae=vae, positive=positive, negative=negative, noise_augmentation=noise_augmentation,
            seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
            frames_per_group=frames_per_group, context_frames=context_frames, tile_size=tile_size,
            tile_overlap=tile_overlap, latent_shift=latent_shift,
        ))
        model, vae, positive, negative = (inputs[name] for name in ("model", "vae", "positive", "negative"))
        settings = Settings(**{field.name: inputs[field.name] for field in fields(Settings)})
        x4_conditioning()
        clip = clip_frames(frames)
        check_model(model)
        check_vae(vae)
        check_conditioning(model, positive, negative, clip.shape[0])
        settings.check()
        plan = plan_pieces(model, inputs["latent_shift"], clip, settings)
        with unloaded_on_failure(plan.model):
            latents = upscale_latents(plan.model, clip, positive, negative, plan.settings, plan.sizes, plan.loop)
        comfy.model_management.throw_exception_if_processing_interrupted()
        images = vae.decode(latents)
        return io.NodeOutput(images)


def single_values(inputs: dict[str, list]) -> dict:
    """The one value of each input of this ``is_input_list`` node other than ``frames`` (whose items
    form one clip); an input that brings a list of several values is refused, naming it."""
    for name, values in inputs.items():
        if len(values) != 1:
            raise ValueError(
                f"{NODE}: '{name}' brings {len(values)} values (a list from the node before it), but every input "
                f"other than 'frames' (whose items form one clip) takes one value; connect a single {name}."
            )
    return {name: values[0] for name, values in inputs.items()}


@dataclass(frozen=True)
class PiecePlan:
    model: object
    """The MODEL each piece is sampled with (:func:`upscaler_model`)."""
    sizes: PieceSizes
    settings: Settings
    loop: bool
    """The clip loops and needs several groups: its last group carries the first frames after its end."""


def plan_pieces(model, latent_shift: bool, clip: torch.Tensor, settings: Settings) -> PiecePlan:
    """How the clip is cut (group and tile sizes from the settings or free memory) and the MODEL
    each piece is sampled with; the plan goes to ComfyUI's log."""
    count, height, width = clip.shape[0], clip.shape[1], clip.shape[2]
    sampling_model = upscaler_model(model, latent_shift)
    sizes, how = piece_sizes(sampling_model, count, height, width, settings)
    if not settings.tile_size:  # an automatic tile keeps its overlap under half its side
        settings = replace(
            settings, tile_overlap=min(settings.tile_overlap, min(sizes.tile_height, sizes.tile_width) // 2)
        )
    looped = bool((get_config(sampling_model) or SimDAConfig()).loop)
    loop = looped and sizes.frames_per_group < count
    if loop:  # the groups' layout carries the loop; each call is a straight piece of it
        sampling_model = upscaler_model(model, latent_shift, straight=True)
    context = min(settings.context_frames, sizes.frames_per_group - 1)
    pieces = sizes.pieces(count, height, width, settings.context_frames, settings.tile_overlap, loop)
    log.info(
        "%s: %d frames %dx%d -> %dx%d in pieces of up to %d frames (%d context) x %dx%d tiles (%s): %d pieces%s.",
        NODE, count, width, height, width * SCALE, height * SCALE, sizes.frames_per_group, context,
        min(sizes.tile_width, width), min(sizes.tile_height, height), how, pieces,
        loop_plan(looped, loop, frame_groups(count, sizes.frames_per_group, context, loop)[-1].closing),
    )
    return PiecePlan(sampling_model, sizes, settings, loop)


def loop_plan(looped: bool, loop: bool, closing: int) -> str:
    """How the log says a looped clip is sampled."""
    if not looped:
        return ""
    if not loop:
        return "; the loop fits in one call"
    if not closing:
        return "; a loop, but with context_frames 0 the last group does not continue into the first frames"
    return f"; a loop: the last group continues into frames 0..{closing - 1}"
