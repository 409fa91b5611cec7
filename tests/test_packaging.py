"""The pack as users install it: registry metadata that comfy-cli accepts, a ComfyUI-Manager style
install (clone into custom_nodes, pip install -r requirements.txt) that loads cleanly in the real
server, and runtime code that is offline, shell-free and never unpickles freely."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import pytest

from host import PACK_DIR
from live_server import cached_test_models, make_base_dir, start_server

NODE_IDS = {
    "SimDAAdapterLoader", "SimDALatentShiftPatch", "SimDAVideoSampler", "SimDAEditTuner", "SimDASaveAdapters",
    "SimDAVideoUpscaler", "SimDAPromptTravel", "SimDAKeyframes",
}
RUNTIME_CODE = sorted(
    [PACK_DIR / "__init__.py", *(PACK_DIR / "nodes").glob("*.py"), *(PACK_DIR / "simda_core").rglob("*.py")]
)
# The collection trainer is a command, not loaded by ComfyUI; it is checked for the rest.
SERVER_LOADED = [p for p in RUNTIME_CODE if p.parent.name != "collection" and p.name != "video_data.py"]


def requirement_names(lines: list[str]) -> list[str]:
    return sorted(
        re.split(r"[<>=!~ ;\[]", line.strip(), maxsplit=1)[0].lower()
        for line in lines if line.strip() and not line.startswith("#")
    )


def test_pyproject_carries_registry_metadata_and_matches_requirements():
    meta = tomllib.loads((PACK_DIR / "pyproject.toml").read_text())
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert "GNU GENERAL PUBLIC LICENSE" in (PACK_DIR / project["license"]["file"]).read_text()[:200]
    for key in ("DisplayName", "requires-comfyui"):  # the rest is filled in when publishing (docs/PUBLISHING.md)
        assert key in comfy
    assert comfy["requires-comfyui"].startswith(">=0.3.75")
    requirements = (PACK_DIR / "requirements.txt").read_text().splitlines()
    assert requirement_names(requirements) == requirement_names(project["dependencies"])


def test_comfy_node_validate_passes_without_warnings():
    result = subprocess.run(
        [sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry", "node", "validate"],
        cwd=PACK_DIR, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output, output
    assert "warning" not in output.lower(), output


def calls(path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            parts = []
            while isinstance(func, ast.Attribute):
                parts.append(func.attr)
                func = func.value
            if isinstance(func, ast.Name):
                parts.append(func.id)
            names.append(".".join(reversed(parts)))
    return names


def imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", RUNTIME_CODE, ids=lambda p: p.relative_to(PACK_DIR).as_posix())
def test_runtime_code_runs_no_code_from_data_and_no_shell(path):
    names = calls(path)
    assert not {"eval", "exec", "os.system", "pickle.load", "pickle.loads"} & set(names)
    assert not {"subprocess", "pickle", "shlex"} & imports(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert keywords.get("weights_only") == "True", f"{path.name}: torch.load without weights_only=True"


@pytest.mark.parametrize("path", SERVER_LOADED, ids=lambda p: p.relative_to(PACK_DIR).as_posix())
def test_code_loaded_by_comfyui_makes_no_network_access(path):
    assert not {"urllib", "requests", "socket", "http", "aiohttp", "huggingface_hub"} & imports(path)


def test_manager_style_install_loads_every_node_cleanly(tmp_path):
    checkpoint, adapters = cached_test_models()
    base = tmp_path / "comfyui"
    make_base_dir(base, checkpoint, adapters)
    pack = base / "custom_nodes" / "simda"
    pack.unlink()
    subprocess.run(["git", "clone", "--quiet", str(PACK_DIR), str(pack)], check=True, timeout=120)
    assert (pack / "requirements.txt").is_file() and not (pack / ".venv").exists()
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-r", str(pack / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    server = start_server(base)
    try:
        info = server.object_info()
        assert NODE_IDS <= set(info), sorted(NODE_IDS - set(info))
        for node_id in NODE_IDS:
            assert info[node_id]["python_module"].endswith("simda")
        log = server.log_path.read_text(errors="replace")
    finally:
        server.stop()
    ours = [line for line in log.splitlines() if "simda" in line.lower()]
    assert any("custom_nodes" in line and "simda" in line for line in ours), log[-3000:]
    bad = [line for line in ours if re.search(r"error|warning|traceback|import failed", line, re.I)]
    assert not bad, bad
    assert "SimDA" not in "".join(line for line in log.splitlines() if "Traceback" in line)
