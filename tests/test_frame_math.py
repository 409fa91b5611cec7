"""Frame-shared GroupNorm and the temporal adapter against torch's own operators on the
``[clips, C, F, H, W]`` rearrangement (docs/METHOD.md §3 and §5), and loop mode of both."""
from __future__ import annotations

import host  # noqa: F401  (registers the pack as simda_pack)
import pytest
import torch
import torch.nn.functional as F

import comfy.ops
from simda_pack.simda_core.host.attention import host_norm_parameters
from simda_pack.simda_core.model.adapters import TemporalAdapter
from simda_pack.simda_core.model.group_norm import frame_shared_group_norm
from simda_pack.simda_core.model.layout import ClipLayout


def to_clips(x, frames):
    """``[clips * F, C, H, W]`` -> ``[clips, C, F, H, W]`` (written out, not einops)."""
    b = x.shape[0] // frames
    return x.reshape(b, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def from_clips(x):
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def relative_error(new, old):
    new, old = new.detach().double(), old.detach().double()
    return float((new - old).abs().max() / old.abs().max())


def seeded_norm(groups, channels, seed, cls=torch.nn.GroupNorm, affine=True):
    g = torch.Generator().manual_seed(seed)
    norm = cls(groups, channels, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(1 + 0.2 * torch.randn(channels, generator=g))
            norm.bias.copy_(0.3 * torch.randn(channels, generator=g))
    return norm


def activations(clips, frames, channels, h, w, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # per-channel offsets and scales, so groups have different statistics
    offset = 2 * torch.randn(1, channels, 1, 1, generator=g)
    scale = torch.rand(1, channels, 1, 1, generator=g) * 3 + 0.2
    return (torch.randn(clips * frames, channels, h, w, generator=g) * scale + offset).to(dtype)


# -- frame-shared GroupNorm -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "clips,frames,channels,groups,h,w",
    [(2, 8, 64, 32, 8, 8), (1, 3, 320, 32, 5, 7), (4, 4, 48, 16, 6, 3), (2, 16, 32, 32, 16, 16), (3, 2, 8, 2, 4, 4)],
)
def test_group_norm_equals_torch_on_the_clip_tensor(clips, frames, channels, groups, h, w):
    x = activations(clips, frames, channels, h, w, seed=channels + frames)
    norm = seeded_norm(groups, channels, seed=frames)
    expected = from_clips(F.group_norm(to_clips(x, frames), groups, norm.weight, norm.bias, norm.eps))
    with torch.no_grad():
        got = frame_shared_group_norm(x, ClipLayout.contiguous(clips, frames), norm)
    assert got.shape == x.shape
    assert relative_error(got, expected) <= 1e-6
    # and per-frame statistics would be different: the comparison above checks something
    per_frame = F.group_norm(x, groups, norm.weight, norm.bias, norm.eps)
    assert relative_error(per_frame, expected) > 1e-2


def test_group_norm_keeps_precision_when_means_dwarf_the_spread():
    # mean 30x the standard deviation: E[x^2] - E[x]^2 in float32 would lose the variance
    x = torch.randn(2 * 8, 32, 8, 8, generator=torch.Generator().manual_seed(12)) + 30.0
    norm = seeded_norm(8, 32, seed=5)
    exact = from_clips(F.group_norm(to_clips(x.double(), 8), 8, norm.weight.double(), norm.bias.double(), norm.eps))
    with torch.no_grad():
        got = frame_shared_group_norm(x, ClipLayout.contiguous(2, 8), norm)
    assert relative_error(got, exact) <= 1e-6


def test_group_norm_without_affine_and_of_one_frame():
    x = activations(2, 4, 16, 4, 4, seed=5)
    norm = seeded_norm(4, 16, seed=1, affine=False)
    expected = from_clips(F.group_norm(to_clips(x, 4), 4, None, None, norm.eps))
    assert relative_error(frame_shared_group_norm(x, ClipLayout.contiguous(2, 4), norm), expected) <= 1e-6
    # F = 1: the module's own per-image GroupNorm
    single = frame_shared_group_norm(x, ClipLayout.contiguous(8, 1), norm)
    assert torch.equal(single, F.group_norm(x, 4, None, None, norm.eps))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_low_precision_matches_torch(dtype):
    # statistics in float32, output in the input's dtype: within two units of that dtype's
    # precision (at the largest output) of the float32 result, as torch's own GroupNorm is
    x = activations(2, 8, 64, 8, 8, seed=7, dtype=dtype)
    norm = seeded_norm(32, 64, seed=3)
    exact = from_clips(F.group_norm(to_clips(x.float(), 8), 32, norm.weight, norm.bias, norm.eps))
    torch_low = from_clips(
        F.group_norm(to_clips(x, 8), 32, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)
    )
    with torch.no_grad():
        got = frame_shared_group_norm(x, ClipLayout.contiguous(2, 8), norm)  # float32 weights, cast inside
    assert got.dtype == dtype
    bound = 2 * torch.finfo(dtype).eps
    assert relative_error(torch_low, exact) <= bound  # the bound holds for torch itself
    assert relative_error(got, exact) <= bound


def test_group_norm_with_the_hosts_layers():
    # The host's GroupNorm classes (plain and manual-cast) are torch GroupNorms: same result as
    # their own forward on the clip tensor; a forward object-patched on the instance is not called.
    x = activations(2, 4, 32, 4, 4, seed=8)
    layout = ClipLayout.contiguous(2, 4)
    for cls in (comfy.ops.disable_weight_init.GroupNorm, comfy.ops.manual_cast.GroupNorm):
        norm = cls(8, 32)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(0.5, 1.5, 32))
            norm.bias.copy_(torch.linspace(-0.2, 0.2, 32))
        expected = from_clips(type(norm).forward(norm, to_clips(x, 4)))
        norm.forward = lambda t: pytest.fail("the instance forward must not be called")
        with torch.no_grad():
            got = frame_shared_group_norm(x, layout, norm)
        assert relative_error(got, expected) <= 1e-6


def test_group_norm_with_a_host_weight_patch_goes_through_the_layer():
    x = activations(2, 4, 16, 4, 4, seed=9)
    norm = comfy.ops.disable_weight_init.GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.bias.zero_()
    norm.weight_function = [lambda w: w * 2]  # the host's weight patch hook (e.g. a LoRA on norms)
    got = frame_shared_group_norm(x, ClipLayout.contiguous(2, 4), norm, host_norm_parameters)  # as the patch calls it
    expected = from_clips(F.group_norm(to_clips(x, 4), 4, 2 * torch.ones(16), torch.zeros(16), norm.eps))
    assert relative_error(got, expected) <= 1e-6


def test_group_norm_gradients_equal_torch():
    x = activations(2, 4, 16, 4, 4, seed=10).requires_grad_()
    norm = seeded_norm(4, 16, seed=4)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    (frame_shared_group_norm(x, ClipLayout.contiguous(2, 4), norm) * upstream).sum().backward()
    got = (x.grad.clone(), norm.weight.grad.clone(), norm.bias.grad.clone())
    x.grad = norm.weight.grad = norm.bias.grad = None
    (from_clips(F.group_norm(to_clips(x, 4), 4, norm.weight, norm.bias, norm.eps)) * upstream).sum().backward()
    for a, b in zip(got, (x.grad, norm.weight.grad, norm.bias.grad)):
        assert relative_error(a, b) <= 1e-5


# -- temporal adapter -----------------------------------------------------------------------------

def seeded_adapter(channels, seed, dtype=torch.float32):
    torch.manual_seed(seed)
    adapter = TemporalAdapter(channels)
    with torch.no_grad():  # the up-projection starts at zero: give it weights so the delta is not 0
        adapter.up.weight.normal_(0, 0.1)
        adapter.up.bias.normal_(0, 0.1)
    return adapter.to(dtype)


def conv3d_delta(adapter, x, frames, circular=False):
    """The spec's adapter with torch's Conv3d on ``[b, C, F, H, W]`` (zero or circular time padding)."""
    clip = to_clips(x, frames)
    hidden = F.conv3d(clip, adapter.down.weight, adapter.down.bias)
    if circular:
        hidden = F.pad(hidden, (0, 0, 0, 0, 1, 1), mode="circular")
        hidden = F.conv3d(hidden, adapter.depthwise.weight, adapter.depthwise.bias, groups=hidden.shape[1])
    else:
        hidden = F.conv3d(
            hidden, adapter.depthwise.weight, adapter.depthwise.bias, padding=(1, 0, 0), groups=hidden.shape[1]
        )
    return from_clips(F.conv3d(hidden, adapter.up.weight, adapter.up.bias))


@pytest.mark.parametrize(
    "clips,frames,channels,h,w", [(2, 8, 64, 8, 8), (1, 2, 32, 5, 7), (3, 5, 16, 4, 6), (2, 16, 320, 4, 4)]
)
def test_temporal_adapter_equals_conv3d(clips, frames, channels, h, w):
    adapter = seeded_adapter(channels, seed=frames)
    x = activations(clips, frames, channels, h, w, seed=channels)
    layout = ClipLayout.contiguous(clips, frames)
    with torch.no_grad():
        expected = conv3d_delta(adapter, x, frames)
        delta = adapter.delta(x, layout)
        out = adapter(x, layout)
    assert delta.shape == x.shape
    assert relative_error(delta, expected) <= 1e-6
    assert relative_error(out, x + expected) <= 1e-6


def test_temporal_adapter_keeps_its_state_dict_keys():
    assert sorted(TemporalAdapter(8).state_dict()) == [
        "depthwise.bias", "depthwise.weight", "down.bias", "down.weight", "up.bias", "up.weight"
    ]


def test_temporal_adapter_follows_the_input_dtype():
    adapter = seeded_adapter(16, seed=1)  # float32 weights
    x = activations(2, 4, 16, 4, 4, seed=2, dtype=torch.float64)
    with torch.no_grad():
        got = adapter.delta(x, ClipLayout.contiguous(2, 4))
        expected = conv3d_delta(adapter.double(), x, 4)
    assert got.dtype == torch.float64
    assert relative_error(got, expected) <= 1e-6


def test_temporal_adapter_gradients_equal_conv3d():
    adapter = seeded_adapter(16, seed=3)
    x = activations(2, 4, 16, 4, 4, seed=4).requires_grad_()
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    (adapter.delta(x, ClipLayout.contiguous(2, 4)) * upstream).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in adapter.parameters()]
    x.grad = None
    adapter.zero_grad(set_to_none=True)
    (conv3d_delta(adapter, x, 4) * upstream).sum().backward()
    for a, b in zip(got, [x.grad] + [p.grad for p in adapter.parameters()]):
        assert relative_error(a, b) <= 1e-5


# -- loop mode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("frames", [2, 3, 8])
def test_looped_clip_pads_time_circularly(frames):
    adapter = seeded_adapter(16, seed=frames)
    x = activations(2, frames, 16, 4, 4, seed=frames)
    with torch.no_grad():
        got = adapter.delta(x, ClipLayout.contiguous(2, frames, loop=True))
        expected = conv3d_delta(adapter, x, frames, circular=True)
        open_clip = conv3d_delta(adapter, x, frames)
    assert relative_error(got, expected) <= 1e-6
    assert relative_error(open_clip, expected) > 1e-3


def test_strided_window_around_the_whole_loop_pads_circularly():
    # every 2nd frame of a 16-frame loop: after time 14 comes time 16 = 0, the window's first frame
    adapter = seeded_adapter(16, seed=5)
    x = activations(1, 8, 16, 4, 4, seed=5)
    layout = ClipLayout.from_batch(8, groups=1, window_indices=list(range(4, 16, 2)) + [0, 2], loop_length=16)
    assert layout.closes_loop
    with torch.no_grad():
        assert relative_error(adapter.delta(x, layout), conv3d_delta(adapter, x, 8, circular=True)) <= 1e-6


def test_window_of_a_longer_loop_pads_with_zeros():
    adapter = seeded_adapter(16, seed=6)
    x = activations(2, 4, 16, 4, 4, seed=6)
    layout = ClipLayout.from_batch(8, groups=2, window_indices=[30, 31, 0, 1], loop_length=32)
    assert not layout.closes_loop
    with torch.no_grad():
        assert relative_error(adapter.delta(x, layout), conv3d_delta(adapter, x, 4)) <= 1e-6


def test_last_frame_reaches_frame_zero_only_in_a_loop():
    adapter = seeded_adapter(16, seed=7)
    frames = 6
    x = activations(1, frames, 16, 4, 4, seed=7)
    changed = x.clone()
    changed[-1] += 1.0
    for loop in (True, False):
        layout = ClipLayout.contiguous(1, frames, loop=loop)
        with torch.no_grad():
            before, after = adapter(x, layout), adapter(changed, layout)
        frame0_moves = not torch.equal(before[0], after[0])
        assert frame0_moves == loop, f"loop={loop}"
        assert not torch.equal(before[-2], after[-2])  # the neighbour in time always sees it


# -- torch.compile ----------------------------------------------------------------------------------

def test_frame_math_compiles_in_one_graph_and_once_for_all_window_positions():
    from torch._dynamo.utils import counters

    from simda_pack.simda_core.model.latent_shift import latent_shift_attention

    clips, frames, channels, h, w, heads = 2, 4, 16, 4, 4, 2
    adapter = seeded_adapter(channels, seed=8)
    norm = seeded_norm(4, channels, seed=8)

    def step(x, layout):
        x = frame_shared_group_norm(x, layout, norm)
        x = adapter(x, layout)
        tokens = x.flatten(2).transpose(1, 2)  # [b, h * w, C]
        return latent_shift_attention(tokens, tokens, tokens, heads, layout, h, w)

    def window(start):
        return ClipLayout.from_batch(clips * frames, groups=clips, window_indices=list(range(start, start + frames)))

    x = activations(clips, frames, channels, h, w, seed=8)
    with torch.no_grad():
        eager = step(x, window(0))  # fills the gather-index cache, as the first eager call does
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(step)(x, window(0))
        assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
        assert explanation.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(step, backend="eager")
        graphs = []
        for start in range(6):
            before = counters["stats"]["unique_graphs"]
            out = compiled(x, window(start))
            graphs.append(counters["stats"]["unique_graphs"] - before)
            torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    assert graphs == [1, 0, 0, 0, 0, 0], graphs
