"""SimDA Prompt Travel: keyframed prompts become per-frame CONDITIONING."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..simda_core.prompt_schedule import (
    PromptScheduleError, common_token_length, frame_weights, interpolate, parse_schedule, repeat_tokens,
)

log = logging.getLogger("SimDA")

EXAMPLE = "0: a cat walking in a garden\n16: a (tiger:1.2) walking in a garden"


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
                "frames' prompts."
            ),
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP."),
                io.String.Input("prompts", multiline=True, default=EXAMPLE,
                                tooltip="One keyframe per line, '<frame>: <prompt>'; frame -1 is the last frame. Lines starting with # are skipped."),
                io.Int.Input("frames", default=16, min=1, max=4096,
                             tooltip="Frames of the clip; must match the clip the sampler makes."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING", tooltip="One cross-attention context per frame.")],
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
        contexts, pooled = [], []
        for keyframe in keyframes:
            context, pooled_output = clip.encode_from_tokens(clip.tokenize(keyframe.prompt), return_pooled=True)
            contexts.append(context)
            pooled.append(pooled_output)
        tokens = common_token_length([c.shape[1] for c in contexts])
        contexts = [repeat_tokens(c, tokens) for c in contexts]
        weights = frame_weights([k.frame for k in keyframes], frames)
        per_frame = interpolate(contexts, weights)  # [F, tokens, dim]
        extra = {}
        if all(p is not None for p in pooled):
            extra["pooled_output"] = interpolate([p.reshape(1, -1) for p in pooled], weights)  # [F, dim]
        log.info("SimDA Prompt Travel: %d keyframes over %d frames (at %s).", len(keyframes), frames,
                 ", ".join(str(k.frame) for k in keyframes))
        return io.NodeOutput([[per_frame, extra]])
