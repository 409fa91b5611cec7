"""What a SimDA sampling run leaves on the shared UNet, on the real host, and why it changes nothing for
any other MODEL.

The host keeps the last sampled MODEL loaded with its object patches applied: SimDA's replaced
``forward`` functions (temporal adapters on the SpatialTransformers, FFN adapters on ``ff`` with
``norm3`` passed through, frame-shared GroupNorm on the ResBlock and output norms) stay on the UNet's
modules after the run. The host takes them off when it next unpatches that UNet: when another clone of
the same model loads (its load first restores every object patch from the backup all clones of the
model share) or when the model is unloaded. Until then they are inert for every call that is not a
SimDA MODEL's: each acts only inside a UNet call that SimDA's own wrapper opened on its runtime, which
it reaches by weak reference, and otherwise runs the module's own ``forward``.

Checked here bit for bit: the replaced forwards after the run are exactly the SimDA MODEL's object
patches; a call of the shared UNet outside any SimDA MODEL gives the plain output while they are there,
and after the SimDA MODEL is released; the plain MODEL sampled after the SimDA run gives the result it
gave before it, and its load leaves none of SimDA's forwards; a second SimDA MODEL's load replaces the
first one's forwards with its own.
"""
from __future__ import annotations

import gc
import weakref

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import comfy.sample
import pytest
import torch

from simda_pack.simda_core.host.register import apply_simda, get_config, model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.model.patch_functions import is_simda

pytestmark = pytest.mark.usefixtures("unload_host_models")

CONTEXT = 32  # host.TINY_UNET's context_dim
TOKENS = 8
FRAMES = 6
_g = torch.Generator().manual_seed(77)
POSITIVE = [[torch.randn(1, TOKENS, CONTEXT, generator=_g), {}]]
NEGATIVE = [[torch.randn(1, TOKENS, CONTEXT, generator=_g), {}]]


def sample(patcher, seed: int = 0) -> torch.Tensor:
    """A KSampler run through the host: its memory manager loads (and patches) the MODEL."""
    latent = torch.zeros(FRAMES, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        patcher, noise, 3, 4.0, "euler", "normal", POSITIVE, NEGATIVE, latent, disable_pbar=True, seed=seed
    )


def direct_call(unet: torch.nn.Module) -> torch.Tensor:
    """The shared UNet called as it stands, outside any MODEL's wrappers (as code that holds the module
    and calls it would): a batch of two groups of FRAMES frames."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2 * FRAMES, 4, 8, 8, generator=g)
    context = torch.randn(2 * FRAMES, TOKENS, CONTEXT, generator=g)
    with torch.no_grad():
        return unet(x, timesteps=torch.full((2 * FRAMES,), 400.0), context=context, transformer_options={})


def own_forward(module: torch.nn.Module, forward) -> bool:
    """``forward`` is the module's class ``forward`` bound to it: what the host puts back when it
    restores an object patch (it saved the bound method it replaced)."""
    return getattr(forward, "__func__", None) is type(module).forward and getattr(forward, "__self__", None) is module


def replaced_forwards(unet: torch.nn.Module) -> dict:
    """Every module of the UNet whose ``forward`` is not its own (an object patch in place), keyed as the
    host keys object patches."""
    return {
        f"diffusion_model.{name}.forward" if name else "diffusion_model.forward": module.__dict__["forward"]
        for name, module in unet.named_modules()
        if "forward" in module.__dict__ and not own_forward(module, module.__dict__["forward"])
    }


def simda_model(base, seed: int, adapters: bool = True):
    """A SimDA clone of ``base``: random non-zero adapters (unless ``adapters`` is False), latent shift
    and frame-shared GroupNorm."""
    trained = None
    if adapters:
        trained = SimDAAdapters(model_sites(base))
        host.randomize_(trained, seed)
        trained.requires_grad_(False)
    clone = base.clone()
    apply_simda(clone, SimDAConfig(adapters=trained, latent_shift=LatentShiftSettings(), frame_group_norm=True))
    return clone


def test_what_stays_on_the_unet_after_a_simda_run_is_inert_and_the_next_load_removes_it(base):
    unet = base.get_model_object("diffusion_model")
    assert replaced_forwards(unet) == {}
    plain_call = direct_call(unet)
    plain_sample = sample(base)

    simda = simda_model(base, seed=3)
    simda_sample = sample(simda)
    assert not torch.allclose(simda_sample, plain_sample, atol=1e-3), "SimDA did not act in its own run"

    left = replaced_forwards(unet)
    keys = set(get_config(simda).object_patch_keys)
    assert keys and set(left) == keys, "after the run the UNet holds exactly the SimDA MODEL's object patches"
    assert all(left[key] is simda.object_patches[key] and is_simda(left[key]) for key in keys)
    assert any(key.endswith(".ff.forward") for key in keys) and any(key.endswith(".out.0.forward") for key in keys)

    assert torch.equal(direct_call(unet), plain_call), "SimDA's forwards left on the UNet act outside its MODEL"

    other = base.clone()  # another MODEL of the same checkpoint, without SimDA
    assert torch.equal(sample(other), plain_sample)
    assert replaced_forwards(unet) == {}, "loading another MODEL of the same UNet left SimDA's forwards on it"
    assert torch.equal(direct_call(unet), plain_call)


def test_forwards_left_by_a_released_simda_model_act_as_the_plain_modules(base):
    unet = base.get_model_object("diffusion_model")
    plain_call = direct_call(unet)
    simda = simda_model(base, seed=4)
    sample(simda)
    adapters = weakref.ref(get_config(simda).adapters)
    left = set(replaced_forwards(unet))
    del simda
    gc.collect()
    assert adapters() is None, "the forwards left on the UNet keep the released MODEL's adapters alive"
    assert left and set(replaced_forwards(unet)) == left, "the host keeps the released MODEL's patches on the UNet"
    assert torch.equal(direct_call(unet), plain_call)


def test_a_second_simda_model_takes_the_first_ones_forwards_off(base):
    unet = base.get_model_object("diffusion_model")
    first = simda_model(base, seed=5)
    first_sample = sample(first)
    second = simda_model(base, seed=6, adapters=False)  # frame GroupNorm and latent shift only
    sample(second)
    left = replaced_forwards(unet)
    assert set(left) == set(get_config(second).object_patch_keys) < set(get_config(first).object_patch_keys)
    assert all(left[key] is second.object_patches[key] for key in left)
    assert torch.equal(sample(first), first_sample)
