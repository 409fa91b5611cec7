#!/usr/bin/env bash
# Sets up (first run) and starts ComfyUI with SimDA on http://127.0.0.1:8188.
# COMFYUI_PATH=/path/to/ComfyUI uses your own ComfyUI instead of the pinned copy.
# Extra arguments go to ComfyUI's main.py.
set -euo pipefail
pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
host=$("$pack_dir/scripts/setup_host.sh" | tail -n 1)
py="$pack_dir/.venv/bin/python"
device_args=()
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  device_args=(--cpu)
fi
cd "$host"
exec "$py" main.py --listen 127.0.0.1 --port "${SIMDA_PORT:-8188}" "${device_args[@]}" "$@"
