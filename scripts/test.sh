#!/usr/bin/env bash
# Sets up (first run) and runs the whole SimDA test suite against the real ComfyUI host.
# The compatibility tests install VideoHelperSuite and AnimateDiff-Evolved into the host
# (scripts/setup_packs.sh: from GitHub, or offline from the folder SIMDA_PACKS_DIR names).
# Extra arguments go to pytest.
set -euo pipefail
pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host=$("$pack_dir/scripts/setup_host.sh" | tail -n 1)
"$pack_dir/scripts/setup_packs.sh" "$host" >/dev/null
"$pack_dir/scripts/setup_browser.sh"
cd "$pack_dir"
COMFYUI_PATH="$host" exec "$pack_dir/.venv/bin/python" -m pytest tests "$@"
