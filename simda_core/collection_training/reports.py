"""What a run shows of itself: the loss curve (PNG drawn with PIL, CSV) and sample clips from the
model being trained (animated WEBP)."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

from .conditioning import SR_SCALE, CaptionEncoder, low_resolution
from .state import atomic_write

LOSS_PNG, LOSS_CSV = "loss.png", "loss.csv"


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

