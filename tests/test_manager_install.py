"""The pack installed, run and removed by the real ComfyUI-Manager, the way a user installs it from a
git URL: on hosts that have the Manager built in (``--enable-manager``, ComfyUI 0.33+; the package
``comfyui_manager`` that the host's manager_requirements.txt pins, which scripts/setup_host.sh
installs into the pinned 0.33.0 host's venv).

A throwaway ComfyUI: a copy of the host's tree without its custom nodes, models or user data, with
the random SD1.5 test checkpoint and adapters (tests/live_server.py) in its models/ and the
Manager's config in user/__manager/config.ini. A clean clone of this repository's committed HEAD
is what the Manager installs, through its own install-from-git-URL route (served with
``--enable-manager-legacy-ui`` and allowed by ``allow_git_url_install``) as
``file://localhost/<clone>`` (the Manager refuses a URL without a host part, such as ``file:///``).
Its requirements go through pip (``use_uv = False``: uv does not see torch through the pinned hosts'
.pth file and would install a second torch); ``network_mode = offline`` keeps the Manager's start-up
off the network. The test then checks that the Python environment (torch above all) is unchanged,
restarts ComfyUI through the Manager, runs a small text-to-video workflow on the installed pack,
disables and uninstalls it through the Manager's queue, restarts again and checks that ComfyUI
serves without it.
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
from host import HOST_DIR, PACK_DIR
from live_server import ComfyServer, cached_test_models, execution_error, free_port, wait_ready
from test_workflows import FRAMES, SIZE, decode_mp4, run_ok, saved_file, small_text_to_video
from workflow_format import workflow_to_api

MANAGER_FLAGS = ("--enable-manager", "--enable-manager-legacy-ui")
PACK_FOLDER = "comfyui-simda"
"""The clone's folder name, so the Manager installs the pack as custom_nodes/comfyui-simda, as it
would from a git URL ending in comfyui-simda."""
TORCH_PACKAGES = ("torch", "torchvision", "torchaudio")


def missing_manager_flags() -> list[str]:
    """The Manager's command-line flags that the host's comfy/cli_args.py does not define."""
    cli_args = HOST_DIR / "comfy" / "cli_args.py"
    text = cli_args.read_text(errors="replace") if cli_args.is_file() else ""
    return [flag for flag in MANAGER_FLAGS if f'"{flag}"' not in text]


pytestmark = pytest.mark.skipif(
    bool(missing_manager_flags()),
    reason=f"the ComfyUI at {HOST_DIR} has no {' / '.join(missing_manager_flags())} (comfy/cli_args.py): "
    "no built-in ComfyUI-Manager to install the pack with",
)


# -- the throwaway ComfyUI ---------------------------------------------------------------------------

MANAGER_CONFIG = {
    "allow_git_url_install": "True",
    "network_mode": "offline",
    "use_uv": "False",
    "security_level": "normal",
    "file_logging": "False",
}
"""user/__manager/config.ini ([default]); the Manager reads a key it does not find as False."""

SNAPSHOT_SCRIPT = r"""
import hashlib, importlib.metadata as md, json
import torch
records = {}
for name in %r:
    try:
        records[name] = hashlib.sha256((md.distribution(name).read_text("RECORD") or "").encode()).hexdigest()
    except md.PackageNotFoundError:
        records[name] = None
print(json.dumps({
    "torch": torch.__version__, "torch_file": torch.__file__, "records": records,
    "distributions": sorted(f"{d.metadata['Name']}=={d.version} at {d.locate_file('')}" for d in md.distributions()),
}))
""" % (TORCH_PACKAGES,)


def environment_snapshot() -> dict:
    """What the host's Python sees installed: torch's version and file, the sha256 of the torch
    packages' RECORD files, and every distribution with its version and folder."""
    result = subprocess.run([sys.executable, "-c", SNAPSHOT_SCRIPT], capture_output=True, text=True,
                            env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def copy_host(target: Path) -> None:
    """The host's tree without custom nodes, models, user data, outputs or caches."""
    top_level = {"custom_nodes", "models", "user", "input", "output", "temp", ".git"}

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {name for name in names if name == "__pycache__"}
        if Path(folder) == HOST_DIR:
            skip |= top_level & set(names)
        return skip

    shutil.copytree(HOST_DIR, target, ignore=ignore, symlinks=True)
    for sub in ("custom_nodes", "models/checkpoints", "models/simda", "input", "output", "user/__manager"):
        (target / sub).mkdir(parents=True, exist_ok=True)
    checkpoint, adapters = cached_test_models()
    (target / "models/checkpoints" / checkpoint.name).symlink_to(checkpoint)
    (target / "models/simda" / adapters.name).symlink_to(adapters)
    config = configparser.ConfigParser()
    config["default"] = MANAGER_CONFIG
    with open(target / "user/__manager/config.ini", "w") as file:
        config.write(file)


def clone_head(target: Path) -> str:
    """A clean clone of this repository's committed HEAD at ``target``; its commit."""
    head = subprocess.run(["git", "-C", str(PACK_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"{PACK_DIR} is not a git checkout (the Manager installs the pack from a git URL)")
    subprocess.run(["git", "clone", "-q", str(PACK_DIR), str(target)], check=True, capture_output=True, timeout=120)
    return head.stdout.strip()


def pack_node_ids(pack: Path) -> set[str]:
    """The node ids the pack's nodes/nodes_*.py define (``node_id="..."`` in their schemas)."""
    ids = set()
    for source in sorted((pack / "nodes").glob("nodes_*.py")):
        ids |= set(re.findall(r'node_id\s*=\s*"([^"]+)"', source.read_text()))
    assert ids, f"no node_id found in {pack / 'nodes'}/nodes_*.py"
    return ids


# -- the server --------------------------------------------------------------------------------------

def start(root: Path, log_path: Path, environment: dict) -> ComfyServer:
    """The throwaway ComfyUI's main.py with the Manager and its legacy UI, on the CPU and a free
    loopback port (the Manager allows a git URL install only on a loopback listener)."""
    port = free_port()
    command = [
        sys.executable, str(root / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--disable-api-nodes",
        "--dont-print-server", *MANAGER_FLAGS,
    ]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, cwd=str(root), stdout=log, stderr=subprocess.STDOUT, env=environment)
    server = ComfyServer(base_url=f"http://127.0.0.1:{port}", base_dir=root, log_path=log_path, process=process)
    try:
        wait_ready(server)
    except BaseException:
        server.stop()
        raise
    return server


def reboot(server: ComfyServer) -> None:
    """The Manager's restart (POST /v2/manager/reboot: the process execs itself again, same pid),
    then until the new process serves."""
    restarts = server.log_path.read_text(errors="replace").count("Restarting...")
    request = urllib.request.Request(server.base_url + "/v2/manager/reboot", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raise server.fail(f"POST /v2/manager/reboot answered {response.status} instead of restarting")
    except urllib.error.HTTPError as e:
        raise server.fail(f"POST /v2/manager/reboot answered {e.code}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        pass  # the connection ends with the old process
    deadline = time.monotonic() + 30
    while server.log_path.read_text(errors="replace").count("Restarting...") == restarts:
        if time.monotonic() > deadline or not server.alive():
            raise server.fail("the Manager's reboot did not restart ComfyUI")
        time.sleep(0.2)
    wait_ready(server)


def post_text(server: ComfyServer, route: str, text: str, timeout: float) -> int:
    """POST a plain-text body (as the Manager's own page sends a git URL); the HTTP status."""
    request = urllib.request.Request(server.base_url + route, data=text.encode(), method="POST")
    request.add_header("Content-Type", "text/plain;charset=UTF-8")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def installed(server: ComfyServer) -> dict:
    status, packs = server.request("GET", "/v2/customnode/installed")
    assert status == 200, (status, packs)
    return packs


def run_batch(server: ComfyServer, kind: str, item: dict, timeout: float = 120) -> str:
    """One task (``disable``, ``uninstall``) through the Manager's queue (POST /v2/manager/queue/batch),
    waited for on /v2/manager/queue/status; its result as the batch history records it."""
    batch_id = f"simda_test_{kind}_{os.getpid()}"
    status, answer = server.request("POST", "/v2/manager/queue/batch", {"batch_id": batch_id, kind: [item]})
    assert status == 200 and answer == {"failed": []}, f"the Manager refused to {kind} the pack: {status} {answer}"
    deadline = time.monotonic() + timeout
    while True:
        status, queue = server.request("GET", "/v2/manager/queue/status")
        assert status == 200, (status, queue)
        if queue["total_count"] == 0 and not queue["is_processing"]:
            break
        if time.monotonic() > deadline:
            raise server.fail(f"the Manager's {kind} task did not finish within {timeout} s: {queue}")
        time.sleep(0.3)
    status, history = server.request("GET", f"/v2/manager/queue/history?id={batch_id}")
    assert status == 200, (status, history)
    return history["nodepack_result"].get(item["ui_id"])


def simda_nodes(info: dict) -> dict[str, str]:
    """Node id -> python_module of every node served from the installed pack's folder."""
    return {name: node.get("python_module", "") for name, node in info.items()
            if PACK_FOLDER in node.get("python_module", "")}


def core_prompt(server: ComfyServer, prefix: str) -> dict:
    """Load Checkpoint -> prompts -> KSampler (2 steps, 64x64) -> VAE Decode -> Save Image: core nodes only."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.checkpoint_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"manager/{prefix}"}},
    }


# -- the test ----------------------------------------------------------------------------------------

def test_manager_installs_runs_and_removes_the_pack(tmp_path):
    if importlib.util.find_spec("comfyui_manager") is None:
        message = (f"the ComfyUI-Manager package (comfyui_manager) is not installed in {sys.executable}: "
                   f"pip install -r {HOST_DIR / 'manager_requirements.txt'}")
        if HOST_DIR.is_relative_to(PACK_DIR / ".hosts"):
            pytest.fail(message + " (scripts/setup_host.sh installs it into the pinned hosts)", pytrace=False)
        pytest.skip(message)

    started = time.monotonic()
    root = tmp_path / "ComfyUI"
    copy_host(root)
    source = tmp_path / "src" / PACK_FOLDER
    commit = clone_head(source)
    url = f"file://localhost{source}"
    node_ids = pack_node_ids(source)

    before = environment_snapshot()
    constraints = tmp_path / "torch-constraints.txt"  # the shared venv's guard should anything reach for torch
    constraints.write_text("".join(f"{line.split(' at ')[0]}\n" for line in before["distributions"]
                                   if line.split("==")[0].lower() in TORCH_PACKAGES))
    environment = dict(os.environ, COMFYUI_PATH=str(root), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1",
                       PIP_CONSTRAINT=str(constraints))
    environment.pop("COMFYUI_FOLDERS_BASE_PATH", None)
    environment.setdefault("OMP_NUM_THREADS", "1")

    server = start(root, tmp_path / "comfyui.log", environment)
    try:
        status, version = server.request("GET", "/v2/manager/version")
        assert status == 200, (status, version)
        assert "network_mode: offline" in server.log_tail(400), "the Manager did not read user/__manager/config.ini"
        assert not simda_nodes(server.object_info()), "SimDA is served before it is installed"

        # Install from the git URL; the route answers once the clone and its requirements are done.
        log_start = len(server.log_path.read_text(errors="replace"))
        assert post_text(server, "/v2/customnode/install/git_url", url, timeout=600) == 200, \
            server.fail(f"the Manager did not install {url}")
        install_log = server.log_path.read_text(errors="replace")[log_start:]
        assert "Installation was successful." in install_log, install_log[-3000:]
        assert "install script failed" not in install_log, install_log[-3000:]
        assert (root / "custom_nodes" / PACK_FOLDER / "nodes").is_dir()
        pack = installed(server).get(PACK_FOLDER)
        assert pack is not None and pack["enabled"] and pack["ver"] == commit, installed(server)
        status, queue = server.request("GET", "/v2/manager/queue/status")
        assert status == 200 and queue["total_count"] == 0 and not queue["is_processing"], queue

        after = environment_snapshot()
        assert (after["torch"], after["torch_file"], after["records"]) == \
            (before["torch"], before["torch_file"], before["records"]), "the Manager's install changed torch"
        changed = sorted(set(before["distributions"]) ^ set(after["distributions"]))
        assert not changed, f"the Manager's install changed the Python environment: {changed}"

        # Restarted through the Manager: every SimDA node is served from the installed folder, and a
        # small text-to-video workflow runs on it.
        reboot(server)
        info = server.object_info()
        served = simda_nodes(info)
        assert set(served) == node_ids, f"served from custom_nodes/{PACK_FOLDER}: {sorted(served)}; " \
            f"the pack defines {sorted(node_ids)}\n{server.log_tail()}"
        workflow = small_text_to_video(server, info, "text_to_video.json", "manager_t2v")
        entry = run_ok(server, workflow_to_api(workflow, info))
        frames, _ = decode_mp4(saved_file(server, workflow, entry, "SaveVideo"))
        assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape

        # Disabled, then uninstalled, through the Manager's queue.
        item = {"id": PACK_FOLDER, "version": "unknown", "files": [url], "ui_id": f"{PACK_FOLDER}-test"}
        assert run_batch(server, "disable", item) == "success", server.log_tail()
        assert (root / "custom_nodes" / ".disabled" / PACK_FOLDER).is_dir()
        assert not (root / "custom_nodes" / PACK_FOLDER).exists()
        assert installed(server)[PACK_FOLDER]["enabled"] is False, installed(server)
        assert run_batch(server, "uninstall", item) == "success", server.log_tail()
        assert not (root / "custom_nodes" / ".disabled" / PACK_FOLDER).exists()
        assert PACK_FOLDER not in installed(server), installed(server)

        # Restarted: ComfyUI is healthy without the pack.
        reboot(server)
        status, stats = server.request("GET", "/system_stats")
        assert status == 200 and stats["system"]["comfyui_version"], (status, stats)
        info = server.object_info()
        assert not simda_nodes(info) and not node_ids & set(info), sorted(node_ids & set(info))
        entry = run_ok(server, core_prompt(server, "after_uninstall"))
        assert execution_error(entry) is None
        assert server.output_images(entry) and all(path.is_file() for path in server.output_images(entry))
    finally:
        server.stop()
    print(f"ComfyUI-Manager install, run and uninstall: {time.monotonic() - started:.0f} s")
