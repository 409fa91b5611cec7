"""Fresh adapters start as the authors' (``simda/models/unet_blocks.py`` ``Temp_Adapter``,
``simda/models/attention.py`` adapters), and the Adapter Loader's strength means what it says."""
from __future__ import annotations

import math

import torch

import host
import comfy.model_management
from simda_pack.simda_core.host.register import apply_simda, model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters, TemporalAdapter
from simda_pack.simda_core.model.config import SimDAConfig
from simda_pack.simda_core.training.trainer import initial_adapters


def test_fresh_temporal_adapters_have_the_authors_initial_statistics():
    """Kaiming-normal (fan-in, gain sqrt 2) weights on the down and depth-wise convolutions,
    PyTorch's default uniform biases, a zero up-projection."""
    torch.manual_seed(0)
    channels = 640
    adapter = TemporalAdapter(channels)
    hidden = channels // 2
    down, depthwise, up = adapter.down, adapter.depthwise, adapter.up
    # kaiming_normal_: std = sqrt(2 / fan_in); fan_in = C for the 1x1x1 down, 3 for the (3,1,1) depth-wise.
    for conv, fan_in in ((down, channels), (depthwise, 3)):
        w = conv.weight.detach()
        expected = math.sqrt(2.0 / fan_in)
        n = w.numel()  # 4 standard errors of the sample mean and standard deviation
        assert abs(float(w.mean())) < 4 * expected / math.sqrt(n)
        assert abs(float(w.std()) / expected - 1) < 4 / math.sqrt(2 * n), (conv, float(w.std()), expected)
        bound = 1 / math.sqrt(fan_in)
        assert float(conv.bias.abs().max()) <= bound and float(conv.bias.abs().max()) > 0.9 * bound
    assert up.weight.abs().sum() == 0 and up.bias.abs().sum() == 0
    assert (down.weight.shape, depthwise.weight.shape) == ((hidden, channels, 1, 1, 1), (hidden, 1, 3, 1, 1))
    # The spatial and FFN adapters: default-initialised first layer, zero second layer.
    sites = model_sites(host.build_model(host.TINY_UNET))
    fresh = initial_adapters(sites, seed=1)
    for name, p in fresh.named_parameters():
        if ".fc2." in name or ".up." in name:
            assert p.abs().sum() == 0, name
        else:
            assert p.abs().sum() > 0, name



def clip(seed: int = 0, frames: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2 * frames, 4, 8, 8, generator=g), torch.full((2 * frames,), 500.0),
            torch.randn(2 * frames, 8, host.TINY_UNET["context_dim"], generator=g))


def run(patcher, batch):
    comfy.model_management.unload_all_models()
    return host.unet_forward(patcher, *batch, cond_or_uncond=(1, 0))


def with_strength(base, adapters, strength, **extra):
    clone = base.clone()
    apply_simda(clone, SimDAConfig(adapters=adapters, strength=strength, **extra))
    return clone


def test_strength_zero_adds_nothing_and_strength_scales_every_adapter(base):
    adapters = SimDAAdapters(model_sites(base))
    host.randomize_(adapters, 3)
    adapters.requires_grad_(False)
    batch = clip(3)
    plain = run(base, batch)
    # Strength 0: nothing at all, frame GroupNorm included (bit for bit the base).
    assert torch.equal(run(with_strength(base, adapters, 0.0), batch), plain)
    # Above 0 frame GroupNorm is fully on and only the adapters' outputs scale: with the adapters'
    # output layers zeroed, every strength gives the frame-GroupNorm-only model.
    zeroed = SimDAAdapters(model_sites(base)).requires_grad_(False)
    group_norm_only = run(with_strength(base, None, 1.0, frame_group_norm=True), batch)
    for strength in (0.25, 1.0, 2.0):
        assert torch.equal(run(with_strength(base, zeroed, strength), batch), group_norm_only)
    # Strength scales the adapters' contributions: halfway between 0.5 and 1.5 lies 1.0 to first
    # order, and 0.5 is closer to the GroupNorm-only model than 1.0 is.
    outs = {s: run(with_strength(base, adapters, s), batch) for s in (0.5, 1.0)}
    assert (outs[0.5] - group_norm_only).norm() < (outs[1.0] - group_norm_only).norm()
    assert not torch.allclose(outs[0.5], outs[1.0], atol=1e-4)
