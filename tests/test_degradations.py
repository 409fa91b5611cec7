"""Realistic degradations for super-resolution training (simda_core/training/degradations.py): one draw per
clip from (seed, step, clip), the same degradation on every frame, each stage doing what it says
(blur, random resize, Gaussian and Poisson-like noise, JPEG), the clean bicubic kind unchanged."""
from __future__ import annotations

import io
from dataclasses import replace

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import kornia
import numpy
import pytest
import torch
from PIL import Image

from simda_pack.simda_core.training.degradations import (
    ClipDegradation, DegradationConfig, RESIZE_MODES, apply_degradation, degrade_clip, draw_degradation,
)

NONE = DegradationConfig(blur_probability=0.0, noise_probability=0.0, jpeg_probability=0.0)
"""Realistic kind with every optional stage off: only the random resize."""


def detailed_frames(frames: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``[F, size, size, 3]``: a sharp checkerboard with random colour noise, panning right."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size + 2 * frames), indexing="ij")
    board = ((yy // 4 + xx // 4) % 2).float()[..., None].expand(-1, -1, 3)
    scene = (0.2 + 0.6 * board + 0.1 * torch.rand(board.shape, generator=generator)).clamp(0, 1)
    return torch.stack([scene[:, 2 * t:2 * t + size] for t in range(frames)])


def high_frequency(frames: torch.Tensor) -> float:
    """Mean absolute Laplacian: how much fine detail a clip holds."""
    return float(kornia.filters.laplacian(frames.movedim(-1, 1), 3).abs().mean())


def test_bicubic_kind_is_the_clean_antialiased_downscale():
    frames = detailed_frames()
    clean = torch.nn.functional.interpolate(frames.movedim(-1, 1), size=(16, 16), mode="bicubic", align_corners=False,
                                            antialias=True).clamp(0, 1).movedim(1, -1)
    config = DegradationConfig(kind="bicubic")
    for step, clip in [(0, 0), (5, 3)]:
        assert draw_degradation(config, 7, step, clip) == ClipDegradation()
        assert torch.equal(degrade_clip(frames, config, 7, step, clip), clean)


def test_seeded_and_reproducible_per_step_and_clip():
    frames, config = detailed_frames(), DegradationConfig()
    first = degrade_clip(frames, config, seed=3, step=10, clip=1)
    assert torch.equal(first, degrade_clip(frames.clone(), config, seed=3, step=10, clip=1))
    assert draw_degradation(config, 3, 10, 1) == draw_degradation(config, 3, 10, 1)
    draws = {draw_degradation(config, seed, step, clip) for seed in (3, 4) for step in (10, 11) for clip in (0, 1)}
    assert len(draws) == 8  # every (seed, step, clip) gets its own draw
    assert not torch.equal(first, degrade_clip(frames, config, seed=3, step=11, clip=1))
    assert first.shape == (4, 16, 16, 3) and first.dtype == frames.dtype
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0


def test_the_same_degradation_on_every_frame():
    """A still clip (four copies of one frame) comes out as four equal frames whatever the draw,
    once noise, the only per-frame part, is off; with noise the frames differ by noise alone, of
    the same strength on each frame."""
    still = detailed_frames(1).expand(4, -1, -1, -1).clone()
    noiseless = replace(DegradationConfig(), noise_probability=0.0)
    for clip in range(12):
        out = degrade_clip(still, noiseless, 0, 0, clip)
        assert all(torch.equal(out[0], frame) for frame in out[1:]), draw_degradation(noiseless, 0, 0, clip)

    noisy = replace(DegradationConfig(), noise_probability=1.0, poisson_probability=0.0, jpeg_probability=0.0)
    draw = draw_degradation(noisy, 0, 0, 2)
    out = apply_degradation(still, draw)
    clean = apply_degradation(still, replace(draw, gaussian_sigma=None))
    residual = out - clean
    assert not torch.equal(residual[0], residual[1])  # sensor noise is drawn per frame
    strengths = residual.std(dim=(1, 2, 3))
    assert float(strengths.max() / strengths.min()) < 1.3


def test_blur_removes_detail_and_motion_blur_is_used():
    frames = detailed_frames()
    sharp = degrade_clip(frames, NONE, 0, 0, 0)
    blur = replace(NONE, blur_probability=1.0, motion_blur_probability=0.0, blur_sigma=(2.0, 2.5))
    motion = replace(NONE, blur_probability=1.0, motion_blur_probability=1.0, motion_blur_length=(9, 11))
    for clip in range(3):
        a, b = draw_degradation(blur, 0, 0, clip), draw_degradation(motion, 0, 0, clip)
        assert (
            a.blur_sigma is not None and a.motion_blur is None and 2.0 <= min(a.blur_sigma) <= max(a.blur_sigma) <= 2.5
        )
        assert b.motion_blur is not None and b.blur_sigma is None and b.motion_blur[0] in (9, 11)
    # Same resize draw (all other draws equal), so only the blur differs.
    assert high_frequency(degrade_clip(frames, blur, 0, 0, 0)) < 0.7 * high_frequency(sharp)
    assert high_frequency(degrade_clip(frames, motion, 0, 0, 0)) < 0.8 * high_frequency(sharp)


def test_random_resize_methods():
    config = DegradationConfig()
    modes = [draw_degradation(config, 0, step, 0).resize_mode for step in range(200)]
    assert set(modes) == set(RESIZE_MODES)
    frames = detailed_frames()
    outputs = {
        mode: apply_degradation(frames, ClipDegradation(resize_mode=mode, antialias=False)) for mode in RESIZE_MODES
    }
    assert len({tuple(out.flatten()[:64].tolist()) for out in outputs.values()}) == len(RESIZE_MODES)
    only_bicubic = replace(config, resize_modes=("bicubic",))
    assert {draw_degradation(only_bicubic, 0, step, 0).resize_mode for step in range(20)} == {"bicubic"}


def test_gaussian_noise_has_the_drawn_sigma():
    flat = torch.full((3, 64, 64, 3), 0.5)
    config = replace(NONE, noise_probability=1.0, poisson_probability=0.0, gray_noise_probability=0.0,
                     gaussian_sigma=(0.04, 0.04))
    out = degrade_clip(flat, config, 0, 0, 0)
    assert float(out.std()) == pytest.approx(0.04, rel=0.1)
    assert float(out.mean()) == pytest.approx(0.5, abs=0.005)
    gray = degrade_clip(flat, replace(config, gray_noise_probability=1.0), 0, 0, 0)
    assert torch.equal(gray[..., 0], gray[..., 1]) and torch.equal(gray[..., 1], gray[..., 2])
    assert not torch.equal(out[..., 0], out[..., 1])


def test_poisson_noise_follows_the_signal():
    """Photon noise: variance = signal / peak, so a 0.8 region is 4x as noisy (in variance) as 0.2."""
    frames = torch.full((2, 128, 64, 3), 0.2)
    frames[:, :, 32:] = 0.8
    config = replace(NONE, noise_probability=1.0, poisson_probability=1.0, gray_noise_probability=0.0,
                     poisson_peak=(100.0, 100.0), resize_modes=("area",))
    out = degrade_clip(frames, config, 0, 0, 0)  # [2, 32, 16, 3]; area keeps the halves apart
    dark, bright = out[:, :, :7], out[:, :, 9:]
    assert float(dark.var()) == pytest.approx(0.2 / 100, rel=0.2)
    assert float(bright.var()) == pytest.approx(0.8 / 100, rel=0.2)
    assert float(dark.mean()) == pytest.approx(0.2, abs=0.01) and float(bright.mean()) == pytest.approx(0.8, abs=0.01)


def libjpeg(frames: torch.Tensor, quality: int) -> torch.Tensor:
    """``[F, H, W, 3]`` in 0..1 (8-bit values) through Pillow's JPEG (libjpeg, 4:2:0 like kornia's codec)."""
    compressed = []
    for frame in frames:
        buffer = io.BytesIO()
        pixels = (frame * 255).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=quality, subsampling=2)
        compressed.append(torch.from_numpy(numpy.array(Image.open(buffer))).float() / 255)
    return torch.stack(compressed)


@pytest.mark.parametrize("quality", [45, 80])
def test_jpeg_compression_is_jpeg_at_the_drawn_quality(quality):
    """The compressed input is what libjpeg (another JPEG codec: Pillow's) makes at the drawn quality:
    within 0.01 mean absolute difference of it, less than half as far as from libjpeg 10 below or
    above. libjpeg gets the same draw's frames before their JPEG stage, rounded to 8 bits."""
    frames = detailed_frames(size=128)
    config = replace(NONE, jpeg_probability=1.0, jpeg_quality=(float(quality), float(quality)))
    draw = draw_degradation(config, 0, 0, 0)
    assert draw.jpeg_quality == quality
    small = apply_degradation(frames, replace(draw, jpeg_quality=None))  # the same draw without its JPEG stage
    out = degrade_clip(frames, config, 0, 0, 0)

    def distance(libjpeg_quality: int) -> float:
        return float((out - libjpeg(small, libjpeg_quality)).abs().mean())

    assert distance(quality) < 0.01
    assert distance(quality) < 0.5 * min(distance(quality - 10), distance(quality + 10))
    assert float((out - small).abs().mean()) > 0.003


def test_tiny_frames_and_strong_settings():
    """Frames of 8x8 (2x2 input) take the largest blur and motion kernels."""
    frames = detailed_frames(size=8)
    strong = DegradationConfig(blur_probability=1.0, blur_sigma=(3.0, 3.0), motion_blur_probability=0.5,
                               noise_probability=1.0, jpeg_probability=1.0)
    for clip in range(6):
        out = degrade_clip(frames, strong, 0, 0, clip)
        assert out.shape == (4, 2, 2, 3) and torch.isfinite(out).all()


def test_bad_settings_are_refused_with_what_to_change():
    for bad, message in [
        (dict(kind="jpeg"), "kind must be one of"),
        (dict(blur_probability=1.5), "blur_probability must lie in 0..1"),
        (dict(jpeg_quality=(50.0, 120.0)), "jpeg_quality must lie in 1..100"),
        (dict(gaussian_sigma=(0.1, 0.01)), "gaussian_sigma must be a range"),
        (dict(resize_modes=("lanczos",)), "resize_modes must be some of"),
    ]:
        with pytest.raises(ValueError, match=message):
            DegradationConfig(**bad).check()
    DegradationConfig().check()
    record = DegradationConfig(jpeg_quality=(40.0, 60.0)).as_record()
    assert DegradationConfig.from_record(record) == DegradationConfig(jpeg_quality=(40.0, 60.0))
