#!/usr/bin/env bash
# Installs what the frontend tests (tests/test_frontend.py) drive the real ComfyUI page with:
#   - Debian's Chromium (/usr/bin/chromium), unless it is there already; Playwright's own browser
#     download ("playwright install") needs the internet, so it is never used,
#   - the Python package playwright (requirements-dev.txt) in the venv of the ComfyUI folder given
#     (scripts/hosts.sh); it carries its driver.
#   scripts/setup_browser.sh COMFYUI_FOLDER
# Running it again only fills in what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
py="$(venv_of_host "${1:?usage: scripts/setup_browser.sh COMFYUI_FOLDER}")/bin/python"

if [ ! -x /usr/bin/chromium ]; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

if ! "$py" -c "import playwright.sync_api" 2>/dev/null; then
  "$py" -m pip install -q "$(grep -E '^playwright\b' "$pack_dir/requirements-dev.txt")"
fi
