"""Every SimDA node as a newcomer drops it: its inputs at the defaults the host's /object_info gives
(tests/node_info.py), wired with the least it needs, queued on the real server over HTTP, on each host.

The SimDA nodes are the server's node types whose ``python_module`` is this pack, so a node added
later is covered; ``WIRING`` gives each the upstream nodes it needs (a checkpoint loader, a text
encode, an empty image ...) and whether it finishes quickly on a CPU, and a node without an entry
fails the test by name. Validation must pass: POST /prompt answers 200 without node errors. The quick
ones must run without an error; the ones that sample or train for minutes at their defaults are
cancelled once queued (POST /queue delete, POST /interrupt) and must end interrupted, not failed; the
server must then still run a prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from live_server import execution_error
from node_info import node_inputs, pack_nodes, widget_values
from test_upscaler import X4_CLIP_CHECKPOINT, sr_adapter_file, x4, x4_server  # noqa: F401  (fixtures)


@dataclass(frozen=True)
class Source:
    """An upstream node: its class, and inputs other than its defaults (``From``: a link)."""

    class_type: str
    inputs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class From:
    """A link from the source of this name (a ``SOURCES`` entry or a SimDA node at its defaults), from
    its first output of the type the input takes."""

    source: str


CHECKPOINT, X4 = "<the server's SD1.5 test checkpoint>", "<the x4 upscaler test checkpoint>"
SOURCES = {
    "checkpoint": Source("CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}),
    "prompt": Source("CLIPTextEncode", {"text": "a red fox running through snow", "clip": From("checkpoint")}),
    "x4": Source("CheckpointLoaderSimple", {"ckpt_name": X4}),
    "x4 prompt": Source("CLIPTextEncode", {"text": "a red fox running through snow", "clip": From("x4")}),
    "image": Source("EmptyImage"),
    "source clip": Source("EmptyImage", {"batch_size": 48}),
    "latent": Source("EmptyLatentImage"),
}
"""Upstream nodes, at their own defaults but for what is given. "source clip": enough frames for the
Edit Tuner's default 24 frames at stride 2."""


@dataclass(frozen=True)
class Wiring:
    links: dict[str, str]
    """Input name -> source: every link the node needs (required, and optional ones it needs)."""
    quick: bool = True
    """False: at its defaults the node samples or trains for minutes on a CPU; it is cancelled once queued."""


WIRING = {
    "SimDAAdapterLoader": Wiring({"model": "checkpoint"}),
    "SimDALatentShiftPatch": Wiring({"model": "checkpoint"}),
    "SimDAPromptTravel": Wiring({"clip": "checkpoint"}),
    "SimDAKeyframes": Wiring({"keyframe_latents": "latent"}),
    "SimDAVideoSampler": Wiring({"model": "checkpoint", "positive": "prompt", "negative": "prompt"}, quick=False),
    "SimDAEditTuner": Wiring({"model": "checkpoint", "vae": "checkpoint", "source_frames": "source clip",
                              "source_prompt": "prompt", "clip": "checkpoint"}, quick=False),
    "SimDAOneShotTuner": Wiring({"model": "checkpoint", "vae": "checkpoint", "source_frames": "source clip",
                                 "source_prompt": "prompt"}, quick=False),
    "SimDAFitFrames": Wiring({"images": "source clip"}),
    "SimDAInvert": Wiring({"model": "checkpoint", "latent": "latent", "clip": "checkpoint"}, quick=False),
    "SimDASaveAdapters": Wiring({"adapters": "SimDAOneShotTuner"}, quick=False),
    "SimDAVideoUpscaler": Wiring({"frames": "image", "model": "x4", "vae": "x4", "positive": "x4 prompt",
                                  "negative": "x4 prompt"}, quick=False),
}
"""The least each SimDA node needs around it, by node id."""


class PromptBuilder:
    """An API prompt of one node at its defaults, with its wiring and (unless it is an output node)
    the host's Preview Any after its first output."""

    def __init__(self, server, info: dict):
        self.server, self.info = server, info
        self.files = {CHECKPOINT: server.checkpoint_name, X4: X4_CLIP_CHECKPOINT.name}

    def prompt(self, node_id: str) -> dict:
        self.nodes: dict[str, dict] = {}
        self.add(node_id)
        if not self.info[node_id].get("output_node"):
            self.nodes["preview"] = {"class_type": "PreviewAny", "inputs": {"source": [node_id, 0]}}
        return self.nodes

    def add(self, name: str) -> str:
        """Put the source or SimDA node ``name`` (and what it links from) into the prompt; its id."""
        if name in self.nodes:
            return name
        if name in SOURCES:
            source = SOURCES[name]
            class_type, given = source.class_type, dict(source.inputs)
        else:
            class_type, given = name, {input_name: From(source) for input_name, source in WIRING[name].links.items()}
        inputs = {**widget_values(self.info[class_type]), **given}
        self.nodes[name] = {"class_type": class_type, "inputs": inputs}
        wanted = node_inputs(self.info[class_type])
        for input_name, value in inputs.items():
            if isinstance(value, From):
                inputs[input_name] = [self.add(value.source), self.output_index(value.source, wanted[input_name].type)]
            elif value in self.files:
                inputs[input_name] = self.files[value]
        return name

    def output_index(self, name: str, wanted_type: str) -> int:
        class_type = SOURCES[name].class_type if name in SOURCES else name
        outputs = self.info[class_type]["output"]
        assert wanted_type in outputs, f"{class_type} puts out no {wanted_type} ({outputs})"
        return outputs.index(wanted_type)


def queued(server, prompt: dict) -> str:
    """Queue ``prompt``; it must pass the host's validation. Its prompt id."""
    status, answer = server.queue_prompt(prompt)
    assert status == 200 and not answer.get("node_errors"), f"validation refused it ({status}): {answer}"
    return answer["prompt_id"]


def queue_ids(server) -> set[str]:
    status, queue = server.request("GET", "/queue")
    assert status == 200, queue
    return {item[1] for item in queue["queue_running"] + queue["queue_pending"]}


def cancel(server, prompt_id: str, timeout: float = 300) -> dict | None:
    """Take a queued prompt out of the queue and interrupt it where it already runs, until it is
    gone from the queue (the interrupt is repeated: the host clears its flag when a prompt starts).
    Its history entry, or None when it was removed before it ran."""
    deadline = time.monotonic() + timeout
    while prompt_id in queue_ids(server):
        assert time.monotonic() < deadline, f"prompt {prompt_id} still queued {timeout} s after its cancel"
        server.request("POST", "/queue", {"delete": [prompt_id]})
        server.request("POST", "/interrupt", {})
        time.sleep(0.5)
    status, history = server.request("GET", f"/history/{prompt_id}")
    return history.get(prompt_id) if status == 200 else None


def events(entry: dict) -> list[str]:
    return [event for event, _ in entry["status"].get("messages", [])]


@pytest.fixture(scope="module")
def info(x4_server):
    return x4_server.object_info()


@pytest.fixture(scope="module")
def simda_nodes(x4_server, info):
    nodes = pack_nodes(x4_server, info)
    assert nodes, "the server lists no node of this pack"
    return nodes


def test_every_simda_node_has_a_wiring(simda_nodes):
    missing = sorted(set(simda_nodes) - set(WIRING))
    assert not missing, f"no entry in test_defaults.WIRING for {missing}: say what each needs wired to run"
    gone = sorted(set(WIRING) - set(simda_nodes))
    assert not gone, f"test_defaults.WIRING names nodes the server does not have: {gone}"


def test_every_simda_node_runs_at_its_defaults(x4_server, info, simda_nodes):
    builder = PromptBuilder(x4_server, info)
    wired = [node_id for node_id in sorted(simda_nodes) if node_id in WIRING]
    failures = []
    for node_id in sorted(wired, key=lambda n: not WIRING[n].quick):  # the quick ones first
        prompt = builder.prompt(node_id)
        status, answer = x4_server.queue_prompt(prompt)
        if status != 200 or answer.get("node_errors"):
            failures.append(f"{node_id}: validation refused its defaults ({status}): {answer}")
            continue
        prompt_id = answer["prompt_id"]
        if WIRING[node_id].quick:
            entry = x4_server.wait_history(prompt_id, timeout=300)
            if execution_error(entry) is not None:
                failures.append(f"{node_id}: {execution_error(entry)}")
            continue
        entry = cancel(x4_server, prompt_id)
        if entry is not None and ("execution_error" in events(entry) or "execution_interrupted" not in events(entry)):
            failures.append(f"{node_id}: after the cancel, {events(entry)} ({execution_error(entry)})")
        print(f"{node_id}: queued, cancelled ({'before it ran' if entry is None else 'interrupted'})")
    assert not failures, "\n".join(failures)

    # The server is still well: nothing left in the queue, and a new prompt runs.
    assert x4_server.alive() and queue_ids(x4_server) == set()
    check = {
        "checkpoint": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": x4_server.checkpoint_name}},
        "prompt": {"class_type": "CLIPTextEncode", "inputs": {"text": f"a check at {time.time()}",
                                                               "clip": ["checkpoint", 1]}},
        "preview": {"class_type": "PreviewAny", "inputs": {"source": ["prompt", 0]}},
    }
    entry = x4_server.wait_history(queued(x4_server, check), timeout=120)
    assert execution_error(entry) is None and entry["status"].get("completed"), events(entry)
