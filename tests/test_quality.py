"""Quality metrics (simda_core/training/quality.py) on known inputs: PSNR and SSIM agree with kornia's own
functions and with a direct computation from their definitions; identical clips score SSIM 1 and
temporal consistency 1; a frame shifted, replaced or flickering, or noise that changes per frame,
scores worse on temporal consistency."""
from __future__ import annotations

import math

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import kornia
import pytest
import torch

from simda_pack.simda_core.training import quality

FRAMES, SIZE = 6, 48


def texture(seed: int, size: int = SIZE + 16) -> torch.Tensor:
    """A smooth random colour texture ``[size, size, 3]`` in 0.1..0.9."""
    noise = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(seed))
    smooth = kornia.filters.gaussian_blur2d(noise, (9, 9), (2.0, 2.0))
    smooth = (smooth - smooth.amin()) / (smooth.amax() - smooth.amin())
    return (0.1 + 0.8 * smooth)[0].movedim(0, -1)


def panning_clip(seed: int = 0, frames: int = FRAMES, speed: int = 2) -> torch.Tensor:
    """A camera pan over a texture: frame t is the window shifted ``speed * t`` pixels right."""
    scene = texture(seed)
    return torch.stack([scene[8:8 + SIZE, speed * t:speed * t + SIZE] for t in range(frames)])


def reference_ssim(a: torch.Tensor, b: torch.Tensor, max_val: float) -> torch.Tensor:
    """SSIM from its definition (Wang et al. 2004): 11-tap Gaussian window, sigma 1.5, reflected
    borders, c1 = (0.01 L)^2, c2 = (0.03 L)^2; mean over pixels and channels, per image of
    ``[B, C, H, W]``."""
    taps = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-taps**2 / (2 * 1.5**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11)

    def local_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(
            torch.nn.functional.pad(x, (5, 5, 5, 5), mode="reflect"), window, groups=x.shape[1]
        )

    a, b = a.double(), b.double()
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a, var_b = local_mean(a * a) - mu_a**2, local_mean(b * b) - mu_b**2
    cov = local_mean(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    index = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(dim=(1, 2, 3))


def test_identical_clips_score_one():
    clip = panning_clip()
    assert quality.ssim(clip, clip.clone()) == pytest.approx(1.0, abs=1e-6)
    assert quality.temporal_consistency(clip, clip.clone()) == pytest.approx(1.0, abs=1e-6)
    assert math.isinf(quality.psnr(clip, clip.clone()))
    scores = quality.measure(clip, clip.clone())
    assert scores.ssim == pytest.approx(1.0, abs=1e-6) and scores.temporal_consistency == pytest.approx(1.0, abs=1e-6)


def test_psnr_of_a_known_error():
    """A uniform error of 0.1 is an MSE of 0.01: 20 dB; frames with different errors average per frame."""
    clip = panning_clip()
    assert quality.psnr(clip + 0.1, clip) == pytest.approx(20.0, abs=1e-4)
    errors = torch.tensor([0.1, 0.01, 0.1, 0.01, 0.1, 0.01])[:, None, None, None]
    per_frame = quality.psnr_per_frame(clip + errors, clip)
    assert per_frame.tolist() == pytest.approx([20.0, 40.0] * 3, abs=1e-3)
    assert quality.psnr(clip + errors, clip) == pytest.approx(30.0, abs=1e-3)


def test_numbers_match_kornia_and_the_definitions():
    clip = panning_clip()
    degraded = (clip + 0.05 * torch.randn(clip.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    out, ref = degraded.movedim(-1, 1), clip.movedim(-1, 1)

    kornia_psnr = torch.stack([kornia.metrics.psnr(o, r, 1.0) for o, r in zip(out, ref)])
    assert torch.allclose(quality.psnr_per_frame(degraded, clip), kornia_psnr)
    mse = ((out.double() - ref.double()) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(quality.psnr_per_frame(degraded, clip).double(), 10 * torch.log10(1 / mse), atol=1e-4)

    kornia_ssim = kornia.metrics.ssim(out, ref, 11, max_val=1.0, eps=0.0).mean(dim=(1, 2, 3))
    assert torch.allclose(quality.ssim_per_frame(degraded, clip), kornia_ssim)
    assert torch.allclose(quality.ssim_per_frame(degraded, clip).double(), reference_ssim(out, ref, 1.0), atol=1e-5)
    assert quality.ssim(degraded, clip) == pytest.approx(float(kornia_ssim.mean()), abs=1e-6)
    assert 0.3 < quality.ssim(degraded, clip) < 0.95  # a real difference, not a saturated score

    out_change, ref_change = out[1:] - out[:-1], ref[1:] - ref[:-1]
    kornia_tc = kornia.metrics.ssim(out_change, ref_change, 11, max_val=2.0, eps=0.0).mean(dim=(1, 2, 3))
    assert torch.allclose(quality.temporal_consistency_per_pair(degraded, clip), kornia_tc)
    assert torch.allclose(quality.temporal_consistency_per_pair(degraded, clip).double(),
                          reference_ssim(out_change, ref_change, 2.0), atol=1e-5)


def test_a_shifted_frame_scores_worse_on_temporal_consistency():
    clip = panning_clip()
    shifted = clip.clone()
    shifted[3] = torch.roll(clip[3], shifts=3, dims=1)
    pairs = quality.temporal_consistency_per_pair(shifted, clip)
    # The pairs into and out of frame 3 break, the others stay perfect.
    assert pairs[2] < 0.8 and pairs[3] < 0.8
    assert torch.allclose(pairs[[0, 1, 4]], torch.ones(3), atol=1e-6)
    assert quality.temporal_consistency(shifted, clip) < quality.temporal_consistency(clip, clip) - 0.1


def test_a_replaced_frame_scores_worse_on_temporal_consistency():
    clip, other = panning_clip(0), panning_clip(7)
    replaced = clip.clone()
    replaced[2] = other[2]
    assert quality.temporal_consistency(replaced, clip) < quality.temporal_consistency(clip, clip) - 0.2
    pairs = quality.temporal_consistency_per_pair(replaced, clip)
    assert pairs[1] < 0.5 and pairs[2] < 0.5


def test_flicker_and_per_frame_noise_hurt_temporal_consistency_more_than_frame_quality():
    """A brightness flicker of +-0.02 from frame to frame keeps each frame close to the reference
    (PSNR 34 dB, SSIM near 1) but breaks every frame difference. Noise that changes from
    frame to frame scores worse in time than the same noise pattern frozen on every frame, although
    both have the same per-frame PSNR."""
    clip = panning_clip()
    flicker = clip + 0.02 * (1 - 2 * (torch.arange(FRAMES) % 2)).float()[:, None, None, None]
    assert quality.psnr(flicker, clip) == pytest.approx(20 * math.log10(1 / 0.02), abs=1e-3)
    assert quality.ssim(flicker, clip) > 0.98
    assert quality.temporal_consistency(flicker, clip) < 0.5

    generator = torch.Generator().manual_seed(3)
    changing = clip + 0.03 * torch.randn(clip.shape, generator=generator)
    frozen = clip + 0.03 * torch.randn(clip.shape[1:], generator=generator)
    assert quality.psnr(changing, clip) == pytest.approx(quality.psnr(frozen, clip), abs=0.3)
    assert quality.temporal_consistency(frozen, clip) == pytest.approx(1.0, abs=1e-5)
    assert quality.temporal_consistency(changing, clip) < 0.9


def test_a_frozen_clip_does_not_look_consistent():
    """Standing still is not consistency: a clip that repeats its first frame scores below the
    moving reference's own motion."""
    clip = panning_clip()
    frozen = clip[:1].expand_as(clip).clone()
    assert quality.temporal_consistency(frozen, clip) < 0.5


def test_small_frames_and_bad_input():
    tiny = torch.rand((3, 4, 6, 3), generator=torch.Generator().manual_seed(0))
    assert quality.ssim(tiny, tiny) == pytest.approx(1.0, abs=1e-6)
    assert quality.temporal_consistency(tiny, tiny) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="differ in shape"):
        quality.ssim(tiny, tiny[:, :, :4])
    with pytest.raises(ValueError, match="at least 2 frames"):
        quality.temporal_consistency(tiny[:1], tiny[:1])
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        quality.psnr(tiny.movedim(-1, 1), tiny.movedim(-1, 1))
