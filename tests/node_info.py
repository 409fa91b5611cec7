"""What a running server's ``/object_info`` says about the pack's nodes and their inputs, read one way
for every test that needs it: tests/test_defaults.py submits each SimDA node with these defaults,
tests/test_help_pages.py compares each help page's inputs with them, tests/test_upscaler.py fills
the inputs it does not set.

``/object_info`` lists a node's inputs under ``required``, ``optional`` and ``hidden`` (filled by the
host, never by a user), each as ``[type, options]``: ``type`` is ``INT``, ``FLOAT``, ``BOOLEAN``,
``STRING``, ``COMBO`` (V3 schemas; ``options["options"]`` holds the choices) or a list of choices
(older nodes' combos), or a link type (``MODEL``, ``IMAGE``, ...). A widget's value is what the
frontend puts in a new node: ``options["default"]``, or for a combo without one its first choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from host import PACK_DIR

WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"})


@dataclass(frozen=True)
class NodeInput:
    name: str
    type: str
    """``COMBO`` for every combo, old style or V3."""
    optional: bool
    options: dict
    """The host's options as served (``default``, ``min``, ``max``, ``step``, ``multiline``, ...)."""
    choices: tuple = ()
    """A combo's choices."""

    @property
    def is_widget(self) -> bool:
        """A value typed into the node (not a link), as the frontend shows it by default."""
        return self.type in WIDGET_TYPES and not self.options.get("forceInput", False)

    @property
    def has_default(self) -> bool:
        return "default" in self.options

    @property
    def default(self):
        return self.options.get("default")

    @property
    def frontend_value(self):
        """What a new node holds: the default, or a combo's first choice (None when neither exists)."""
        if self.has_default:
            return self.default
        return self.choices[0] if self.type == "COMBO" and self.choices else None


def node_inputs(spec: dict) -> dict[str, NodeInput]:
    """A node's inputs as ``/object_info`` lists them, required first, without the hidden ones."""
    inputs = {}
    for section in ("required", "optional"):
        for name, entry in (spec.get("input", {}).get(section) or {}).items():
            kind = entry[0]
            options = dict(entry[1]) if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(kind, list):
                kind, choices = "COMBO", tuple(kind)
            else:
                choices = tuple(options.get("options", ())) if kind == "COMBO" else ()
            inputs[name] = NodeInput(name, kind, section == "optional", options, choices)
    return inputs


def widget_values(spec: dict) -> dict:
    """The values a new node of this kind holds, by input name (widgets only, links left out)."""
    return {
        name: entry.frontend_value
        for name, entry in node_inputs(spec).items()
        if entry.is_widget and entry.frontend_value is not None
    }


def pack_folder_name(server) -> str:
    """The folder under the server's custom_nodes/ that holds this pack."""
    for entry in (server.base_dir / "custom_nodes").iterdir():
        if entry.resolve() == PACK_DIR:
            return entry.name
    raise AssertionError(f"the pack is not in {server.base_dir / 'custom_nodes'}")


def pack_nodes(server, info: dict | None = None) -> dict[str, dict]:
    """The server's node types that this pack registered (their ``python_module``), with their info."""
    module = f"custom_nodes.{pack_folder_name(server)}"
    info = server.object_info() if info is None else info
    return {name: spec for name, spec in info.items() if spec.get("python_module") == module}


def help_pages() -> dict[str, Path]:
    """The help pages in web/docs, by node id."""
    return {path.stem: path for path in sorted((PACK_DIR / "web" / "docs").glob("*.md"))}
