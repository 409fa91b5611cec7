"""Keyframes / image-to-video on the real host: SimDA Keyframes fixes latents at chosen frames through
the host's denoise mask, the Video Sampler writes them back after sampling, and latent shift carries
a keyframe into its neighbours (with the plain model the frames are independent).

Small SD1.x-layout UNet (``host.TINY_UNET``) with seeded random weights, 8x8 latents.
"""
from __future__ import annotations

import pytest
import torch

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

from simda_pack.nodes.nodes_keyframes import SimDAKeyframes
from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.simda_core.video.keyframes import KeyframeError, keyframed_clip, parse_frame_list

pytestmark = pytest.mark.usefixtures("unload_host_models")

FRAMES, STEPS = 6, 4
_g = torch.Generator().manual_seed(77)
POSITIVE = [[torch.randn(1, 8, 32, generator=_g), {}]]
NEGATIVE = [[torch.randn(1, 8, 32, generator=_g), {}]]
KEY_A = torch.randn(1, 4, 8, 8, generator=_g)
KEY_B = torch.randn(1, 4, 8, 8, generator=_g)




def result(output):
    return (output.result if hasattr(output, "result") else output)[0]


def shifted(model):
    return result(SimDALatentShiftPatch.execute(model, 0, True, True, True, True, 0.0, 1.0, False))


def keyframes(latents: torch.Tensor, at: str, frames: int = FRAMES) -> dict:
    return result(SimDAKeyframes.execute(frames, at, keyframe_latents={"samples": latents}))


def sample(model, latent: dict, seed: int = 3) -> torch.Tensor:
    return result(SimDAVideoSampler.execute(
        model, POSITIVE, NEGATIVE, FRAMES, 64, 64, seed, STEPS, 4.0, "euler", "normal", 1.0, 0.0, latent=latent
    ))["samples"]


def test_frame_lists():
    assert parse_frame_list("0", 16) == [0]
    assert parse_frame_list("0, -1", 16) == [0, 15]
    assert parse_frame_list(" 8 3,12 ", 16) == [8, 3, 12]
    for text, message in (("", "no keyframe frames"), ("0, x", '"x" is not a frame number'),
                          ("16", "outside the clip's frames 0..15"),
                          ("-17", "outside"), ("0, -16", "frame 0 is given twice")):
        with pytest.raises(KeyframeError, match=message):
            parse_frame_list(text, 16)
    samples, mask = keyframed_clip(5, torch.ones(2, 4, 3, 3), [0, 4])
    assert mask[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 0]
    assert samples[:, 0, 0, 0].tolist() == [1, 0, 0, 0, 1]


def test_node_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="connect either 'images' .* or 'keyframe_latents'"):
        SimDAKeyframes.execute(FRAMES, "0")
    with pytest.raises(ValueError, match="need a VAE"):
        SimDAKeyframes.execute(FRAMES, "0", images=torch.zeros(1, 64, 64, 3))
    with pytest.raises(ValueError, match="2 images are connected for 1 keyframe frames"):
        SimDAKeyframes.execute(FRAMES, "0", vae=object(), images=torch.zeros(2, 64, 64, 3))
    with pytest.raises(ValueError, match="not a multiple of 8"):
        SimDAKeyframes.execute(FRAMES, "0", vae=object(), images=torch.zeros(1, 60, 64, 3))
    assert "outside the clip" in SimDAKeyframes.validate_inputs(frames=4, keyframe_frames="0, 9")


def test_start_latent_and_keyframes_together_are_refused(base):
    latent = keyframes(KEY_A, "0")
    start = {"samples": torch.zeros(FRAMES, 4, 8, 8),
             "simda_inversion": {"steps": STEPS, "scheduler": "normal", "sampler": "ddim"}}
    with pytest.raises(ValueError, match="noise mask .* start_latent"):
        SimDAVideoSampler.execute(base, POSITIVE, NEGATIVE, FRAMES, 64, 64, 0, STEPS, 4.0, "euler", "normal", 1.0, 0.0,
                                  latent=latent, start_latent=start)


@pytest.mark.parametrize("at", ["0", "0, -1", "2"])
def test_fixed_frames_come_out_as_given_and_the_others_are_generated(base, at):
    frames = parse_frame_list(at, FRAMES)
    given = torch.cat([KEY_A, KEY_B, KEY_A][: len(frames)])
    out = sample(shifted(base), keyframes(given, at))
    assert out.shape == (FRAMES, 4, 8, 8) and bool(torch.isfinite(out).all())
    for i, frame in enumerate(frames):
        assert torch.equal(out[frame], given[i]), f"frame {frame} is not kept"
    for frame in set(range(FRAMES)) - set(frames):
        assert out[frame].abs().mean() > 0.1, f"frame {frame} was not generated"
    # the same clip without keyframes: the free frames come out differently
    free = sample(shifted(base), {"samples": torch.zeros(FRAMES, 4, 8, 8)})
    assert not torch.allclose(free[frames], given, atol=1e-2)


def neighbour_influence(model) -> list[float]:
    """Mean |change| of each other frame when the keyframe at frame 0 changes (same seed)."""
    a = sample(model, keyframes(KEY_A, "0"))
    b = sample(model, keyframes(KEY_B, "0"))
    return [float((a[i] - b[i]).abs().mean()) for i in range(1, FRAMES)]


def test_latent_shift_carries_the_keyframe_to_its_neighbours(base, record_property):
    off = neighbour_influence(base)
    on = neighbour_influence(shifted(base))
    record_property("influence_shift_off", off)
    record_property("influence_shift_on", on)
    assert max(off) < 1e-5, off  # the plain image model samples the frames independently
    assert on[0] > 1e-2 and on[0] > 100 * max(max(off), 1e-7), (on, off)  # frame 1 sees frame 0 through the shift
    assert all(v > 1e-4 for v in on), on  # and it reaches the rest of the clip through the frames between
