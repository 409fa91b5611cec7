"""The shape of the code: only ``simda_core/host/`` and ``nodes/`` import ComfyUI, and every tracked
Python file keeps to the line length that ``pyproject.toml`` sets for ruff."""
from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from host import PACK_DIR

HOST_MODULES = {
    "comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview", "node_helpers", "server",
}
"""Top-level modules that belong to the ComfyUI host."""
HOST_BOUNDARY = PACK_DIR / "simda_core" / "host"
SIMDA_CORE = sorted((PACK_DIR / "simda_core").rglob("*.py"))


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``tree``, at module level or inside functions, and of
    every ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name; relative
    imports (inside the pack) are left out."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            by_name = ast.unparse(node.func) in ("importlib.import_module", "import_module", "__import__")
            if by_name and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def host_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        f"{path.relative_to(PACK_DIR)}:{line} imports {module}"
        for line, module in imported_modules(tree)
        if module.split(".")[0] in HOST_MODULES
    ]


def test_only_the_host_subpackage_of_simda_core_imports_comfyui():
    outside = [p for p in SIMDA_CORE if HOST_BOUNDARY not in p.parents]
    inside = [p for p in SIMDA_CORE if HOST_BOUNDARY in p.parents]
    assert len(outside) > 20 and len(inside) > 5, "simda_core's files were not found"
    offending = [finding for path in outside for finding in host_imports(path)]
    assert not offending, "host imports outside simda_core/host: " + "; ".join(offending)
    # The check sees the imports that are there: the host subpackage and the nodes do import ComfyUI.
    assert any(host_imports(p) for p in inside)
    assert any(host_imports(p) for p in (PACK_DIR / "nodes").glob("*.py"))


def test_the_import_reader_finds_imports_inside_functions_and_by_name():
    source = (
        "import os\n"
        "def f():\n"
        "    import comfy.model_management as mm\n"
        "    from comfy_extras.nodes_sdupscale import X\n"
        "    return importlib.import_module('folder_paths')\n"
        "from . import sibling\n"
    )
    modules = [module for _, module in imported_modules(ast.parse(source))]
    assert modules == ["os", "comfy.model_management", "comfy_extras.nodes_sdupscale", "folder_paths"]


def tracked_python_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=PACK_DIR, capture_output=True, text=True, check=True
    ).stdout.split()
    return [name for name in listed if (PACK_DIR / name).is_file()]


def test_pyproject_sets_the_line_length_that_ruff_checks():
    ruff = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["line-length"] == 120
    assert "E501" in ruff["lint"]["select"]


def test_every_tracked_python_file_keeps_to_the_line_length():
    files = tracked_python_files()
    assert len(files) > 50
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *files],
        cwd=PACK_DIR, capture_output=True, text=True,
    )
    if result.returncode not in (0, 1):
        pytest.fail(f"ruff could not run: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout[-4000:]


def test_ruff_with_the_pack_settings_flags_a_line_of_121_characters(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("x = '" + "a" * 115 + "'\n" + "y = '" + "b" * 114 + "'\n")  # 121 and 120 characters
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
         "--config", str(PACK_DIR / "pyproject.toml"), str(sample)],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "sample.py:1:121: E501" in result.stdout and "sample.py:2:" not in result.stdout
