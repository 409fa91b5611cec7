"""Edit Tuner bad input: a clear error before any training, and the input MODEL untouched."""
from __future__ import annotations

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import pytest
import torch

from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.simda_core.host_patch import get_config

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
