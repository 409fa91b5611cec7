"""Latent-Shift Attention against a deliberately naive reading of docs/METHOD.md §4, and
how a UNet batch splits into clips (ClipLayout)."""
from __future__ import annotations

import math

import host  # noqa: F401  (registers the pack as simda_pack)
import pytest
import torch

from simda_pack.simda_core.model import latent_shift
from simda_pack.simda_core.model.latent_shift import latent_shift_attention, latent_shift_keys_values
from simda_pack.simda_core.model.layout import ClipLayout, ClipLayoutError


def earlier_frame(positions: tuple[int, ...], frame: int, distance: int, loop_length: int = 0) -> int:
    """Index of the latest frame at least ``distance`` earlier in time than ``frame``, or ``frame``
    itself when there is none, as the code's ``source_frames`` finds it."""
    sources = latent_shift.source_frames(torch.tensor(positions), torch.tensor([distance]), loop_length)
    return int(sources[frame, 0])

PATTERN = [[4, 3, 2, 1], [3, 2, 1, 0], [2, 1, 0, 0], [1, 2, 3, 4]]
"""The spec's P, written out here on purpose (not imported from the code under test)."""

GRIDS = [(4, 4), (5, 7), (8, 3), (12, 12)]
FRAME_COUNTS = [1, 2, 3, 4, 5, 8]


# -- the reference: loops over frames and grid positions, straight from the spec -------------------

def reference_source_frame(positions, t, s, loop_length=0):
    """Frame whose token frame t takes at offset s: the latest frame at least s earlier in time,
    or t itself when there is none (no wrap-around).

    In a loop of ``loop_length`` frames: walk back in time from s frames before frame t, round
    the loop, until a frame of the clip is met. A time outside the stretch of the loop that the
    clip's frames span (a window of a longer loop) has no source: t keeps its own token."""
    if not loop_length:
        earlier = [u for u in range(len(positions)) if positions[u] <= positions[t] - s]
        return max(earlier) if earlier else t
    spanned = {time % loop_length for time in range(positions[0], positions[-1] + 1)}
    frame_at = {p % loop_length: u for u, p in enumerate(positions)}
    time = positions[t] - s
    if time % loop_length not in spanned:
        return t
    while time % loop_length not in frame_at:
        time -= 1
    return frame_at[time % loop_length]


def reference_keys(x, clips, frames, h, w, positions=None, loop_length=0):
    """``x`` ``[clips * F, h * w, D]`` -> ``[clips * F, 2 * h * w, D]``."""
    positions = list(range(frames)) if positions is None else list(positions)
    dim = x.shape[-1]
    x = x.reshape(clips, frames, h, w, dim)
    out = torch.empty(clips, frames, 2 * h * w, dim, dtype=x.dtype)
    for b in range(clips):
        shifted = torch.empty(frames, h, w, dim, dtype=x.dtype)
        for t in range(frames):
            for r in range(h):
                for c in range(w):
                    s = PATTERN[r % 4][c % 4]
                    shifted[t, r, c] = x[b, reference_source_frame(positions, t, s, loop_length), r, c]
        for t in range(frames):
            previous = reference_source_frame(positions, t, 1, loop_length)  # frame 0 of an open clip: itself
            out[b, t] = torch.cat([shifted[previous].reshape(h * w, dim), shifted[t].reshape(h * w, dim)])
    return out.reshape(clips * frames, 2 * h * w, dim)


def reference_attention(q, k, v, heads):
    """Multi-head attention with an explicit softmax, ``[B, tokens, heads * d]``."""
    b, n, inner = q.shape
    d = inner // heads
    q = q.reshape(b, n, heads, d).transpose(1, 2)
    k = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    v = v.reshape(b, v.shape[1], heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    return (weights @ v).transpose(1, 2).reshape(b, n, inner)


def random_qkv(clips, frames, h, w, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(clips * frames, h * w, dim, generator=g) for _ in range(3)]


# -- the reference itself, on a case small enough to write by hand --------------------------------

def test_reference_matches_hand_worked_case():
    # One clip, 5 frames, a 1x4 grid: offsets of row 0 are 4, 3, 2, 1. Token value = frame index.
    frames, h, w = 5, 1, 4
    x = torch.arange(frames, dtype=torch.float32).repeat_interleave(h * w).reshape(frames, h * w, 1)
    keys = reference_keys(x, 1, frames, h, w)[..., 0]
    # shifted(t) per column: t - s where t >= s, else t
    shifted = [[0, 0, 0, 0], [1, 1, 1, 0], [2, 2, 0, 1], [3, 0, 1, 2], [0, 1, 2, 3]]
    for t in range(frames):
        previous = max(t - 1, 0)
        assert keys[t].tolist() == shifted[previous] + shifted[t]


# -- gathered keys/values: exact ------------------------------------------------------------------

@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_keys_values_equal_reference(h, w, frames):
    clips = 2  # cond + uncond
    _, k, v = random_qkv(clips, frames, h, w, seed=h * 100 + w * 10 + frames)
    layout = ClipLayout.contiguous(clips, frames)
    k_shift, v_shift = latent_shift_keys_values(k, v, layout, h, w)
    assert k_shift.shape == (clips * frames, 2 * h * w, k.shape[-1])
    assert torch.equal(k_shift, reference_keys(k, clips, frames, h, w))
    assert torch.equal(v_shift, reference_keys(v, clips, frames, h, w))


def test_keys_values_keep_clips_apart():
    # Three clips in one batch: nothing of one clip may reach another's keys.
    clips, frames, h, w = 3, 4, 5, 7
    _, k, v = random_qkv(clips, frames, h, w, seed=7)
    k_shift, v_shift = latent_shift_keys_values(k, v, ClipLayout.contiguous(clips, frames), h, w)
    assert torch.equal(k_shift, reference_keys(k, clips, frames, h, w))
    assert torch.equal(v_shift, reference_keys(v, clips, frames, h, w))


def test_keys_values_refuse_a_batch_that_does_not_fit():
    _, k, v = random_qkv(2, 4, 4, 4)
    with pytest.raises(ValueError, match="4x5 grid"):
        latent_shift_keys_values(k, v, ClipLayout.contiguous(2, 4), 4, 5)
    with pytest.raises(ValueError, match="3 frames"):
        latent_shift_keys_values(k, v, ClipLayout.contiguous(2, 3), 4, 4)


# -- attention: allclose --------------------------------------------------------------------------

@pytest.mark.parametrize("h,w", GRIDS)
@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_attention_equals_reference(h, w, frames):
    clips, heads = 2, 4
    q, k, v = random_qkv(clips, frames, h, w, seed=1000 + h * 100 + w * 10 + frames)
    out = latent_shift_attention(q, k, v, heads, ClipLayout.contiguous(clips, frames), h, w)
    expected = reference_attention(
        q, reference_keys(k, clips, frames, h, w), reference_keys(v, clips, frames, h, w), heads
    )
    assert out.shape == q.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_attention_differs_from_plain_attention_for_video():
    # Guards the comparison above: with several frames the shifted keys must change the result.
    clips, frames, h, w, heads = 2, 4, 8, 8, 4
    q, k, v = random_qkv(clips, frames, h, w, seed=3)
    out = latent_shift_attention(q, k, v, heads, ClipLayout.contiguous(clips, frames), h, w)
    assert (out - reference_attention(q, k, v, heads)).abs().max() > 1e-2


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7)])
def test_single_frame_is_plain_attention(h, w):
    clips, heads = 2, 4
    q, k, v = random_qkv(clips, 1, h, w, seed=11)
    layout = ClipLayout.contiguous(clips, 1)
    plain = reference_attention(q, k, v, heads)
    torch.testing.assert_close(latent_shift_attention(q, k, v, heads, layout, h, w), plain, rtol=1e-5, atol=1e-5)
    # and the spec's "frame 0 uses itself twice" (what F=1 gathers) is the same attention
    k2, v2 = latent_shift_keys_values(k, v, layout, h, w)
    assert torch.equal(k2, torch.cat([k, k], dim=1)) and torch.equal(v2, torch.cat([v, v], dim=1))
    torch.testing.assert_close(reference_attention(q, k2, v2, heads), plain, rtol=1e-5, atol=1e-5)


# -- ClipLayout.from_batch ------------------------------------------------------------------------

def test_from_batch_automatic_is_one_clip_per_group():
    layout = ClipLayout.from_batch(16, groups=2)
    assert (layout.clips, layout.frames, layout.positions) == (2, 8, tuple(range(8)))
    assert layout.batch == 16 and layout.is_video


def test_from_batch_explicit_frames_per_clip():
    layout = ClipLayout.from_batch(16, groups=2, frames_per_clip=4)
    assert (layout.clips, layout.frames, layout.positions) == (4, 4, (0, 1, 2, 3))
    single = ClipLayout.from_batch(3, groups=1, frames_per_clip=1)
    assert (single.clips, single.frames) == (3, 1) and not single.is_video


def test_from_batch_not_divisible_says_what_to_do():
    with pytest.raises(ClipLayoutError) as e:
        ClipLayout.from_batch(12, groups=2, frames_per_clip=4)
    message = str(e.value)
    assert "6 latents" in message and "4-frame" in message
    assert "frames_per_clip" in message and "divisor of 6" in message
    with pytest.raises(ClipLayoutError, match="does not split into 2 cond/uncond groups"):
        ClipLayout.from_batch(7, groups=2)


def test_contiguous_window_behaves_like_a_clip_from_frame_0():
    h, w, frames = 5, 7, 8
    window = list(range(8, 16))
    layout = ClipLayout.from_batch(2 * frames, groups=2, frames_per_clip=2, window_indices=window)
    assert (layout.clips, layout.frames, layout.positions) == (2, frames, tuple(window))
    _, k, v = random_qkv(2, frames, h, w, seed=21)
    got = latent_shift_keys_values(k, v, layout, h, w)
    expected = latent_shift_keys_values(k, v, ClipLayout.contiguous(2, frames), h, w)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_looped_window_continues_past_the_last_frame():
    h, w = 4, 4
    layout = ClipLayout.from_batch(8, groups=2, window_indices=[14, 15, 0, 1], total_frames=16)
    assert layout.positions == (14, 15, 16, 17)
    _, k, v = random_qkv(2, 4, h, w, seed=22)
    got = latent_shift_keys_values(k, v, layout, h, w)
    assert torch.equal(got[0], reference_keys(k, 2, 4, h, w))
    assert torch.equal(got[1], reference_keys(v, 2, 4, h, w))


def test_strided_window_takes_the_latest_frame_at_least_s_earlier():
    layout = ClipLayout.from_batch(4, groups=1, window_indices=[0, 2, 4, 6])
    positions = layout.positions
    assert positions == (0, 2, 4, 6)
    # frame 3 is time 6
    assert earlier_frame(positions, 3, 0) == 3
    assert earlier_frame(positions, 3, 1) == 2  # time 4 is the latest <= 5
    assert earlier_frame(positions, 3, 2) == 2  # time 4
    assert earlier_frame(positions, 3, 3) == 1  # time 2 is the latest <= 3
    assert earlier_frame(positions, 3, 4) == 1
    assert earlier_frame(positions, 1, 1) == 0
    assert earlier_frame(positions, 1, 3) == 1  # nothing at time <= -1: keeps its own token
    assert earlier_frame(positions, 0, 1) == 0
    for t in range(4):
        for s in range(5):
            assert earlier_frame(positions, t, s) == reference_source_frame(positions, t, s)
    h, w = 5, 7
    _, k, v = random_qkv(1, 4, h, w, seed=23)
    got = latent_shift_keys_values(k, v, layout, h, w)
    assert torch.equal(got[0], reference_keys(k, 1, 4, h, w, positions))
    assert torch.equal(got[1], reference_keys(v, 1, 4, h, w, positions))
    # a strided window is not the same as a contiguous clip
    assert not torch.equal(got[0], reference_keys(k, 1, 4, h, w))


@pytest.mark.parametrize("positions", [(3, 4, 7, 8, 12), (0, 1, 5, 6, 7, 20), (10, 13, 16, 19)])
def test_earlier_frame_matches_reference_on_irregular_positions(positions):
    for t in range(len(positions)):
        for s in range(6):
            assert earlier_frame(positions, t, s) == reference_source_frame(positions, t, s), (t, s)


@pytest.mark.parametrize(
    "window,total,expected",
    [
        ([12, 14, 0, 2], 16, (12, 14, 16, 18)),  # every 2nd frame of a 16-frame loop
        ([11, 13, 0, 2], 15, (11, 13, 15, 17)),  # every 2nd frame of a 15-frame loop
        ([15, 1, 3, 5], 16, (15, 17, 19, 21)),  # wraps right after the first frame
        ([10, 14, 2, 6], 16, (10, 14, 18, 22)),  # every 4th frame of a 16-frame loop
        ([11, 12, 14, 0, 2], 16, (11, 12, 14, 16, 18)),  # the frame before a strided window first (0.33's anchor)
        ([13, 14, 0, 2, 4], 16, (13, 14, 16, 18, 20)),  # anchor 13 before the looped window [14, 0, 2, 4]
        ([7, 8, 0, 1], 9, (7, 8, 9, 10)),  # a 9-frame loop
    ],
)
def test_looped_strided_window_keeps_its_stride(window, total, expected):
    layout = ClipLayout.from_batch(2 * len(window), groups=2, window_indices=window, total_frames=total)
    assert layout.positions == expected


def test_a_window_that_wraps_needs_the_clip_length():
    with pytest.raises(ClipLayoutError, match="do not go forward in time around a clip whose frame count is unknown"):
        ClipLayout.from_batch(8, groups=2, window_indices=[14, 15, 0, 1])
    with pytest.raises(ClipLayoutError, match="do not go forward in time around a clip of 16 frames"):
        ClipLayout.from_batch(4, groups=2, window_indices=[3, 3], total_frames=16)


@pytest.mark.parametrize("num_frames", [15, 16, 24])
def test_host_looped_windows_unwrap_to_real_time(num_frames):
    # The host's own looped context windows (with strides 1, 2, 4): each window is frames
    # j, j + step, j + 2 * step, ... taken modulo the clip length.
    import comfy.context_windows as cw

    handler = cw.IndexListContextHandler(
        None, None, context_length=4, context_overlap=1, context_stride=3, closed_loop=True
    )
    windows = cw.create_windows_uniform_looped(num_frames, handler, {})
    strided_wraps = [w for w in windows if w != sorted(w) and min(b - a for a, b in zip(w, w[1:]) if b > a) > 1]
    assert strided_wraps, "no strided window wraps around: the test would check nothing"
    for window in windows:
        layout = ClipLayout.from_batch(len(window), groups=1, window_indices=window, total_frames=num_frames)
        positions = layout.positions
        step = positions[1] - positions[0]
        assert step >= 1 and all(b - a == step for a, b in zip(positions, positions[1:])), (window, positions)
        assert [p % num_frames for p in positions] == window


# -- loop mode --------------------------------------------------------------------------------------

def test_looped_reference_matches_hand_worked_case():
    # A looped clip of 5 frames on a 1x4 grid (offsets 4, 3, 2, 1): frame t takes (t - s) mod 5,
    # and frame 0's previous frame is frame 4.
    frames, h, w = 5, 1, 4
    x = torch.arange(frames, dtype=torch.float32).repeat_interleave(h * w).reshape(frames, h * w, 1)
    keys = reference_keys(x, 1, frames, h, w, loop_length=frames)[..., 0]
    shifted = [[(t - s) % frames for s in (4, 3, 2, 1)] for t in range(frames)]
    for t in range(frames):
        assert keys[t].tolist() == shifted[(t - 1) % frames] + shifted[t]


@pytest.mark.parametrize("h,w", [(4, 4), (5, 7)])
@pytest.mark.parametrize("frames", [1, 2, 3, 5, 8])
def test_looped_clip_equals_reference(h, w, frames):
    clips, heads = 2, 4
    q, k, v = random_qkv(clips, frames, h, w, seed=2000 + frames)
    layout = ClipLayout.from_batch(clips * frames, groups=clips, loop=True)
    assert layout.loop_length == frames and layout.closes_loop
    k_shift, v_shift = latent_shift_keys_values(k, v, layout, h, w)
    k_ref, v_ref = (reference_keys(t, clips, frames, h, w, loop_length=frames) for t in (k, v))
    assert torch.equal(k_shift, k_ref) and torch.equal(v_shift, v_ref)
    out = latent_shift_attention(q, k, v, heads, layout, h, w)
    torch.testing.assert_close(out, reference_attention(q, k_ref, v_ref, heads), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "window,loop_length",
    [
        ([14, 15, 0, 1, 2, 3], 16),  # a window across the seam of a 16-frame loop
        ([20, 21, 22, 23], 64),  # the middle of a longer loop: nothing wraps within reach
        ([60, 61, 62, 63, 0, 1, 2, 3], 64),
        ([12, 14, 0, 2, 4, 6, 8, 10], 16),  # every 2nd frame, all the way round the loop
        ([10, 14, 2, 6], 16),  # every 4th frame, all the way round
        ([0, 1, 2, 3, 4, 5], 8),  # the start of an 8-frame loop: frame 0 reaches back to nothing
        ([2, 3, 4, 5, 6, 7, 0], 8),  # all but one frame of the loop: wraps, skips the missing one
    ],
)
def test_looped_window_equals_reference(window, loop_length):
    h, w = 5, 6
    layout = ClipLayout.from_batch(2 * len(window), groups=2, window_indices=window, loop_length=loop_length)
    assert [p % loop_length for p in layout.positions] == window
    _, k, v = random_qkv(2, len(window), h, w, seed=len(window) + loop_length)
    got = latent_shift_keys_values(k, v, layout, h, w)
    for tensor, shifted in zip((k, v), got):
        expected = reference_keys(tensor, 2, len(window), h, w, layout.positions, loop_length)
        assert torch.equal(shifted, expected)
    for t in range(len(window)):
        for s in range(6):
            assert earlier_frame(layout.positions, t, s, loop_length) == reference_source_frame(
                layout.positions, t, s, loop_length
            ), (t, s)


def test_last_frame_reaches_frame_zero_only_in_a_loop():
    clips, frames, h, w, heads = 1, 6, 8, 8, 4
    q, k, v = random_qkv(clips, frames, h, w, seed=31)
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 1.0
    v2[-1] -= 1.0
    for loop in (True, False):
        layout = ClipLayout.contiguous(clips, frames, loop=loop)
        before = latent_shift_attention(q, k, v, heads, layout, h, w)
        after = latent_shift_attention(q, k2, v2, heads, layout, h, w)
        assert (not torch.equal(before[0], after[0])) == loop, f"loop={loop}"
        assert not torch.equal(before[-1], after[-1])


def test_loop_layout_settings():
    assert ClipLayout.from_batch(16, groups=2).loop_length == 0
    layout = ClipLayout.from_batch(16, groups=2, frames_per_clip=4, loop=True)
    assert (layout.clips, layout.frames, layout.loop_length, layout.closes_loop) == (4, 4, 4, True)
    window = ClipLayout.from_batch(8, groups=2, window_indices=[30, 31, 0, 1], loop_length=32)
    assert window.positions == (30, 31, 32, 33) and window.frame_offsets == (0, 1, 2, 3)
    assert window.loop_length == 32 and not window.closes_loop
    with pytest.raises(ClipLayoutError, match="pass loop_length"):
        ClipLayout.from_batch(8, groups=2, window_indices=[30, 31, 0, 1], loop=True)
    with pytest.raises(ClipLayoutError, match="loop of 3 frames"):
        ClipLayout.from_batch(8, groups=2, window_indices=[0, 1, 2, 3], loop_length=3)


# -- the gather index: one build per window shape ---------------------------------------------------

def naive_index(positions, loop_length, h, w):
    """The flat gather index, written out with the reference's loops."""
    tokens = h * w

    def shifted(t):
        return [
            reference_source_frame(positions, t, PATTERN[n // w % 4][n % w % 4], loop_length) * tokens + n
            for n in range(tokens)
        ]

    index = []
    for t in range(len(positions)):
        index += shifted(reference_source_frame(positions, t, 1, loop_length)) + shifted(t)
    return index


@pytest.mark.parametrize(
    "positions,loop_length,h,w",
    [((0, 1, 2, 3, 4, 5, 6, 7), 0, 6, 5), ((0, 2, 4, 9), 0, 4, 4), ((0, 1, 2, 3), 4, 3, 7), ((5, 6, 7, 8, 9), 8, 4, 5)],
)
def test_index_equals_the_written_out_index(positions, loop_length, h, w):
    layout = ClipLayout(1, len(positions), positions, loop_length)
    index = latent_shift.key_value_index(layout, h, w, torch.device("cpu"))
    assert index.tolist() == naive_index(positions, loop_length, h, w)
    assert index.dtype == torch.int64 and not index.is_inference()


def test_sliding_windows_share_one_index():
    h, w = 6, 6
    before = dict(latent_shift._index_cache)
    indices = []
    for start in range(100, 140):
        layout = ClipLayout.from_batch(32, groups=2, window_indices=list(range(start, start + 16)))
        indices.append(latent_shift.key_value_index(layout, h, w, torch.device("cpu")))
    new_keys = set(latent_shift._index_cache) - set(before)
    assert len(new_keys) == 1, new_keys
    assert all(index is indices[0] for index in indices)
    # a different shape (a strided window) is a different index
    strided = ClipLayout.from_batch(32, groups=2, window_indices=list(range(100, 132, 2)))
    assert not torch.equal(latent_shift.key_value_index(strided, h, w, torch.device("cpu")), indices[0])


def test_index_made_in_inference_mode_serves_training():
    layout = ClipLayout(1, 3, (0, 1, 2), 0)
    latent_shift._index_cache.pop((layout.frame_offsets, 0, 3, 3, torch.device("cpu")), None)
    with torch.inference_mode():
        latent_shift.key_value_index(layout, 3, 3, torch.device("cpu"))
    k = torch.randn(3, 9, 4, requires_grad=True)
    k_shift, _ = latent_shift_keys_values(k, k, layout, 3, 3)
    k_shift.sum().backward()  # would fail on an inference-mode index
    assert k.grad is not None
