"""Collection training: SimDA adapters trained on a folder (or CSV) of captioned clips, from an SD1.x/
SD2.x checkpoint loaded with the host's own loader. ``scripts/train_simda.py`` is the command.
Given the SD x4 upscaler it trains super-resolution adapters (SIMDA_SPEC.md section 6): the clips'
frames are the targets, their 4x downscales the concat image (see :func:`sr_conditioning`).

One step: this process's shard of the global batch (``video_data.GlobalBatchPlan``) -> frames to
latents with the checkpoint's VAE, captions to context with its CLIP -> the denoising loss of
``training.AdapterTrainer`` on the SimDA-patched host UNet -> gradients averaged over processes ->
clip, AdamW step. Every random draw of a sample (clip, start frame, crop, timestep, noise) comes from
the run's seed and the sample's number, so N processes with the same global batch train like one.

Under ``torchrun`` each process joins a ``torch.distributed`` group (nccl on CUDA, gloo on the CPU);
only rank 0 writes files, logs and the progress bar. Output folder:
- ``simda_adapters_step{N}.safetensors``  adapters every ``save_every`` steps and at the end
- ``training_state.pt``                  resume point (adapters, optimizer, scaler, step, RNG, losses)
- ``loss.png``, ``loss.csv``             the loss curve (mean over the global batch per step)
- ``samples/step{N}.webp``               sample clips every ``sample_every`` steps (if asked for)
"""
from __future__ import annotations

import csv
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .adapters import SimDAAdapters
from .formats import AdapterFileError, save_adapters
from .host_patch import LatentShiftSettings, SimDAConfig, apply_simda, model_family, model_sites
from .adapter_training import NUM_TIMESTEPS, AdapterTrainer, TuningRecipe, initial_adapters, make_base_trainable
from .video_data import (
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

log = logging.getLogger("SimDA")

STATE_NAME = "training_state.pt"
STATE_FORMAT = "simda-training-state"
STATE_VERSION = 1
ADAPTER_PREFIX = "simda_adapters_step"
LOSS_PNG, LOSS_CSV = "loss.png", "loss.csv"
TRAINABLE_FAMILIES = ("sd1", "sd2", "sd_x4_upscaler")
SR_FAMILY = "sd_x4_upscaler"
SR_SCALE = 4
"""Output pixels per input pixel of the x4 upscaler (its latent has the input's size)."""


class TrainingSetupError(ValueError):
    """The run cannot start as asked; the message says what to do."""


@dataclass
class TrainingOptions:
    """Everything the command takes (see ``scripts/train_simda.py --help`` and docs/TRAINING.md)."""

    checkpoint: Path
    output: Path
    data: Path | None = None
    csv: Path | None = None
    frames: int = 16
    stride: int = 2
    width: int = 512
    height: int = 512
    crop: str = "random"
    steps: int = 10000
    learning_rate: float = 5e-5
    batch_per_process: int = 1
    seed: int = 0
    mixed_precision: bool = True
    gradient_checkpointing: bool = True
    save_every: int = 1000
    checkpoint_every: int = 500
    sample_every: int = 0
    sample_prompt: str = ""
    sample_steps: int = 25
    sample_cfg: float = 7.5
    workers: int = 2
    resume: bool = False
    noise_augmentation: tuple[float, float] = (0.0, 0.2)
    """x4 upscaler only: each clip's noise augmentation (SD 4x Upscale Conditioning's) is drawn uniformly from this range."""

    def check(self) -> None:
        if self.data is None and self.csv is None:
            raise TrainingSetupError("give the clips: a data folder (clips with .txt captions) or --csv.")
        for name, flag in (("steps", "--steps"), ("batch_per_process", "--batch")):
            if getattr(self, name) < 1:
                raise TrainingSetupError(f"{flag} is {getattr(self, name)}; it must be 1 or more.")
        for name in ("save_every", "checkpoint_every", "sample_every", "workers"):
            if getattr(self, name) < 0:
                raise TrainingSetupError(f"--{name.replace('_', '-')} is {getattr(self, name)}; use 0 (off) or more.")
        if not self.learning_rate > 0:
            raise TrainingSetupError(f"--lr must be above 0 (got {self.learning_rate}); the authors use 5e-5.")
        if self.sample_every and self.sample_steps < 1:
            raise TrainingSetupError("--sample-steps must be 1 or more.")
        low, high = self.noise_augmentation
        if not 0.0 <= low <= high <= 1.0:
            raise TrainingSetupError(
                f"--noise-augmentation {low} {high}: give MIN MAX with 0 <= MIN <= MAX <= 1 "
                "(the range of SD 4x Upscale Conditioning)."
            )
        if not Path(self.checkpoint).is_file():
            raise TrainingSetupError(f"the checkpoint '{self.checkpoint}' does not exist; pass the path of an SD1.x .safetensors/.ckpt file.")

    def as_record(self) -> dict:
        """Plain values for the training state (no paths or custom types)."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


# -- distributed ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Processes:
    """This process's place in the data-parallel group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over all processes."""
        value = value.detach().float().reshape(1).clone()
        if self.distributed:
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def average_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """All-reduce every gradient (one flat buffer) and divide by the number of processes: the
        gradient of the mean loss over the global batch."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            reduced = flat[offset:offset + n].view_as(g)
            if p.grad is None:
                p.grad = reduced.clone()
            else:
                p.grad.copy_(reduced)
            offset += n

    def broadcast_(self, module: torch.nn.Module) -> None:
        if self.distributed:
            with torch.no_grad():
                for tensor in module.state_dict().values():
                    dist.broadcast(tensor, src=0)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_processes() -> Processes:
    """Join the group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_*``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return Processes(rank=rank, world=world, local_rank=local_rank)


# -- files ---------------------------------------------------------------------------------------

def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def adapter_file_name(output: Path, step: int) -> Path:
    """``simda_adapters_step{N}.safetensors``; when that name exists (a resumed run passing the
    step again) a suffix ``-1``, ``-2``, ... keeps the earlier file."""
    path = output / f"{ADAPTER_PREFIX}{step:06d}.safetensors"
    suffix = 0
    while path.exists():
        suffix += 1
        path = output / f"{ADAPTER_PREFIX}{step:06d}-{suffix}.safetensors"
    return path


def plot_loss(losses: list[float], path: Path, title: str = "SimDA training loss") -> None:
    """The loss per step (light) and its running mean (dark) as a PNG, drawn with PIL."""
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 900, 420, 70, 20, 40, 45
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w, plot_h = width - left - right, height - top - bottom
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline=(90, 90, 90))
    values = [v for v in losses if math.isfinite(v)]
    draw.text((left, 12), f"{title} - {len(losses)} steps", fill=(0, 0, 0))
    if values:
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5 * abs(low or 1), high + 0.5 * abs(high or 1)
        pad = 0.05 * (high - low)
        low, high = low - pad, high + pad
        count = len(losses)

        def point(i: int, v: float) -> tuple[float, float]:
            x = left + (plot_w * i / (count - 1) if count > 1 else plot_w / 2)
            return x, top + plot_h * (high - v) / (high - low)

        for k in range(5):
            v = low + (high - low) * k / 4
            _, y = point(0, v)
            draw.line([left - 4, y, left, y], fill=(90, 90, 90))
            draw.text((4, y - 6), f"{v:.4g}", fill=(60, 60, 60))
        first_step = 1
        for k in range(5):
            i = round((count - 1) * k / 4)
            x, _ = point(i, low)
            draw.line([x, top + plot_h, x, top + plot_h + 4], fill=(90, 90, 90))
            draw.text((x - 10, top + plot_h + 8), str(first_step + i), fill=(60, 60, 60))
        draw.text((left + plot_w // 2 - 10, height - 18), "step", fill=(0, 0, 0))
        raw = [point(i, v) for i, v in enumerate(losses) if math.isfinite(v)]
        window = max(1, count // 20)
        smooth, running = [], []
        for i, v in enumerate(losses):
            if math.isfinite(v):
                running.append(v)
            running = running[-window:]
            if running:
                smooth.append(point(i, sum(running) / len(running)))
        if len(raw) > 1:
            draw.line(raw, fill=(160, 190, 230), width=1)
            draw.line(smooth, fill=(20, 60, 160), width=2)
        else:
            x, y = raw[0]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(20, 60, 160))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_loss_csv(losses: list[float], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["step", "loss"])
            writer.writerows((i + 1, f"{v:.6g}") for i, v in enumerate(losses))

    atomic_write(path, write)


def write_animation(frames: torch.Tensor, path: Path, fps: float = 8.0) -> Path:
    """``[F, H, W, 3]`` 0..1 -> an animated WEBP (GIF where PIL lacks WEBP), written atomically."""
    from PIL import Image, features

    if not features.check("webp"):
        path = path.with_suffix(".gif")
    images = [Image.fromarray(f) for f in (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()]
    kind = "WEBP" if path.suffix == ".webp" else "GIF"
    options = {"quality": 90} if kind == "WEBP" else {}
    atomic_write(path, lambda tmp: images[0].save(
        tmp, format=kind, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **options
    ))
    return path


# -- the training state (resume) -----------------------------------------------------------------

def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: Path, step: int, adapters: SimDAAdapters, trainer: AdapterTrainer, losses: list[float],
               options: TrainingOptions, family: str, processes: Processes) -> None:
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "family": family,
        "world_size": processes.world,
        "global_batch": options.batch_per_process * processes.world,
        "adapters": {k: v.detach().cpu().clone() for k, v in adapters.file_state_dict().items()},
        "trainer": trainer.state_dict(),
        "losses": list(losses),
        "rng": rng_states(),
        "options": options.as_record(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise TrainingSetupError(f"--resume: there is no {STATE_NAME} in '{path.parent}'; start without --resume.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a cut or foreign file)
        raise TrainingSetupError(f"--resume: '{path}' cannot be read ({type(e).__name__}: {e}); it is damaged.") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingSetupError(f"--resume: '{path}' is not a SimDA training state.")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise TrainingSetupError(f"--resume: '{path}' was written by a newer version of this trainer; update the pack.")
    return state


RESUME_CHECKED = ("frames", "stride", "width", "height", "crop", "learning_rate", "seed", "data", "csv")


def resume_differences(saved: dict, options: TrainingOptions) -> list[str]:
    now = options.as_record()
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_CHECKED if saved.get(k) != now.get(k)]


# -- encoding ------------------------------------------------------------------------------------

class CaptionEncoder:
    """Captions -> CLIP context ``[1, tokens, dim]`` on the CPU, the most recent ones cached."""

    def __init__(self, clip, cache_size: int = 1024):
        self.clip = clip
        self.cache: dict[str, torch.Tensor] = {}
        self.cache_size = cache_size

    def __call__(self, caption: str) -> torch.Tensor:
        cond = self.cache.pop(caption, None)
        if cond is None:
            with torch.no_grad():
                cond = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(caption))[0][0].float().cpu()
        self.cache[caption] = cond
        while len(self.cache) > self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        return cond

    def context(self, captions: list[str], frames: int) -> torch.Tensor:
        """``[clips * frames, tokens, dim]``: each clip's caption for each of its frames. Captions
        longer than one 77-token chunk are repeated to a common length, as the host concatenates
        conditionings (attention over a key set repeated whole is unchanged)."""
        conds = [self(c) for c in captions]
        tokens = math.lcm(*(c.shape[1] for c in conds))
        conds = [c.repeat(1, tokens // c.shape[1], 1) for c in conds]
        return torch.cat([c.expand(frames, -1, -1) for c in conds])


def encode_frames(vae, model_patcher, frames: torch.Tensor) -> torch.Tensor:
    """``[clips, F, H, W, 3]`` 0..1 -> clean latents ``[clips * F, C, H/8, W/8]`` (the x4 upscaler's:
    ``H/4, W/4``) in the UNet's space."""
    with torch.no_grad():
        latent = vae.encode(frames.reshape(-1, *frames.shape[2:]))
        return model_patcher.model.process_latent_in(latent.float()).float()


def low_resolution(frames: torch.Tensor) -> torch.Tensor:
    """``[..., H, W, 3]`` -> ``[..., H/4, W/4, 3]``: the frames downscaled 4x (bicubic, antialiased)."""
    pixels = frames.reshape(-1, *frames.shape[-3:]).movedim(-1, 1)
    size = (frames.shape[-3] // SR_SCALE, frames.shape[-2] // SR_SCALE)
    small = torch.nn.functional.interpolate(pixels, size=size, mode="bicubic", align_corners=False, antialias=True)
    return small.clamp(0, 1).movedim(1, -1).reshape(*frames.shape[:-3], *size, frames.shape[-1])


def sr_conditioning(model_patcher, frames: torch.Tensor, x0: torch.Tensor, seed: int, sample_numbers: list[int],
                    noise_augmentation: tuple[float, float]) -> dict[str, torch.Tensor]:
    """The x4 upscaler's extra conditioning of each clip, made by the host as when the Video Upscaler
    samples: the clip's frames ``[clips, F, H, W, 3]`` downscaled 4x go through SD 4x Upscale
    Conditioning (concat image in -1..1), then ``SD_X4Upscaler.extra_conds`` noise-augments them and
    gives the noise level. Each clip's level is drawn uniformly from ``noise_augmentation`` and its
    augmentation noise seeded, both from the sample's number only. ``x0``: the clips' latents
    ``[clips * F, 4, H/4, W/4]``. Returns ``{'c_concat': [clips * F, 3, H/4, W/4], 'y': [clips * F]}``
    for :meth:`AdapterTrainer.loss`."""
    from comfy_extras.nodes_sdupscale import SD_4XUpscale_Conditioning

    base, device = model_patcher.model, model_patcher.load_device
    frames_per_clip = frames.shape[1]
    low, high = noise_augmentation
    parts: dict[str, list[torch.Tensor]] = {}
    for clip, number in enumerate(sample_numbers):
        generator = torch.Generator().manual_seed(derived_seed(seed, "noise augmentation", number))
        level = low + (high - low) * float(torch.rand((), generator=generator))
        augmentation_seed = int(torch.randint(0, 2**62, (), generator=generator))
        conditioned = SD_4XUpscale_Conditioning.execute(low_resolution(frames[clip]), [[None, {}]], [], float(SR_SCALE), level)
        options = conditioned.args[0][0][1]  # {'concat_image': [F, 3, h, w], 'noise_augmentation': level}
        clip_latents = x0[clip * frames_per_clip:(clip + 1) * frames_per_clip]
        # The host's augmentation reseeds the global RNG (torch.manual_seed); keep ours as it was.
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            conds = base.extra_conds(**options, noise=clip_latents, device=device, seed=augmentation_seed)
        for name, cond in conds.items():
            parts.setdefault(name, []).append(cond.process_cond(batch_size=frames_per_clip, area=None).cond)
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def sample_draws(seed: int, sample_numbers: list[int], latent_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and noise of each sample of a shard, from the sample's number only: ``[clips]``
    and ``[clips * F, C, h, w]`` for per-clip latents ``latent_shape`` ``(F, C, h, w)``."""
    timesteps, noise = [], []
    for n in sample_numbers:
        generator = torch.Generator().manual_seed(derived_seed(seed, "noise", n))
        timesteps.append(torch.randint(0, NUM_TIMESTEPS, (1,), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
    return torch.cat(timesteps), torch.cat(noise)


def sample_clip(model_patcher, captions: CaptionEncoder, vae, prompt: str, frames: int, width: int, height: int,
                steps: int, cfg: float, seed: int) -> torch.Tensor:
    """One clip from the model being trained, through the host's sampler (DDIM, the empty prompt as
    negative): ``[F, H, W, 3]`` in 0..1."""
    import comfy.sample

    channels = model_patcher.get_model_object("latent_format").latent_channels
    latent = torch.zeros([frames, channels, height // 8, width // 8])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive, negative = [[captions(prompt), {}]], [[captions(""), {}]]
    with torch.no_grad():
        samples = comfy.sample.sample(
            model_patcher, noise, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, disable_pbar=True, seed=seed,
        )
        return vae.decode(samples).reshape(-1, height, width, 3).float().cpu()


def sample_upscaled_clip(model_patcher, captions: CaptionEncoder, vae, frames: torch.Tensor, prompt: str, steps: int,
                         cfg: float, noise_augmentation: float, seed: int) -> torch.Tensor:
    """The x4 model being trained upscales a clip's frames ``[F, H, W, 3]`` from their 4x downscale,
    as the Video Upscaler does for a clip in one piece (SD 4x Upscale Conditioning, the host's
    sampler; DDIM, the empty prompt as negative). Returns ``[F, H, 3W, 3]``: the low-resolution
    input (bilinear to full size) | the upscaled frames | the original frames, in 0..1."""
    import comfy.sample
    from comfy_extras.nodes_sdupscale import SD_4XUpscale_Conditioning

    low = low_resolution(frames)
    positive, negative, latent = SD_4XUpscale_Conditioning.execute(
        low, [[captions(prompt), {}]], [[captions(""), {}]], float(SR_SCALE), noise_augmentation
    ).args
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        samples = comfy.sample.sample(
            model_patcher, noise, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent["samples"],
            disable_pbar=True, seed=seed,
        )
        upscaled = vae.decode(samples).reshape(frames.shape).float().cpu()
    shown_input = torch.nn.functional.interpolate(low.movedim(-1, 1), size=frames.shape[1:3], mode="bilinear").movedim(1, -1)
    return torch.cat([shown_input, upscaled, frames.float()], dim=2)


# -- the run -------------------------------------------------------------------------------------

def load_collection(options: TrainingOptions):
    if options.csv is not None:
        return read_csv(options.csv, options.data)
    return find_clips(options.data)


def check_output(options: TrainingOptions) -> Path:
    """The state path; refuses to start a fresh run over an earlier one."""
    output = Path(options.output)
    state_path = output / STATE_NAME
    if output.exists() and not output.is_dir():
        raise TrainingSetupError(f"the output '{output}' is a file; pass a folder.")
    if not options.resume:
        earlier = [p.name for p in (output.glob(f"{ADAPTER_PREFIX}*.safetensors") if output.is_dir() else [])]
        if state_path.exists() or earlier:
            raise TrainingSetupError(
                f"the output folder '{output}' already holds a training run ({STATE_NAME if state_path.exists() else earlier[0]}); "
                "pass --resume to continue it, or choose another output folder."
            )
    elif not state_path.is_file():
        raise TrainingSetupError(f"--resume: there is no {STATE_NAME} in '{output}'; start without --resume.")
    return state_path


def load_host_model(options: TrainingOptions):
    """MODEL, CLIP and VAE from the checkpoint, through the host's own loader, and the family."""
    import comfy.model_management
    import comfy.sd

    on_cuda = comfy.model_management.get_torch_device().type == "cuda"
    unet_dtype = torch.float16 if (options.mixed_precision and on_cuda) else torch.float32
    try:
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(options.checkpoint), output_vae=True, output_clip=True, model_options={"dtype": unet_dtype},
            # the host keeps the text encoder in fp16 even on the CPU, where fp16 matmuls are many times slower
            te_model_options={} if on_cuda else {"dtype": torch.float32},
        )
    except RuntimeError as e:
        reason = " ".join(str(e).split()).removeprefix("ERROR: ")
        raise TrainingSetupError(
            f"ComfyUI could not load '{options.checkpoint}' ({reason}); pass an SD1.x checkpoint (or the SD x4 upscaler) "
            "with UNet, text encoder and VAE in one file."
        ) from None
    if model is None or clip is None or vae is None:
        raise TrainingSetupError(
            f"'{Path(options.checkpoint).name}' lacks a UNet, text encoder or VAE; the trainer needs a full SD1.x checkpoint "
            "(or the full SD x4 upscaler, e.g. x4-upscaler-ema.safetensors)."
        )
    family = model_family(model)
    if family not in TRAINABLE_FAMILIES:
        raise TrainingSetupError(
            f"'{Path(options.checkpoint).name}' is a {family} checkpoint; SimDA adapters train on an SD1.x (or SD2.x) "
            "UNet, super-resolution adapters on the SD x4 upscaler: pass an SD1.5 checkpoint or x4-upscaler-ema.safetensors."
        )
    return model, clip, vae, family


def prepare_training(model, family: str, options: TrainingOptions, state: dict | None, processes: Processes):
    """A SimDA-patched clone of ``model`` (latent shift on) with trainable adapters, fresh or from
    ``state``, the same in every process, loaded by the host and ready for backward; its trainer."""
    import comfy.model_management

    device = model.load_device
    adapters = initial_adapters(model_sites(model), derived_seed(options.seed, "adapters"), device)
    if state:
        try:
            adapters.load_file_state_dict({k: v.to(device) for k, v in state["adapters"].items()})
        except KeyError as e:
            raise TrainingSetupError(
                f"--resume: the saved adapters do not fit this checkpoint's UNet ({e.args[0]}); resume with the checkpoint "
                "the run started from."
            ) from None
    processes.broadcast_(adapters)
    training = model.clone()
    apply_simda(training, SimDAConfig(
        adapters=adapters, family=family, latent_shift=LatentShiftSettings(),
        gradient_checkpointing=options.gradient_checkpointing,
    ))
    comfy.model_management.load_models_gpu([training])
    make_base_trainable(training.model.diffusion_model)
    recipe = TuningRecipe(
        steps=options.steps, learning_rate=options.learning_rate, mixed_precision=options.mixed_precision,
        gradient_checkpointing=options.gradient_checkpointing,
    )
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
        log.info("SimDA trainer: %d clips; global batch %d = %d per process x %d process%s; %d frames every %d at %dx%d; "
                 "steps %d -> %d", len(entries), global_batch, options.batch_per_process, processes.world,
                 "es" if processes.world > 1 else "", options.frames, options.stride, options.width, options.height,
                 start_step, options.steps)
        if state:
            changed = resume_differences(state.get("options", {}), options)
            if changed:
                log.warning("SimDA trainer: resuming with changed settings (%s).", "; ".join(changed))
            if int(state.get("global_batch", global_batch)) != global_batch:
                log.warning("SimDA trainer: the global batch changes from %s to %d; the data order changes with it.",
                            state.get("global_batch"), global_batch)

    import comfy.model_management
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
            log.info("SimDA trainer: super-resolution: %dx%d frames from their %dx%d downscale, noise augmentation %g..%g",
                     options.width, options.height, options.width // SR_SCALE, options.height // SR_SCALE,
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
    sample_frames = None  # super-resolution samples: one fixed clip of the collection, loaded when first needed

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
        comfy.model_management.load_models_gpu([training])  # no-op unless encoding moved it out
        make_base_trainable(training.model.diffusion_model)
        conds = None
        if super_resolution:
            conds = sr_conditioning(training, frames, x0, options.seed, numbers, options.noise_augmentation)
        loss = trainer.loss(x0, context, clips, timesteps=timesteps, noise=noise, conds=conds)
        trainer.backward_and_update(loss, reduce_gradients=processes.average_gradients)
        value = processes.mean(loss)
        losses.append(value)
        done = step + 1
        if not math.isfinite(value):
            raise FloatingPointError(
                f"the loss became {value} at step {done}; lower --lr or resume from the last checkpoint "
                "with mixed precision off (--no-mixed-precision)."
            )
        if processes.is_main:
            progress.set_postfix(loss=f"{value:.4f}", refresh=False)
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
                    if sample_frames is None:
                        sample_frames = dataset[(0, derived_seed(options.seed, "sample clip"))]
                    clip_frames = sample_upscaled_clip(
                        training, captions, vae, sample_frames["frames"], options.sample_prompt or sample_frames["caption"],
                        options.sample_steps, options.sample_cfg, options.noise_augmentation[0], options.seed,
                    )
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
        log.info("SimDA trainer: %d steps in %.1f s (%.2f s/step), final loss %.5f; output in %s", trained, elapsed,
                 elapsed / max(1, trained), losses[-1] if losses else float("nan"), output)
    return output


def main(options: TrainingOptions) -> int:
    """Run the trainer in this process (one of ``torchrun``'s, or alone). Returns the exit code:
    0 done; 2 the run could not start (nothing was written) or no clip of the collection could be
    sampled; 3 the loss diverged (resume from the last checkpoint). The message says which."""
    processes = init_processes()
    try:
        run(options, processes)
        return 0
    except (TrainingSetupError, VideoDataError, AdapterFileError, FloatingPointError) as e:
        if processes.is_main:
            print(f"SimDA trainer: error: {e}", file=sys.stderr)
        return 3 if isinstance(e, FloatingPointError) else 2
    finally:
        if processes.distributed and dist.is_initialized():
            dist.destroy_process_group()

