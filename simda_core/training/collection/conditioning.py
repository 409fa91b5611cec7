"""A training batch made into the UNet's inputs: captions to CLIP context, frames to latents, the
x4 upscaler's low-resolution conditioning, and each sample's timestep and noise from its number."""
from __future__ import annotations

import torch

from ...host.x4 import x4_conditioning
from ...video.prompt_schedule import common_token_length, repeat_tokens
from ..degradations import ClipDegradation, DegradationConfig, apply_degradation, draw_degradation
from ..trainer import NUM_TIMESTEPS
from ..video_data import derived_seed

SR_SCALE = 4
"""Output pixels per input pixel of the x4 upscaler (its latent has the input's size)."""


class CaptionEncoder:
    """Captions -> CLIP context ``[1, tokens, dim]`` and pooled text ``[1, dim]`` (None where the
    text encoder gives none) on the CPU, the most recent ones cached."""

    def __init__(self, clip, cache_size: int = 1024):
        self.clip = clip
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.cache_size = cache_size

    def encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(context, pooled)`` of one caption, as CLIP Text Encode gives them."""
        encoded = self.cache.pop(caption, None)
        if encoded is None:
            with torch.no_grad():
                context, options = self.clip.encode_from_tokens_scheduled(self.clip.tokenize(caption))[0]
            pooled = options.get("pooled_output")
            encoded = (context.float().cpu(), pooled.float().cpu() if pooled is not None else None)
        self.cache[caption] = encoded
        while len(self.cache) > self.cache_size:
            self.cache.pop(next(iter(self.cache)))
        return encoded

    def __call__(self, caption: str) -> torch.Tensor:
        return self.encode(caption)[0]

    def conditioning(self, caption: str, width: int, height: int) -> list:
        """A CONDITIONING of ``caption`` for frames of ``width x height`` pixels: the pooled text
        and the frame size, which SDXL's ADM embeds (other families ignore them)."""
        context, pooled = self.encode(caption)
        options = {"width": width, "height": height}
        if pooled is not None:
            options["pooled_output"] = pooled
        return [[context, options]]

    def context(self, captions: list[str], frames: int) -> torch.Tensor:
        """``[clips * frames, tokens, dim]``: each clip's caption for each of its frames. Captions
        longer than one 77-token chunk are repeated to a common length, as the host concatenates
        conditionings (attention over a key set repeated whole is unchanged)."""
        conds = [self(c) for c in captions]
        tokens = common_token_length([c.shape[1] for c in conds])
        conds = [repeat_tokens(c, tokens) for c in conds]
        return torch.cat([c.expand(frames, -1, -1) for c in conds])

    def model_conds(
        self, model_patcher, captions: list[str], frames: int, width: int, height: int
    ) -> dict[str, torch.Tensor]:
        """The model's extra conditioning of each clip, made by the host's ``extra_conds`` from the
        clip's caption at the clips' frame size, as when it samples a CLIP Text Encode output:
        SDXL's ADM vector (pooled CLIP-G text + size embeddings, crop 0, target = frame size),
        ``{'y': [clips * frames, 2816]}``; ``{}`` for a model without one (SD1.x, SD2.x)."""
        base, device = model_patcher.model, model_patcher.load_device
        parts: dict[str, list[torch.Tensor]] = {}
        for caption in captions:
            (context, options), = self.conditioning(caption, width, height)
            conds = base.extra_conds(**options, device=device)
            for name, cond in conds.items():
                parts.setdefault(name, []).append(cond.process_cond(batch_size=frames, area=None).cond)
        return {name: torch.cat(tensors) for name, tensors in parts.items()}


def encode_frames(vae, model_patcher, frames: torch.Tensor) -> torch.Tensor:
    """``[clips, F, H, W, 3]`` 0..1 -> clean latents ``[clips * F, C, H/8, W/8]`` (the x4 upscaler's:
    ``H/4, W/4``) in the UNet's space."""
    with torch.no_grad():
        latent = vae.encode(frames.reshape(-1, *frames.shape[2:]))
        return model_patcher.model.process_latent_in(latent.float()).float()


def low_resolution(frames: torch.Tensor, degradation: ClipDegradation | None = None) -> torch.Tensor:
    """``[..., H, W, 3]`` -> ``[..., H/4, W/4, 3]``: the frames downscaled 4x, clean (bicubic,
    antialiased) or through ``degradation`` (one clip's draw, the same on every frame)."""
    flat = frames.reshape(-1, *frames.shape[-3:])
    small = apply_degradation(flat, degradation or ClipDegradation(), SR_SCALE)
    return small.reshape(*frames.shape[:-3], *small.shape[1:])


def clip_degradations(config: DegradationConfig, seed: int, step: int, slots) -> list[ClipDegradation]:
    """The degradation of each clip of this process's shard: one draw per clip from the run's seed,
    the step and the clip's slot in the global batch (``simda_core.training.degradations``), so a step's
    inputs are the same on resume and on any number of processes."""
    return [draw_degradation(config, seed, step, slot) for slot in slots]


def sr_conditioning(model_patcher, frames: torch.Tensor, x0: torch.Tensor, seed: int, sample_numbers: list[int],
                    noise_augmentation: tuple[float, float],
                    degradations: list[ClipDegradation] | None = None) -> dict[str, torch.Tensor]:
    """The x4 upscaler's extra conditioning of each clip, made by the host as when the Video Upscaler
    samples: the clip's frames ``[clips, F, H, W, 3]`` downscaled 4x (clean bicubic, or through the
    clip's entry of ``degradations``: blur, resize, noise, JPEG) go through SD 4x Upscale
    Conditioning (concat image in -1..1), then ``SD_X4Upscaler.extra_conds`` noise-augments them and
    gives the noise level. Each clip's level is drawn uniformly from ``noise_augmentation`` and its
    augmentation noise seeded, both from the sample's number only. ``x0``: the clips' latents
    ``[clips * F, 4, H/4, W/4]``. Returns ``{'c_concat': [clips * F, 3, H/4, W/4], 'y': [clips * F]}``
    for :meth:`AdapterTrainer.loss`."""
    base, device = model_patcher.model, model_patcher.load_device
    frames_per_clip = frames.shape[1]
    low, high = noise_augmentation
    if degradations is not None and len(degradations) != len(sample_numbers):
        raise ValueError(f"{len(degradations)} degradations for {len(sample_numbers)} clips")
    parts: dict[str, list[torch.Tensor]] = {}
    for clip, number in enumerate(sample_numbers):
        generator = torch.Generator().manual_seed(derived_seed(seed, "noise augmentation", number))
        level = low + (high - low) * float(torch.rand((), generator=generator))
        augmentation_seed = int(torch.randint(0, 2**62, (), generator=generator))
        clip_input = low_resolution(frames[clip], degradations[clip] if degradations is not None else None)
        conditioned = x4_conditioning("the SimDA trainer").execute(clip_input, [[None, {}]], [], float(SR_SCALE), level)
        options = conditioned.args[0][0][1]  # {'concat_image': [F, 3, h, w], 'noise_augmentation': level}
        clip_latents = x0[clip * frames_per_clip:(clip + 1) * frames_per_clip]
        # The host's augmentation reseeds the global RNG (torch.manual_seed); keep ours as it was.
        with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
            conds = base.extra_conds(**options, noise=clip_latents, device=device, seed=augmentation_seed)
        for name, cond in conds.items():
            parts.setdefault(name, []).append(cond.process_cond(batch_size=frames_per_clip, area=None).cond)
    return {name: torch.cat(tensors) for name, tensors in parts.items()}


def sample_draws(
    seed: int, sample_numbers: list[int], latent_shape: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and noise of each sample of a shard, from the sample's number only: ``[clips]``
    and ``[clips * F, C, h, w]`` for per-clip latents ``latent_shape`` ``(F, C, h, w)``."""
    timesteps, noise = [], []
    for n in sample_numbers:
        generator = torch.Generator().manual_seed(derived_seed(seed, "noise", n))
        timesteps.append(torch.randint(0, NUM_TIMESTEPS, (1,), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
    return torch.cat(timesteps), torch.cat(noise)

