"""What a run shows of itself: the loss curve (PNG drawn with PIL, CSV) and sample clips from the
model being trained (animated WEBP); for super-resolution, side-by-side pictures (PNG, MP4) of one
clip upscaled by the plain x4 model and by the model being trained, with their quality scores."""
from __future__ import annotations

import csv
import math
import textwrap
from pathlib import Path

import torch

from ...host.samplers import sample_ddim
from ...host.x4 import x4_conditioning
from .. import quality
from ..degradations import draw_degradation
from ..video_data import ClipSampling, derived_seed, load_sample
from .conditioning import CaptionEncoder, SR_SCALE, low_resolution
from .options import TrainingOptions
from .state import atomic_write

LOSS_PNG, LOSS_CSV = "loss.png", "loss.csv"
SR_SAMPLE = "sr_sample"
"""``sr_sample.png`` / ``.mp4`` next to ``loss.png``: the latest side-by-side picture of a super-resolution run."""
SR_PANELS = ("low-res input", "plain x4", "SimDA (training)", "ground truth")


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
    channels = model_patcher.get_model_object("latent_format").latent_channels
    latent = torch.zeros([frames, channels, height // 8, width // 8])
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    positive, negative = captions.conditioning(prompt, width, height), captions.conditioning("", width, height)
    with torch.no_grad():
        samples = sample_ddim(model_patcher, noise, steps, cfg, positive, negative, latent, seed)
        return vae.decode(samples).reshape(-1, height, width, 3).float().cpu()


def upscale_clip(model_patcher, captions: CaptionEncoder, vae, low: torch.Tensor, prompt: str, steps: int, cfg: float,
                 noise_augmentation: float, seed: int) -> torch.Tensor:
    """An x4 MODEL upscales a clip's low-resolution frames ``[F, h, w, 3]`` to ``[F, 4h, 4w, 3]`` as
    the Video Upscaler does for a clip in one piece (SD 4x Upscale Conditioning, the host's sampler;
    DDIM, the empty prompt as negative), in 0..1."""
    positive, negative, latent = x4_conditioning("the SimDA trainer").execute(
        low, [[captions(prompt), {}]], [[captions(""), {}]], float(SR_SCALE), noise_augmentation
    ).args
    noise = torch.randn(latent["samples"].shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        samples = sample_ddim(model_patcher, noise, steps, cfg, positive, negative, latent["samples"], seed)
        frames = low.shape[0]
        return vae.decode(samples).reshape(frames, low.shape[1] * SR_SCALE, low.shape[2] * SR_SCALE, 3).float().cpu()


def blown_up(low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Low-resolution frames ``[F, h, w, 3]`` shown at ``size`` with their pixels as blocks (nearest)."""
    return torch.nn.functional.interpolate(low.movedim(-1, 1).float(), size=size, mode="nearest").movedim(1, -1)


def side_by_side_png(panels: list[torch.Tensor], labels: list[str], caption: str, path: Path, rows: int = 4) -> None:
    """Clips ``[F, H, W, 3]`` as columns, up to ``rows`` evenly spaced frames as rows, a label over
    each column and a caption line on top; PNG, written atomically."""
    from PIL import Image, ImageDraw

    count, height, width = panels[0].shape[:3]
    picked = sorted({round(i * (count - 1) / max(1, rows - 1)) for i in range(min(rows, count))})
    gap, line = 4, 14
    total_width = len(panels) * (width + gap) - gap
    columns = max(20, total_width // 6)  # PIL's default font: about 6 pixels a character
    lines = textwrap.wrap(caption, columns) + [""]
    label_lines = [textwrap.wrap(label, max(4, width // 6)) for label in labels]
    top = line * (len(lines) + max(len(w) for w in label_lines)) + 2
    image = Image.new("RGB", (total_width, top + len(picked) * (height + gap) - gap), "white")
    draw = ImageDraw.Draw(image)
    for k, text in enumerate(lines):
        draw.text((2, 2 + k * line), text, fill=(0, 0, 0))
    for column, (panel, wrapped) in enumerate(zip(panels, label_lines)):
        x = column * (width + gap)
        for k, text in enumerate(wrapped):
            draw.text((x + 2, 2 + (len(lines) + k) * line), text, fill=(0, 0, 0))
        for row, frame in enumerate(picked):
            pixels = (panel[frame].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            image.paste(Image.fromarray(pixels), (x, top + row * (height + gap)))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_mp4(frames: torch.Tensor, path: Path, fps: int = 8) -> None:
    """``[F, H, W, 3]`` 0..1 -> an H.264 MP4 (MPEG-4 part 2 where PyAV has no H.264 encoder), written
    atomically; odd sizes are padded by one pixel (yuv420p needs even sides)."""
    import av

    pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = torch.nn.functional.pad(
        pixels.movedim(-1, 1), (0, pixels.shape[2] % 2, 0, pixels.shape[1] % 2)
    ).movedim(1, -1)
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"

    def write(tmp: Path) -> None:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream(codec, rate=fps)
            stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
            if codec == "libx264":
                stream.options = {"crf": "16"}
            for frame in pixels.numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode(None))

    atomic_write(path, write)


class UpscalingSamples:
    """The sample pictures of a super-resolution run. One clip (``--sample-clip``, held out from the
    collection, else a fixed clip of it) at the training size is the ground truth; its input is
    made as training inputs are (the run's degradation, one fixed draw); the plain x4 model's upscale
    is made once (the base is frozen); at each sample step the model being trained upscales it.
    Each step writes, in ``samples/``: ``stepN.png`` (rows of frames: input | plain x4 | SimDA |
    ground truth, with PSNR, SSIM and temporal consistency against the ground truth), ``stepN.mp4``
    (the four side by side), ``stepN.webp`` (input | SimDA | ground truth, animated); a line of
    ``quality.csv``; and the latest PNG and MP4 as ``sr_sample.png`` / ``.mp4`` next to ``loss.png``."""

    def __init__(self, options: TrainingOptions, dataset, output: Path):
        self.options, self.dataset, self.output = options, dataset, Path(output)
        self.truth: torch.Tensor | None = None
        self.plain: torch.Tensor | None = None

    def _prepare(self, base_model, captions: CaptionEncoder, vae) -> None:
        options = self.options
        if options.sample_clip is not None:
            sampling = ClipSampling(options.frames, options.stride, options.width, options.height, "center")
            self.truth = load_sample(Path(options.sample_clip), sampling, derived_seed(options.seed, "sample clip"))
            self.source, self.prompt = f"held-out clip {Path(options.sample_clip).name}", options.sample_prompt
        else:
            sample = self.dataset[(0, derived_seed(options.seed, "sample clip"))]
            self.truth, self.source = sample["frames"], "a clip of the training collection (not held out)"
            self.prompt = options.sample_prompt or sample["caption"]
        degradation = draw_degradation(options.degradation, derived_seed(options.seed, "sample degradation"), 0, 0)
        self.low = low_resolution(self.truth, degradation)
        self.plain = upscale_clip(
            base_model, captions, vae, self.low, self.prompt, options.sample_steps, options.sample_cfg,
            options.noise_augmentation[0], options.seed,
        )

    def scores(self, clip: torch.Tensor) -> dict[str, float]:
        return {
            "psnr": quality.psnr(clip, self.truth),
            "ssim": quality.ssim(clip, self.truth),
            "temporal_consistency": (
                quality.temporal_consistency(clip, self.truth) if clip.shape[0] > 1 else float("nan")
            ),
        }

    def write(self, base_model, model_patcher, captions: CaptionEncoder, vae, step: int) -> Path:
        """The pictures of step ``step``; returns the PNG's path."""
        if self.truth is None:
            self._prepare(base_model, captions, vae)
        options = self.options
        ours = upscale_clip(
            model_patcher, captions, vae, self.low, self.prompt, options.sample_steps, options.sample_cfg,
            options.noise_augmentation[0], options.seed,
        )
        size = tuple(self.truth.shape[1:3])
        panels = [blown_up(self.low, size), self.plain, ours, self.truth.float()]
        plain_scores, our_scores = self.scores(self.plain), self.scores(ours)

        def shown(scores: dict[str, float]) -> str:
            return "PSNR {psnr:.2f} dB, SSIM {ssim:.3f}, temporal {temporal_consistency:.3f}".format(**scores)

        caption = (f"step {step}, {self.source}, input: {options.degradation.kind}. Plain x4: {shown(plain_scores)}. "
                   f"SimDA: {shown(our_scores)}.")
        samples = self.output / "samples"
        png, mp4 = samples / f"step{step:06d}.png", samples / f"step{step:06d}.mp4"
        side_by_side_png(panels, list(SR_PANELS), caption, png)
        write_mp4(torch.cat(panels, dim=2), mp4)
        write_animation(torch.cat([panels[0], ours, panels[3]], dim=2), samples / f"step{step:06d}.webp")
        for source, target in ((png, self.output / f"{SR_SAMPLE}.png"), (mp4, self.output / f"{SR_SAMPLE}.mp4")):
            data = source.read_bytes()
            atomic_write(target, lambda tmp: tmp.write_bytes(data))
        self._append_scores(step, plain_scores, our_scores)
        return png

    def _append_scores(self, step: int, plain: dict[str, float], ours: dict[str, float]) -> None:
        path = self.output / "samples" / "quality.csv"
        names = list(plain)
        lines = path.read_text().splitlines() if path.is_file() else [
            ",".join(["step", *(f"plain_{n}" for n in names), *(f"simda_{n}" for n in names)])
        ]
        lines.append(",".join([str(step), *(f"{plain[n]:.6g}" for n in names), *(f"{ours[n]:.6g}" for n in names)]))
        text = "\n".join(lines) + "\n"
        atomic_write(path, lambda tmp: tmp.write_text(text))
