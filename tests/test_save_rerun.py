"""Running a workflow again never loses an output: Save SimDA Adapters numbers its files as the
host's save nodes do (``<prefix>_00001.safetensors``, ``_00002``, ...), over HTTP on the real
server. A prompt whose only output is the save is accepted again; run with a changed input (here
the tuner's seed) it adds a file. The identical prompt queued twice adds no file the second time:
the host serves every node of it from its cache, its own Save Image included, so the second run
writes nothing and the first file holds those adapters. An API prompt written for the old
``filename`` input still saves (under that name as the prefix)."""
from __future__ import annotations

import shutil

import pytest

from live_server import cached_nodes, comfy_server, execution_error  # noqa: F401  (comfy_server is a fixture)
from test_workflows import bigbuckbunny

from simda_pack.simda_core.formats import read_adapter_file

SOURCE_CLIP = "save_rerun_bigbuckbunny.mp4"
CHECKPOINT, PROMPT, SOURCE, COMPONENTS, TUNER, SAVE = map(str, range(1, 7))


@pytest.fixture(scope="module")
def source_clip(comfy_server):
    shutil.copyfile(bigbuckbunny(), comfy_server.input_dir / SOURCE_CLIP)


def tune_and_save(server, seed: int, **save_inputs) -> dict:
    """Load Video -> Edit Tuner (1 step, 2 frames of 64x64) -> Save SimDA Adapters: the save is the
    prompt's only output."""
    return {
        CHECKPOINT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        PROMPT: {"class_type": "CLIPTextEncode", "inputs": {"text": "a rabbit in a meadow", "clip": [CHECKPOINT, 1]}},
        SOURCE: {"class_type": "LoadVideo", "inputs": {"file": SOURCE_CLIP}},
        COMPONENTS: {"class_type": "GetVideoComponents", "inputs": {"video": [SOURCE, 0]}},
        TUNER: {
            "class_type": "SimDAEditTuner",
            "inputs": {
                "model": [CHECKPOINT, 0], "vae": [CHECKPOINT, 2], "source_frames": [COMPONENTS, 0],
                "source_prompt": [PROMPT, 0],
                "clip": [CHECKPOINT, 1], "steps": 1, "learning_rate": 1e-4, "seed": seed, "frames": 2, "start_frame": 0,
                "stride": 1, "width": 64, "height": 64, "gradient_checkpointing": False, "inversion_steps": 1,
                "inversion_scheduler": "ddim_uniform", "source_fps": 24.0,
            },
        },
        SAVE: {"class_type": "SimDASaveAdapters", "inputs": {"adapters": [TUNER, 2], **save_inputs}},
    }


def saved_files(server, stem: str) -> list[str]:
    return sorted(path.name for path in server.simda_dir.glob(f"{stem}_*.safetensors"))


def run(server, prompt: dict) -> dict:
    status, answer = server.queue_prompt(prompt)
    assert status == 200, answer
    entry = server.wait_history(answer["prompt_id"], timeout=300)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def test_running_again_adds_a_numbered_file(comfy_server, source_clip):
    for seed in (0, 1):
        run(comfy_server, tune_and_save(comfy_server, seed, filename_prefix="rerun_edit"))
    assert saved_files(comfy_server, "rerun_edit") == ["rerun_edit_00001.safetensors", "rerun_edit_00002.safetensors"]
    first, second = (
        read_adapter_file(comfy_server.simda_dir / name) for name in saved_files(comfy_server, "rerun_edit")
    )
    assert first.family == second.family == "sd1"


def save_image(prefix: str) -> dict:
    """The host's own Save Image of one small picture: the reference for what a re-run saves."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0x336699}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def test_the_identical_prompt_queued_twice_saves_once_as_the_hosts_save_image_does(comfy_server, source_clip):
    """What a user gets from queueing the same prompt twice, first from the host's Save Image, then
    from Save SimDA Adapters: one file, and a second run in which the host executed nothing (every
    node, the save included, served from its cache; Save Image shows its first file again). That is
    what a ComfyUI user expects of an unchanged re-run: the host's own save node does the same, and
    the one file already holds the adapters of that same prompt."""
    reference = save_image("rerun_reference")
    first, second = run(comfy_server, reference), run(comfy_server, reference)
    assert sorted(p.name for p in comfy_server.output_dir.glob("rerun_reference_*")) == ["rerun_reference_00001_.png"]
    assert "2" not in cached_nodes(first) and set(cached_nodes(second)) == {"1", "2"}
    assert comfy_server.output_images(second) == comfy_server.output_images(first)  # it shows the first file

    prompt = tune_and_save(comfy_server, 6, filename_prefix="rerun_same")
    first, second = run(comfy_server, prompt), run(comfy_server, prompt)
    assert saved_files(comfy_server, "rerun_same") == ["rerun_same_00001.safetensors"]
    assert SAVE not in cached_nodes(first) and set(cached_nodes(second)) == set(prompt)


def test_a_prefix_with_a_subfolder_saves_there_and_one_leaving_models_simda_is_refused(comfy_server, source_clip):
    run(comfy_server, tune_and_save(comfy_server, 2, filename_prefix="edits/cat"))
    assert (comfy_server.simda_dir / "edits" / "cat_00001.safetensors").is_file()
    status, answer = comfy_server.queue_prompt(tune_and_save(comfy_server, 3, filename_prefix="../outside"))
    assert status == 400, answer
    assert "not a file name prefix inside models/simda" in str(answer), answer


def test_an_api_prompt_with_the_old_filename_input_still_saves(comfy_server, source_clip):
    run(comfy_server, tune_and_save(comfy_server, 4, filename="legacy_edit"))
    run(comfy_server, tune_and_save(comfy_server, 5, filename="legacy_edit"))
    assert saved_files(comfy_server, "legacy_edit") == [
        "legacy_edit_00001.safetensors", "legacy_edit_00002.safetensors"
    ]
