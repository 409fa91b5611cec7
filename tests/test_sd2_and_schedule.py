"""SimDA on an SD2.x-shaped UNet (linear transformer projections, 64-channel heads, 1024 context,
v-prediction) with channels and heads read from the model, and the Latent-Shift Patch's active
part of the sampling schedule."""
from __future__ import annotations

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import comfy.supported_models
import torch

from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.simda_core.host.family import model_family
from simda_pack.simda_core.host.register import apply_simda, get_config, model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

SD2_TINY = dict(
    host.TINY_UNET, model_channels=64, context_dim=48, use_linear_in_transformer=True, channel_mult=[1, 2, 2, 2],
)


def sd2_model():
    return host.build_model(SD2_TINY, config_class=comfy.supported_models.SD20, seed=4)


def batch(frames: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * frames, 4, 8, 12, generator=generator)
    context = torch.randn(2, 6, SD2_TINY["context_dim"], generator=generator).repeat_interleave(frames, 0)
    return x, torch.full((2 * frames,), 300.0), context


def test_sd2_layout_is_read_from_the_model():
    model = sd2_model()
    assert model_family(model) == "sd2"
    sites = model_sites(model)
    assert len(sites) == 16
    assert sorted({s.channels for s in sites}) == [64, 128]
    unet = model.get_model_object("diffusion_model")
    first = unet.get_submodule(sites[0].block_path(0))
    # SD2.x has 64-channel heads (the host's SD20 config fixes num_head_channels=64): one head at 64
    # channels, where SD1.x would have 8; latent shift reads the block's own n_heads.
    assert (first.n_heads, first.d_head) == (1, 64)


def test_sd2_with_everything_on_changes_video_and_one_frame_runs_only_the_adapters():
    model = sd2_model()
    adapters = SimDAAdapters(model_sites(model))
    host.randomize_(adapters, 9)
    clone = model.clone()
    apply_simda(clone, SimDAConfig(adapters=adapters.requires_grad_(False), latent_shift=LatentShiftSettings()))
    video = batch(frames=5)
    assert (
        host.unet_forward(clone, *video, cond_or_uncond=[1, 0])
        - host.unet_forward(model, *video, cond_or_uncond=[1, 0])
    ).abs().max() > 1e-2
    single = batch(frames=1)
    base = host.unet_forward(model, *single, cond_or_uncond=[1, 0])
    assert (host.unet_forward(clone, *single, cond_or_uncond=[1, 0]) - base).abs().max() > 1e-3
    shift_only = model.clone()
    apply_simda(shift_only, SimDAConfig(latent_shift=LatentShiftSettings(), frame_group_norm=True))
    assert torch.allclose(host.unet_forward(shift_only, *single, cond_or_uncond=[1, 0]), base, atol=1e-5)


def test_latent_shift_acts_only_inside_its_part_of_the_schedule():
    model = sd2_model()
    sampling = model.get_model_object("model_sampling")
    (early,) = SimDALatentShiftPatch.execute(model, 0, True, True, True, True, 0.0, 0.5, False).result
    settings = get_config(early).latent_shift
    assert (settings.start_percent, settings.end_percent) == (0.0, 0.5)
    # a UNet call outside a sampling run: the range in this MODEL's own schedule
    boundary = float(sampling.percent_to_sigma(0.5))
    x, timesteps, context = batch(frames=4)
    high, low = torch.tensor([boundary * 2.0]), torch.tensor([boundary * 0.5])

    def run(patcher, sigma):
        return host.unet_forward(patcher, x, timesteps, context, cond_or_uncond=[1, 0], sigmas=sigma)

    assert (run(early, high) - run(model, high)).abs().max() > 1e-3  # active early (high noise)
    assert torch.equal(run(early, low), run(model, low))  # switched off late: the plain model exactly
