"""The shipped workflows are what scripts/build_workflows.py builds from the test server's own
/object_info (the server with VideoHelperSuite, for vhs_video_edit): node for node and link for
link on every host, and byte for byte on ComfyUI 0.3.75, the host the files are generated
against (0.33's frontend adds the widgets its nodes gained when it saves a file; it loads these
as they are, tests/test_frontend.py)."""
from __future__ import annotations

import json
import sys

import host
from live_server import comfy_server_with_packs  # noqa: F401  (a fixture)

sys.path.insert(0, str(host.PACK_DIR / "scripts"))
import build_workflows  # noqa: E402

SHIPPED = host.PACK_DIR / "example_workflows"


def layout(workflow: dict) -> list[tuple]:
    return [(n["id"], n["type"], n.get("title"), n["mode"], n["pos"], n["size"]) for n in workflow["nodes"]]


def built(server) -> dict[str, dict]:
    workflows = build_workflows.build_all(server.object_info())
    assert sorted(workflows) == sorted(path.name for path in SHIPPED.glob("*.json"))
    return workflows


def test_the_builder_regenerates_the_shipped_workflows_node_for_node(comfy_server_with_packs):  # noqa: F811
    for name, workflow in built(comfy_server_with_packs).items():
        shipped = json.loads((SHIPPED / name).read_text())
        assert layout(workflow) == layout(shipped), name
        assert workflow["links"] == shipped["links"], name


@host.only_on_hosts_before((0, 33, 0), "the shipped files are generated against 0.3.75's /object_info; 0.33's "
                           "nodes gained widgets (SaveVideo's format.codec, CreateVideo's bit_depth) that it fills in")
def test_the_builder_regenerates_the_shipped_workflows_byte_for_byte(comfy_server_with_packs):  # noqa: F811
    for name, workflow in built(comfy_server_with_packs).items():
        assert json.dumps(workflow, indent=1) + "\n" == (SHIPPED / name).read_text(), name
