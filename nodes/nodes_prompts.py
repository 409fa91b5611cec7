"""SimDA Prompt Travel: keyframed prompts become per-frame CONDITIONING."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..simda_core.video.prompt_schedule import (
    PromptScheduleError, common_token_length, frame_weights, interpolate, parse_schedule, repeat_tokens,
)

log = logging.getLogger("SimDA")


def blend_entry(keyframe_entries: list, weights) -> list:
    """One CONDITIONING entry ``[context, options]`` per frame row: the keyframes' contexts (repeated
    to a common token count) and pooled outputs blended by ``weights``; the other options (a hook
    schedule's start and end percent) as the first keyframe's entry has them."""
    contexts = [context for context, _ in keyframe_entries]
    tokens = common_token_length([c.shape[1] for c in contexts])
    options = dict(keyframe_entries[0][1])
    pooled = [entry_options.get("pooled_output") for _, entry_options in keyframe_entries]
    if all(p is not None for p in pooled):
        options["pooled_output"] = interpolate([p.reshape(1, -1) for p in pooled], weights)  # [F, dim]
    return [interpolate([repeat_tokens(c, tokens) for c in contexts], weights), options]  # [F, tokens, dim]

EXAMPLE = "0: a cat walking in a garden\n-1: a (tiger:1.2) walking in a garden"
"""The default schedule: the first frame and the last (-1), so it fits any number of frames."""


class SimDAPromptTravel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAPromptTravel",
            display_name="SimDA Prompt Travel",
            category="SimDA",
            description=(
                "Per-frame prompts: one keyframe per line as '<frame>: <prompt>'. Frames between two keyframes get "
                "their text embeddings blended linearly; frames before the first keyframe hold its prompt, frames "
                "after the last hold the last one. Prompt weights such as (tiger:1.2) work as in CLIP Text Encode. "
                "The CONDITIONING holds one row per frame: use it as 'positive' of the Video Sampler or of KSampler, "
                "also with context windows (the host's or AnimateDiff-Evolved's), where each window gets its own "
                "frames' prompts. The schedule covers exactly 'frames' frames: a sampler whose clip has another "
                "number of frames refuses it, naming both. A CLIP with scheduled hooks (Set CLIP Hooks) is encoded "
                "per part of its schedule, as CLIP Text Encode does."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                io.String.Input(
                    "prompts", multiline=True, default=EXAMPLE,
                    tooltip=(
                        "One keyframe per line, '<frame>: <prompt>'; frame -1 "
                        "is the last frame. Lines starting with # are skipped."
                    ),
                ),
                io.Int.Input(
                    "frames", default=16, min=1, max=4096,
                    tooltip=(
                        "Frames of the clip; the sampler refuses a schedule "
                        "of another length than its clip (it is not re-timed)."
                    ),
                ),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING", tooltip="One cross-attention context per frame.")
            ],
        )

    @classmethod
    def validate_inputs(cls, prompts=None, frames=None):
        if isinstance(prompts, str) and isinstance(frames, int):  # linked inputs arrive at execution
            try:
                parse_schedule(prompts, frames)
            except PromptScheduleError as e:
                return f"SimDA Prompt Travel: {e}."
        return True

    @classmethod
    def execute(cls, clip, prompts, frames) -> io.NodeOutput:
        if clip is None:
            raise ValueError("SimDA Prompt Travel: no CLIP is connected; connect the checkpoint's CLIP output.")
        try:
            keyframes = parse_schedule(prompts, frames)
        except PromptScheduleError as e:
            raise ValueError(f"SimDA Prompt Travel: {e}.") from None
        # The host's scheduled encode, as CLIP Text Encode uses it: a CLIP with scheduled hooks gives
        # one entry per part of the schedule, each blended over the frames on its own.
        encoded = [clip.encode_from_tokens_scheduled(clip.tokenize(keyframe.prompt)) for keyframe in keyframes]
        if len({len(entries) for entries in encoded}) != 1:
            raise ValueError(
                "SimDA Prompt Travel: the CLIP's hook schedule gave the keyframes different numbers of entries."
            )
        weights = frame_weights([k.frame for k in keyframes], frames)
        conditioning = [
            blend_entry([entries[index] for entries in encoded], weights) for index in range(len(encoded[0]))
        ]
        log.info("SimDA Prompt Travel: %d keyframes over %d frames (at %s).", len(keyframes), frames,
                 ", ".join(str(k.frame) for k in keyframes))
        return io.NodeOutput(conditioning)
