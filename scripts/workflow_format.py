"""ComfyUI's UI workflow format (what the frontend saves and loads) and its API prompt format
(what /prompt takes), read with the widget order that /object_info gives for each node type."""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def is_widget(input_spec: list) -> bool:
    return isinstance(input_spec[0], list) or input_spec[0] in WIDGET_TYPES


def input_spec(node_info: dict, name: str) -> list:
    for group in ("required", "optional"):
        if name in node_info["input"].get(group, {}):
            return node_info["input"][group][name]
    raise KeyError(name)


def widget_slots(node_info: dict) -> list[tuple[str, bool]]:
    """``(name, followed_by_control_value)`` for each widget, in ``widgets_values`` order: the
    frontend stores a "fixed"/"randomize" value after each seed-like widget."""
    slots = []
    for group in ("required", "optional"):
        for name in node_info["input_order"].get(group, []):
            spec = node_info["input"][group][name]
            if is_widget(spec):
                options = spec[1] if len(spec) > 1 else {}
                slots.append((name, bool(options.get("control_after_generate"))))
    return slots


def widget_index(node_info: dict, name: str) -> int:
    index = 0
    for slot, has_control in widget_slots(node_info):
        if slot == name:
            return index
        index += 2 if has_control else 1
    raise KeyError(f"no widget '{name}'")


def set_widget(workflow: dict, object_info: dict, node_type: str, name: str, value) -> int:
    """Set widget ``name`` on every node of ``node_type``; returns how many nodes were changed."""
    changed = 0
    for node in workflow["nodes"]:
        if node["type"] == node_type:
            node["widgets_values"][widget_index(object_info[node_type], name)] = value
            changed += 1
    if not changed:
        raise KeyError(f"the workflow has no {node_type} node")
    return changed


def workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt that queueing ``workflow`` in the frontend sends (active nodes only)."""
    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        values = list(node.get("widgets_values") or [])
        inputs = {}
        position = 0
        for name, has_control in widget_slots(info):
            inputs[name] = values[position]
            position += 2 if has_control else 1
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                source, slot = links[entry["link"]]
                inputs[entry["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
