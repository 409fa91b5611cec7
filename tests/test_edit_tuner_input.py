"""The video-edit nodes' input: SimDA One-Shot Tuner, the deprecated SimDA Edit Tuner, SimDA Fit Frames
and SimDA Invert refuse bad input with a clear error before any work, leaving the input MODEL
untouched; the tuner and Fit Frames fit frames one way; the tuner keeps the incoming adapters' strength."""
from __future__ import annotations

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import comfy.sd
import pytest
import torch
from sdxl_server import random_taesd

from nodes import VAEEncode
from simda_pack.nodes.nodes_edit import SimDAEditTuner, SimDAOneShotTuner
from simda_pack.nodes.nodes_fit_frames import SimDAFitFrames
from simda_pack.nodes.nodes_invert import SimDAInvert
from simda_pack.nodes.simda_model import simda_clone
from simda_pack.simda_core.host.register import get_config, model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import SimDAConfig

CONDITIONING = [[torch.zeros(1, 8, host.TINY_UNET["context_dim"]), {}]]
TUNERS = {"SimDA One-Shot Tuner": SimDAOneShotTuner, "SimDA Edit Tuner": SimDAEditTuner}
"""The tuner, and the deprecated tuner that also inverts (both check their input the same way)."""


class NoVAE:
    """Stands where the VAE goes: any use of it would mean work started before the check."""

    def encode(self, pixels):
        raise AssertionError("the VAE was used before the input was checked")


def tune(node, model, source: torch.Tensor, vae=None, prompt=CONDITIONING, **changes):
    settings = dict(steps=2, learning_rate=5e-5, seed=0, frames=4, start_frame=0, stride=1, width=64, height=64,
                    gradient_checkpointing=True, source_fps=24.0)
    if node is SimDAEditTuner:
        settings |= dict(inversion_steps=2, inversion_scheduler="ddim_uniform", inversion_conditioning=CONDITIONING)
    settings.update(changes)
    with torch.inference_mode():  # as the host's executor runs nodes
        return node.execute(model, vae or NoVAE(), source, prompt, **settings)


def unchanged(model, before: dict) -> bool:
    after = model.model.diffusion_model.state_dict()
    untouched = get_config(model) is None and not model.object_patches
    return untouched and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("name", TUNERS)
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
def test_bad_input_is_refused_before_training(name, frames, changes, message):
    model = host.build_model(host.TINY_UNET, seed=2)
    before = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as error:
        with torch.inference_mode():
            tune(TUNERS[name], model, torch.rand(frames, 64, 64, 3), **changes)
    assert str(error.value).startswith(f"{name}:")
    assert unchanged(model, before)


def test_missing_inversion_prompt_source_is_refused():
    """The Edit Tuner and SimDA Invert need the CLIP (for the empty prompt) or a conditioning."""
    model = host.build_model(host.TINY_UNET, seed=2)
    with pytest.raises(ValueError, match="SimDA Edit Tuner: connect the checkpoint's CLIP"):
        tune(SimDAEditTuner, model, torch.rand(6, 64, 64, 3), inversion_conditioning=None)
    with pytest.raises(ValueError, match="SimDA Invert: connect the checkpoint's CLIP"):
        SimDAInvert.execute(model, {"samples": torch.zeros(4, 4, 8, 8)}, 2, "ddim_uniform")


def test_fit_frames_refuses_what_the_tuner_refuses():
    for frames, changes, message in ((1, {}, "needs at least 2"), (6, {"width": 100}, "not a multiple of 8")):
        settings = dict(frames=4, start_frame=0, stride=1, width=64, height=64) | changes
        with pytest.raises(ValueError, match=message) as error:
            SimDAFitFrames.execute(torch.rand(frames, 64, 64, 3), **settings)
        assert str(error.value).startswith("SimDA Fit Frames:")


def disagreeing_with_4_frames(cause: str):
    """``(model, conditioning, what the sentence names)``: a MODEL of frames_per_clip 3 from a
    Latent-Shift Patch, or a 3-row conditioning, each against a 4-frame clip."""
    from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch

    model = host.build_model(host.TINY_UNET, seed=2)
    if cause == "frames_per_clip":
        (model,) = SimDALatentShiftPatch.execute(model, 3, True, True, True, True, 0.0, 1.0, False).result
        return model, CONDITIONING, "frames_per_clip = 3"
    return model, [[torch.zeros(3, 8, host.TINY_UNET["context_dim"]), {}]], "holds 3 rows"


@pytest.mark.parametrize("cause", ["frames_per_clip", "prompt_schedule"])
def test_an_inversion_prompt_or_model_that_disagrees_with_the_clip_is_refused_before_inverting(cause):
    """SimDA Invert on 4 frames with a MODEL of frames_per_clip 3, or a 3-row conditioning: one sentence."""
    model, conditioning, expected = disagreeing_with_4_frames(cause)
    with pytest.raises(ValueError) as error, torch.inference_mode():
        SimDAInvert.execute(model, {"samples": torch.zeros(4, 4, 8, 8)}, 2, "ddim_uniform",
                            inversion_conditioning=conditioning)
    message = str(error.value)
    assert message.startswith("SimDA Invert:") and expected in message and "4 frames" in message, message


def test_invert_refuses_a_latent_that_is_not_a_batch_of_frames():
    model = host.build_model(host.TINY_UNET, seed=2)
    with pytest.raises(ValueError, match="SimDA Invert: the latent must be a batch of frame latents"):
        SimDAInvert.execute(model, {"samples": torch.zeros(1, 4, 4, 8, 8)}, 2, "ddim_uniform",
                            inversion_conditioning=CONDITIONING)


@pytest.mark.parametrize("name", TUNERS)
@pytest.mark.parametrize("cause", ["frames_per_clip", "prompt_schedule"])
def test_a_clip_that_disagrees_with_frames_per_clip_or_the_prompt_schedule_is_refused_before_encoding(name, cause):
    """frames_per_clip 3 from a Latent-Shift Patch upstream, or a 3-row prompt schedule, against the
    tuner's 4 frames: one sentence naming both, before the VAE encodes anything."""
    model, prompt, expected = disagreeing_with_4_frames(cause)
    with pytest.raises(ValueError) as error, torch.inference_mode():
        tune(TUNERS[name], model, torch.rand(6, 64, 64, 3), prompt=prompt)
    message = str(error.value)
    assert message.startswith(f"{name}:") and expected in message and "4 frames" in message, message


# -- fitting frames: one way -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vae():
    return comfy.sd.VAE(sd=random_taesd(3).state_dict())


def board(frames: int, height: int, width: int) -> torch.Tensor:
    """A 1-pixel checkerboard, ``[frames, height, width, 3]``, each frame shifted by one pixel."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([((rows + columns + f) % 2).float() for f in range(frames)])[..., None].expand(-1, -1, -1, 3)


def test_fit_frames_shrinks_without_aliasing():
    """A 1-pixel checkerboard at 720x1280 shrunk to 64x64: the fit (antialiased) gives the flat grey the
    picture averages to, where the host's plain bilinear resize aliases into strong patterns."""
    import comfy.utils

    source = board(2, 720, 1280)
    (fitted, rate) = SimDAFitFrames.execute(source, frames=2, start_frame=0, stride=1, width=64, height=64,
                                            source_fps=30.0).result
    aliased = comfy.utils.common_upscale(source.movedim(-1, 1), 64, 64, "bilinear", "center").movedim(1, -1)
    assert fitted.shape == (2, 64, 64, 3) and float((fitted - 0.5).abs().max()) < 0.05
    assert float((aliased - 0.5).abs().max()) > 0.25
    assert rate == 30.0


def test_the_tuner_trains_on_the_frames_fit_frames_gives(vae):
    """Frames 1, 3, 5, 7 of a 9-frame 96x160 clip at 64x64: the One-Shot Tuner's source latent is VAE
    Encode of SimDA Fit Frames' output for the same settings, and both give source_fps / stride."""
    generator = torch.Generator().manual_seed(4)
    source = torch.rand(9, 96, 160, 3, generator=generator)
    fit = dict(frames=4, start_frame=1, stride=2, width=64, height=64)
    with torch.inference_mode():
        (fitted, rate) = SimDAFitFrames.execute(source, source_fps=25.0, **fit).result
        (encoded,) = VAEEncode().encode(vae, fitted)
    model = host.build_model(host.TINY_UNET, seed=2)
    tuned, latent, _, tuner_rate, losses = tune(SimDAOneShotTuner, model, source, vae=vae, steps=1, source_fps=25.0,
                                                **fit).result
    assert torch.equal(latent["samples"], encoded["samples"])
    assert rate == tuner_rate == 12.5 and len(losses["loss"]) == 1


# -- the incoming adapters' strength -----------------------------------------------------------------

def with_adapters(model, strength: float):
    adapters = SimDAAdapters(model_sites(model))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return simda_clone(model, SimDAConfig(adapters=adapters.requires_grad_(False), strength=strength))


def tuned_adapters(model, vae) -> tuple[float, dict]:
    tuned, _, trained, _, _ = tune(SimDAOneShotTuner, model, board(4, 64, 64), vae=vae, steps=2).result
    assert get_config(tuned).adapters is trained.adapters
    return get_config(tuned).strength, trained.adapters.state_dict()


def test_the_tuner_keeps_the_incoming_adapters_strength(vae):
    """Adapters at 0.5 are the starting point and train and come out at 0.5 (not at 1: the result
    differs from tuning the same adapters at 1); at strength 0, which the MODEL samples without them,
    tuning starts from fresh adapters at 1, exactly as on the plain MODEL."""
    base = host.build_model(host.TINY_UNET, seed=2)
    plain_strength, plain = tuned_adapters(base, vae)
    half_strength, half = tuned_adapters(with_adapters(base, 0.5), vae)
    full_strength, full = tuned_adapters(with_adapters(base, 1.0), vae)
    off_strength, off = tuned_adapters(with_adapters(base, 0.0), vae)
    assert (plain_strength, half_strength, full_strength, off_strength) == (1.0, 0.5, 1.0, 1.0)
    assert all(torch.equal(off[k], plain[k]) for k in plain)
    assert any(not torch.equal(half[k], full[k]) for k in full)
    assert any(not torch.equal(full[k], plain[k]) for k in plain)
