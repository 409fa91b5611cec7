"""Cancel, an error or out-of-memory halfway through a SimDA node leaves nothing behind, in-process
on the real host with MODELs from the host's own checkpoint loader: the shared UNet carries no
training weight wrappers, no replaced forwards and no loaded SimDA clone; the MODEL passed in is
unchanged; and the next plain and SimDA calls are bit-identical to ones made before.

The host's interrupt is raised as the user's Cancel raises it (``interrupt_current_processing``)
or, at a chosen point inside a host layer, by a forward hook on that layer that raises the host's
``InterruptProcessingException`` (or torch's out-of-memory error), which is what the host's own
sampling loops and CUDA do at those points.
"""
from __future__ import annotations

import contextlib

import host  # noqa: F401  (first: puts the host on sys.path, imports the pack as simda_pack)

import comfy.model_management as mm
import pytest
import torch

from test_host_compat import host_loaded_model, random_adapters
from test_upscaler import smooth_frames, upscale, x4  # noqa: F401  (x4 is a fixture)

from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.nodes.simda_model import simda_clone
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

Interrupt = mm.InterruptProcessingException


@pytest.fixture(autouse=True)
def no_pending_interrupt():
    mm.interrupt_current_processing(False)
    mm.unload_all_models()
    yield
    mm.interrupt_current_processing(False)
    mm.unload_all_models()


def ours_left_on(model) -> list[str]:
    """What of SimDA sits on the shared UNet of ``model``: weight wrappers, replaced forwards, and
    loaded MODELs that carry SimDA."""
    found = []
    for name, module in model.model.named_modules():
        for attribute in ("weight_function", "bias_function"):
            if getattr(module, attribute, None):
                found.append(f"{name}.{attribute}")
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
            found.append(f"{name}.forward")
    found += ["a loaded SimDA MODEL" for loaded in mm.current_loaded_models
              if loaded.model is not None and "simda" in loaded.model.attachments]
    return found


def record(model) -> tuple:
    """What the MODEL passed in holds that a node could change."""
    options = model.model_options.get("transformer_options", {})
    return (dict(model.object_patches), set(model.attachments), {k: len(v) for k, v in model.wrappers.items()},
            {k: len(v) for k, v in model.callbacks.items()}, set(options.get("patches", {})),
            set(options.get("patches_replace", {})))


def calls(model, simda) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain and one SimDA UNet call of 2 frames, as the host's sampler makes them."""
    g = torch.Generator().manual_seed(11)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    timesteps = torch.full((2,), 400.0)
    return host.unet_forward(model, x, timesteps, context), host.unet_forward(simda, x, timesteps, context)


@contextlib.contextmanager
def raising_in(layer: torch.nn.Module, when, error: BaseException):
    """``layer`` raises ``error`` in the forward call for which ``when(call_number)`` is true."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if when(count[0]):
            raise error

    handle = layer.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def first_transformer_projection(model) -> torch.nn.Module:
    return next(m for name, m in model.model.diffusion_model.named_modules() if name.endswith(".proj_in"))


def in_training(number: int) -> bool:
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


CASES = {
    "cancel before the first step": (None, None),
    "cancel in the first training step": (lambda n: in_training(n), Interrupt()),
    "cancel in the backward pass (recomputed host layer)": (lambda n: in_training(n) and n >= 2, Interrupt()),
    "cancel during the inversion": (lambda n: torch.is_inference_mode_enabled(), Interrupt()),
    "out of memory in the UNet": (
        lambda n: in_training(n), torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_edit_tuner_leaves_nothing_behind(case):
    model, clip, vae = host_loaded_model()
    simda = simda_clone(model, SimDAConfig(adapters=random_adapters(model, 3), latent_shift=LatentShiftSettings()))
    with torch.inference_mode():
        plain_before, simda_before = calls(model, simda)
        frames = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a clip"))
    recorded = record(model)
    when, error = CASES[case]
    tune = dict(steps=2, learning_rate=1e-3, seed=0, frames=2, start_frame=0, stride=1, width=64, height=64,
                gradient_checkpointing=True, inversion_steps=2, inversion_scheduler="ddim_uniform", clip=clip)
    if when is None:
        mm.interrupt_current_processing(True)
        hooked = contextlib.nullcontext([0])
    else:
        hooked = raising_in(first_transformer_projection(model), when, error)
    with hooked, pytest.raises(type(error) if error is not None else Interrupt), torch.inference_mode():
        SimDAEditTuner.execute(model, vae, frames, prompt, **tune)
    assert ours_left_on(model) == []
    assert record(model) == recorded
    with torch.inference_mode():
        plain_after, simda_after = calls(model, simda)
    assert torch.equal(plain_after, plain_before) and torch.equal(simda_after, simda_before)


def test_the_video_sampler_leaves_nothing_behind_when_cancelled_mid_step():
    model, clip, _ = host_loaded_model()
    simda = simda_clone(model, SimDAConfig(adapters=random_adapters(model, 4), latent_shift=LatentShiftSettings()))
    with torch.inference_mode():
        plain_before, simda_before = calls(model, simda)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a clip"))
    recorded = record(simda)
    with raising_in(first_transformer_projection(model), lambda n: n == 3, Interrupt()), pytest.raises(Interrupt):
        with torch.inference_mode():
            SimDAVideoSampler.execute(simda, cond, cond, 2, 64, 64, 0, 3, 5.0, "euler", "normal", 1.0, 0.0)
    assert ours_left_on(model) == []
    assert record(simda) == recorded
    with torch.inference_mode():
        plain_after, simda_after = calls(model, simda)
    assert torch.equal(plain_after, plain_before) and torch.equal(simda_after, simda_before)


def test_the_upscaler_leaves_nothing_behind_when_cancelled_between_tiles(x4):  # noqa: F811
    """Nine one-step pieces (cfg 1: one UNet call each); the third call raises the host's interrupt.
    The next run upscales exactly as a run made before."""
    model, vae = x4
    frames = smooth_frames(1, 32, seed=6)
    settings = dict(steps=1, tile_size=16, tile_overlap=8)
    before = upscale(model, vae, frames, **settings)
    with raising_in(
        first_transformer_projection(model), lambda n: n == 3, Interrupt()
    ) as count, pytest.raises(Interrupt):
        upscale(model, vae, frames, **settings)
    assert count[0] == 3
    assert ours_left_on(model) == []
    assert torch.equal(upscale(model, vae, frames, **settings), before)
