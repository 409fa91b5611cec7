"""Edit Tuner bad input: a clear error before any training, and the input MODEL untouched."""
from __future__ import annotations

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import pytest
import torch

from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.simda_core.host.register import get_config

CONDITIONING = [[torch.zeros(1, 8, host.TINY_UNET["context_dim"]), {}]]


class NoVAE:
    """Stands where the VAE goes: any use of it would mean work started before the check."""

    def encode(self, pixels):
        raise AssertionError("the VAE was used before the input was checked")


def tune(model, frames: torch.Tensor, **changes):
    settings = dict(steps=2, learning_rate=5e-5, seed=0, frames=4, start_frame=0, stride=1, width=64, height=64,
                    gradient_checkpointing=True, inversion_steps=2, inversion_scheduler="ddim_uniform", source_fps=24.0)
    settings.update(changes)
    return SimDAEditTuner.execute(model, NoVAE(), frames, CONDITIONING, inversion_conditioning=CONDITIONING, **settings)


@pytest.mark.parametrize(
    "frames, changes, message",
    [
        (1, {}, "needs at least 2"),
        (6, {"start_frame": 5}, "needs at least 2"),
        (6, {"stride": 6}, "needs at least 2"),
        (6, {"steps": 0}, "train at least 1 step"),
        (6, {"learning_rate": 0.0}, "learning_rate must be above 0"),
        (6, {"learning_rate": -1e-4}, "learning_rate must be above 0"),
        (6, {"width": 100}, "not a multiple of 8"),
    ],
    ids=["one_frame", "start_past_the_end", "stride_too_long", "zero_steps", "zero_lr", "negative_lr", "width"],
)
def test_bad_input_is_refused_before_training(frames, changes, message):
    model = host.build_model(host.TINY_UNET, seed=2)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        with torch.inference_mode():
            tune(model, torch.rand(frames, 64, 64, 3), **changes)
    assert str(error.value).startswith("SimDA Edit Tuner:")
    assert get_config(model) is None and not model.object_patches
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_missing_inversion_prompt_source_is_refused():
    model = host.build_model(host.TINY_UNET, seed=2)
    with pytest.raises(ValueError, match="connect the checkpoint's CLIP"):
        SimDAEditTuner.execute(
            model, NoVAE(), torch.rand(6, 64, 64, 3), CONDITIONING, steps=2, learning_rate=5e-5, seed=0, frames=4,
            start_frame=0, stride=1, width=64, height=64, gradient_checkpointing=True, inversion_steps=2,
            inversion_scheduler="ddim_uniform",
        )


def test_the_edit_tuner_and_the_trainer_fit_frames_one_antialiased_way():
    """A 1-pixel checkerboard at 720x1280 shrunk to 64x64: the shared fit (antialiased) gives the
    flat grey the picture averages to, where the host's plain bilinear resize (the Edit Tuner's
    earlier one) aliases into strong patterns. The Edit Tuner and the collection trainer's clip
    loader both use the shared fit."""
    import comfy.utils

    from simda_pack.nodes import nodes_edit
    from simda_pack.simda_core.training import video_data

    rows, columns = torch.meshgrid(torch.arange(720), torch.arange(1280), indexing="ij")
    board = ((rows + columns) % 2).float()[None, :, :, None].expand(2, 720, 1280, 3)
    fitted = video_data.fit_frames(board, 64, 64)
    aliased = comfy.utils.common_upscale(board.movedim(-1, 1), 64, 64, "bilinear", "center").movedim(1, -1)
    assert fitted.shape == (2, 64, 64, 3) and float((fitted - 0.5).abs().max()) < 0.05
    assert float((aliased - 0.5).abs().max()) > 0.25
    assert nodes_edit.fit_frames is video_data.fit_frames


@pytest.mark.parametrize("cause", ["frames_per_clip", "prompt_schedule"])
def test_a_clip_that_disagrees_with_frames_per_clip_or_the_prompt_schedule_is_refused_before_encoding(cause):
    """frames_per_clip 3 from a Latent-Shift Patch upstream, or a 3-row prompt schedule, against the
    tuner's 4 frames: one sentence naming both, before the VAE encodes anything."""
    from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch

    model = host.build_model(host.TINY_UNET, seed=2)
    prompt = CONDITIONING
    if cause == "frames_per_clip":
        (model,) = SimDALatentShiftPatch.execute(model, 3, True, True, True, True, 0.0, 1.0, False).result
        expected = "frames_per_clip = 3"
    else:
        prompt = [[torch.zeros(3, 8, host.TINY_UNET["context_dim"]), {}]]
        expected = "holds 3 rows"
    with pytest.raises(ValueError) as error, torch.inference_mode():
        SimDAEditTuner.execute(model, NoVAE(), torch.rand(6, 64, 64, 3), prompt, inversion_conditioning=CONDITIONING,
                               steps=2, learning_rate=5e-5, seed=0, frames=4, start_frame=0, stride=1, width=64,
                               height=64,
                               gradient_checkpointing=True, inversion_steps=2, inversion_scheduler="ddim_uniform")
    message = str(error.value)
    assert message.startswith("SimDA Edit Tuner:") and expected in message and "4 frames" in message, message
