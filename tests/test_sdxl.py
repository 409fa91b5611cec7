"""SimDA on SDXL-family UNets of the real host: the host's own ``model_base.SDXL`` (ADM size
conditioning) built from ``comfy.supported_models`` configs, UNet only, with seeded random weights.

- ``VEGA_TEST_UNET`` (tests/sdxl_server.py, the UNet of the server tests' checkpoint): the smallest
  UNet 0.3.75's detection takes for SDXL-family (320 channels, three levels of one width, Segmind
  Vega's transformer depths; about 103M parameters).
- ``DEEP_SDXL_UNET``: SDXL's own depths (2 and 10 per level, 10 in the middle) at 64 channels, so
  transformer blocks with ``block_index`` up to 9 run in a unit test.
"""
from __future__ import annotations

import math

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import comfy.model_detection
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sd
import comfy.supported_models
import folder_paths
import pytest
import torch
from PIL import Image

from sdxl_server import SDXL_COMMON, VEGA_TEST_UNET, cached_sdxl_models, random_taesd
from test_latent_shift import reference_attention, reference_keys

from simda_pack.nodes.nodes_adapters import SimDAAdapterLoader
from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.nodes.simda_model import check_family
from simda_pack.simda_core.formats import build_adapters, read_adapter_file, save_adapters
from simda_pack.simda_core.host.family import model_family
from simda_pack.simda_core.host.register import apply_simda, get_config, model_sites, shift_block_key, shift_sites
from simda_pack.simda_core.host.training import training_patcher
from simda_pack.simda_core.model import patch_functions
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.model.unet_sites import find_resblock_norms
from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

pytestmark = pytest.mark.usefixtures("unload_host_models")

DEEP_SDXL_UNET = dict(
    SDXL_COMMON, model_channels=64, channel_mult=[1, 1, 1], num_res_blocks=[2, 2, 2], num_head_channels=32,
    transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_middle=10,
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
)
DEEP_BLOCKS = 5 * 2 + 6 * 10
"""Transformer blocks of DEEP_SDXL_UNET: 5 two-deep transformers at level 1, 6 ten-deep at level 2."""
CONTEXT, POOLED, TOKENS = 2048, 1280, 4
DIFFUSION_MODEL = comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL


def build_sdxl(unet_config: dict, config_class=comfy.supported_models.SDXL, seed: int | None = 0):
    """The host's SDXL model (``model_config.get_model``: ``model_base.SDXL`` with its ADM) in a ModelPatcher."""
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({}, device="cpu")
    if seed is not None:
        host.randomize_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


@pytest.fixture(scope="module")
def deep():
    return build_sdxl(DEEP_SDXL_UNET, seed=3)



def conditioning(seed: int, **options):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TOKENS, CONTEXT, generator=g),
             {"pooled_output": torch.randn(1, POOLED, generator=g), **options}]]


def video_call(patcher, frames: int = 3, size=(8, 12), seed: int = 0, groups: int = 2):
    """One UNet call as the host's sampler makes it for SDXL: ``groups`` cond/uncond groups of
    ``frames`` frames, each group with its own text context and ADM vector ``y``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups * frames, 4, *size, generator=g)
    context = torch.cat([torch.randn(1, TOKENS, CONTEXT, generator=g).expand(frames, -1, -1) for _ in range(groups)])
    y = torch.cat([torch.randn(1, 2816, generator=g).expand(frames, -1) for _ in range(groups)])
    options = dict(patcher.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts({}, patcher.wrappers)
    options["cond_or_uncond"] = list(range(groups))
    with host.patched(patcher) as model, torch.no_grad():
        return model.diffusion_model(x, timesteps=torch.full((groups * frames,), 500.0), context=context, y=y,
                                     transformer_options=options)


# -- family --------------------------------------------------------------------------------------

def test_the_smallest_detected_sdxl_checkpoint_is_segmind_vega_and_family_sdxl():
    """The test checkpoints' UNet goes through the host's own detection of its state dict."""
    patcher = build_sdxl(VEGA_TEST_UNET, comfy.supported_models.Segmind_Vega, seed=None)
    state = patcher.model.diffusion_model.state_dict()
    detected = comfy.model_detection.model_config_from_unet(state, "")
    assert type(detected) is comfy.supported_models.Segmind_Vega
    assert 95e6 < sum(t.numel() for t in state.values()) < 110e6
    assert model_family(patcher) == "sdxl"
    sites = model_sites(patcher)
    assert {s.level for s in sites} == {1, 2} and {s.depth for s in sites} == {1, 2}


@pytest.mark.parametrize("config_class", ["SDXL", "SSD1B", "Segmind_Vega", "KOALA_700M", "SDXL_instructpix2pix"])
def test_sdxl_and_its_subclasses_are_family_sdxl(config_class):
    patcher = build_sdxl(DEEP_SDXL_UNET, getattr(comfy.supported_models, config_class), seed=None)
    assert model_family(patcher) == "sdxl"
    assert check_family(patcher, "", "probe") == "sdxl"


def test_the_sdxl_refiner_is_not_family_sdxl():
    """Not a subclass of the host's SDXL, and another UNet (see ``model_family``)."""
    refiner = host.build_model(host.TINY_UNET, config_class=comfy.supported_models.SDXLRefiner, seed=None)
    assert model_family(refiner) != "sdxl"
    with pytest.raises(ValueError, match=r"^probe needs an SD1\.x, SD2\.x or SDXL model .* is SDXLRefiner\. "):
        check_family(refiner, "", "probe")


# -- where SimDA attaches ------------------------------------------------------------------------

def test_sites_follow_sdxl_depths_and_skip_the_top_level(deep):
    sites = model_sites(deep)
    unet = deep.get_model_object("diffusion_model")
    assert [(s.path, s.level, s.depth) for s in sites] == [
        ("input_blocks.4.1", 1, 2), ("input_blocks.5.1", 1, 2), ("input_blocks.7.1", 2, 10),
        ("input_blocks.8.1", 2, 10),
        ("middle_block.1", 2, 10),
        ("output_blocks.0.1", 2, 10), ("output_blocks.1.1", 2, 10), ("output_blocks.2.1", 2, 10),
        ("output_blocks.3.1", 1, 2), ("output_blocks.4.1", 1, 2), ("output_blocks.5.1", 1, 2),
    ]
    assert all(unet.get_submodule(s.path).use_linear for s in sites)
    assert all(s.channels == s.inner_dim == 64 and all(s.self_attention) for s in sites)
    keys = [shift_block_key(s, i) for s, i in shift_sites(sites, None)]
    assert len(keys) == DEEP_BLOCKS
    assert {("input", 8, 9), ("middle", 0, 9), ("output", 2, 9), ("output", 5, 1)} <= set(keys)


def test_zero_adapters_with_shift_off_reproduce_the_base_bit_exactly(deep):
    """Zero adapters with latent shift off: without frame GroupNorm (its object patches taken off
    the clone, as the config always turns it on with adapters) the base bit for bit, with it the
    GroupNorm-only patch bit for bit; and the adapter paths are live."""
    base = video_call(deep)
    adapters = SimDAAdapters(model_sites(deep)).requires_grad_(False)
    clone = deep.clone()
    apply_simda(clone, SimDAConfig(adapters=adapters))
    group_norm_only = deep.clone()
    apply_simda(group_norm_only, SimDAConfig(frame_group_norm=True))
    shared = video_call(group_norm_only)
    assert torch.equal(video_call(clone), shared)
    assert not torch.allclose(shared, base, atol=1e-4)

    unet = deep.get_model_object("diffusion_model")
    for path in find_resblock_norms(unet):
        del clone.object_patches[f"diffusion_model.{path}.forward"]
    assert torch.equal(video_call(clone), base)
    host.randomize_(adapters, 5)
    assert not torch.allclose(video_call(clone), base, atol=1e-4)


def test_latent_shift_at_every_sdxl_block_is_the_spec_on_a_non_square_grid(deep):
    """At every transformer block (block_index 0..9 at the 10-deep level) the host hands the shift
    its own q, k, v and grid; the result equals the spec's loop over frames and positions."""
    frames, groups = 3, 2
    clone = deep.clone()
    apply_simda(clone, SimDAConfig(latent_shift=LatentShiftSettings()))
    replaced = clone.model_options["transformer_options"]["patches_replace"]["attn1"]
    seen = {}

    def recording(key, ours):
        def attn1(q, k, v, extra_options):
            out = ours(q, k, v, extra_options)
            seen[key] = (q, k, v, extra_options["activations_shape"], extra_options["n_heads"], out)
            return out
        return patch_functions.mark(attn1)

    for key in list(replaced):
        replaced[key] = recording(key, replaced[key])
    video_call(clone, frames=frames, size=(8, 12), groups=groups)
    assert set(seen) == {shift_block_key(s, i) for s, i in shift_sites(model_sites(deep), None)}
    level_of = {shift_block_key(s, i): s.level for s in model_sites(deep) for i in range(s.depth)}
    for key, (q, k, v, shape, heads, out) in seen.items():
        h, w = shape[-2:]
        assert (h, w) == {1: (4, 6), 2: (2, 3)}[level_of[key]], key
        keys = reference_keys(k, groups, frames, h, w)
        values = reference_keys(v, groups, frames, h, w)
        assert torch.allclose(out, reference_attention(q, keys, values, heads), atol=1e-5), key


# -- adapters ------------------------------------------------------------------------------------

def test_tuning_trains_every_sdxl_adapter(deep):
    adapters = initial_adapters(model_sites(deep), seed=1)
    clone = training_patcher(deep)
    apply_simda(clone, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings()))
    trainer = AdapterTrainer(clone, adapters, TuningRecipe(learning_rate=1e-3, mixed_precision=False), seed=3)
    g = torch.Generator().manual_seed(0)
    frames = 3
    x0 = torch.randn(frames, 4, 8, 12, generator=g)
    context = torch.randn(1, TOKENS, CONTEXT, generator=g).repeat(frames, 1, 1)
    y = torch.randn(1, 2816, generator=g).repeat(frames, 1)
    names = dict(adapters.named_parameters())
    touched: set[str] = set()
    with host.patched(clone):
        for _ in range(2):
            loss = trainer.loss(x0, context, clips=1, conds={"y": y})
            loss.backward()
            touched |= {n for n, p in names.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)}
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
    assert len([n for n in names if ".fc2.weight" in n]) == 2 * (DEEP_BLOCKS)
    assert not sorted(set(names) - touched), sorted(set(names) - touched)[:5]


@pytest.fixture()
def simda_folder(tmp_path):
    """A folder registered with the host's folder_paths as models/simda."""
    folder_paths.add_model_folder_path("simda", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["simda"][0].remove(str(tmp_path))


def test_sdxl_adapters_load_on_sdxl_and_are_refused_across_families(deep, simda_folder):
    adapters = SimDAAdapters(model_sites(deep))
    host.randomize_(adapters, 5)
    save_adapters(adapters, simda_folder / "xl.safetensors", family=model_family(deep))
    sd1 = host.build_model(host.TINY_UNET, seed=None)
    save_adapters(SimDAAdapters(model_sites(sd1)), simda_folder / "sd1.safetensors", family=model_family(sd1))
    assert read_adapter_file(simda_folder / "xl.safetensors").family == "sdxl"

    loaded = SimDAAdapterLoader.execute(deep, "xl.safetensors", 1.0).result[0]
    assert get_config(loaded).family == "sdxl"
    direct = deep.clone()
    apply_simda(direct, SimDAConfig(adapters=adapters.requires_grad_(False)))
    torch.testing.assert_close(video_call(loaded), video_call(direct), rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match=r"^SimDA adapter file 'xl.safetensors' was made for an SDXL UNet, "
                                         r"but the connected MODEL is an SD1\.x UNet; [^.]*\.$"):
        SimDAAdapterLoader.execute(sd1, "xl.safetensors", 1.0)
    with pytest.raises(ValueError, match=r"^SimDA adapter file 'sd1.safetensors' was made for an SD1\.x UNet, "
                                         r"but the connected MODEL is an SDXL UNet; [^.]*\.$"):
        SimDAAdapterLoader.execute(deep, "sd1.safetensors", 1.0)


def test_latent_shift_patch_node_takes_an_sdxl_model(deep):
    out = SimDALatentShiftPatch.execute(deep, 0, True, True, True, True, 0.0, 1.0, True).result[0]
    assert out is not deep and "patches_replace" in out.model_options["transformer_options"]
    assert len(out.model_options["transformer_options"]["patches_replace"]["attn1"]) == DEEP_BLOCKS


# -- size conditioning ---------------------------------------------------------------------------

def test_video_sampler_gives_every_frame_the_clips_size_conditioning(deep):
    """The ADM vector ``y`` of every frame of every UNet call is the host's SDXL encoding of the
    clip's frame size (192x128 here), not the host's 768x768 default: the host fills it from the
    latent (the pack adds nothing to the conditioning for it)."""
    positive, negative = conditioning(1), conditioning(2)
    seen = []
    probe = deep.clone()
    probe.add_wrapper_with_key(
        DIFFUSION_MODEL, "test_probe",
        lambda executor, x, *a, **k: seen.append(a[2].clone()) or executor(x, *a, **k)  # (timesteps, context, y, ...)
    )
    frames = 3
    samples = SimDAVideoSampler.execute(
        probe, positive, negative, frames, 192, 128, 0, 2, 4.0, "euler", "normal", 1.0, 0.0
    ).result[0]["samples"]
    assert samples.shape == (frames, 4, 16, 24) and bool(torch.isfinite(samples).all())
    model = deep.model

    def adm(cond, width, height):
        return model.encode_adm(pooled_output=cond[0][1]["pooled_output"], width=width, height=height, device="cpu")

    assert seen
    for y in seen:
        assert y.shape[0] % frames == 0
        rows = y.reshape(-1, frames, y.shape[-1])
        for group in rows:
            assert any(torch.allclose(row, adm(c, 192, 128)[0]) for c in (positive, negative) for row in group[:1])
            assert torch.equal(group, group[:1].expand_as(group))
            assert not any(torch.allclose(group[0], adm(c, 768, 768)[0]) for c in (positive, negative))
    assert "width" not in positive[0][1]


# -- Edit Tuner and collection trainer -----------------------------------------------------------

def adm_calls(patcher) -> tuple[object, list[tuple[bool, torch.Tensor]]]:
    """A clone of ``patcher`` that records ``(grad enabled, y)`` of every UNet call made with it or its clones."""
    seen: list[tuple[bool, torch.Tensor]] = []

    def probe(executor, x, timesteps, context, y, *args, **kwargs):
        seen.append((torch.is_grad_enabled(), y.detach().float().clone()))
        return executor(x, timesteps, context, y, *args, **kwargs)

    probed = patcher.clone()
    probed.add_wrapper_with_key(DIFFUSION_MODEL, "test_probe", probe)
    return probed, seen


def test_edit_tuner_trains_every_sdxl_adapter_with_the_clips_adm_vector(deep):
    """The Edit Tuner node on an SDXL MODEL: every training call carries the host's SDXL ADM vector
    of the source prompt at the training size (not the host's 768x768 default), and every adapter
    tensor moves by an Adam step (about the learning rate), far beyond what weight decay alone does."""
    start = SimDAAdapters(model_sites(deep))
    host.randomize_(start, 11)
    with torch.no_grad():  # small non-zero adapters: every tensor has a gradient from the first step
        for p in start.parameters():
            p.mul_(0.05)
    with_adapters = deep.clone()
    apply_simda(with_adapters, SimDAConfig(adapters=start.requires_grad_(False), family="sdxl"))
    model, seen = adm_calls(with_adapters)
    vae = comfy.sd.VAE(sd=random_taesd(4).state_dict())
    frames, width, height, lr = 3, 64, 48, 1e-3
    source = torch.rand(frames, height, width, 3, generator=torch.Generator().manual_seed(5))
    prompt, empty = conditioning(6), conditioning(7)

    with torch.inference_mode():  # as the host's executor runs a node
        tuned, inverted, trained, rate, _ = SimDAEditTuner.execute(
            model, vae, source, prompt, steps=2, learning_rate=lr, seed=0, frames=frames, start_frame=0, stride=1,
            width=width, height=height, gradient_checkpointing=True, inversion_steps=1,
            inversion_scheduler="ddim_uniform",
            source_fps=8.0, inversion_conditioning=empty,
        ).result

    assert trained.family == "sdxl" and trained.frames_trained == frames and rate == 8.0
    assert inverted["samples"].shape == (frames, 4, height // 8, width // 8) and bool(
        torch.isfinite(inverted["samples"]).all()
    )
    def adm(cond, **size):
        return deep.model.encode_adm(
            pooled_output=cond[0][1]["pooled_output"], device="cpu", **size
        )[0].expand(frames, -1)

    training, inversion = seen[:2], seen[2:]  # two training steps, then the one inversion step
    assert [grad for grad, _ in training] == [True, True] and len(inversion) == 1, [grad for grad, _ in seen]
    for _, y in training:
        torch.testing.assert_close(y, adm(prompt, width=width, height=height))
        assert not torch.allclose(y, adm(prompt))  # the host's 768x768 default
    torch.testing.assert_close(inversion[0][1], adm(empty, width=width, height=height))

    before = start.state_dict()
    after = trained.adapters.state_dict()
    assert set(after) == set(before)
    moved = {k: float((after[k].float() - before[k].float()).abs().max()) for k in before}
    still = sorted(k for k, d in moved.items() if d < 0.5 * lr)
    assert not still, f"{len(still)} of {len(moved)} adapter tensors did not train, e.g. {still[:5]}"
    assert get_config(tuned).family == "sdxl" and get_config(deep) is None


@pytest.fixture(scope="module")
def sdxl_checkpoint():
    checkpoint, _ = cached_sdxl_models()
    return checkpoint


def test_caption_conditioning_is_the_hosts_sdxl_adm_vector_and_nothing_for_sd1(sdxl_checkpoint):
    from simda_pack.simda_core.training.collection.conditioning import CaptionEncoder

    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(
        str(sdxl_checkpoint), output_vae=False, output_clip=True, te_model_options={"dtype": torch.float32}
    )
    captions = CaptionEncoder(clip)
    conds = captions.model_conds(model, ["a red fox", "snow"], frames=3, width=96, height=64)
    assert set(conds) == {"y"} and conds["y"].shape == (6, 2816)
    for index, caption in enumerate(["a red fox", "snow"]):
        context, options = clip.encode_from_tokens_scheduled(clip.tokenize(caption))[0]
        adm = model.model.encode_adm(pooled_output=options["pooled_output"], width=96, height=64, device="cpu")
        torch.testing.assert_close(conds["y"][3 * index:3 * index + 3], adm.float().expand(3, -1))
        torch.testing.assert_close(captions(caption), context.float())
    assert not torch.allclose(conds["y"][0], conds["y"][3])
    sd1 = host.build_model(host.TINY_UNET, seed=None)
    assert captions.model_conds(sd1, ["a red fox"], frames=3, width=96, height=64) == {}


def test_collection_trainer_trains_sdxl_adapters(sdxl_checkpoint, tmp_path):
    """scripts/train_simda.py on the SDXL-family test checkpoint: two steps (the SDXL UNet refuses a
    call without its ADM vector), a sample clip, and adapters that fit the checkpoint's UNet."""
    from test_trainer import load_script, write_clip

    data = tmp_path / "clips"
    data.mkdir()
    for index, caption in enumerate(("a red square moving right", "a blue box sliding")):
        write_clip(data / f"clip{index}.mp4", frames=8, seed=index)
        (data / f"clip{index}.txt").write_text(caption)
    output = tmp_path / "run"
    try:
        code = load_script().main([str(a) for a in (
            "--checkpoint", sdxl_checkpoint, "--data", data, "--output", output, "--steps", 2, "--batch", 2,
            "--frames", 2, "--stride", 2, "--width", 64, "--height", 48, "--lr", 1e-3, "--seed", 7, "--workers", 0,
            "--save-every", 2, "--checkpoint-every", 2, "--sample-every", 2, "--sample-steps", 1,
        )])
    finally:
        comfy.model_management.unload_all_models()
    assert code == 0
    adapter_file = read_adapter_file(output / "simda_adapters_step000002.safetensors")
    assert adapter_file.family == "sdxl" and adapter_file.frames_trained == 2
    state = torch.load(output / "training_state.pt", map_location="cpu", weights_only=True)
    assert state["family"] == "sdxl" and len(state["losses"]) == 2 and all(map(math.isfinite, state["losses"]))
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(sdxl_checkpoint), output_vae=False, output_clip=False)
    assert model_family(model) == "sdxl"
    build_adapters(adapter_file, model_sites(model))
    with Image.open(output / "samples" / "step000002.webp") as clip:
        assert clip.n_frames == 2 and clip.size == (64, 48)
