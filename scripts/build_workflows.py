"""Writes the shared workflows in example_workflows/ (ComfyUI's UI format) from a short description of each
graph, with widget order and socket types taken from a running ComfyUI's /object_info.

    python scripts/build_workflows.py --server http://127.0.0.1:8188

The shipped files are generated against ComfyUI 0.3.75 with VideoHelperSuite installed (its server
from `scripts/comfyui.sh` with `COMFYUI_PATH=.hosts/0.3.75/ComfyUI`); ComfyUI 0.33's frontend loads
them as they are (tests/test_workflow_builder.py, tests/test_frontend.py).
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from workflow_format import default_value, input_spec, is_widget, widget_slots

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"

NEGATIVE = "blurry, low quality, watermark, text, deformed, flicker"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
ADAPTERS = "simda_sd15.safetensors"
PROMPT = "a red panda walking through a snowy forest, cinematic, detailed"


KEYED_PREFIX = "VHS_"
"""VideoHelperSuite's nodes: its frontend keeps their widgets_values as an object keyed by widget
name (a list it reads in an older widget order of its own)."""


def keyed_widget_values(spec: dict, widgets: dict) -> dict:
    """``{name: value}`` of every widget, then the widgets that the chosen value of a ``format``
    widget adds in VHS's frontend (its ``formats`` option: ``[name, type or choices, options]``);
    the values given are taken out of ``widgets``."""
    values = {}
    for slot in widget_slots(spec):
        values[slot.name] = widgets.pop(slot.name) if slot.name in widgets else default_value(slot.spec)
    if "format" in values:
        options = input_spec(spec, "format")[1] if len(input_spec(spec, "format")) > 1 else {}
        for extra in options.get("formats", {}).get(values["format"], []):
            name = extra[0]
            values[name] = widgets.pop(name) if name in widgets else default_value(list(extra[1:]))
    return values


def listed_widget_values(spec: dict, widgets: dict) -> list:
    """``widgets_values`` as a list in the frontend's order: each widget's value (taken out of
    ``widgets``) or its default, a seed-like one followed by "fixed"; the widgets that the value
    of a dynamic combo brings come right after it, so the list grows one widget at a time."""
    values: list = []
    while True:
        pending = [slot for slot in widget_slots(spec, values) if slot.position >= len(values)]
        if not pending:
            return values
        slot = pending[0]
        values.append(widgets.pop(slot.name) if slot.name in widgets else default_value(slot.spec))
        if slot.control:
            values.append("fixed")


def save_video_widgets(info: dict, prefix: str) -> dict:
    """Save Video's widgets for an H.264 mp4 under ``prefix``. Where the host's ``format`` is a
    dynamic combo, the codec is the mp4 option's own widget ``format.codec``; else ``codec``."""
    spec = info["SaveVideo"]
    names = {slot.name for slot in widget_slots(spec, listed_widget_values(spec, {"format": "mp4"}))}
    codec = "format.codec" if "format.codec" in names else "codec"
    return {"filename_prefix": prefix, "format": "mp4", codec: "h264"}


class Graph:
    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, pos: tuple[int, int], title: str | None = None, size=(320, 120), **widgets) -> int:
        spec = self.info[type_]
        node_id = len(self.nodes) + 1
        if type_.startswith(KEYED_PREFIX):
            values = keyed_widget_values(spec, widgets)
        else:
            values = listed_widget_values(spec, widgets)
        if widgets:
            raise KeyError(f"{type_} has no widgets {sorted(widgets)}")
        node = {
            "id": node_id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": node_id - 1,
            "mode": 0, "inputs": [], "properties": {"Node name for S&R": type_}, "widgets_values": values,
            "outputs": [
                {"name": name, "type": type_out, "links": [], "slot_index": i}
                for i, (name, type_out) in enumerate(zip(spec["output_name"], spec["output"]))
            ],
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        return node_id

    def link(self, src: int, src_slot: int, dst: int, dst_input: str) -> None:
        src_node, dst_node = self.nodes[src - 1], self.nodes[dst - 1]
        link_id = len(self.links) + 1
        type_ = src_node["outputs"][src_slot]["type"]
        entry = {"name": dst_input, "type": type_, "link": link_id}
        if is_widget(input_spec(self.info[dst_node["type"]], dst_input)):
            entry["widget"] = {"name": dst_input}
        dst_node["inputs"].append(entry)
        src_node["outputs"][src_slot]["links"].append(link_id)
        self.links.append([link_id, src, src_slot, dst, len(dst_node["inputs"]) - 1, type_])

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
            "links": self.links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}},
            "version": 0.4,
        }


def checkpoint(g: Graph, name: str = CHECKPOINT, title: str | None = None) -> int:
    """Load Checkpoint at the left of the graph."""
    return g.add("CheckpointLoaderSimple", (0, 200), title=title, ckpt_name=name, size=(320, 100))


def prompts(g: Graph, ckpt: int, text: str, title: str = "Prompt", negative_at: int = 220,
            negative_height: int = 160) -> tuple[int, int]:
    """The prompt and the negative prompt (CLIP Text Encode) on the checkpoint's CLIP."""
    pos = g.add("CLIPTextEncode", (380, 0), title=title, size=(400, 160), text=text)
    neg = g.add("CLIPTextEncode", (380, negative_at), title="Negative prompt", size=(400, negative_height),
                text=NEGATIVE)
    g.link(ckpt, 1, pos, "clip")
    g.link(ckpt, 1, neg, "clip")
    return pos, neg


def video_sampler(g: Graph, model: int, pos: int, neg: int, size=(320, 380), title: str | None = None,
                  **widgets) -> int:
    """SimDA Video Sampler (DDIM, 50 steps, cfg 7.5, seed 42 unless given) on ``model``'s MODEL."""
    settings = dict(steps=50, cfg=7.5, sampler_name="ddim", scheduler="ddim_uniform", seed=42) | widgets
    sampler = g.add("SimDAVideoSampler", (840, 100), title=title, size=size, **settings)
    g.link(model, 0, sampler, "model")
    g.link(pos, 0, sampler, "positive")
    g.link(neg, 0, sampler, "negative")
    return sampler


def save_webp(g: Graph, decode: int, rate: int, prefix: str, title: str | None = None) -> None:
    """Save Animated WEBP of the decoded frames at the Frame rate node's fps."""
    webp = g.add("SaveAnimatedWEBP", (1460, 420), title=title, filename_prefix=prefix, size=(360, 360))
    g.link(decode, 0, webp, "images")
    g.link(rate, 0, webp, "fps")


def text_to_video(info: dict, with_adapters: bool) -> dict:
    g = Graph(info)
    ckpt = checkpoint(g)
    pos, neg = prompts(g, ckpt, PROMPT)
    model_src = (ckpt, 0)
    if with_adapters:
        loader = g.add("SimDAAdapterLoader", (380, 420), adapter_name=ADAPTERS, strength=1.0, size=(320, 110))
        g.link(*model_src, loader, "model")
        model_src = (loader, 0)
    shift = g.add("SimDALatentShiftPatch", (380, 560) if with_adapters else (380, 420), size=(320, 250))
    g.link(*model_src, shift, "model")
    sampler = video_sampler(g, shift, pos, neg, frames=16, width=512, height=512)
    prefix = "simda/text_to_video" if with_adapters else "simda/latent_shift"
    decode, rate = save_clip(g, sampler, ckpt, prefix)
    save_webp(g, decode, rate, prefix)
    return g.to_json()


X4_CHECKPOINT = "x4-upscaler-ema.safetensors"
SR_ADAPTERS = "simda_sr_x4.safetensors"


def text_to_video_upscaled(info: dict) -> dict:
    """Text to video at 256x256 (the paper's first stage), then SimDA Video Upscaler with the SD x4
    upscaler to 1024x1024, saved as mp4. The super-resolution Adapter Loader ships bypassed: the
    plain x4 model with latent shift runs as is; un-bypass it once there are SR adapters."""
    g = Graph(info)
    ckpt = checkpoint(g)
    pos, neg = prompts(g, ckpt, PROMPT)
    loader = g.add("SimDAAdapterLoader", (380, 420), adapter_name=ADAPTERS, strength=1.0, size=(320, 110))
    g.link(ckpt, 0, loader, "model")
    shift = g.add("SimDALatentShiftPatch", (380, 560), size=(320, 250))
    g.link(loader, 0, shift, "model")
    sampler = video_sampler(g, shift, pos, neg, title="SimDA Video Sampler (256x256)", frames=16, width=256, height=256)
    decode = g.add("VAEDecode", (1200, 100), size=(220, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")

    x4 = g.add("CheckpointLoaderSimple", (0, 900), title="Load the SD x4 upscaler", ckpt_name=X4_CHECKPOINT,
               size=(320, 100))
    x4_pos = g.add("CLIPTextEncode", (380, 860), title="Prompt (x4 upscaler's CLIP)", size=(400, 140), text=PROMPT)
    x4_neg = g.add("CLIPTextEncode", (380, 1040), title="Negative prompt (x4 upscaler's CLIP)", size=(400, 120),
                   text=NEGATIVE)
    g.link(x4, 1, x4_pos, "clip")
    g.link(x4, 1, x4_neg, "clip")
    sr = g.add("SimDAAdapterLoader", (380, 1200), title="SR adapters (bypassed: un-bypass with trained SR adapters)",
               adapter_name=SR_ADAPTERS, strength=1.0, size=(320, 110))
    g.nodes[sr - 1]["mode"] = 4
    g.link(x4, 0, sr, "model")
    upscaler = g.add("SimDAVideoUpscaler", (1200, 500), size=(340, 520))
    g.link(decode, 0, upscaler, "frames")
    g.link(sr, 0, upscaler, "model")
    g.link(x4, 2, upscaler, "vae")
    g.link(x4_pos, 0, upscaler, "positive")
    g.link(x4_neg, 0, upscaler, "negative")
    fps = g.add("PrimitiveFloat", (1580, 500), title="Frame rate", value=8.0, size=(220, 60))
    create = g.add("CreateVideo", (1580, 600), size=(260, 80))
    g.link(upscaler, 0, create, "images")
    g.link(fps, 0, create, "fps")
    save = g.add("SaveVideo", (1880, 500), size=(420, 420), **save_video_widgets(info, "simda/text_to_video_1024"))
    g.link(create, 0, save, "video")
    return g.to_json()


EDIT_SOURCE = "a rabbit walking in a green meadow"
EDIT_TARGET = "a tiger walking in a green meadow"


def vae_decode(g: Graph, sampler: int, ckpt: int, position: tuple[int, int]) -> int:
    """VAE Decode of the sampler's latent with the checkpoint's VAE; its id."""
    decode = g.add("VAEDecode", position, size=(220, 50))
    g.link(sampler, 0, decode, "samples")
    g.link(ckpt, 2, decode, "vae")
    return decode


def source_clip(g: Graph) -> tuple[int, int]:
    """Load Video -> Get Video Components, and the checkpoint, for a video edit; the ids of the
    components and the checkpoint."""
    video = g.add("LoadVideo", (0, 0), file="source_clip.mp4", size=(320, 420))
    parts = g.add("GetVideoComponents", (0, 460), size=(260, 90))
    g.link(video, 0, parts, "video")
    return parts, g.add("CheckpointLoaderSimple", (0, 600), ckpt_name=CHECKPOINT, size=(320, 100))


def save_edit(g: Graph, sampler: int, ckpt: int, fps: tuple[int, int], prefix: str) -> None:
    """An edit's end: VAE Decode -> Create Video at the frame rate ``fps`` gives -> Save Video (mp4)."""
    decode = vae_decode(g, sampler, ckpt, (1900, 0))
    create = g.add("CreateVideo", (1900, 100), size=(260, 80))
    g.link(decode, 0, create, "images")
    g.link(*fps, create, "fps")
    save_video = g.add("SaveVideo", (1900, 220), size=(360, 360), **save_video_widgets(g.info, prefix))
    g.link(create, 0, save_video, "video")


def edit_prompts(g: Graph, ckpt: int, source: bool = True) -> tuple[int | None, int, int]:
    """The prompts of a video edit on the checkpoint's CLIP: the source prompt (for the tuner; none
    without ``source``), the edited prompt and the empty negative; their ids."""
    ids = []
    texts = [("Source prompt (describes the clip)", EDIT_SOURCE)] if source else []
    texts += [("Edited prompt", EDIT_TARGET)]
    for index, (title, text) in enumerate(texts):
        ids.append(g.add("CLIPTextEncode", (360, 180 * index), title=title, size=(400, 140), text=text))
    ids.append(g.add("CLIPTextEncode", (360, 180 * len(texts)), title="Negative prompt (empty, as in the paper)",
                     size=(400, 100), text=""))
    for node in ids:
        g.link(ckpt, 1, node, "clip")
    return (ids[0] if source else None), ids[-2], ids[-1]


def invert_and_sample(g: Graph, model: tuple[int, int], latent: tuple[int, int], ckpt: int, edited: int, empty: int,
                      x: int, cfg: float) -> int:
    """SimDA Invert of ``latent`` with the empty prompt -> SimDA Video Sampler from the inverted noise
    with the edited prompt, both on ``model`` (50 DDIM steps); the sampler's id."""
    invert = g.add("SimDAInvert", (x, 0), size=(320, 160), steps=50, scheduler="ddim_uniform")
    g.link(*model, invert, "model")
    g.link(*latent, invert, "latent")
    g.link(ckpt, 1, invert, "clip")
    sampler = g.add("SimDAVideoSampler", (x + 360, 0), size=(320, 420), steps=50, cfg=cfg, sampler_name="ddim",
                    scheduler="ddim_uniform", frames=24, seed=0)
    g.link(*model, sampler, "model")
    g.link(edited, 0, sampler, "positive")
    g.link(empty, 0, sampler, "negative")
    g.link(invert, 0, sampler, "start_latent")
    return sampler


def one_shot_tuner(g: Graph, ckpt: int, source: int, frames: tuple[int, int], fps: tuple[int, int],
                   **widgets) -> int:
    """SimDA One-Shot Tuner on the checkpoint's MODEL and VAE, and Save SimDA Adapters (muted) after it."""
    tuner = g.add("SimDAOneShotTuner", (800, 0), size=(340, 460), **widgets)
    g.link(ckpt, 0, tuner, "model")
    g.link(ckpt, 2, tuner, "vae")
    g.link(*frames, tuner, "source_frames")
    g.link(source, 0, tuner, "source_prompt")
    g.link(*fps, tuner, "source_fps")
    save = g.add("SimDASaveAdapters", (800, 520), title="Save SimDA Adapters (unmute to keep the tuned adapters)",
                 filename_prefix="simda_edit", size=(340, 80))
    g.nodes[save - 1]["mode"] = 2
    g.link(tuner, 2, save, "adapters")
    return tuner


def video_edit(info: dict) -> dict:
    """One-shot video editing: Load Video -> SimDA One-Shot Tuner (trains on the clip) -> SimDA Invert
    (the tuned MODEL inverts the clip the tuner trained on) -> Video Sampler with the edited prompt ->
    Save Video at the tuner's frame rate. Changing the inversion or the prompt does not train again."""
    g = Graph(info)
    parts, ckpt = source_clip(g)
    source, edited, empty = edit_prompts(g, ckpt)
    tuner = one_shot_tuner(g, ckpt, source, (parts, 0), (parts, 2))
    sampler = invert_and_sample(g, (tuner, 0), (tuner, 1), ckpt, edited, empty, x=1180, cfg=12.5)
    save_edit(g, sampler, ckpt, (tuner, 3), "simda/video_edit")
    return g.to_json()


def video_edit_training_free(info: dict) -> dict:
    """A video edit with no training: Load Video -> SimDA Fit Frames -> VAE Encode -> SimDA Invert on the
    checkpoint with the Latent-Shift Patch -> Video Sampler with the edited prompt on the same MODEL ->
    Save Video at Fit Frames' frame rate."""
    g = Graph(info)
    parts, ckpt = source_clip(g)
    _, edited, empty = edit_prompts(g, ckpt, source=False)
    fit = g.add("SimDAFitFrames", (360, 340), size=(320, 250))
    g.link(parts, 0, fit, "images")
    g.link(parts, 2, fit, "source_fps")
    encode = g.add("VAEEncode", (360, 640), size=(220, 50))
    g.link(fit, 0, encode, "pixels")
    g.link(ckpt, 2, encode, "vae")
    shift = g.add("SimDALatentShiftPatch", (800, 200), size=(320, 270))
    g.link(ckpt, 0, shift, "model")
    sampler = invert_and_sample(g, (shift, 0), (encode, 0), ckpt, edited, empty, x=1180, cfg=7.5)
    save_edit(g, sampler, ckpt, (fit, 1), "simda/video_edit_training_free")
    return g.to_json()


def simda_model(g: Graph, ckpt: int, pos: tuple[int, int], loop: bool = False) -> int:
    """Adapter Loader -> Latent-Shift Patch on the checkpoint's MODEL; the patch node's id."""
    loader = g.add("SimDAAdapterLoader", pos, adapter_name=ADAPTERS, strength=1.0, size=(320, 110))
    g.link(ckpt, 0, loader, "model")
    extra = {"loop": True} if loop else {}
    shift = g.add("SimDALatentShiftPatch", (pos[0], pos[1] + 140), size=(320, 270), **extra)
    g.link(loader, 0, shift, "model")
    return shift


def save_clip(g: Graph, sampler: int, ckpt: int, prefix: str, x: int = 1200, fps: float = 8.0) -> tuple[int, int]:
    """VAE Decode -> Create Video at the Frame rate node's fps -> Save Video (mp4); the ids of the
    decode and the frame rate nodes."""
    decode = vae_decode(g, sampler, ckpt, (x, 100))
    rate = g.add("PrimitiveFloat", (x, 200), title="Frame rate", value=fps, size=(220, 60))
    create = g.add("CreateVideo", (x + 260, 0), size=(260, 80))
    g.link(decode, 0, create, "images")
    g.link(rate, 0, create, "fps")
    save = g.add("SaveVideo", (x + 560, 0), size=(360, 360), **save_video_widgets(g.info, prefix))
    g.link(create, 0, save, "video")
    return decode, rate


def prompt_travel(info: dict) -> dict:
    """Per-frame prompts: a cat turns into a tiger over 16 frames (SimDA Prompt Travel as positive)."""
    g = Graph(info)
    ckpt = checkpoint(g)
    travel = g.add("SimDAPromptTravel", (380, 0), title="Prompt travel (frame: prompt)", size=(420, 200), frames=16,
                   prompts="0: a cat walking through a sunny garden, detailed\n"
                           "8: a lynx walking through a sunny garden, detailed\n"
                           "-1: a (tiger:1.2) walking through a sunny garden, detailed")
    neg = g.add("CLIPTextEncode", (380, 240), title="Negative prompt", size=(420, 140), text=NEGATIVE)
    g.link(ckpt, 1, travel, "clip")
    g.link(ckpt, 1, neg, "clip")
    shift = simda_model(g, ckpt, (380, 420))
    sampler = video_sampler(g, shift, travel, neg, frames=16, width=512, height=512)
    save_clip(g, sampler, ckpt, "simda/prompt_travel")
    return g.to_json()


def image_to_video(info: dict) -> dict:
    """One image fixed as frame 0 of a 16-frame clip (SimDA Keyframes); latent shift carries it on."""
    g = Graph(info)
    ckpt = checkpoint(g)
    image = g.add("LoadImage", (0, 360), title="First frame", image="first_frame.png", size=(320, 320))
    scale = g.add("ImageScale", (0, 800), upscale_method="lanczos", width=512, height=512, crop="center",
                  size=(320, 130))
    g.link(image, 0, scale, "image")
    pos, neg = prompts(g, ckpt, "a sailing boat on a calm sea, gentle waves, cinematic",
                       title="Prompt (describes the image and the motion)", negative_at=200, negative_height=140)
    shift = simda_model(g, ckpt, (380, 380))
    keys = g.add("SimDAKeyframes", (380, 820), title="SimDA Keyframes (image at frame 0)", frames=16,
                 keyframe_frames="0", size=(320, 160))
    g.link(ckpt, 2, keys, "vae")
    g.link(scale, 0, keys, "images")
    sampler = video_sampler(g, shift, pos, neg, size=(320, 420))
    g.link(keys, 0, sampler, "latent")
    save_clip(g, sampler, ckpt, "simda/image_to_video")
    return g.to_json()


def loop(info: dict) -> dict:
    """A seamless loop: the Latent-Shift Patch's loop mode (the last frame leads into the first)."""
    g = Graph(info)
    ckpt = checkpoint(g)
    pos, neg = prompts(g, ckpt, "a campfire burning at night, sparks rising, loopable, detailed", negative_at=200,
                       negative_height=140)
    shift = simda_model(g, ckpt, (380, 380), loop=True)
    sampler = video_sampler(g, shift, pos, neg, frames=16, width=512, height=512)
    decode, rate = save_clip(g, sampler, ckpt, "simda/loop")
    save_webp(g, decode, rate, "simda/loop", title="Save Animated WEBP (repeats forever)")
    return g.to_json()


SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"


def sdxl_latent_shift_training_free(info: dict) -> dict:
    """Latent shift alone on an SDXL checkpoint (no adapters, no training): 16 frames at 1024x1024;
    the Video Sampler gives every frame SDXL's size conditioning."""
    g = Graph(info)
    ckpt = checkpoint(g, SDXL_CHECKPOINT, title="Load an SDXL checkpoint")
    pos, neg = prompts(g, ckpt, PROMPT)
    shift = g.add("SimDALatentShiftPatch", (380, 420), size=(320, 270))
    g.link(ckpt, 0, shift, "model")
    sampler = video_sampler(g, shift, pos, neg, frames=16, width=1024, height=1024)
    save_clip(g, sampler, ckpt, "simda/sdxl_latent_shift")
    return g.to_json()


def vhs_video_edit(info: dict) -> dict:
    """The video edit with VideoHelperSuite (needs VHS): VHS Load Video (every 2nd frame) -> One-Shot Tuner
    (stride 1, source_fps = VHS's loaded fps) -> SimDA Invert -> Video Sampler -> VHS Video Combine at the
    tuner's frame rate (loaded fps / stride: the edit plays at the source's speed)."""
    g = Graph(info)
    video = g.add("VHS_LoadVideo", (0, 0), video="source_clip.mp4", select_every_nth=2, frame_load_cap=48,
                  format="None", size=(320, 480))
    video_info = g.add("VHS_VideoInfoLoaded", (0, 520), size=(260, 130))
    g.link(video, 3, video_info, "video_info")
    ckpt = g.add("CheckpointLoaderSimple", (0, 700), ckpt_name=CHECKPOINT, size=(320, 100))
    source, edited, empty = edit_prompts(g, ckpt)
    tuner = one_shot_tuner(g, ckpt, source, (video, 0), (video_info, 0), stride=1)
    sampler = invert_and_sample(g, (tuner, 0), (tuner, 1), ckpt, edited, empty, x=1180, cfg=12.5)
    decode = vae_decode(g, sampler, ckpt, (1900, 0))
    combine = g.add("VHS_VideoCombine", (1900, 100), filename_prefix="simda/vhs_video_edit", format="video/h264-mp4",
                    size=(360, 480))
    g.link(decode, 0, combine, "images")
    g.link(tuner, 3, combine, "frame_rate")
    return g.to_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default="http://127.0.0.1:8188")
    parser.add_argument("--object-info", help="read /object_info from this JSON file instead of a server")
    args = parser.parse_args()
    if args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    else:
        with urllib.request.urlopen(f"{args.server}/object_info") as response:
            info = json.load(response)
    WORKFLOWS.mkdir(exist_ok=True)
    for name, workflow in build_all(info).items():
        (WORKFLOWS / name).write_text(json.dumps(workflow, indent=1) + "\n")
        print("wrote", WORKFLOWS / name)


def build_all(info: dict) -> dict[str, dict]:
    """Every workflow this host's ``/object_info`` can build, by file name."""
    builds = {
        "text_to_video.json": text_to_video(info, with_adapters=True),
        "latent_shift_training_free.json": text_to_video(info, with_adapters=False),
        "video_edit.json": video_edit(info),
        "video_edit_training_free.json": video_edit_training_free(info),
        "text_to_video_upscaled.json": text_to_video_upscaled(info),
        "prompt_travel.json": prompt_travel(info),
        "image_to_video.json": image_to_video(info),
        "sdxl_latent_shift_training_free.json": sdxl_latent_shift_training_free(info),
    }
    shift_inputs = info["SimDALatentShiftPatch"]["input"]
    if "loop" in shift_inputs.get("optional", {}) | shift_inputs["required"]:
        builds["loop.json"] = loop(info)
    if "VHS_LoadVideo" in info:  # a server with VideoHelperSuite installed (scripts/setup_packs.sh)
        builds["vhs_video_edit.json"] = vhs_video_edit(info)
    return builds


if __name__ == "__main__":
    main()
