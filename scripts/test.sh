#!/usr/bin/env bash
# Sets up (first run) and runs the whole SimDA test suite against the real ComfyUI, once on each
# pinned host it can install (scripts/hosts.sh: 0.33.0, then 0.3.75), one pytest run per host.
# With COMFYUI_PATH set, only the user's own ComfyUI is tested.
# The compatibility tests install VideoHelperSuite and AnimateDiff-Evolved into each host
# (scripts/setup_packs.sh: from GitHub, or offline from the folder SIMDA_PACKS_DIR names).
# Extra arguments go to pytest. Exits non-zero when any run fails.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"

if [ -n "${COMFYUI_PATH:-}" ]; then
  targets=(user)
else
  targets=("${pinned_hosts[@]}")
fi

failed=()
ran=0
for target in "${targets[@]}"; do
  if [ "$target" = user ]; then
    install_host || exit 1
  else
    install_host "$target"
    status=$?
    if [ "$status" = 3 ]; then
      echo "test.sh: ComfyUI $target cannot be installed on this machine (see the line above); its run is left out." >&2
      continue
    fi
    [ "$status" = 0 ] || exit "$status"
  fi
  "$pack_dir/scripts/setup_packs.sh" "$host" >/dev/null || exit 1
  "$pack_dir/scripts/setup_browser.sh" "$host" || exit 1
  version=$(host_version "$host")
  echo "===== SimDA tests on ComfyUI ${version:-of unknown version} at $host ====="
  (cd "$pack_dir" && COMFYUI_PATH="$host" "$(venv_of_host "$host")/bin/python" -m pytest tests "$@")
  status=$?
  ran=$((ran + 1))
  echo "===== ComfyUI ${version:-of unknown version}: pytest exit status $status ====="
  [ "$status" = 0 ] || failed+=("${version:-$host}")
done

if [ "$ran" = 0 ]; then
  echo "test.sh: no ComfyUI host could be installed, so no test ran." >&2
  exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "test.sh: the runs on ComfyUI ${failed[*]} failed." >&2
  exit 1
fi
