"""SimDA registered on the real host: ComfyUI's UNet, ModelPatcher, sampler, memory manager and
the host's own nodes (HyperTile, Context Windows, LoRA loading). Nothing of the host is mocked.

Small UNets (``host.TINY_UNET``, SD1.x layout with 16 transformers, 32 channels) with seeded
random weights; latents of 8x8 (8x12 where a non-square grid matters).
"""
from __future__ import annotations

import copy
import gc
import logging
import re
import weakref
from dataclasses import replace

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.supported_models
import folder_paths
import pytest
import torch
from comfy_extras.nodes_hypertile import HyperTile

from simda_pack.nodes.nodes_adapters import SimDAAdapterLoader
from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.simda_core.formats import save_adapters
from simda_pack.simda_core.host.family import adapter_storage_dtype
from simda_pack.simda_core.host.register import (
    ADDITIONAL_MODELS_KEY, ATTACHMENT, SimDAPatchError, apply_simda, get_config, model_sites,
)
from simda_pack.simda_core.model import patch_functions
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.model.layout import ClipLayout
from simda_pack.simda_core.model.unet_sites import find_resblock_norms

pytestmark = pytest.mark.usefixtures("unload_host_models")

DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
CONTEXT = 32  # host.TINY_UNET's context_dim
TOKENS = 8
TRANSFORMER_BLOCKS = 16  # SD1.x layout: input 1,2,4,5,7,8 + middle + output 3..11


# -- helpers ---------------------------------------------------------------------------------------



def random_adapters(patcher, seed: int, dtype=None) -> SimDAAdapters:
    adapters = SimDAAdapters(model_sites(patcher), dtype=dtype)
    host.randomize_(adapters, seed)
    return adapters.requires_grad_(False)


def zero_adapters(patcher) -> SimDAAdapters:
    return SimDAAdapters(model_sites(patcher)).requires_grad_(False)


def simda(patcher, **config) -> comfy.model_patcher.ModelPatcher:
    clone = patcher.clone()
    apply_simda(clone, SimDAConfig(**config))
    return clone


def simda_like(clone, **changes) -> comfy.model_patcher.ModelPatcher:
    """A clone of a SimDA MODEL with some of its config changed."""
    return simda(
        clone,
        **{**{k: getattr(get_config(clone), k) for k in ("adapters", "latent_shift", "frame_group_norm")}, **changes},
    )


def everything_on(patcher, seed: int = 1, **extra):
    return simda(
        patcher, adapters=random_adapters(patcher, seed), latent_shift=LatentShiftSettings(), frame_group_norm=True,
        **extra,
    )


def video_batch(frames: int, groups: int = 2, seed: int = 0, size=(8, 8)):
    """``(x, timesteps, context)`` of one UNet call: ``groups`` cond/uncond groups of ``frames``
    frames each, every group with its own text context."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * frames, 4, *size, generator=g)
    context = torch.cat([torch.randn(1, TOKENS, CONTEXT, generator=g).expand(frames, -1, -1) for _ in range(groups)])
    timesteps = torch.full((groups * frames,), 500.0)
    return x, timesteps, context


def call(patcher, batch, cond_or_uncond=(1, 0), **extra):
    x, timesteps, context = batch
    return host.unet_forward(patcher, x, timesteps, context, cond_or_uncond=cond_or_uncond, **extra)


def gn_object_patch_keys(patcher) -> list[str]:
    unet = patcher.get_model_object("diffusion_model")
    return [f"diffusion_model.{path}.forward" for path in find_resblock_norms(unet)]


_g = torch.Generator().manual_seed(1234)
POSITIVE = [[torch.randn(1, TOKENS, CONTEXT, generator=_g), {}]]
NEGATIVE = [[torch.randn(1, TOKENS, CONTEXT, generator=_g), {}]]


def sample(patcher, frames: int = 6, steps: int = 3, seed: int = 0, size=(8, 8), cfg: float = 4.0):
    """Sampling the way KSampler does it: the host's sampler, memory manager and CFG batching."""
    latent = torch.zeros(frames, 4, *size)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        patcher, noise, steps, cfg, "euler", "normal", POSITIVE, NEGATIVE, latent, disable_pbar=True, seed=seed
    )


def simda_forwards(module: torch.nn.Module) -> list[str]:
    """Submodules whose instance ``forward`` is one of ours."""
    return [name for name, m in module.named_modules() if getattr(m.__dict__.get("forward"), "simda_patch", False)]


def ours_in(obj) -> list[str]:
    """Paths inside a nested options structure that hold something of SimDA's."""
    found = []

    def walk(value, path):
        if getattr(value, "simda_patch", False) or isinstance(value, SimDAAdapters):
            found.append(path)
        elif isinstance(value, comfy.model_patcher.ModelPatcher):
            walk(value.model, path + ".model")
        elif isinstance(value, dict):
            for k, v in value.items():
                if k in ("simda", ATTACHMENT, ADDITIONAL_MODELS_KEY):
                    found.append(f"{path}[{k!r}]")
                walk(v, f"{path}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(obj, "")
    return found


def patcher_state(patcher) -> dict:
    return {
        "object_patches": dict(patcher.object_patches),
        "model_options": copy.deepcopy(patcher.model_options),
        "wrappers": copy.deepcopy(patcher.wrappers),
        "attachments": dict(patcher.attachments),
        "additional_models": {k: list(v) for k, v in patcher.additional_models.items()},
        "patches": {k: list(v) for k, v in patcher.patches.items()},
    }


def node_model(output):
    """The MODEL of a V3 node's result (``io.NodeOutput`` or the tuple some host nodes return)."""
    result = output.result if hasattr(output, "result") else output
    return result[0]


# -- 1 and 2: what SimDA adds when it should add nothing -------------------------------------------

def test_zero_adapters_without_frame_group_norm_reproduce_the_base_bit_exactly(base):
    """Fresh adapters are zero at their output (fc2 / up), and with latent shift and frame GroupNorm
    off nothing else changes, so the UNet output is the base output bit for bit.

    The config cannot express "adapters without frame GroupNorm" (adapters were trained with it, so
    ``uses_frame_group_norm`` forces it on): the test removes the GroupNorm object patches from
    the clone instead."""
    adapters = zero_adapters(base)
    assert SimDAConfig(adapters=adapters, frame_group_norm=False).uses_frame_group_norm
    clone = simda(base, adapters=adapters)
    gn_keys = gn_object_patch_keys(clone)
    assert set(gn_keys) <= set(clone.object_patches)
    for key in gn_keys:
        del clone.object_patches[key]
    assert clone.object_patches, "the temporal and FFN adapter patches must stay"

    batch = video_batch(frames=6, groups=2)
    expected = call(base, batch)
    assert torch.equal(call(clone, batch), expected)

    # The adapter paths were live: giving the same adapter modules weights changes the output.
    host.randomize_(adapters, 5)
    assert not torch.allclose(call(clone, batch), expected, atol=1e-3)


def test_zero_adapters_add_exactly_nothing_to_frame_group_norm(base):
    """With frame GroupNorm on (as adapters always have it), zero adapters equal the GroupNorm-only
    patch bit for bit, and that differs from the base (statistics are shared over frames)."""
    batch = video_batch(frames=6, groups=2, seed=1)
    with_adapters = call(simda(base, adapters=zero_adapters(base)), batch)
    group_norm_only = call(simda(base, frame_group_norm=True), batch)
    assert torch.equal(with_adapters, group_norm_only)
    assert not torch.allclose(group_norm_only, call(base, batch), atol=1e-3)


def test_one_frame_without_adapters_reproduces_the_base(base, record_property):
    """Training-free latent shift and frame GroupNorm on a single frame are the image model: the
    frame attends to itself, and its statistics are its own."""
    clone = simda(base, latent_shift=LatentShiftSettings(), frame_group_norm=True)
    one_frame = video_batch(frames=1, groups=2, seed=2)
    expected = call(base, one_frame)
    got = call(clone, one_frame)
    diff = float((got - expected).abs().max())
    record_property("one_frame_max_abs_diff", diff)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), diff
    clip = video_batch(frames=6, groups=2, seed=2)
    assert not torch.allclose(call(clone, clip), call(base, clip), atol=1e-2)


def test_one_frame_runs_the_adapters(base):
    """As in the authors' UNet, a one-frame clip still passes through the spatial and FFN adapters
    and the temporal adapter's centre tap (tests/test_authors_fixture.py checks the numbers): it is
    not the image model, and each one-frame clip of a batch (frames_per_clip 1) is computed alone."""
    clone = everything_on(base)
    one_frame = video_batch(frames=1, groups=2, seed=2)
    assert not torch.allclose(call(clone, one_frame), call(base, one_frame), atol=1e-3)

    x, timesteps, context = video_batch(frames=3, groups=1, seed=4, size=(16, 16))
    per_frame_clips = call(simda_like(clone, frames_per_clip=1), (x, timesteps, context), cond_or_uncond=(0,))
    alone = torch.cat(
        [call(clone, (x[i:i + 1], timesteps[i:i + 1], context[i:i + 1]), cond_or_uncond=(0,)) for i in range(3)]
    )
    torch.testing.assert_close(per_frame_clips, alone, rtol=1e-5, atol=1e-5)


# -- 3: clips, frames and cond/uncond groups --------------------------------------------------------

@pytest.mark.parametrize("frames_per_clip", [0, 2], ids=["clip_per_group", "two_clips_per_group"])
def test_clips_never_share_anything(base, frames_per_clip):
    """Everything on, two cond/uncond groups of 4 frames, the second group's frames scaled and
    shifted copies of the first's. One clip per group: clip B (the second group) can change without
    changing clip A's output, and the other way round. ``frames_per_clip=2``: each group holds two
    clips, and clip B is the second clip of the first group, just as independent."""
    frames = 4
    clone = everything_on(base, seed=3, frames_per_clip=frames_per_clip)
    x, timesteps, context = video_batch(frames=frames, groups=2, seed=3, size=(8, 12))
    x[frames:] = 1.5 * x[:frames] + 0.25
    clip = frames_per_clip or frames
    a, b = slice(0, clip), slice(clip, 2 * clip)

    out = call(clone, (x, timesteps, context))
    changed_b = x.clone()
    changed_b[b] += torch.randn_like(changed_b[b])
    out_b = call(clone, (changed_b, timesteps, context))
    assert torch.equal(out_b[a], out[a])
    assert torch.equal(out_b[2 * clip:], out[2 * clip:])
    assert not torch.allclose(out_b[b], out[b], atol=1e-3)

    changed_a = x.clone()
    changed_a[a] *= -1
    out_a = call(clone, (changed_a, timesteps, context))
    assert torch.equal(out_a[clip:], out[clip:])


@pytest.mark.parametrize("variant", ["group_norm_only", "zero_adapters"])
def test_frame_group_norm_shares_statistics_within_a_clip_only(base, variant):
    """Changing one frame of clip A changes every other frame of clip A through the shared
    statistics (frame GroupNorm on, latent shift off, zero adapters), never clip B; with frame
    GroupNorm off the other frames stay exactly as they were."""
    frames = 4
    config = {"frame_group_norm": True} if variant == "group_norm_only" else {"adapters": zero_adapters(base)}
    shared = simda(base, **config)
    batch = video_batch(frames=frames, groups=2, seed=4)
    x, timesteps, context = batch
    changed = x.clone()
    changed[2] = 3 * changed[2] + 1
    others_a = [0, 1, 3]

    out, out_changed = call(shared, batch), call(shared, (changed, timesteps, context))
    assert torch.equal(out_changed[frames:], out[frames:])
    for frame in others_a:
        assert not torch.allclose(out_changed[frame], out[frame], atol=1e-4), frame

    base_out, base_changed = call(base, batch), call(base, (changed, timesteps, context))
    assert torch.equal(base_changed[others_a], base_out[others_a])
    assert not torch.allclose(base_changed[2], base_out[2], atol=1e-3)


def test_cond_and_uncond_batched_or_in_separate_calls_agree(base):
    """The host batches cond and uncond when memory allows and calls them one by one when it does
    not: SimDA must give the same result either way."""
    frames = 5
    clone = everything_on(base, seed=6)
    x, timesteps, context = video_batch(frames=frames, groups=2, seed=6)
    # Batched and split matmuls and reductions block differently, so the results differ by float
    # reassociation (measured up to 1.4e-4 on outputs of magnitude ~3, one thread or two); mixing
    # the clips would differ by O(1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = call(clone, (x, timesteps, context), cond_or_uncond=(0, 1))
        cond = call(clone, (x[:frames], timesteps[:frames], context[:frames]), cond_or_uncond=(0,))
        uncond = call(clone, (x[frames:], timesteps[frames:], context[frames:]), cond_or_uncond=(1,))
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(together, torch.cat([cond, uncond]), rtol=1e-4, atol=5e-4)


# -- 4: sampling leaves nothing behind ---------------------------------------------------------------

def test_sampling_a_clone_leaves_the_original_model_untouched(base):
    unet = base.get_model_object("diffusion_model")
    batch = video_batch(frames=6, groups=2, seed=7)
    before_state = patcher_state(base)
    before_call = call(base, batch)
    before_sample = sample(base)

    clone = everything_on(base, seed=7)
    live = []
    clone.add_wrapper_with_key(
        DIFFUSION_MODEL, "test_probe",
        lambda executor, *a, **k: live.append(len(simda_forwards(unet))) or executor(*a, **k),
    )
    assert ours_in(patcher_state(clone)), "ours_in must see SimDA's registrations on the clone"
    simda_sample = sample(clone)
    assert live and set(live) == {len(clone.object_patches)}, "SimDA's object patches were not applied while sampling"
    assert not torch.allclose(simda_sample, before_sample, atol=1e-3)

    # The next run with the original MODEL, as the host does it: the clone is unloaded first.
    assert torch.equal(sample(base), before_sample)
    assert simda_forwards(unet) == []
    comfy.model_management.unload_all_models()
    assert simda_forwards(unet) == []
    assert torch.equal(call(base, batch), before_call)

    after_state = patcher_state(base)
    assert after_state == before_state
    assert ours_in(after_state) == []
    assert ATTACHMENT not in base.attachments and not base.additional_models
    assert "simda" not in base.wrappers.get(DIFFUSION_MODEL, {})


def test_two_clones_do_not_talk_to_each_other(base):
    """A clone sampled alone, then again after a second clone with other adapters was made and
    sampled, gives the same result bit for bit; the two give different results."""
    first = everything_on(base, seed=8)
    alone = sample(first)
    second = everything_on(base, seed=9)
    b1 = sample(second)
    a2, b2 = sample(first), sample(second)
    assert torch.equal(a2, alone)
    assert torch.equal(b2, b1)
    assert not torch.allclose(alone, b1, atol=1e-3)


def test_releasing_a_simda_model_while_its_unet_is_loaded_frees_its_adapters(base, caplog):
    """A workflow drops a SimDA MODEL (new strength, node removed) while the host keeps the UNet
    loaded with that MODEL's object patches on it: the adapters go with the MODEL that owns them,
    the host's memory manager holds no released ModelPatcher of a live model, and unloading works
    without the host's "memory leak" warning."""
    unet = base.get_model_object("diffusion_model")
    adapters = random_adapters(base, 18)
    adapters_alive = weakref.ref(adapters)
    clone = simda(base, adapters=adapters, latent_shift=LatentShiftSettings())
    del adapters
    with caplog.at_level(logging.WARNING):
        sample(clone, frames=4, steps=1)
        assert simda_forwards(unet), "the host keeps the sampled MODEL loaded, its patches on the UNet"
        del clone
        gc.collect()
        assert adapters_alive() is None, "patches left on the UNet keep the adapters of a released MODEL alive"
        assert not [entry for entry in comfy.model_management.current_loaded_models if entry.is_dead()]
        comfy.model_management.unload_all_models()
        assert simda_forwards(unet) == []
        assert call(base, video_batch(frames=3)).isfinite().all()
    assert "memory leak" not in caplog.text


# -- 5: other patches on the same MODEL ---------------------------------------------------------------

LORA_TARGETS = (
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "output_blocks.5.1.transformer_blocks.0.ff.net.2",
)
"""Linear layers the test LoRA changes with up/down matrices."""
NORM_DIFF_TARGET = "input_blocks.1.0.in_layers.0"
"""A ResBlock GroupNorm (one SimDA makes frame-shared) the test LoRA changes with a ``.diff``."""
LORA_KEYS = {f"diffusion_model.{path}.weight" for path in (*LORA_TARGETS, NORM_DIFF_TARGET)}


def lora_name(path: str) -> str:
    return "lora_unet_" + path.replace(".", "_")


def lora_state_dict(patcher, seed: int = 11, rank: int = 4) -> dict[str, torch.Tensor]:
    """A LoRA file's tensors in the kohya naming LoraLoader reads."""
    unet = patcher.get_model_object("diffusion_model")
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path in LORA_TARGETS:
        out_dim, in_dim = unet.get_submodule(path).weight.shape
        tensors[f"{lora_name(path)}.lora_up.weight"] = 0.5 * torch.randn(out_dim, rank, generator=g)
        tensors[f"{lora_name(path)}.lora_down.weight"] = 0.5 * torch.randn(rank, in_dim, generator=g)
        tensors[f"{lora_name(path)}.alpha"] = torch.tensor(float(rank))
    norm = unet.get_submodule(NORM_DIFF_TARGET)
    tensors[f"{lora_name(NORM_DIFF_TARGET)}.diff"] = 0.5 * torch.randn(norm.weight.shape, generator=g)
    return tensors


def lora_delta(lora: dict[str, torch.Tensor], path: str) -> torch.Tensor:
    if path == NORM_DIFF_TARGET:
        return lora[f"{lora_name(path)}.diff"]
    return lora[f"{lora_name(path)}.lora_up.weight"] @ lora[f"{lora_name(path)}.lora_down.weight"]


def test_lora_weight_patches_apply_on_a_simda_clone(base):
    lora = lora_state_dict(base)
    targets = (*LORA_TARGETS, NORM_DIFF_TARGET)
    clone = everything_on(base, seed=10)

    with_lora, _ = comfy.sd.load_lora_for_models(clone, None, lora, 1.0, 0.0)
    assert set(with_lora.patches) == LORA_KEYS, "the LoRA keys no longer resolve on the SimDA clone"
    assert get_config(with_lora) is not None

    # While the host has it patched, the module weights are base + up @ down (base + diff).
    unet = base.get_model_object("diffusion_model")
    originals = {path: unet.get_submodule(path).weight.detach().clone() for path in targets}
    with host.patched(with_lora):
        for path in targets:
            torch.testing.assert_close(unet.get_submodule(path).weight, originals[path] + lora_delta(lora, path))
    for path in targets:
        assert torch.equal(unet.get_submodule(path).weight, originals[path])

    clip = video_batch(frames=6, groups=2, seed=10)
    assert not torch.allclose(call(with_lora, clip), call(clone, clip), atol=1e-3)
    # The LoRA acts on one frame too, where the adapters still run.
    lora_only, _ = comfy.sd.load_lora_for_models(base, None, lora, 1.0, 0.0)
    frame = video_batch(frames=1, groups=2, seed=10)
    assert not torch.allclose(call(with_lora, frame), call(clone, frame), atol=1e-3)
    assert not torch.allclose(call(with_lora, frame), call(lora_only, frame), atol=1e-3)
    # LoRA first, SimDA second: the same model.
    config = get_config(clone)
    lora_then_simda = lora_only.clone()
    apply_simda(lora_then_simda, replace(config, object_patch_keys=()))
    assert set(lora_then_simda.patches) == LORA_KEYS
    torch.testing.assert_close(call(lora_then_simda, clip), call(with_lora, clip), rtol=1e-5, atol=1e-5)


def test_cross_attention_patches_still_run(base):
    """IP-Adapter style patches (``attn2_patch``, ``attn2_output_patch``) on a SimDA clone."""
    calls = {"attn2_patch": [], "attn2_output_patch": []}

    def attn2_patch(n, context, value, extra_options):
        calls["attn2_patch"].append(extra_options["block"])
        return n, context * 1.5, value * 1.5

    def attn2_output_patch(out, extra_options):
        calls["attn2_output_patch"].append(extra_options["block"])
        return out * 0.8

    clone = everything_on(base, seed=12)
    patched = clone.clone()
    patched.set_model_attn2_patch(attn2_patch)
    patched.set_model_attn2_output_patch(attn2_output_patch)
    base_patched = base.clone()
    base_patched.set_model_attn2_patch(attn2_patch)
    base_patched.set_model_attn2_output_patch(attn2_output_patch)

    clip = video_batch(frames=4, groups=2, seed=12)
    out = call(patched, clip)
    assert len(calls["attn2_patch"]) == len(calls["attn2_output_patch"]) == TRANSFORMER_BLOCKS
    assert not torch.allclose(out, call(clone, clip), atol=1e-3)
    assert not torch.allclose(out, call(base_patched, clip), atol=1e-3), "SimDA stopped working next to attn2 patches"
    # On one frame the training-free patch is the image model, attn2 patches included; with
    # adapters the attn2 patches still run there.
    frame = video_batch(frames=1, groups=2, seed=12)
    shift_only = simda(base_patched, latent_shift=LatentShiftSettings())
    torch.testing.assert_close(call(shift_only, frame), call(base_patched, frame), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(call(patched, frame), call(clone, frame), atol=1e-3)


def hypertile(model, tile_size=256, swap_size=2):
    tiled = HyperTile.execute(model, tile_size=tile_size, swap_size=swap_size, max_depth=0, scale_depth=False)
    return node_model(tiled)


def test_hypertile_that_tiles_is_refused_at_the_first_unet_call_in_either_order(base):
    """HyperTile with parameters that really tile an 8x8 latent (tiles of 4 latent pixels, swap size 1)
    re-tiles the queries of the top level: the grid check of the first call refuses it, naming it."""
    shift = LatentShiftSettings()
    for model in (hypertile(simda(base, latent_shift=shift), 32, 1), simda(hypertile(base, 32, 1), latent_shift=shift)):
        named = r"token grid \(\S*hypertile_in \(from comfy_extras\.nodes_hypertile\)"
        with pytest.raises(SimDAPatchError, match=named):
            sample(model, frames=4, steps=1)


def test_hypertile_that_does_not_tile_runs_with_latent_shift(base):
    """With its defaults HyperTile tiles nothing below a latent side of 32 (tiles of 32 latent pixels):
    latent shift runs beside it and the clip equals latent shift alone."""
    shift = simda(base, latent_shift=LatentShiftSettings())
    assert torch.equal(sample(hypertile(shift), frames=4, steps=2), sample(shift, frames=4, steps=2))


def hypernetwork_like(q, k, v, extra_options):
    """A per-token ``attn1_patch`` as the host's hypernetworks are: keys and values changed token by token."""
    return q, k * 1.5 + 0.1, v * 0.5


def test_a_per_token_attention_patch_runs_with_latent_shift(base):
    shift = simda(base, latent_shift=LatentShiftSettings())
    patched = shift.clone()
    patched.set_model_attn1_patch(hypernetwork_like)
    before = simda(base.clone(), latent_shift=LatentShiftSettings())
    before.set_model_attn1_patch(hypernetwork_like)
    plain = base.clone()
    plain.set_model_attn1_patch(hypernetwork_like)
    with_patch = sample(patched, frames=4, steps=2)
    assert torch.equal(with_patch, sample(simda(plain, latent_shift=LatentShiftSettings()), frames=4, steps=2))
    assert (with_patch - sample(shift, frames=4, steps=2)).abs().max() > 1e-3, "the patch did not act"
    assert (with_patch - sample(plain, frames=4, steps=2)).abs().max() > 1e-3, "latent shift did not act"


def foreign_self_attention(q, k, v, extra_options):
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, extra_options["n_heads"])


@pytest.mark.parametrize("key", [("input", 1, 0), ("input", 1)])
def test_a_replacement_on_the_model_is_refused_in_either_order(base, key):
    """Another node's self-attention replacement set on the MODEL (at ``(block, id, index)`` or at
    ``(block, id)``) would take latent shift's slot on every call: refused, naming it."""
    occupied = base.clone()
    occupied.set_model_attn1_replace(foreign_self_attention, *key)
    named = re.escape(f"at {key} on this MODEL (") + r"foreign_self_attention \(from \S*test_host_patch\)"
    with pytest.raises(SimDAPatchError, match=named):
        apply_simda(occupied.clone(), SimDAConfig(latent_shift=LatentShiftSettings()))

    later = simda(base, latent_shift=LatentShiftSettings())
    later.set_model_attn1_replace(foreign_self_attention, *key)
    with pytest.raises(RuntimeError, match=named):  # when the sampling run starts
        sample(later, frames=3, steps=1)
    with pytest.raises(SimDAPatchError, match=named):  # a UNet call outside a sampling run
        call(later, video_batch(frames=3, groups=1), cond_or_uncond=(0,))


def guidance_pass(key, seen):
    """A guidance node's post-CFG function in the shape of the host's Perturbed-Attention Guidance:
    one more pass of the cond with its own self-attention replacement at ``key``, added to a copy of the
    call's options; its result is the guidance output, so what that pass computed decides the clip."""

    def perturbed(q, k, v, extra_options, mask=None):
        seen.append(tuple(extra_options["block"]) + (extra_options["block_index"],))
        return v

    def post_cfg(args):
        options = comfy.model_patcher.set_model_options_patch_replace(
            args["model_options"].copy(), perturbed, "attn1", *key
        )
        (out,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return out

    return post_cfg


@pytest.mark.parametrize("key", [("middle", 0), ("middle", 0, 0), ("input", 1)])
def test_a_guidance_pass_takes_its_blocks_and_latent_shift_keeps_the_others(base, key, monkeypatch):
    seen, shifted = [], []
    real_shift = patch_functions.latent_shift_attention

    def recording_shift(q, k, v, heads, layout, h, w, attention):
        shifted.append(len(seen))
        return real_shift(q, k, v, heads, layout, h, w, attention=attention)

    monkeypatch.setattr(patch_functions, "latent_shift_attention", recording_shift)
    guided = simda(base, latent_shift=LatentShiftSettings())
    guided.set_model_sampler_post_cfg_function(guidance_pass(key, seen))
    out = sample(guided, frames=4, steps=1)
    assert seen and set(seen) == {key if len(key) == 3 else key + (0,)}, seen  # the guidance pass ran its own
    assert not torch.equal(out, sample(simda(base, latent_shift=LatentShiftSettings()), frames=4, steps=1))
    shifts_per_pass = TRANSFORMER_BLOCKS
    assert len(shifted) == 2 * shifts_per_pass + (shifts_per_pass - 1), len(shifted)  # cond+uncond, then the pass


# -- 6: context windows -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "schedule, stride, closed_loop, cfg",
    [("standard_static", 1, False, 4.0), ("standard_uniform", 2, False, 1.0), ("looped_uniform", 1, True, 1.0),
     ("looped_uniform", 2, True, 1.0)],
)
def test_context_windows_hand_each_window_to_simda_as_a_clip(base, monkeypatch, schedule, stride, closed_loop, cfg):
    """12 frames, windows of 6 (sliding, strided, looped, looped and strided; on 0.33 with the frame
    before each window first): every UNet call is one window per cond/uncond group, and the latent
    shift sees a clip of 6 (or 7) frames at the time positions of the window's frames, walked around
    the 12-frame clip in the test. 5 steps: the host's 0.3.75 step lookup (see
    test_host_context_windows_on_frames_need_steps_plus_one_frames) is served on a SimDA MODEL's runs.
    cfg 1 (cond only, half the work) where the cond/uncond batching is not what is tested."""
    windowed = host.context_windows(everything_on(base, seed=13), 6, 2, schedule, stride, closed_loop)
    calls = []
    real_shift = patch_functions.latent_shift_attention

    def recording_shift(q, k, v, heads, layout, h, w, attention):
        calls[-1]["layouts"].add(layout)
        return real_shift(q, k, v, heads, layout, h, w, attention=attention)

    def probe(executor, x, *args, **kwargs):
        options = args[4]
        calls.append({
            "batch": x.shape[0],
            "groups": len(options["cond_or_uncond"]),
            "window": tuple(options["context_window"].index_list),
            "frames": real_frames(options["context_window"]),
            "layouts": set(),
        })
        return executor(x, *args, **kwargs)

    monkeypatch.setattr(patch_functions, "latent_shift_attention", recording_shift)
    windowed.add_wrapper_with_key(DIFFUSION_MODEL, "test_probe", probe)
    out = sample(windowed, frames=12, steps=5, cfg=cfg)

    assert out.shape == (12, 4, 8, 8) and bool(torch.isfinite(out).all())
    assert len(calls) > 2
    assert {c["groups"] for c in calls} == {2 if cfg != 1.0 else 1}
    for seen in calls:
        count = len(seen["frames"])
        assert len(seen["window"]) == 6 and count in (6, 7) and seen["batch"] == count * seen["groups"]
        assert seen["layouts"] == {ClipLayout(seen["groups"], count, walked_positions(seen["frames"], 12))}
    assert set().union(*(c["window"] for c in calls)) == set(range(12))
    steps = {b - a for c in calls for a, b in zip(c["window"], c["window"][1:])}
    if stride > 1:
        assert 2 in steps, "no strided window was sampled"
    if closed_loop:
        assert any(c["window"][0] > c["window"][-1] for c in calls), "no window wrapped around"
    if closed_loop and stride > 1:
        looped_strided = [c for c in calls if c["window"][0] > c["window"][-1] and 2 in np_steps(c["window"])]
        assert looped_strided, "no window was both looped and strided"


def np_steps(window) -> set[int]:
    return {b - a for a, b in zip(window, window[1:]) if b > a}


def walked_positions(indices: list[int], total: int) -> tuple[int, ...]:
    """The time positions of a window's frames, by walking them: the first at its index, each next
    one ``(index - previous index) mod total`` frames later."""
    positions = [indices[0]]
    for previous, index in zip(indices, indices[1:]):
        positions.append(positions[-1] + (index - previous) % total)
    return tuple(positions)


def real_frames(window) -> list[int]:
    """The frames a host window hands the UNet: its index list, after the frame before it where
    the host adds that one (0.33's ``causal_window_fix`` anchor; 0.3.75 has none)."""
    anchor = getattr(window, "causal_anchor_index", None)
    return ([anchor] if anchor is not None and anchor >= 0 else []) + list(window.index_list)


@host.only_on_hosts_before((0, 33, 0), "0.33 matches the step on the first timestep entry, so any frame count samples")
def test_host_context_windows_on_frames_need_steps_plus_one_frames(base):
    """Host limitation in ComfyUI 0.3.75, without SimDA: ``IndexListContextHandler.set_step``
    compares the per-frame timesteps with the schedule's sigmas, so with ``dim=0`` (frames in the
    batch, as for SD1.x video) sampling fails unless steps + 1 equals the frame count (the Video
    Sampler's handler matches on the first entry)."""
    windowed = host.context_windows(base, 6, 2, "standard_static")
    with pytest.raises(RuntimeError, match="must match the size"):
        sample(windowed, frames=12, steps=2)


# -- 7: memory management ------------------------------------------------------------------------------

def test_adapters_are_an_additional_model_the_host_loads(base):
    adapters = random_adapters(base, 14)
    clone = simda(base, adapters=adapters, latent_shift=LatentShiftSettings())
    extra = [m for m in clone.get_nested_additional_models() if m.model is adapters]
    assert len(extra) == 1
    size = sum(p.numel() * p.element_size() for p in adapters.parameters())
    assert extra[0].model_size() == size > 0

    loaded_during_call = []
    clone.add_wrapper_with_key(
        DIFFUSION_MODEL, "test_probe",
        lambda executor, *a, **k: (
            loaded_during_call.append(extra[0] in comfy.model_management.loaded_models()) or executor(*a, **k)
        ),
    )
    sample(clone, frames=4, steps=1)
    assert loaded_during_call == [True]


def run_loaded(patcher, batch, share: float | None, cond_or_uncond=(1, 0)):
    """One UNet call with the UNet and its additional models loaded by the host's ``load()``:
    fully (``share`` None) or for low VRAM with ``share`` of each model's size in memory (the
    rest cast per layer, weight patches applied on the fly)."""
    cpu = torch.device("cpu")
    x, timesteps, context = batch
    options = copy.copy(patcher.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers)
    options["cond_or_uncond"] = list(cond_or_uncond)
    patchers = [patcher, *patcher.get_nested_additional_models()]
    for p in patchers:
        p.patch_model(device_to=cpu, lowvram_model_memory=0 if share is None else max(1, int(share * p.model_size())))
    try:
        state = {
            "lowvram": [bool(p.model.model_lowvram) for p in patchers],
            "lowvram_patches": patcher.model.lowvram_patch_counter,
            "loaded_share": patcher.loaded_size() / patcher.model_size(),
        }
        with torch.no_grad():
            out = patcher.model.diffusion_model(x, timesteps=timesteps, context=context, transformer_options=options)
        return out, state
    finally:
        for p in reversed(patchers):
            p.unpatch_model(device_to=cpu)


@pytest.mark.parametrize("share", [0.0, 0.35], ids=["all_offloaded", "partly_loaded"])
def test_low_vram_loading_gives_the_full_load_outputs(base, share):
    adapters = random_adapters(base, 15)
    clone = simda(base, adapters=adapters, latent_shift=LatentShiftSettings())
    clone, _ = comfy.sd.load_lora_for_models(clone, None, lora_state_dict(base), 1.0, 0.0)
    batch = video_batch(frames=4, groups=2, seed=15)

    full, full_state = run_loaded(clone, batch, share=None)
    assert full_state["lowvram"] == [False, False]
    low, state = run_loaded(clone, batch, share=share)
    # The UNet takes the low-VRAM path; the adapters are plain torch layers, which the host always
    # loads whole (they are small: the host casts only its own layers per call).
    assert state["lowvram"] == [True, False], "the host did not take the low-VRAM path for the UNet"
    if share == 0.0:
        assert state["loaded_share"] == 0.0
        # Every LoRA key, the frame-shared GroupNorm's included, is applied by the host per call.
        assert state["lowvram_patches"] == len(LORA_KEYS), "the LoRA was not applied as low-VRAM patches"
    else:
        assert 0.0 < state["loaded_share"] < 1.0
    torch.testing.assert_close(low, full, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(full, call(base, batch), atol=1e-3)


def test_half_precision_storage(base, record_property):
    """An fp16 UNet (CPU fp16 works in this torch): adapters are stored in fp16 too, the host's
    sampler runs it, and the result follows the fp32 model within fp16 rounding."""
    half = host.build_model(host.TINY_UNET, seed=0, dtype=torch.float16)
    assert adapter_storage_dtype(half) == torch.float16
    adapters = random_adapters(base, 16)
    half_adapters = copy.deepcopy(adapters).to(torch.float16)
    full_clone = simda(base, adapters=adapters, latent_shift=LatentShiftSettings())
    half_clone = simda(half, adapters=half_adapters, latent_shift=LatentShiftSettings())
    assert {p.dtype for p in half_adapters.parameters()} == {torch.float16}
    assert (
        half_clone.get_nested_additional_models()[0].model_size() * 2
        == full_clone.get_nested_additional_models()[0].model_size()
    )

    x, timesteps, context = video_batch(frames=4, groups=2, seed=16)
    expected = call(full_clone, (x, timesteps, context))
    got = call(half_clone, (x.half(), timesteps, context.half()))
    assert got.dtype == torch.float16
    relative = float((got.float() - expected).abs().max() / expected.abs().max())
    record_property("fp16_relative_max_diff", relative)
    print(f"fp16 vs fp32 relative max diff: {relative:.3g}")
    assert relative < 0.02
    # The SimDA effect itself survives fp16.
    effect = expected - call(base, (x, timesteps, context))
    half_base = host.unet_forward(half, x.half(), timesteps, context.half(), cond_or_uncond=(1, 0))
    half_effect = (got - half_base).float()
    assert torch.nn.functional.cosine_similarity(effect.flatten(), half_effect.flatten(), dim=0) > 0.99

    out = sample(half_clone, frames=4, steps=2)
    assert bool(torch.isfinite(out).all())


# -- 8: the nodes ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory, base):
    """A saved adapter file in a folder registered with the host's folder_paths as models/simda."""
    folder = tmp_path_factory.mktemp("simda_models")
    adapters = random_adapters(base, 17)
    save_adapters(adapters, folder / "tiny.safetensors", family="sd1")
    folder_paths.add_model_folder_path("simda", str(folder))
    yield "tiny.safetensors", adapters
    folder_paths.folder_names_and_paths["simda"][0].remove(str(folder))


SHIFT_DEFAULTS = dict(
    frames_per_clip=0, full_resolution=True, half_resolution=True, quarter_resolution=True, eighth_resolution=True,
    start_percent=0.0, end_percent=1.0, frame_group_norm=False,
)


def test_nodes_compose_and_leave_their_input_alone(base, adapter_file):
    name, adapters = adapter_file
    before = patcher_state(base)

    loaded = node_model(SimDAAdapterLoader.execute(base, name, 1.0))
    assert patcher_state(base) == before
    config = get_config(loaded)
    assert config.adapters is not None and config.adapter_name == name and config.family == "sd1"
    assert config.latent_shift is None

    shifted = node_model(SimDALatentShiftPatch.execute(loaded, **SHIFT_DEFAULTS))
    assert patcher_state(base) == before
    assert get_config(loaded).latent_shift is None, "the Latent-Shift Patch changed its input MODEL"
    both = get_config(shifted)
    assert both.adapters is config.adapters and both.latent_shift is not None
    replaced = shifted.model_options["transformer_options"]["patches_replace"]["attn1"]
    assert len(replaced) == TRANSFORMER_BLOCKS
    assert len(shifted.get_nested_additional_models()) == 1

    # The other order carries both as well.
    reverse = node_model(
        SimDAAdapterLoader.execute(node_model(SimDALatentShiftPatch.execute(base, **SHIFT_DEFAULTS)), name, 1.0)
    )
    assert get_config(reverse).adapters is not None and get_config(reverse).latent_shift is not None
    assert patcher_state(base) == before

    # The loaded file is the saved adapters: same outputs as registering them directly.
    clip = video_batch(frames=4, groups=2, seed=17)
    direct = simda(base, adapters=adapters, latent_shift=LatentShiftSettings())
    torch.testing.assert_close(call(shifted, clip), call(direct, clip), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(call(reverse, clip), call(shifted, clip), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strength", [2.5, -0.1])
def test_out_of_range_strength_is_refused_before_anything_is_patched(base, strength):
    before = patcher_state(base)
    # A missing file would give another error: the strength is checked first.
    with pytest.raises(ValueError, match=rf"strength {strength} is out of range; use a value from 0.0 to 2.0"):
        SimDAAdapterLoader.execute(base, "not-there.safetensors", strength)
    assert patcher_state(base) == before


def test_latent_shift_patch_refuses_a_reversed_schedule(base):
    before = patcher_state(base)
    with pytest.raises(ValueError, match="start_percent 0.8 must not be above end_percent 0.2"):
        SimDALatentShiftPatch.execute(base, **{**SHIFT_DEFAULTS, "start_percent": 0.8, "end_percent": 0.2})
    assert patcher_state(base) == before


def test_nodes_refuse_a_model_of_another_family(adapter_file):
    """The SDXL refiner is not an SDXL subclass in the host (another UNet: 384 channels, 1280-wide
    context): SimDA refuses it by name."""
    refiner = host.build_model(host.TINY_UNET, config_class=comfy.supported_models.SDXLRefiner, seed=None)
    with pytest.raises(ValueError, match=r"SD1\.x, SD2\.x or SDXL.*SDXLRefiner"):
        SimDAAdapterLoader.execute(refiner, adapter_file[0], 1.0)
    with pytest.raises(ValueError, match=r"SD1\.x, SD2\.x or SDXL.*SDXLRefiner"):
        SimDALatentShiftPatch.execute(refiner, **SHIFT_DEFAULTS)
    assert ATTACHMENT not in refiner.attachments


def test_video_sampler_runs_context_windows_over_the_frame_batch(base):
    """The Video Sampler hands the host a context handler that finds its step from one frame's
    sigma, so windows over the frames work at any step count (the host's own needs steps + 1 ==
    frames, see above); every UNet call sees one window of 6 frames per cond/uncond group."""
    from simda_pack.nodes.nodes_sampler import SimDAVideoSampler

    clone = everything_on(base, seed=21)
    windowed = host.context_windows(clone, 6, 2, "standard_static")
    seen = []
    windowed.add_wrapper_with_key(
        DIFFUSION_MODEL, "test_probe",
        lambda executor, x, *a, **k: (
            seen.append((x.shape[0], len(real_frames(a[4]["context_window"])))) or executor(x, *a, **k)
        ),
    )
    result = SimDAVideoSampler.execute(
        windowed, POSITIVE, NEGATIVE, 12, 64, 64, 0, 2, 4.0, "euler", "normal", 1.0, 0.0
    ).result[0]["samples"]
    assert result.shape == (12, 4, 8, 8) and bool(torch.isfinite(result).all())
    assert seen and all(batch == 2 * frames for batch, frames in seen), seen  # 2 groups x the window's frames
    assert {frames for _, frames in seen} <= {6, 7}, seen  # 6, and the frame before it where the host adds one
    assert "context_handler" in windowed.model_options  # the caller's MODEL keeps the host's own handler
    assert type(windowed.model_options["context_handler"]).__name__ == "IndexListContextHandler"


def test_a_second_adapter_loader_replaces_the_first_adapters(base, adapter_file, tmp_path_factory, caplog):
    """Stacking: a second Adapter Loader on a SimDA MODEL replaces the first one's adapters (with a
    log line) and keeps the rest of the config; the result is the second file's adapters alone."""
    name, _ = adapter_file
    folder = tmp_path_factory.mktemp("simda_models_second")
    second_adapters = random_adapters(base, 18)
    save_adapters(second_adapters, folder / "second.safetensors", family="sd1")
    folder_paths.add_model_folder_path("simda", str(folder))
    try:
        (first,) = SimDAAdapterLoader.execute(base, name, 1.0).result
        (shifted,) = SimDALatentShiftPatch.execute(first, **SHIFT_DEFAULTS).result
        with caplog.at_level("INFO", logger="SimDA"):
            (stacked,) = SimDAAdapterLoader.execute(shifted, "second.safetensors", 0.5).result
        (alone,) = SimDALatentShiftPatch.execute(
            SimDAAdapterLoader.execute(base, "second.safetensors", 0.5).result[0], **SHIFT_DEFAULTS
        ).result
    finally:
        folder_paths.folder_names_and_paths["simda"][0].remove(str(folder))
    assert any("replaces them" in r.getMessage() for r in caplog.records), caplog.text
    config = get_config(stacked)
    assert config.adapter_name == "second.safetensors" and config.strength == 0.5 and config.latent_shift is not None
    assert len(stacked.additional_models[ADDITIONAL_MODELS_KEY]) == 1
    batch = video_batch(frames=4, groups=2, seed=18)
    torch.testing.assert_close(call(stacked, batch), call(alone, batch), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(call(stacked, batch), call(shifted, batch), atol=1e-3)
