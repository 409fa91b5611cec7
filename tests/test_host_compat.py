"""What keeps SimDA correct on the hosts users run (docs/HOST_COMPAT.md), tested on the real
ComfyUI 0.3.75:

- adapters are built and loaded without the host's layer classes (the newest host creates those
  without weights under Dynamic VRAM), for every storage dtype of the base;
- tuning never changes the host's shared UNet: the MODEL the host's loader built keeps the very
  parameter objects it loaded, and the pinned-memory bookkeeping is untouched;
- the patches follow the model they run on when a clone carries another model object;
- latent-shift attention goes through the host's attention selection with the call's options, and
  training uses an attention with a backward whatever override the user set.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

import host
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models
from live_server import cached_test_models
from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.simda_core import formats
from simda_pack.simda_core.host.family import adapter_storage_dtype
from simda_pack.simda_core.host.register import SimDAPatchError, apply_simda, get_config, model_sites
from simda_pack.simda_core.host.training import training_patcher
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

pytestmark = pytest.mark.usefixtures("unload_host_models")

ON_CLONE = comfy.patcher_extension.CallbacksMP.ON_CLONE




def video_batch(frames: int = 4, groups: int = 2, seed: int = 0, size=(8, 8), tokens: int = 8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * frames, 4, *size, generator=g)
    context = torch.randn(groups * frames, tokens, host.TINY_UNET["context_dim"], generator=g)
    return x, torch.full((groups * frames,), 500.0), context


def call(patcher, batch, **options):
    x, timesteps, context = batch
    return host.unet_forward(patcher, x, timesteps, context, cond_or_uncond=(1, 0), **options)


def random_adapters(patcher, seed: int) -> SimDAAdapters:
    adapters = SimDAAdapters(model_sites(patcher))
    host.randomize_(adapters, seed)
    return adapters.requires_grad_(False)


def simda(patcher, **config):
    clone = patcher.clone()
    apply_simda(clone, SimDAConfig(**config))
    return clone


# -- 1: adapters never depend on how the host creates layers --------------------------------------------

HOST_LAYER_CLASSES = [
    getattr(ops, name)
    for ops in (comfy.ops.disable_weight_init, comfy.ops.manual_cast)
    for name in ("Linear", "Conv3d", "Conv2d", "GroupNorm", "LayerNorm")
]


def test_adapters_are_built_and_loaded_without_the_host_layer_classes(base, monkeypatch, tmp_path):
    """Every host layer class refuses to be constructed or loaded during this test: adapters made
    fresh, initialised for training, saved, read back from our file and from the authors' file all
    still come out whole, with no host layer among their modules."""

    def refuse(*args, **kwargs):
        raise AssertionError("SimDA adapters went through a host layer class")

    for cls in HOST_LAYER_CLASSES:
        monkeypatch.setattr(cls, "__init__", refuse)
        monkeypatch.setattr(cls, "_load_from_state_dict", refuse)

    sites = model_sites(base)
    fresh = initial_adapters(sites, seed=3)
    random = random_adapters(base, 4)
    path = formats.save_adapters(random, tmp_path / "a.safetensors", family="sd1")
    loaded = formats.build_adapters(formats.read_adapter_file(path), sites, dtype=torch.float16)
    authors = formats.build_adapters(formats.read_adapter_file(host.FIXTURES / "simda_authors_tiny"), sites)
    for adapters in (fresh, random, loaded, authors):
        assert not any(isinstance(m, tuple(HOST_LAYER_CLASSES)) for m in adapters.modules())
        assert all(p.device.type != "meta" and p.numel() > 0 for p in adapters.parameters())
        assert all(torch.isfinite(p).all() for p in adapters.parameters())
    assert all(torch.equal(a, b.half()) for a, b in zip(loaded.state_dict().values(), random.state_dict().values()))


@pytest.mark.parametrize(
    "storage, compute",
    [(torch.float32, None), (torch.float16, None), (torch.bfloat16, None), (torch.float8_e4m3fn, torch.float32)],
    ids=["fp32", "fp16", "bf16", "fp8_manual_cast_fp32"],
)
def test_every_storage_dtype_runs_with_adapters(storage, compute):
    """The base stored in each dtype (fp8 with the host's manual cast to fp32): adapters are kept
    in the dtype the UNet computes in, the host samples the clone, and the adapters act."""
    model_config = comfy.supported_models.SD15(dict(host.TINY_UNET))
    model_config.set_inference_dtype(storage, compute)
    model = comfy.model_base.BaseModel(model_config, device="cpu")
    reference = host.build_model(host.TINY_UNET, seed=0)
    with torch.no_grad():
        for target, source in zip(model.diffusion_model.parameters(), reference.model.diffusion_model.parameters()):
            target.copy_(source.to(target.dtype))
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=torch.device("cpu"), offload_device=torch.device("cpu")
    )
    dtype = adapter_storage_dtype(patcher)
    assert dtype == (compute or storage)
    adapters = random_adapters(reference, 5).to(dtype)
    clone = simda(patcher, adapters=adapters, latent_shift=LatentShiftSettings())
    x, timesteps, context = video_batch(seed=5)
    compute_dtype = compute or storage
    batch = (x.to(compute_dtype), timesteps, context.to(compute_dtype))
    out = call(clone, batch)
    plain = call(patcher, batch)
    assert out.dtype == compute_dtype and torch.isfinite(out.float()).all()
    assert (out.float() - plain.float()).abs().max() > 1e-2, "the adapters did not act"
    # The same adapters in fp32 on the fp32 base: the half/fp8 runs follow it within their rounding.
    full = call(
        simda(reference, adapters=random_adapters(reference, 5), latent_shift=LatentShiftSettings()),
        video_batch(seed=5),
    )
    error = float((out.float() - full).abs().max() / full.abs().max())
    assert error < {
        torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float8_e4m3fn: 3e-1
    }[storage], error


# -- 2: training never touches the host's shared UNet ------------------------------------------------------

def host_loaded_model():
    """SD1.5 MODEL, CLIP and VAE as the host's checkpoint loader builds them while executing a
    prompt (under inference mode: the weights are inference tensors)."""
    checkpoint, _ = cached_test_models()
    with torch.inference_mode():
        model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=True, output_clip=True)
    return model, clip, vae


def parameter_record(model):
    unet = model.model.diffusion_model
    return {name: (param, param.is_inference(), param.detach().clone()) for name, param in unet.named_parameters()}


def test_edit_tuner_leaves_the_host_loaded_unet_as_it_was():
    model, clip, vae = host_loaded_model()
    before = parameter_record(model)
    assert all(inference for _, inference, _ in before.values()), "the host's loader no longer makes inference tensors"
    pinned_before = (
        set(model.pinned), comfy.model_management.TOTAL_PINNED_MEMORY, dict(comfy.model_management.PINNED_MEMORY)
    )
    with torch.inference_mode():
        frames = torch.rand(4, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a clip"))
        tuned, inverted, trained, _, loss_map = SimDAEditTuner.execute(
            model, vae, frames, prompt, steps=2, learning_rate=1e-3, seed=0, frames=4, start_frame=0, stride=1,
            width=64, height=64, gradient_checkpointing=True, inversion_steps=2, inversion_scheduler="ddim_uniform",
            clip=clip,
        ).result
    assert get_config(model) is None
    assert any(
        (p != 0).any() for name, p in trained.adapters.named_parameters() if ".up." in name or ".fc2." in name
    ), "nothing trained"
    assert len(loss_map["loss"]) == 2 and all(math.isfinite(v) for v in loss_map["loss"])
    after = dict(model.model.diffusion_model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, inference, values) in before.items():
        assert after[name] is param, f"{name}: the UNet holds another parameter object after tuning"
        assert after[name].is_inference() == inference, name
        assert torch.equal(after[name], values), name
    pinned_after = (
        set(model.pinned), comfy.model_management.TOTAL_PINNED_MEMORY, dict(comfy.model_management.PINNED_MEMORY)
    )
    assert pinned_after == pinned_before
    # The host's layers carry no training wrappers afterwards.
    assert not any(
        getattr(m, "weight_function", None) or getattr(m, "bias_function", None) for m in model.model.modules()
    )


# -- 3: patches follow the model they run on -----------------------------------------------------------------

def test_a_clone_that_carries_another_model_gets_the_patches_for_that_model(base):
    """The newest host's non-dynamic delegate and multi-GPU clones carry another model object than
    the one SimDA was applied to. Built here with the host's own API: an ON_CLONE callback,
    registered before SimDA's, that gives the new patcher a second BaseModel."""
    second = host.build_model(host.TINY_UNET, seed=21)
    swapping = base.clone()

    def give_second_model(source, clone):
        clone.model = second.model

    swapping.add_callback(ON_CLONE, give_second_model)
    adapters = random_adapters(base, 22)
    config = dict(adapters=adapters, latent_shift=LatentShiftSettings(), frame_group_norm=True)
    on_first = simda(swapping, **config)
    carried = on_first.clone()
    assert carried.model is second.model
    batch = video_batch(frames=4, seed=22)
    expected = call(simda(second, **config), batch)
    torch.testing.assert_close(call(carried, batch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, call(simda(base, **config), batch), atol=1e-2)


def test_patches_made_for_another_model_are_refused_at_call_time(base):
    """A clone whose model is swapped after SimDA's callback ran (nothing re-registers the
    patches) is refused with a sentence, never run half on one model and half on the other."""
    second = host.build_model(host.TINY_UNET, seed=23)
    patched = simda(base, adapters=random_adapters(base, 23), latent_shift=LatentShiftSettings())
    patched.add_callback(ON_CLONE, lambda source, clone: setattr(clone, "model", second.model))
    swapped = patched.clone()
    with pytest.raises(SimDAPatchError, match="another model object"):
        call(swapped, video_batch(seed=23))


# -- 4: the host's attention selection -----------------------------------------------------------------------

def test_latent_shift_attention_goes_through_the_users_attention_override(base):
    seen = []

    def recording_override(func, q, k, v, heads, *args, **kwargs):
        seen.append(k.shape[1] == 2 * q.shape[1])
        return func(q, k, v, heads, *args, **kwargs)

    overridden = base.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = recording_override
    patched = simda(overridden, latent_shift=LatentShiftSettings())
    batch = video_batch(frames=4, seed=24, tokens=7)
    out = call(patched, batch)
    shift_blocks = sum(1 for s in model_sites(base) for flag in s.self_attention if flag)
    # Each latent-shift self-attention shows 2N keys for N queries; cross-attention shows the 7 text tokens.
    assert seen.count(True) == shift_blocks and seen.count(False) == shift_blocks, seen
    torch.testing.assert_close(out, call(simda(base, latent_shift=LatentShiftSettings()), batch), rtol=1e-5, atol=1e-5)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("this attention kernel has no backward")


def test_tuning_works_under_an_attention_override_without_backward(base):
    calls = []

    def inference_only_override(func, q, k, v, *args, **kwargs):
        calls.append(1)
        return NoBackward.apply(func(q, k, v, *args, **kwargs))

    overridden = base.clone()
    overridden.model_options["transformer_options"]["optimized_attention_override"] = inference_only_override
    # Sampling uses the user's override...
    call(simda(overridden, latent_shift=LatentShiftSettings()), video_batch(seed=25))
    assert calls, "the override was not used for sampling"
    calls.clear()
    # ...training replaces it with an attention that has a backward.
    adapters = initial_adapters(model_sites(base), seed=25)
    training = training_patcher(overridden)
    apply_simda(training, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings()))
    trainer = AdapterTrainer(training, adapters, TuningRecipe(learning_rate=1e-3, mixed_precision=False), seed=25)
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(25))
    context = torch.randn(4, 8, host.TINY_UNET["context_dim"], generator=torch.Generator().manual_seed(26))
    with host.patched(training):
        before = copy.deepcopy(adapters.state_dict())
        losses = [trainer.step(x0, context) for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not calls, "training ran through the override that has no backward"
    assert any(not torch.equal(before[k], v) for k, v in adapters.state_dict().items())


# -- loops on the host's UNet --------------------------------------------------------------------------------

def loop_clone(base, loop: bool, adapters: bool = False):
    extra = {"adapters": random_adapters(base, 30)} if adapters else {}
    return simda(base, latent_shift=LatentShiftSettings(), frame_group_norm=False, loop=loop, **extra)


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "no_loop"])
def test_in_a_loop_the_last_frame_reaches_the_first(base, loop):
    """A host UNet call on a 6-frame clip with training-free latent shift (which only looks back in
    time; frame GroupNorm off, since its statistics couple every frame anyway): changing only the
    last frame changes frame 0's output when the clip loops, and leaves it exactly as it was when
    it does not. (The temporal adapter's kernel looks both ways, so with adapters every frame
    reaches every other one through the layers, loop or not.)"""
    clone = loop_clone(base, loop)
    x, timesteps, context = video_batch(frames=6, groups=1, seed=31)
    changed = x.clone()
    changed[5] += torch.randn(changed[5].shape, generator=torch.Generator().manual_seed(32))
    out = host.unet_forward(clone, x, timesteps, context, cond_or_uncond=(0,))
    out_changed = host.unet_forward(clone, changed, timesteps, context, cond_or_uncond=(0,))
    difference = float((out_changed[0] - out[0]).abs().max())
    if loop:
        assert difference > 1e-3, difference
    else:
        assert difference == 0.0, difference


def test_a_looping_clip_under_host_context_windows_wraps_around_the_whole_clip(base):
    """The Video Sampler's windows carry the clip's frame count, so a looped window sees the frames
    across the seam at their real positions."""
    from simda_pack.nodes.nodes_sampler import SimDAVideoSampler

    clone = loop_clone(base, True, adapters=True)
    windowed = host.context_windows(clone, 4, 1, "standard_static", 1, True)
    layouts = []
    import simda_pack.simda_core.host.register as register_module

    original = register_module.ClipLayout.from_batch

    def recording(*args, **kwargs):
        layout = original(*args, **kwargs)
        layouts.append(layout)
        return layout

    cond = [[torch.randn(1, 8, host.TINY_UNET["context_dim"], generator=torch.Generator().manual_seed(33)), {}]]
    try:
        register_module.ClipLayout.from_batch = recording
        (latent,) = SimDAVideoSampler.execute(
            windowed, cond, cond, 8, 64, 64, 0, 2, 1.0, "euler", "normal", 1.0, 0.0
        ).result
    finally:
        register_module.ClipLayout.from_batch = original
    assert torch.isfinite(latent["samples"]).all()
    assert layouts and all(layout.loop_length == 8 for layout in layouts), [l.loop_length for l in layouts]


# -- memory sizing: the MODEL's own query where the host has one ------------------------------------------

def test_memory_sizing_asks_the_model_where_the_host_offers_it(base):
    """The newer ModelPatcher (0.33+) answers ``get_free_memory(device)`` itself (it knows memory held
    by streamed weights) and ``is_dynamic()``; 0.3.75's has neither. The sizing helpers use the MODEL's
    answers when they exist and the host's module-level query otherwise; a CPU MODEL is never dynamic."""
    from simda_pack.nodes.nodes_upscale import sampling_budget
    from simda_pack.simda_core.host.memory import free_device_memory, resident_weight_bytes

    device = torch.device("cpu")
    clone = base.clone()
    host_query = getattr(clone, "get_free_memory", None) or comfy.model_management.get_free_memory
    host_free = free_device_memory(clone, device)
    assert host_free == pytest.approx(float(host_query(device)), rel=0.05)
    assert not getattr(clone, "is_dynamic", lambda: False)()
    assert resident_weight_bytes(clone) == clone.model_size() > 0
    budget = sampling_budget(clone)

    clone.get_free_memory = lambda dev: 7 * 2**30
    clone.is_dynamic = lambda: True
    assert free_device_memory(clone, device) == 7 * 2**30
    assert resident_weight_bytes(clone) == 0.0
    assert sampling_budget(clone) != budget


# -- a layer's own attention choice (ComfyUI 0.38's CrossAttention.comfy_attention) ------------------------

def test_latent_shift_passes_on_a_layers_attention_choice_only_where_the_layer_has_one(base, monkeypatch):
    """Where the layers carry no ``comfy_attention`` (0.3.75, 0.33) latent shift calls the host's
    attention exactly as before (same arguments, same output). Where they carry one, as 0.38's
    ``CrossAttention`` does, each latent-shift call hands that layer's choice on as
    ``preferred_attention``."""
    import comfy.ldm.modules.attention as attention_module

    batch = video_batch(seed=9)
    expected = call(simda(base, latent_shift=LatentShiftSettings()), batch)
    real = attention_module.optimized_attention
    seen = []

    def recording(q, k, v, heads, *args, **kwargs):
        seen.append(kwargs.pop("preferred_attention", None))
        return real(q, k, v, heads, *args, **kwargs)

    monkeypatch.setattr(attention_module, "optimized_attention", recording)
    clone = simda(base, latent_shift=LatentShiftSettings())
    assert torch.equal(call(clone, batch), expected)
    assert seen and all(choice is None for choice in seen)

    choices = {}
    for path, site_module in base.model.diffusion_model.named_modules():
        if path.endswith("attn1"):
            choices[path] = object()
            monkeypatch.setattr(site_module, "comfy_attention", choices[path], raising=False)
    seen.clear()
    clone = simda(base, latent_shift=LatentShiftSettings())
    assert torch.equal(call(clone, batch), expected)
    shifted = [choice for choice in seen if choice is not None]
    sites = sum(site.self_attention.count(True) for site in model_sites(base))
    assert len(shifted) == sites and set(map(id, shifted)) == set(map(id, choices.values()))


# -- multi-GPU deep clone (ComfyUI 0.33+) --------------------------------------------------------------------

@pytest.mark.skipif(not hasattr(comfy.model_patcher.ModelPatcher, "deepclone_multigpu"),
                    reason="ComfyUI 0.33+ only: 0.3.75 has no multi-GPU deep clone")
def test_a_multi_gpu_deep_clone_runs_simda_on_its_own_model_and_adapters():
    """The host's ``deepclone_multigpu`` (run on the CPU here) loads a fresh UNet from the checkpoint
    and deep-clones the additional models: the deep clone of a SimDA MODEL samples as the clone did,
    with its own UNet and its own copy of the adapters; changing the source's weights afterwards
    changes the source's output and leaves the deep clone's as it was."""
    model, _, _ = host_loaded_model()
    unet = model.get_model_object("diffusion_model")
    adapters = random_adapters(model, 7)
    clone = simda(model, adapters=adapters, latent_shift=LatentShiftSettings())
    g = torch.Generator().manual_seed(8)
    batch = (torch.randn(8, 4, 8, 8, generator=g), torch.full((8,), 500.0), torch.randn(8, 8, 768, generator=g))
    with torch.inference_mode():
        expected = call(clone, batch)
        deep = clone.deepclone_multigpu(new_load_device=torch.device("cpu"))
        assert deep.get_model_object("diffusion_model") is not unet
        assert deep.additional_models["simda_adapters"][0].model is not adapters
        torch.testing.assert_close(call(deep, batch), expected, rtol=1e-5, atol=1e-5)
        for parameter in unet.parameters():
            parameter.mul_(0.5)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.mul_(0.5)
    with torch.inference_mode():
        assert (call(clone, batch) - expected).abs().max() > 1e-2
        torch.testing.assert_close(call(deep, batch), expected, rtol=1e-5, atol=1e-5)
