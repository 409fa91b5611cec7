"""ComfyUI's UI workflow format (what the frontend saves and loads) and its API prompt format
(what /prompt takes), read with the widget order that /object_info gives for each node type.

A dynamic combo (``COMFY_DYNAMICCOMBO_V3``, such as Save Video's ``format`` on newer hosts) is a
widget whose chosen option brings widgets of its own: the frontend places them right after it,
named ``<combo>.<input>``, and sends each as an input of that dotted name."""
from __future__ import annotations

from typing import NamedTuple

DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", DYNAMIC_COMBO}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def spec_options(spec: list) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(input_spec: list) -> bool:
    """Whether the frontend gives the input a widget: a value type or a combo, unless it is forced
    to be a socket (``forceInput``)."""
    is_value = isinstance(input_spec[0], list) or input_spec[0] in WIDGET_TYPES
    return is_value and not spec_options(input_spec).get("forceInput")


def input_spec(node_info: dict, name: str) -> list:
    for group in ("required", "optional"):
        if name in node_info["input"].get(group, {}):
            return node_info["input"][group][name]
    raise KeyError(name)


def choices(spec: list) -> list:
    """The values a combo offers: a list as the spec's type (older nodes) or its ``options``; a
    dynamic combo's option keys."""
    if isinstance(spec[0], list):
        return spec[0]
    options = spec_options(spec).get("options", [])
    return [o["key"] for o in options] if spec[0] == DYNAMIC_COMBO else options


def default_value(spec: list):
    """The value a new widget starts with: the input's default, else a combo's first choice, else ""."""
    options = spec_options(spec)
    if "default" in options:
        return options["default"]
    offered = choices(spec)
    return offered[0] if offered else ""


class Slot(NamedTuple):
    """A widget at ``position`` in ``widgets_values``; a seed-like one (``control``) is followed
    there by its "fixed"/"randomize" value."""
    name: str
    spec: list
    position: int
    control: bool


def ordered_inputs(inputs: dict, order: dict | None = None):
    """``(name, spec)`` of the required inputs, then the optional ones, in ``order`` when given."""
    for group in ("required", "optional"):
        names = (order or {}).get(group) or list(inputs.get(group, {}))
        for name in names:
            yield name, inputs[group][name]


def widget_slots(node_info: dict, values: list | tuple = ()) -> list[Slot]:
    """Each widget of a node whose ``widgets_values`` list is ``values``, in that list's order. The
    option a dynamic combo holds (its default where ``values`` ends before it) adds its widgets
    right after it."""
    slots: list[Slot] = []

    def walk(inputs: dict, order: dict | None, prefix: str) -> None:
        for name, spec in ordered_inputs(inputs, order):
            if not is_widget(spec):
                continue
            position = slots[-1].position + (2 if slots[-1].control else 1) if slots else 0
            slot = Slot(prefix + name, spec, position, bool(spec_options(spec).get("control_after_generate")))
            slots.append(slot)
            if spec[0] == DYNAMIC_COMBO:
                chosen = values[position] if position < len(values) else default_value(spec)
                for option in spec_options(spec).get("options", []):
                    if option["key"] == chosen:
                        walk(option.get("inputs", {}), None, slot.name + ".")

    walk(node_info["input"], node_info.get("input_order"), "")
    return slots


def widget_slot(node_info: dict, name: str, values: list | tuple = ()) -> Slot:
    for slot in widget_slots(node_info, values):
        if slot.name == name:
            return slot
    raise KeyError(f"no widget '{name}'")


def widget_index(node_info: dict, name: str, values: list | tuple = ()) -> int:
    """Where widget ``name`` sits in a ``widgets_values`` list that starts as ``values``."""
    return widget_slot(node_info, name, values).position


def widget_value(node: dict, node_info: dict, name: str):
    """Widget ``name`` of a UI-format node: ``widgets_values`` is a list in /object_info order (a
    widget past its end, which the file predates, holds its default), or (VideoHelperSuite's
    nodes) an object keyed by widget name."""
    values = node["widgets_values"]
    if isinstance(values, dict):
        if name not in values:
            raise KeyError(f"{node['type']} #{node['id']} has no widget '{name}'")
        return values[name]
    slot = widget_slot(node_info, name, values)
    return values[slot.position] if slot.position < len(values) else default_value(slot.spec)


def padded_values(node_info: dict, values: list) -> list:
    """``values`` with the widgets past its end added at their defaults, as the frontend loads it."""
    values = list(values)
    for slot in widget_slots(node_info, values):
        if slot.position >= len(values):
            values.append(default_value(slot.spec))
            if slot.control:
                values.append("fixed")
    return values


def set_widget_value(node: dict, node_info: dict, name: str, value) -> None:
    widget_value(node, node_info, name)  # it must exist
    values = node["widgets_values"]
    if isinstance(values, dict):
        values[name] = value
        return
    if widget_index(node_info, name, values) >= len(values):
        values[:] = padded_values(node_info, values)
    values[widget_index(node_info, name, values)] = value


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
    order, widgets past its end at their defaults; a keyed object by name, with the extra widgets a
    node's own frontend code adds (such as VHS Video Combine's per-format crf, pix_fmt) and without
    its display widgets (a preview's state, an object)."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):
        inputs = {slot.name: values[slot.name] for slot in widget_slots(node_info) if slot.name in values}
        inputs.update({k: v for k, v in values.items() if k not in inputs and isinstance(v, (bool, int, float, str))})
        return inputs
    values = padded_values(node_info, values)
    return {slot.name: values[slot.position] for slot in widget_slots(node_info, values)}


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
    if slot < len(inputs) and all(types_match(inputs[slot].get("type"), t) for t in (produced, wanted)):
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
