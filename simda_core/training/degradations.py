"""Degradations that make the low-resolution input of super-resolution training.

The SD x4 upscaler meets diffusion-made clips and compressed videos, not clean bicubic
downscales. Following the video SR literature (blur, resize, noise, compression, each with random
parameters), a clip's high-resolution frames ``[F, H, W, 3]`` in 0..1 become its input
``[F, H/4, W/4, 3]`` through, in this order:

1. blur (probability ``blur_probability``): an axis-aligned Gaussian with independent sigmas per
   axis (``kornia.filters.gaussian_blur2d``) or, with probability ``motion_blur_probability``
   among blurred clips, a motion streak at a random angle (``kornia.filters.motion_blur``);
2. the 4x downscale, with a method drawn from ``resize_modes`` (bilinear and bicubic antialiased
   or not at random, area, nearest; ``torch.nn.functional.interpolate``);
3. noise (probability ``noise_probability``): Gaussian noise of a random sigma, or Poisson-like
   noise whose variance follows the signal (``torch.poisson`` on the image times a random peak
   count); either, with probability ``gray_noise_probability``, the same for all three channels;
4. JPEG compression (probability ``jpeg_probability``) at a random quality
   (``kornia.enhance.jpeg_codec_differentiable``, the 8x8 DCT quantisation of JPEG in torch).

Temporal coherence: every parameter (whether a stage runs, kernel, angle, resize method, noise
kind and level, JPEG quality) is drawn once per clip, so all frames of a clip get the same
degradation. Only the noise *realisation* differs from frame to frame, as a camera's sensor noise
does; it comes from the clip's own generator. The draw depends on ``(seed, step, clip)`` only
(:func:`draw_degradation`), so a step's degradations are reproduced exactly on resume, on any
number of processes, and whatever order the clips are made in.

``DegradationConfig.kind = "bicubic"`` keeps the clean 4x bicubic (antialiased) downscale.

Parameter draws use our own seeded ``torch.Generator`` rather than ``kornia.augmentation``'s
random modules, whose draws come from the global RNG and would tie the result to everything
else that consumed it; the kornia filters and codec those modules call do the pixel work.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import kornia
import torch

SCALE = 4
KINDS = ("bicubic", "realistic")
RESIZE_MODES = ("bilinear", "bicubic", "area", "nearest-exact")


@dataclass(frozen=True)
class DegradationConfig:
    """The ranges degradations are drawn from (each a ``(min, max)``, drawn uniformly; the Poisson
    peak log-uniformly). Blur sigmas and motion lengths are in **high-resolution** pixels (the blur
    runs before the downscale), noise sigmas on the 0..1 pixel scale, JPEG quality 1..100."""

    kind: str = "realistic"
    scale: int = SCALE
    blur_probability: float = 0.8
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    motion_blur_probability: float = 0.2
    motion_blur_length: tuple[int, int] = (3, 11)
    resize_modes: tuple[str, ...] = RESIZE_MODES
    noise_probability: float = 0.8
    poisson_probability: float = 0.4
    gaussian_sigma: tuple[float, float] = (1.0 / 255, 15.0 / 255)
    poisson_peak: tuple[float, float] = (60.0, 2000.0)
    gray_noise_probability: float = 0.4
    jpeg_probability: float = 0.8
    jpeg_quality: tuple[float, float] = (35.0, 95.0)

    def check(self) -> None:
        """Raise a ValueError saying what to change when a setting is out of range."""
        if self.kind not in KINDS:
            raise ValueError(f"degradation kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.scale < 1:
            raise ValueError(f"degradation scale must be at least 1, not {self.scale}")
        for name in ("blur_probability", "motion_blur_probability", "noise_probability", "poisson_probability",
                     "gray_noise_probability", "jpeg_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in 0..1, not {value}")
        for name, lowest in (("blur_sigma", 0.0), ("motion_blur_length", 3), ("gaussian_sigma", 0.0),
                             ("poisson_peak", 1e-3), ("jpeg_quality", 1.0)):
            low, high = getattr(self, name)
            if not lowest <= low <= high:
                raise ValueError(f"{name} must be a range MIN MAX with {lowest} <= MIN <= MAX, not {low} {high}")
        if self.jpeg_quality[1] > 100:
            raise ValueError(f"jpeg_quality must lie in 1..100, not up to {self.jpeg_quality[1]}")
        unknown = [m for m in self.resize_modes if m not in RESIZE_MODES]
        if not self.resize_modes or unknown:
            raise ValueError(f"resize_modes must be some of {', '.join(RESIZE_MODES)}, not {list(self.resize_modes)}")

    def as_record(self) -> dict:
        """Plain values (lists for ranges) for run settings and file metadata."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_record(cls, record: dict) -> "DegradationConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})


@dataclass(frozen=True)
class ClipDegradation:
    """One clip's draw: what every frame of the clip goes through. ``None`` = stage skipped."""

    blur_sigma: tuple[float, float] | None = None        # (sigma_y, sigma_x), high-res pixels
    motion_blur: tuple[int, float, float] | None = None  # (kernel size, angle in degrees, direction -1..1)
    resize_mode: str = "bicubic"
    antialias: bool = True
    gaussian_sigma: float | None = None
    poisson_peak: float | None = None
    gray_noise: bool = False
    jpeg_quality: float | None = None
    noise_seed: int = 0


def clip_seed(seed: int, step: int, clip: int) -> int:
    """A 63-bit seed from ``(seed, step, clip)`` alone (stable across runs and Python versions)."""
    digest = hashlib.sha256(f"simda degradation {seed} {step} {clip}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def draw_degradation(config: DegradationConfig, seed: int, step: int, clip: int) -> ClipDegradation:
    """The degradation of clip ``clip`` of training step ``step``: one draw for the whole clip."""
    if config.kind == "bicubic":
        return ClipDegradation()
    generator = torch.Generator().manual_seed(clip_seed(seed, step, clip))

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))

    def chance(probability: float) -> bool:
        return uniform(0.0, 1.0) < probability

    # Every draw is made whether or not its stage runs, so one setting never shifts the others.
    blurred, motion = chance(config.blur_probability), chance(config.motion_blur_probability)
    sigma = (uniform(*config.blur_sigma), uniform(*config.blur_sigma))
    length = int(torch.randint(config.motion_blur_length[0], config.motion_blur_length[1] + 1, (), generator=generator))
    angle, direction = uniform(0.0, 180.0), uniform(-1.0, 1.0)
    mode = config.resize_modes[int(torch.randint(len(config.resize_modes), (), generator=generator))]
    antialias = chance(0.5)
    noisy, poisson, gray = (
        chance(config.noise_probability), chance(config.poisson_probability), chance(config.gray_noise_probability)
    )
    gaussian_sigma = uniform(*config.gaussian_sigma)
    # Peak counts spread over orders of magnitude: draw their logarithm uniformly.
    log_low, log_high = torch.tensor(config.poisson_peak, dtype=torch.float64).log().tolist()
    peak = float(torch.tensor(uniform(log_low, log_high)).exp())
    compressed, quality = chance(config.jpeg_probability), uniform(*config.jpeg_quality)
    noise_seed = int(torch.randint(0, 2**62, (), generator=generator))

    return ClipDegradation(
        blur_sigma=sigma if blurred and not motion else None,
        motion_blur=(length | 1, angle, direction) if blurred and motion else None,
        resize_mode=mode,
        antialias=antialias and mode in ("bilinear", "bicubic"),
        gaussian_sigma=gaussian_sigma if noisy and not poisson else None,
        poisson_peak=peak if noisy and poisson else None,
        gray_noise=gray,
        jpeg_quality=quality if compressed else None,
        noise_seed=noise_seed,
    )


def _blur_kernel_size(sigma: float) -> int:
    """Odd kernel width covering +-3 sigma."""
    return 2 * max(1, int(3.0 * sigma + 0.5)) + 1


def _reflect_safe(size: int, height: int, width: int) -> int:
    """Reflection padding needs the pad below the image size: shrink the kernel for tiny frames."""
    largest = 2 * (min(height, width) - 1) - 1
    return max(1, min(size, largest if largest % 2 else largest - 1))


def apply_degradation(frames: torch.Tensor, degradation: ClipDegradation, scale: int = SCALE) -> torch.Tensor:
    """One clip's frames ``[F, H, W, 3]`` in 0..1 -> ``[F, H/scale, W/scale, 3]`` in 0..1, all frames
    through the same ``degradation``."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {list(frames.shape)}")
    count, height, width = frames.shape[:3]
    size = (height // scale, width // scale)
    if min(size) < 1:
        raise ValueError(f"frames of {height}x{width} are too small for a {scale}x downscale")
    x = frames.movedim(-1, 1).float()  # [F, 3, H, W]

    if degradation.blur_sigma is not None:
        ky, kx = (_reflect_safe(_blur_kernel_size(s), height, width) for s in degradation.blur_sigma)
        x = kornia.filters.gaussian_blur2d(x, (ky, kx), degradation.blur_sigma, border_type="reflect")
    if degradation.motion_blur is not None:
        length, angle, direction = degradation.motion_blur
        length = _reflect_safe(length, height, width)
        if length >= 3:
            x = kornia.filters.motion_blur(x, length, angle, direction, border_type="reflect")

    smooth = degradation.resize_mode in ("bilinear", "bicubic")
    x = torch.nn.functional.interpolate(
        x, size=size, mode=degradation.resize_mode, antialias=degradation.antialias and smooth,
        align_corners=False if smooth else None,
    )
    x = x.clamp(0, 1)

    if degradation.gaussian_sigma is not None or degradation.poisson_peak is not None:
        generator = torch.Generator(device=x.device).manual_seed(degradation.noise_seed)
        channels = 1 if degradation.gray_noise else 3
        if degradation.gaussian_sigma is not None:
            noise = (
                torch.randn((count, channels, *size), generator=generator, device=x.device) * degradation.gaussian_sigma
            )
        else:
            # Poisson-like: photon counts at ``peak`` for white. Gray noise takes the counts of the
            # luma and adds its deviation to every channel.
            peak = degradation.poisson_peak
            signal = kornia.color.rgb_to_grayscale(x) if degradation.gray_noise else x
            noise = torch.poisson(signal * peak, generator=generator) / peak - signal
        x = (x + noise).clamp(0, 1)

    if degradation.jpeg_quality is not None:
        x = jpeg(x, degradation.jpeg_quality)

    return x.movedim(1, -1).to(frames.dtype)


def jpeg(images: torch.Tensor, quality: float) -> torch.Tensor:
    """``[B, 3, h, w]`` in 0..1 through kornia's JPEG codec at ``quality``. The image is padded
    (edge pixels repeated) to whole 16x16 macroblocks and cropped back, as an encoder does;
    kornia 0.7 refuses other sizes."""
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (0, -width % 16, 0, -height % 16), mode="replicate")
    quality_per_image = torch.full((images.shape[0],), float(quality), device=images.device, dtype=images.dtype)
    return kornia.enhance.jpeg_codec_differentiable(padded, quality_per_image)[..., :height, :width].clamp(0, 1)


def degrade_clip(frames: torch.Tensor, config: DegradationConfig, seed: int, step: int, clip: int) -> torch.Tensor:
    """``[F, H, W, 3]`` -> ``[F, H/scale, W/scale, 3]``: the low-resolution input of clip ``clip`` of
    step ``step`` (bicubic: the clean antialiased downscale, the same for every draw)."""
    return apply_degradation(frames, draw_degradation(config, seed, step, clip), config.scale)
