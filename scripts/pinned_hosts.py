"""Where scripts/setup_host.sh puts the pinned ComfyUI hosts (scripts/hosts.sh has the same list)."""
from __future__ import annotations

import os
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PINNED_HOSTS = ("0.33.0", "0.3.75")
"""Newest first."""


def host_dir() -> Path:
    """The ComfyUI to run against: COMFYUI_PATH, else the newest pinned host that is installed."""
    if os.environ.get("COMFYUI_PATH"):
        return Path(os.environ["COMFYUI_PATH"]).resolve()
    folders = [PACK_DIR / ".hosts" / version / "ComfyUI" for version in PINNED_HOSTS]
    return next((folder for folder in folders if (folder / "main.py").is_file()), folders[0]).resolve()
