"""The video edit as two nodes, over HTTP on the real server: SimDA One-Shot Tuner trains, SimDA
Invert inverts, so the host's cache serves what did not change; an API prompt saved with the one-node
Edit Tuner (tests/fixtures/old_edit_tuner) still runs to the result it gave before the split, and so
does the same graph in the two-node form.

The server runs the host's classic cache (``--cache-classic``, where the host has the flag: ComfyUI
0.33 defaults to a cache that drops entries under RAM pressure), so a node the host could serve from
its cache is served from it; which ones it served is its ``execution_cached`` message for the prompt.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
import old_edit_tuner
from live_server import cached_nodes, cached_test_models, execution_error, make_base_dir, serving
from old_edit_tuner import EDITED, INVERTED, SAMPLER, TUNER, load_reference, old_form_prompt, outcome

INVERT = "15"
"""The id of SimDA Invert in the two-node form of prompt.json (the tuner keeps id 7)."""
TRAINING_STARTED = re.compile(r"SimDA (?:One-Shot|Edit) Tuner: step 1/")


def cache_classic_args() -> tuple[str, ...]:
    """``("--cache-classic",)`` where the host's command line has the flag (read from its
    comfy/cli_args.py), else nothing (hosts before the flag cached classically)."""
    return ("--cache-classic",) if "--cache-classic" in (host.HOST_DIR / "comfy" / "cli_args.py").read_text() else ()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint, adapters = cached_test_models()
    base = tmp_path_factory.mktemp("comfyui_base_edit")
    make_base_dir(base, checkpoint, adapters)
    with serving(base, extra_args=cache_classic_args()) as server:
        old_edit_tuner.provide_source_clip(server)
        yield server


def two_node_form(prompt: dict) -> dict:
    """The old-form ``prompt`` with its Edit Tuner replaced by SimDA One-Shot Tuner (same id, same
    training inputs) and SimDA Invert (id INVERT, the tuner's inversion inputs), rewired as a user
    rewires it: the inverted noise now comes from SimDA Invert."""
    new = copy.deepcopy(prompt)
    old = new[TUNER]["inputs"]
    inversion = {name: old.pop(name) for name in ("clip", "inversion_conditioning", "inversion_steps",
                                                  "inversion_scheduler")}
    new[TUNER]["class_type"] = "SimDAOneShotTuner"
    new[INVERT] = {"class_type": "SimDAInvert", "inputs": {
        "model": [TUNER, 0], "latent": [TUNER, 1], "clip": inversion["clip"],
        "inversion_conditioning": inversion["inversion_conditioning"], "steps": inversion["inversion_steps"],
        "scheduler": inversion["inversion_scheduler"]}}
    for entry in new.values():
        for name, value in entry["inputs"].items():
            if value == [TUNER, 1] and entry is not new[INVERT]:
                entry["inputs"][name] = [INVERT, 0]
    return new


def run_ok(server, prompt: dict) -> dict:
    entry = server.run_prompt(prompt, timeout=600)
    assert execution_error(entry) is None, execution_error(entry)
    return entry


def trainings_since(server, start: int) -> int:
    return len(TRAINING_STARTED.findall(server.log_path.read_text(errors="replace")[start:]))


def log_size(server) -> int:
    return len(server.log_path.read_text(errors="replace"))


def assert_same_outcome(got: dict, reference: dict) -> None:
    for name in ("edited", "inverted"):
        assert torch.equal(got[name], reference[name]), (
            f"the {name} latent differs from the recorded one by {float((got[name] - reference[name]).abs().max())}")
    for name in ("adapters_sha256", "webp_durations_ms", "webp_pixels_sha256", "loss_graph_pixels_sha256"):
        assert got[name] == reference[name], (name, got[name], reference[name])


def test_the_recorded_reference_is_this_hosts_and_these_test_models():
    from live_server import RECIPE_KEY

    reference = load_reference()
    assert reference["host"] == old_edit_tuner.host_version()
    assert reference["recipe_key"] == RECIPE_KEY, "the reference was recorded on another test checkpoint recipe"


def test_an_old_form_prompt_runs_to_the_result_it_gave(server):
    """prompt.json, saved with the one-node Edit Tuner, as it is: accepted, run, and bit for bit what it
    gave before the split (both latents, the adapters, the frame rate, the loss graph)."""
    info = server.object_info("SimDAEditTuner")["SimDAEditTuner"]
    assert info["deprecated"] is True
    assert "SimDA One-Shot Tuner" in info["description"] and "SimDA Invert" in info["description"]
    entry = run_ok(server, old_form_prompt(server, "old_form"))
    assert_same_outcome(outcome(server, entry, "old_form"), load_reference())


def test_the_two_node_form_gives_the_old_result(server):
    """The same graph with One-Shot Tuner -> SimDA Invert: the tuner's source latent inverted by SimDA
    Invert on the tuned MODEL is the old tuner's inverted noise, and the edit is the same, bit for bit."""
    entry = run_ok(server, two_node_form(old_form_prompt(server, "two_node_form")))
    assert_same_outcome(outcome(server, entry, "two_node_form"), load_reference())


def test_changed_inversion_settings_or_prompt_train_nothing_again(server):
    """A first run trains; the same graph with other inversion steps (and the Video Sampler's to match)
    takes the tuner from the host's cache and re-runs SimDA Invert and what follows it; the same graph
    with only another edited prompt takes the tuner and SimDA Invert from the cache."""
    first = two_node_form(old_form_prompt(server, "cache_first"))
    first[TUNER]["inputs"]["seed"] = 3  # a training no other test of the module ran
    start = log_size(server)
    entry = run_ok(server, first)
    assert TUNER not in cached_nodes(entry) and trainings_since(server, start) == 1

    inversion = copy.deepcopy(first)
    inversion[INVERT]["inputs"]["steps"] = 3
    inversion[SAMPLER]["inputs"]["steps"] = 3
    entry = run_ok(server, inversion)
    cached = cached_nodes(entry)
    assert TUNER in cached and INVERT not in cached and SAMPLER not in cached, cached
    assert INVERTED in entry["outputs"] and EDITED in entry["outputs"], sorted(entry["outputs"])
    assert trainings_since(server, start) == 1, "changing the inversion trained again"

    prompt = copy.deepcopy(inversion)
    prompt["5"]["inputs"]["text"] = "a lynx walking in a green meadow"
    entry = run_ok(server, prompt)
    cached = cached_nodes(entry)
    assert TUNER in cached and INVERT in cached and SAMPLER not in cached, cached
    assert trainings_since(server, start) == 1, "changing the edited prompt trained again"


def test_noise_inverted_without_the_tuned_state_is_refused(server):
    """The tuner adds latent shift and its adapters on its own: noise that SimDA Invert made with the
    plain checkpoint, sampled with the tuned MODEL, is refused in one sentence before sampling."""
    prompt = two_node_form(old_form_prompt(server, "plain_inversion"))
    prompt[INVERT]["inputs"]["model"] = ["3", 0]
    entry = server.run_prompt(prompt, timeout=600)
    message = execution_error(entry)
    assert message is not None, "noise inverted by another MODEL was sampled"
    assert message.startswith("SimDA Video Sampler: start_latent was inverted by a MODEL with no latent shift"), message
    assert "but the MODEL sampling it has latent shift" in message and "SimDA Invert" in message, message
    assert message.count(". ") == 0 and message.endswith("."), message
    assert SAMPLER not in entry["outputs"] and EDITED not in entry["outputs"]
