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


def widget_value(node: dict, node_info: dict, name: str):
    """Widget ``name`` of a UI-format node: ``widgets_values`` is a list in /object_info order, or
    (VideoHelperSuite's nodes) an object keyed by widget name."""
    values = node["widgets_values"]
    if isinstance(values, dict):
        if name not in values:
            raise KeyError(f"{node['type']} #{node['id']} has no widget '{name}'")
        return values[name]
    return values[widget_index(node_info, name)]


def set_widget_value(node: dict, node_info: dict, name: str, value) -> None:
    widget_value(node, node_info, name)  # it must exist
    values = node["widgets_values"]
    values[name if isinstance(values, dict) else widget_index(node_info, name)] = value


def set_widget(workflow: dict, object_info: dict, node_type: str, name: str, value) -> int:
    """Set widget ``name`` on every node of ``node_type``; returns how many nodes were changed."""
    changed = 0
    for node in workflow["nodes"]:
        if node["type"] == node_type:
            set_widget_value(node, object_info[node_type], name, value)
            changed += 1
    if not changed:
        raise KeyError(f"the workflow has no {node_type} node")
    return changed


def widget_inputs(node: dict, node_info: dict) -> dict:
    """The inputs a node's widgets give its API prompt entry. A list is read in /object_info's widget
    order; a keyed object by name, with the extra widgets a node's own frontend code adds (such as
    VHS Video Combine's per-format crf, pix_fmt) and without its display widgets (a preview's state,
    an object)."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        inputs = {name: values[name] for name, _ in widget_slots(node_info) if name in values}
        inputs.update({k: v for k, v in values.items() if k not in inputs and isinstance(v, (bool, int, float, str))})
        return inputs
    inputs, position = {}, 0
    for name, has_control in widget_slots(node_info):
        inputs[name] = values[position]
        position += 2 if has_control else 1
    return inputs


MUTED, BYPASSED = 2, 4
"""Node modes in the UI format: a muted node is left out; a bypassed one is left out and its
consumers are connected to the input it would have passed on, as the frontend does."""


def types_match(a: str | None, b: str | None) -> bool:
    """Whether sockets of types ``a`` and ``b`` connect ("*" and "" take anything; "A,B" is a union)."""
    a, b = str(a or "*").lower(), str(b or "*").lower()
    if a == "*" or b == "*" or a == b:
        return True
    return any(x == y for x in a.split(",") for y in b.split(",")) if "," in a + b else False


def bypass_input(node: dict, slot: int, wanted: str) -> int | None:
    """The input of bypassed ``node`` whose value stands in for its output ``slot`` when a
    ``wanted``-typed input reads it: the input at the same index if its type fits, else the first
    input of exactly that type, else the first that connects; None when none fits."""
    inputs = node.get("inputs") or []
    if not inputs:
        return None
    if str(wanted or "*") == "*":
        return slot if slot < len(inputs) else 0
    outputs = node.get("outputs") or []
    produced = outputs[slot].get("type") if slot < len(outputs) else wanted
    if slot < len(inputs) and types_match(inputs[slot].get("type"), produced) and types_match(inputs[slot].get("type"), wanted):
        return slot
    for index, entry in enumerate(inputs):
        if entry.get("type") == wanted:
            return index
    for index, entry in enumerate(inputs):
        if types_match(entry.get("type"), produced) and types_match(entry.get("type"), wanted):
            return index
    return None


def resolve_link(workflow: dict, link_id: int | None, wanted: str) -> tuple[str, int] | None:
    """``(node id, output slot)`` that link ``link_id`` delivers to a ``wanted``-typed input once
    bypassed nodes and Reroutes are passed through; None when nothing arrives (an unlinked input
    behind a bypass, or a frontend-only source such as a PrimitiveNode, whose value is already in
    the consumer's widget)."""
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: (link[1], link[2]) for link in workflow["links"]}
    seen = set()
    while link_id is not None:
        if link_id in seen:
            raise ValueError(f"the workflow's links loop through bypassed nodes (link {link_id})")
        seen.add(link_id)
        source, slot = links[link_id]
        node = nodes[source]
        if node.get("mode", 0) == BYPASSED:
            index = bypass_input(node, slot, wanted)
            if index is None:
                return None
            link_id = node["inputs"][index].get("link")
        elif node["type"] == "Reroute":
            link_id = (node.get("inputs") or [{}])[0].get("link")
        elif node["type"] in FRONTEND_ONLY:
            return None
        else:
            return str(source), slot
    return None


def workflow_to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt that queueing ``workflow`` in the frontend sends: active nodes only (muted and
    bypassed ones are left out); an input fed through a bypassed node reads that node's input of
    the same type instead, and one fed by a muted node is dropped (the frontend does both)."""
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONTEND_ONLY or node.get("mode", 0) in (MUTED, BYPASSED):
            continue
        inputs = widget_inputs(node, object_info[node["type"]])
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                source = resolve_link(workflow, entry["link"], entry.get("type", "*"))
                if source is not None:
                    inputs[entry["name"]] = list(source)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    for entry in prompt.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] not in prompt:
                del entry["inputs"][name]
    return prompt
