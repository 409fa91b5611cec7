"""Quality of an upscaled clip against its reference: PSNR, SSIM and temporal consistency.

Clips are ComfyUI IMAGE batches ``[F, H, W, 3]`` in 0..1, compared frame by frame.

- **PSNR** (dB) and **SSIM** come from ``kornia.metrics`` (``psnr`` with ``max_val=1``; the mean of
  ``ssim``'s map with the usual 11-pixel Gaussian window, ``eps=0`` so identical frames score
  exactly 1), computed per frame and averaged over the frames (kornia's ``psnr`` pools the MSE of
  a whole batch, which would let one bad frame hide among good ones). Identical clips have an
  infinite PSNR.
- **Temporal consistency** is the SSIM between the *frame differences* of the two clips:
  ``SSIM(out[t+1] - out[t], ref[t+1] - ref[t])`` for every adjacent pair, with the data range of a
  difference (``max_val=2``), averaged over the pairs. It is 1 when the clip changes from frame to
  frame exactly as the reference does; flicker, a frame that jumps or is swapped, or noise that
  changes per frame lower it even where every single frame looks good. The luminance term of
  SSIM catches a global brightness flicker (a mean difference where the reference has none), the
  contrast and structure terms catch motion that differs in place or shape.

  Why not a flow-warped error (warp ``out[t]`` to ``out[t+1]`` with optical flow estimated on the
  reference, as video SR papers often report): it needs a trained flow network (RAFT and the
  like), and none is available to this project offline. Frame-difference SSIM needs no model and
  compares against the reference's own motion, so it cannot reward a clip for standing still.

Everything here is plain torch + kornia; nothing imports the host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import kornia
import torch

SSIM_WINDOW = 11


def _channels_first(clip: torch.Tensor) -> torch.Tensor:
    """``[F, H, W, 3]`` -> ``[F, 3, H, W]`` float32 (float64 stays float64)."""
    clip = clip.movedim(-1, 1)
    return clip if clip.dtype == torch.float64 else clip.float()


def check_clips(output: torch.Tensor, reference: torch.Tensor) -> None:
    """Raise a ValueError when two clips cannot be compared."""
    if output.ndim != 4 or output.shape[-1] != 3:
        raise ValueError(f"clips must be IMAGE batches [F, H, W, 3]; got {list(output.shape)}")
    if output.shape != reference.shape:
        raise ValueError(
            f"the clips differ in shape: {list(output.shape)} against the reference's {list(reference.shape)}; "
            "resize or crop the output to the reference first"
        )


def _window(height: int, width: int, window: int) -> int:
    """The SSIM window, shrunk (odd) for frames smaller than it: reflection padding needs the
    half-window below the frame size."""
    largest = 2 * min(height, width) - 1
    return min(window, largest if largest % 2 else largest - 1)


def psnr_per_frame(output: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each frame ``[F]`` (``inf`` where a frame equals its reference)."""
    check_clips(output, reference)
    out, ref = _channels_first(output), _channels_first(reference)
    return torch.stack([kornia.metrics.psnr(o, r, max_val=1.0) for o, r in zip(out, ref)])


def ssim_map(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = SSIM_WINDOW) -> torch.Tensor:
    """kornia's SSIM map of ``[B, C, H, W]`` images with ``eps=0`` (identical images: exactly 1)."""
    return kornia.metrics.ssim(a, b, _window(a.shape[-2], a.shape[-1], window), max_val=float(max_val), eps=0.0)


def ssim_per_frame(output: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW) -> torch.Tensor:
    """Mean SSIM of each frame ``[F]`` (over pixels and channels)."""
    check_clips(output, reference)
    return ssim_map(_channels_first(output), _channels_first(reference), 1.0, window).mean(dim=(1, 2, 3))


def temporal_consistency_per_pair(
    output: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW
) -> torch.Tensor:
    """Frame-difference SSIM of each adjacent pair ``[F - 1]``: ``SSIM(out[t+1] - out[t],
    ref[t+1] - ref[t])`` with ``max_val=2`` (a difference spans -1..1)."""
    check_clips(output, reference)
    if output.shape[0] < 2:
        raise ValueError("temporal consistency needs clips of at least 2 frames")
    out, ref = _channels_first(output), _channels_first(reference)
    out_change, ref_change = out[1:] - out[:-1], ref[1:] - ref[:-1]
    return ssim_map(out_change, ref_change, 2.0, window).mean(dim=(1, 2, 3))


def psnr(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR over the frames, dB."""
    return float(psnr_per_frame(output, reference).mean())


def ssim(output: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM over the frames."""
    return float(ssim_per_frame(output, reference, window).mean())


def temporal_consistency(output: torch.Tensor, reference: torch.Tensor, window: int = SSIM_WINDOW) -> float:
    """Mean frame-difference SSIM over the adjacent pairs (1: changes exactly like the reference)."""
    return float(temporal_consistency_per_pair(output, reference, window).mean())


@dataclass(frozen=True)
class ClipQuality:
    psnr: float
    ssim: float
    temporal_consistency: float

    def as_record(self) -> dict:
        return asdict(self)


def measure(output: torch.Tensor, reference: torch.Tensor) -> ClipQuality:
    """All three scores of ``output`` against ``reference`` (both ``[F, H, W, 3]``, 0..1)."""
    return ClipQuality(psnr(output, reference), ssim(output, reference), temporal_consistency(output, reference))
