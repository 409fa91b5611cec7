"""Nodes that disagree about the clip are refused before any work, over HTTP on the real server:
a SimDA Prompt Travel schedule of another length than the clip (through the host's KSampler on a
SimDA MODEL, and through the Video Sampler on a plain one), and a frames_per_clip that does not
divide the clip. Each refusal is one sentence naming both values, and the server saves nothing for
the refused prompt."""
from __future__ import annotations

import pytest

from live_server import comfy_server, execution_error  # noqa: F401  (comfy_server is a fixture)
from test_server_nodes import CHECKPOINT, FRAMES, LATENT, POSITIVE, SAMPLER, SAVE, SHIFT, SIZE, video_prompt

TRAVEL = "99"


def with_travel(prompt: dict, frames: int) -> dict:
    """``prompt`` with its positive conditioning from SimDA Prompt Travel over ``frames`` frames."""
    prompt[TRAVEL] = {
        "class_type": "SimDAPromptTravel",
        "inputs": {"clip": [CHECKPOINT, 1], "prompts": "0: a red fox\n-1: a grey wolf", "frames": frames},
    }
    prompt[SAMPLER]["inputs"]["positive"] = [TRAVEL, 0]
    return prompt


def with_video_sampler(prompt: dict, model: list) -> dict:
    """``prompt`` with the KSampler swapped for the SimDA Video Sampler (FRAMES frames)."""
    prompt[SAMPLER] = {
        "class_type": "SimDAVideoSampler",
        "inputs": {
            "model": model, "positive": [POSITIVE, 0], "negative": prompt[SAMPLER]["inputs"]["negative"],
            "frames": FRAMES, "width": SIZE, "height": SIZE, "seed": 5, "steps": 2, "cfg": 5.0,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0, "noise_shared": 0.0,
        },
    }
    del prompt[LATENT]
    return prompt


def refused(server, prompt: dict, prefix: str) -> str:
    entry = server.run_prompt(prompt)
    error = execution_error(entry)
    assert error is not None, "the prompt ran"
    assert "\n" not in error.strip() and error.strip().endswith("."), error
    assert not list(server.output_dir.glob(f"{prefix}*")), "a refused prompt saved frames"
    return error


@pytest.mark.parametrize("travel_frames", [FRAMES - 1, FRAMES + 2])
def test_a_prompt_schedule_of_another_length_is_refused_by_the_simda_model_under_ksampler(comfy_server, travel_frames):
    prefix = f"travel_ksampler_{travel_frames}"
    prompt = with_travel(video_prompt(comfy_server, seed=3, prefix=prefix), travel_frames)
    error = refused(comfy_server, prompt, prefix)
    assert f"holds {travel_frames} rows" in error and f"the clip has {FRAMES} frames" in error, error


def test_a_prompt_schedule_of_another_length_is_refused_by_the_video_sampler(comfy_server):
    prefix = "travel_video_sampler"
    prompt = with_travel(with_video_sampler(video_prompt(comfy_server, seed=4, prefix=prefix, latent_shift=False),
                                            [CHECKPOINT, 0]), FRAMES + 1)
    error = refused(comfy_server, prompt, prefix)
    assert error.startswith("SimDA Video Sampler:") or "SimDA Video Sampler:" in error, error
    assert f"holds {FRAMES + 1} rows" in error and f"the clip has {FRAMES} frames" in error, error


def test_a_prompt_schedule_of_the_clips_length_runs(comfy_server):
    prompt = with_travel(video_prompt(comfy_server, seed=6, prefix="travel_fits"), FRAMES)
    entry = comfy_server.run_prompt(prompt)
    assert execution_error(entry) is None, execution_error(entry)
    assert len(comfy_server.output_images(entry)) == FRAMES


@pytest.mark.parametrize("sampler", ["ksampler", "video_sampler"])
def test_frames_per_clip_that_does_not_divide_the_clip_is_refused(comfy_server, sampler):
    prefix = f"frames_per_clip_{sampler}"
    prompt = video_prompt(comfy_server, seed=7, prefix=prefix)
    prompt[SHIFT]["inputs"]["frames_per_clip"] = FRAMES - 1
    if sampler == "video_sampler":
        prompt = with_video_sampler(prompt, [SHIFT, 0])
    error = refused(comfy_server, prompt, prefix)
    assert f"the clip has {FRAMES} frames" in error and f"frames_per_clip = {FRAMES - 1}" in error, error
    assert SAVE in prompt
