"""Prompt travel on the real host: SimDA Prompt Travel's per-frame CONDITIONING reaches each frame's
cross-attention as that frame's interpolation, through the Video Sampler and the host's KSampler,
and through the host's context windows, where each window gets its own frames' prompts (ComfyUI
0.3.75 on its own hands every window the first window's rows).

The model is the random-weight SD1.5 test checkpoint of tests/live_server.py (real CLIP-L, a cut
UNet) with SimDA's latent shift; what the UNet's cross-attention receives is read with a host
``attn2_patch``.
"""
from __future__ import annotations

import pytest
import torch

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)
from live_server import cached_test_models

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
from simda_pack.nodes.nodes_latent_shift import SimDALatentShiftPatch
from simda_pack.nodes.nodes_prompts import SimDAPromptTravel
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.simda_core.video.frame_windows import window_frames
from simda_pack.simda_core.video.prompt_schedule import PromptScheduleError, frame_weights, parse_schedule

pytestmark = pytest.mark.usefixtures("unload_host_models")

FRAMES = 8
SCHEDULE = "0: a cat walking in a garden\n4: a tiger walking in a garden\n7: a (tiger:1.4) running on a beach"


def result(output):
    return (output.result if hasattr(output, "result") else output)[0]


# -- the schedule ----------------------------------------------------------------------------------

def test_schedule_lines_frames_and_weights():
    keyframes = parse_schedule("# travel\n0: a cat, walking\n\n-1: a (tiger:1.2): walking\n5:  \"a dog\" ", 10)
    assert [(k.frame, k.prompt) for k in keyframes] == [
        (0, "a cat, walking"), (5, "a dog"), (9, "a (tiger:1.2): walking")
    ]
    w = frame_weights([2, 6], 9)
    assert torch.equal(w[:3], torch.tensor([[1.0, 0.0]] * 3, dtype=w.dtype))  # held before the first keyframe
    assert torch.allclose(w[3:6], torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]], dtype=w.dtype))
    assert torch.equal(w[6:], torch.tensor([[0.0, 1.0]] * 3, dtype=w.dtype))  # held after the last
    assert torch.allclose(frame_weights([0, 3, 5], 6).sum(1), torch.ones(6, dtype=w.dtype))


@pytest.mark.parametrize(
    "text, frames, message",
    [
        ("a cat walking", 8, 'line 1 ("a cat walking") is not "<frame>: <prompt>"'),
        ("0: a cat\n8: a tiger", 8, "frame 8, but the clip has frames 0..7"),
        ("0: a cat\n-9: a tiger", 8, "frame -9, but the clip has frames 0..7"),
        ("0: a cat\n-8: a tiger", 8, "sets frame 0 a second time"),
        ("\n# nothing\n", 8, "holds no keyframes"),
    ],
)
def test_bad_schedules_are_one_sentence(text, frames, message):
    with pytest.raises(PromptScheduleError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_schedule(text, frames)
    assert SimDAPromptTravel.validate_inputs(prompts=text, frames=frames).startswith("SimDA Prompt Travel: ")


# -- the node on the real CLIP ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint():
    path, _ = cached_test_models()
    model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
    return model, clip



def encode(clip, text):
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


@pytest.fixture(scope="module")
def travel(checkpoint):
    _, clip = checkpoint
    return result(SimDAPromptTravel.execute(clip, SCHEDULE, FRAMES))


def test_each_frame_gets_its_interpolation(checkpoint, travel):
    _, clip = checkpoint
    (context, extra), = travel
    cat, cat_pooled = encode(clip, "a cat walking in a garden")
    tiger, _ = encode(clip, "a tiger walking in a garden")
    beach, beach_pooled = encode(clip, "a (tiger:1.4) running on a beach")
    assert context.shape == (FRAMES, 77, 768) and extra["pooled_output"].shape == (FRAMES, 768)
    expected = [cat[0], 0.75 * cat[0] + 0.25 * tiger[0], 0.5 * cat[0] + 0.5 * tiger[0], 0.25 * cat[0] + 0.75 * tiger[0],
                tiger[0], (2 / 3) * tiger[0] + (1 / 3) * beach[0], (1 / 3) * tiger[0] + (2 / 3) * beach[0], beach[0]]
    for i, row in enumerate(expected):
        torch.testing.assert_close(context[i], row, rtol=1e-4, atol=1e-4, msg=f"frame {i}")
    torch.testing.assert_close(extra["pooled_output"][0], cat_pooled[0])
    torch.testing.assert_close(extra["pooled_output"][-1], beach_pooled[0])
    # the prompt weight is the host's emphasis syntax: it changes the embedding
    assert not torch.allclose(beach, encode(clip, "a tiger running on a beach")[0], atol=1e-3)


def record_cross_attention(model) -> list[tuple]:
    """``(window frames or None, cond_or_uncond, context rows)`` of every cross-attention call."""
    seen = []

    def attn2_patch(n, context, value, extra_options):
        window = window_frames(extra_options)
        seen.append(
            (tuple(window[0]) if window else None, tuple(extra_options["cond_or_uncond"]), context.detach().clone())
        )
        return n, context, value

    model.set_model_attn2_patch(attn2_patch)
    return seen


def cond_rows(seen_entry) -> torch.Tensor:
    """The cond group's context rows of one recorded call."""
    window, cond_or_uncond, context = seen_entry
    groups = len(cond_or_uncond)
    per_group = context.reshape(groups, context.shape[0] // groups, *context.shape[1:])
    return per_group[cond_or_uncond.index(0)]


def simda_model(model):
    return result(SimDALatentShiftPatch.execute(model, 0, True, True, True, True, 0.0, 1.0, False))


NEGATIVE_TEXT = "blurry"


@pytest.mark.parametrize("sampler", ["video_sampler", "ksampler"])
def test_the_unet_sees_frame_i_with_its_own_prompt(checkpoint, travel, sampler):
    model, clip = checkpoint
    negative = [[encode(clip, NEGATIVE_TEXT)[0], {}]]
    patched = simda_model(model)
    seen = record_cross_attention(patched)
    if sampler == "video_sampler":
        SimDAVideoSampler.execute(patched, travel, negative, FRAMES, 64, 64, 0, 2, 5.0, "euler", "normal", 1.0, 0.0)
    else:
        latent = torch.zeros(FRAMES, 4, 8, 8)
        comfy.sample.sample(patched, comfy.sample.prepare_noise(latent, 0), 2, 5.0, "euler", "normal", travel, negative,
                            latent, disable_pbar=True, seed=0)
    assert seen
    for entry in seen:
        assert entry[0] is None
        torch.testing.assert_close(cond_rows(entry), travel[0][0].to(entry[2].dtype), rtol=1e-3, atol=1e-3)


def sample_with(path: str, model, positive, negative, frames: int, steps: int):
    """One clip through one of the host's sampler paths, or the Video Sampler."""
    if path == "video_sampler":
        SimDAVideoSampler.execute(model, positive, negative, frames, 64, 64, 0, steps, 5.0, "euler", "normal", 1.0, 0.0)
        return
    latent = torch.zeros(frames, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    if path == "ksampler":
        comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent, disable_pbar=True,
                            seed=0)
        return
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(5.0)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, disable_pbar=True, seed=0)


@pytest.mark.parametrize("path", ["video_sampler", "ksampler", "sampler_custom_advanced"])
@pytest.mark.parametrize(
    "schedule, closed_loop", [("standard_static", False), ("standard_uniform", False), ("looped_uniform", True)]
)
def test_each_context_window_sees_its_own_frames_prompts(checkpoint, travel, schedule, closed_loop, path):
    """Windows of 4 over 8 frames (the host's ContextWindowsManual on the frame batch), 2 steps (on
    ComfyUI 0.3.75 the host's own step lookup needs frames = steps + 1): every sampler path's
    cross-attention sees each window's own frames' rows (the frame before the window included where
    0.33 adds it)."""
    model, clip = checkpoint
    negative = [[encode(clip, NEGATIVE_TEXT)[0], {}]]
    windowed = host.context_windows(simda_model(model), 4, 2, schedule, 1, closed_loop)
    seen = record_cross_attention(windowed)
    sample_with(path, windowed, travel, negative, FRAMES, 2)
    windows = {entry[0] for entry in seen}
    assert None not in windows and len(windows) >= 3 and set().union(*windows) == set(range(FRAMES))
    per_frame = travel[0][0]
    for entry in seen:
        torch.testing.assert_close(cond_rows(entry), per_frame[list(entry[0])].to(entry[2].dtype), rtol=1e-3, atol=1e-3)
    assert any(not torch.allclose(per_frame[list(w)], per_frame[: len(w)]) for w in windows)


# -- the helpers on their own ------------------------------------------------------------------------

def test_window_frames_reads_the_host_and_ade():
    class Window:
        index_list = [6, 7, 0, 1]

    assert window_frames({"context_window": Window()}) == ([6, 7, 0, 1], 0)
    assert window_frames({"context_window": Window()}, total_frames=8) == ([6, 7, 0, 1], 8)  # 0.3.75: from the run

    class AnchoredWindow:  # 0.33's causal_window_fix: the frame before the window goes first
        index_list = [4, 5, 6, 7]
        causal_anchor_index = 3
        total_frames = 8

    assert window_frames({"context_window": AnchoredWindow()}) == ([3, 4, 5, 6, 7], 8)
    AnchoredWindow.causal_anchor_index = -1  # the first window has none
    assert window_frames({"context_window": AnchoredWindow()}) == ([4, 5, 6, 7], 8)
    assert window_frames(
        {"ad_params": {"sub_idxs": [4, 5, 6, 7], "full_length": 12, "context_length": 4}}
    ) == ([4, 5, 6, 7], 12)
    assert window_frames({"ad_params": {"sub_idxs": None, "full_length": 12, "context_length": 16}}) is None
    assert window_frames({"ad_params": {"sub_idxs": list(range(12)), "full_length": 12}}) is None
    assert window_frames({}) is None


def test_window_rows_cut_only_what_the_host_left_whole():
    import comfy.conds

    from simda_pack.simda_core.host.windows import window_rows

    per_frame = comfy.conds.CONDCrossAttn(torch.arange(12.0).reshape(12, 1, 1))
    shared = comfy.conds.CONDCrossAttn(torch.zeros(1, 1, 1))
    already = comfy.conds.CONDRegular(torch.arange(3.0).reshape(3, 1))  # the window's rows, as 0.33 cuts them
    conds = [[{"model_conds": {"c_crossattn": per_frame, "y": shared, "c_concat": already}, "uuid": 1}], None]
    ((cut,), none) = window_rows(conds, host.index_window([3, 4, 5], 12), 12)
    assert cut["model_conds"]["c_crossattn"].cond.flatten().tolist() == [3, 4, 5]
    assert cut["model_conds"]["y"] is shared and cut["model_conds"]["c_concat"] is already and cut["uuid"] == 1
    assert none is None
    assert conds[0][0]["model_conds"]["c_crossattn"] is per_frame  # the input is left alone


def test_a_clip_with_scheduled_hooks_is_encoded_per_part_of_its_schedule(checkpoint):
    """A CLIP whose hooks change strength halfway through sampling (the host's Set CLIP Hooks with
    schedule_clip, as CLIP Text Encode honours it): Prompt Travel gives one entry per part of the
    schedule, each with the host's start and end percent and one row per frame, and at a keyframe
    each entry's row is what the host's own scheduled encode gives for that prompt."""
    import comfy.hooks
    from comfy_extras.nodes_hooks import SetClipHooks

    _, clip = checkpoint
    weights = comfy.hooks.get_patch_weights_from_model(clip.patcher)
    hooks = comfy.hooks.create_hook_model_as_lora(
        None, {k: 1.2 * v for k, v in weights.items() if v.ndim == 2}, strength_model=1.0, strength_clip=1.0
    )
    keyframes = comfy.hooks.HookKeyframeGroup()
    keyframes.add(comfy.hooks.HookKeyframe(strength=0.0, start_percent=0.0))
    keyframes.add(comfy.hooks.HookKeyframe(strength=1.0, start_percent=0.5))
    hooks.set_keyframes_on_hooks(keyframes)
    (hooked,) = SetClipHooks().apply_hooks(clip, schedule_clip=True, apply_to_conds=True, hooks=hooks)
    travel = result(SimDAPromptTravel.execute(hooked, "0: a cat\n3: a dog", 4))
    host_cat = hooked.encode_from_tokens_scheduled(hooked.tokenize("a cat"))
    assert len(host_cat) == len(travel) == 2
    for (rows, options), (cat, cat_options) in zip(travel, host_cat):
        assert rows.shape[0] == 4
        for name in ("start_percent", "end_percent"):
            assert options.get(name) == cat_options.get(name), name
        torch.testing.assert_close(rows[:1], cat.to(rows.dtype), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(travel[0][0], travel[1][0], atol=1e-3), "the hook schedule made no difference"
