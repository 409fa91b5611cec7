#!/usr/bin/env bash
# Installs the video packs SimDA is tested with into a ComfyUI's custom_nodes/, the way
# ComfyUI-Manager does (the pack's source at a pinned commit, then its Python requirements):
#   - ComfyUI-VideoHelperSuite     4ee72c065db22c9d96c2427954dc69e7b908444b (1.7.9)
#   - ComfyUI-AnimateDiff-Evolved  d8d163cd90b1111f6227495e3467633676fbb346 (1.5.7)
#   - ComfyUI-Advanced-ControlNet  per host: 9e60d8a9c8016c5315063aa7af66b321a0444df7 (1.5.8, its V3
#     nodes) on ComfyUI 0.33 and newer, ba0795aaaa6d100f8d84a1f060df682bcc1091fa (the commit before its
#     move to V3, which also loads on older hosts) below 0.33
# The source comes from `git clone` + `git checkout <commit>` when GitHub can be reached, otherwise
# from the release archives <name>-<short commit>.tar.gz in the folder SIMDA_PACKS_DIR names.
#
#   scripts/setup_packs.sh COMFYUI_FOLDER
#
# Requirements go into that ComfyUI's venv (scripts/hosts.sh; VHS: opencv-python-headless and
# imageio-ffmpeg). Running it again
# changes nothing once every pack sits at its commit.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
host="${1:?usage: scripts/setup_packs.sh COMFYUI_FOLDER}"
venv=$(venv_of_host "$host")
py="$venv/bin/python"
[ -f "$host/main.py" ] || { echo "setup_packs.sh: $host is not a ComfyUI folder (no main.py); run scripts/setup_host.sh first." >&2; exit 1; }
[ -x "$py" ] || { echo "setup_packs.sh: no virtual environment at $venv; run scripts/setup_host.sh first." >&2; exit 1; }

acn_commit() {  # the Advanced-ControlNet commit for this host's version (V3 nodes from 0.33 on)
  local version
  version=$(host_version "$host")
  if [ -n "$version" ] && [ "$(printf '%s\n0.33.0\n' "$version" | sort -V | head -n 1)" = 0.33.0 ]; then
    echo 9e60d8a9c8016c5315063aa7af66b321a0444df7
  else
    echo ba0795aaaa6d100f8d84a1f060df682bcc1091fa
  fi
}

# name | repository | commit | requirements we install for it
packs=(
  "ComfyUI-VideoHelperSuite|https://github.com/Kosinkadink/ComfyUI-VideoHelperSuite|4ee72c065db22c9d96c2427954dc69e7b908444b|opencv-python-headless imageio-ffmpeg"
  "ComfyUI-AnimateDiff-Evolved|https://github.com/Kosinkadink/ComfyUI-AnimateDiff-Evolved|d8d163cd90b1111f6227495e3467633676fbb346|"
  "ComfyUI-Advanced-ControlNet|https://github.com/Kosinkadink/ComfyUI-Advanced-ControlNet|$(acn_commit)|"
)
stamp_name=".simda-pinned-commit"

installed_commit() {  # the commit a pack folder holds, or nothing
  local target=$1
  if [ -f "$target/$stamp_name" ]; then
    cat "$target/$stamp_name"
  elif [ -d "$target/.git" ]; then
    git -C "$target" rev-parse HEAD 2>/dev/null || true
  fi
}

from_git() {  # clone + checkout; fails quietly when GitHub cannot be reached
  local repo=$1 commit=$2 target=$3 tmp
  command -v git >/dev/null || return 1
  timeout 60 git ls-remote "$repo" HEAD >/dev/null 2>&1 || return 1
  tmp=$(mktemp -d)
  if git clone -q "$repo" "$tmp/src" && git -C "$tmp/src" checkout -q "$commit"; then
    rm -rf "$target"
    mv "$tmp/src" "$target"
    rm -rf "$tmp"
    return 0
  fi
  rm -rf "$tmp"
  return 1
}

from_archive() {  # unpack <name>-<short commit>.tar.gz from SIMDA_PACKS_DIR
  local name=$1 commit=$2 target=$3 archive tmp top
  [ -n "${SIMDA_PACKS_DIR:-}" ] || return 1
  archive="$SIMDA_PACKS_DIR/$name-${commit:0:7}.tar.gz"
  [ -f "$archive" ] || return 1
  tmp=$(mktemp -d)
  tar -xzf "$archive" -C "$tmp"
  top=$(find "$tmp" -mindepth 1 -maxdepth 1 -type d | head -n 1)
  [ -n "$top" ] && [ -f "$top/__init__.py" ] || { rm -rf "$tmp"; echo "setup_packs.sh: $archive does not hold a ComfyUI pack folder." >&2; exit 1; }
  echo "$commit" > "$top/$stamp_name"
  rm -rf "$target"
  mv "$top" "$target"
  rm -rf "$tmp"
}

mkdir -p "$host/custom_nodes"
for entry in "${packs[@]}"; do
  IFS='|' read -r name repo commit requirements <<< "$entry"
  target="$host/custom_nodes/$name"
  if [ "$(installed_commit "$target")" != "$commit" ]; then
    if from_git "$repo" "$commit" "$target"; then
      echo "setup_packs.sh: $name cloned at ${commit:0:7}" >&2
    elif from_archive "$name" "$commit" "$target"; then
      echo "setup_packs.sh: $name unpacked at ${commit:0:7} from $SIMDA_PACKS_DIR" >&2
    else
      echo "setup_packs.sh: cannot install $name: GitHub ($repo) cannot be reached and SIMDA_PACKS_DIR does not name a folder holding $name-${commit:0:7}.tar.gz; give this machine network access or set SIMDA_PACKS_DIR to such a folder." >&2
      exit 1
    fi
  fi
  if [ -n "$requirements" ]; then
    missing=()
    for requirement in $requirements; do
      "$py" -m pip show -q "$requirement" >/dev/null 2>&1 || missing+=("$requirement")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      "$py" -m pip install -q "${missing[@]}"
    fi
  fi
done
echo "$host/custom_nodes"
