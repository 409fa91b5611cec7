"""The real ComfyUI server for end-to-end tests: a random-weight SD1.5 checkpoint the host
detects as SD1.5, random SimDA adapters for it, and the host's own ``main.py`` started on a
temporary base folder (``--base-directory``), driven over its HTTP API.

Test files import what they use: ``from live_server import comfy_server, ...``.

The checkpoint and adapters are built once with the host's own modules and cached under
``<pack>/.cache/`` (git-ignored), keyed by a hash of the recipe. The server runs in its own
process; this one imports the host too (tests/host.py), as every test module here must: pytest
imports the pack's own ``__init__.py`` (the repository root is a package), which needs the host.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import host  # first: it puts the host on sys.path and imports the pack as simda_pack
from host import HOST_DIR, PACK_DIR

import comfy.model_base
import comfy.model_detection
import comfy.sd
import comfy.supported_models
import comfy.taesd.taesd
import comfy.utils
from simda_pack.simda_core.formats import save_adapters
from simda_pack.simda_core.host.register import model_sites
from simda_pack.simda_core.model.adapters import SimDAAdapters

CACHE_DIR = PACK_DIR / ".cache"

SD15_TEST_UNET = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, channel_mult=[1, 1], num_res_blocks=[1, 1],
    transformer_depth=[1, 1], transformer_depth_middle=1, transformer_depth_output=[1, 1, 1, 1],
    context_dim=768, num_heads=8, use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
)
"""An SD1.5 UNet cut to two levels of 320 channels with one ResBlock and one transformer each
(44M parameters instead of 860M). The host detects SD1.5 from 320 base channels, a 768 context
and conv (not linear) transformer projections; the number of levels does not matter."""

RECIPE = {
    "unet": SD15_TEST_UNET,
    "text_encoder": "CLIP-L (host SD1ClipModel), full size",
    "vae": "TAESD (host comfy.taesd), 8x, 4 latent channels",
    "weights": "seeded, fan-in scaled, stored float16",
    "adapters": "SimDAAdapters for the UNet's sites, 0.02 * randn everywhere",
    "seed": 0,
    "version": 2,
}
RECIPE_KEY = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
CHECKPOINT_NAME = f"simda_test_sd15_{RECIPE_KEY}.safetensors"
ADAPTER_NAME = f"simda_test_random_sd1_{RECIPE_KEY}.safetensors"

STARTUP_TIMEOUT_S = 180


# -- the random checkpoint and adapters ----------------------------------------------------------

def random_sd15_checkpoint(path: str | os.PathLike, seed: int = RECIPE["seed"]) -> Path:
    """Write a seeded random-weight checkpoint that ``CheckpointLoaderSimple`` loads as SD1.5.

    Built from the host's own modules and saved with the host's own key layout
    (``BaseModel.state_dict_for_saving``: ``model.diffusion_model.``, ``cond_stage_model.``,
    ``first_stage_model.``). The VAE is the host's TAESD (detected by its ``taesd_decoder`` keys),
    which keeps the 8x latent of SD1.5 at 1/40 of the KL VAE's size."""
    path = Path(path)
    cpu = torch.device("cpu")
    model_config = comfy.supported_models.SD15(dict(SD15_TEST_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    model = comfy.model_base.BaseModel(model_config, device=cpu)
    host.randomize_(model.diffusion_model, seed)

    clip = comfy.sd.CLIP(
        model_config.clip_target(),
        model_options={"dtype": torch.float32, "load_device": cpu, "offload_device": cpu, "initial_device": cpu},
    )
    host.randomize_(clip.cond_stage_model, seed + 1)

    vae = comfy.taesd.taesd.TAESD()
    host.randomize_(vae, seed + 2)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        vae.taesd_decoder[-1].bias.fill_(0.5)  # mid-grey images rather than mostly clipped black

    state = host.checkpoint_state(model, clip.get_sd(), vae.state_dict())
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state.items()}

    detected = comfy.model_detection.model_config_from_unet(
        state, comfy.model_detection.unet_prefix_from_state_dict(state)
    )
    if type(detected) is not comfy.supported_models.SD15:
        raise RuntimeError(
            f"the random checkpoint is detected as {type(detected).__name__}, not SD15; fix SD15_TEST_UNET"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(state, str(tmp), metadata={"simda_test_recipe": json.dumps(RECIPE, sort_keys=True)})
    os.replace(tmp, path)
    return path


def random_simda_adapters(
    checkpoint: str | os.PathLike, path: str | os.PathLike, family: str = "sd1", seed: int = RECIPE["seed"]
) -> Path:
    """Write SimDA adapters for ``checkpoint``'s UNet (loaded by the host's checkpoint loader) with
    every parameter seeded and non-zero (``0.02 * randn``), in our format."""
    model, *_ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_clip=False)
    adapters = SimDAAdapters(model_sites(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return save_adapters(adapters, path, family=family, overwrite=True)


def cached_test_models() -> tuple[Path, Path]:
    """``(checkpoint, adapters)`` under ``.cache/``, built on first use."""
    checkpoint = CACHE_DIR / CHECKPOINT_NAME
    adapters = CACHE_DIR / ADAPTER_NAME
    if not checkpoint.is_file():
        random_sd15_checkpoint(checkpoint)
    if not adapters.is_file():
        random_simda_adapters(checkpoint, adapters)
    return checkpoint, adapters


def random_controlnet(path: str | os.PathLike, seed: int = 5) -> Path:
    """Write a seeded random-weight ControlNet for the test checkpoint's UNet, built by the host's own
    ``comfy.cldm.cldm.ControlNet`` from ``SD15_TEST_UNET`` and saved in the original (``control_model.``)
    layout, which the host's ``ControlNetLoader`` detects from its keys."""
    import comfy.cldm.cldm
    import comfy.ops

    config = {k: v for k, v in SD15_TEST_UNET.items() if k not in ("out_channels", "transformer_depth_output")}
    control = comfy.cldm.cldm.ControlNet(
        hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu", **config
    )
    host.randomize_(control, seed)
    state = {f"control_model.{k}": v.to(torch.float16).contiguous() for k, v in control.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    comfy.utils.save_torch_file(state, str(tmp))
    os.replace(tmp, path)
    return path


def random_hypernetwork(path: str | os.PathLike, seed: int = 6, dim: int = 320) -> Path:
    """Write a seeded random hypernetwork in the layout the host's ``HypernetworkLoader`` reads: for
    the self-attention input width ``dim``, one small MLP for the keys and one for the values."""
    generator = torch.Generator().manual_seed(seed)

    def mlp():
        return {
            "linear.0.weight": torch.randn(2 * dim, dim, generator=generator) / dim**0.5,
            "linear.0.bias": torch.zeros(2 * dim),
            "linear.1.weight": torch.randn(dim, 2 * dim, generator=generator) / (2 * dim) ** 0.5,
            "linear.1.bias": torch.zeros(dim),
        }

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({dim: [mlp(), mlp()], "activation_func": "relu", "is_layer_norm": False}, tmp)
    os.replace(tmp, path)
    return path


def cached_hint_models() -> tuple[Path, Path]:
    """``(controlnet, hypernetwork)`` for the test checkpoint under ``.cache/``, built on first use."""
    controlnet = CACHE_DIR / f"simda_test_controlnet_{RECIPE_KEY}.safetensors"
    hypernetwork = CACHE_DIR / f"simda_test_hypernetwork_{RECIPE_KEY}.pt"
    if not controlnet.is_file():
        random_controlnet(controlnet)
    if not hypernetwork.is_file():
        random_hypernetwork(hypernetwork)
    return controlnet, hypernetwork


# -- the server ----------------------------------------------------------------------------------

class ServerError(AssertionError):
    """The server stopped answering or died; the message carries its log's tail."""


@dataclass
class ComfyServer:
    """A running ComfyUI: where it lives (``base_dir`` with models/, input/, output/ and its log)
    and its HTTP API."""

    base_url: str
    base_dir: Path
    log_path: Path
    process: subprocess.Popen
    checkpoint_name: str = CHECKPOINT_NAME
    adapter_name: str = ADAPTER_NAME
    client_id: str = field(default_factory=lambda: f"simda-tests-{os.getpid()}")

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def simda_dir(self) -> Path:
        return self.models_dir / "simda"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> ServerError:
        state = "running" if self.alive() else f"exited with {self.process.returncode}"
        return ServerError(f"{what} (server {state}; log {self.log_path}):\n{self.log_tail()}")

    # -- HTTP ----------------------------------------------------------------------------------

    def request(self, method: str, route: str, body: dict | None = None, timeout: float = 60) -> tuple[int, object]:
        """``(HTTP status, decoded JSON or raw bytes)``; HTTP errors are returned, not raised."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + route, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw, kind = response.status, response.read(), response.headers.get_content_type()
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get_content_type()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise self.fail(f"{method} {route} got no answer ({e})") from None
        return status, (json.loads(raw) if kind == "application/json" else raw)

    def object_info(self, node_class: str | None = None) -> dict:
        status, info = self.request("GET", "/object_info" + (f"/{node_class}" if node_class else ""))
        if status != 200:
            raise self.fail(f"GET /object_info answered {status}")
        return info

    def queue_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt: ``(200, {"prompt_id", ...})``, or ``(400, {"error", "node_errors"})`` when
        the host's validation refuses it."""
        return self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})

    def wait_history(self, prompt_id: str, timeout: float = 120) -> dict:
        """The prompt's history entry once it completed or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, history = self.request("GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id) if status == 200 and isinstance(history, dict) else None
            if entry and (entry["status"].get("completed") or entry["status"].get("status_str") == "error"):
                return entry
            if not self.alive():
                raise self.fail(f"the server died while running prompt {prompt_id}")
            time.sleep(0.2)
        raise self.fail(f"prompt {prompt_id} did not finish within {timeout} s")

    def run_prompt(self, prompt: dict, timeout: float = 120) -> dict:
        """Queue ``prompt`` (it must pass validation) and return its finished history entry."""
        status, answer = self.queue_prompt(prompt)
        if status != 200:
            raise AssertionError(f"the host refused the prompt ({status}): {json.dumps(answer, indent=1)[:3000]}")
        return self.wait_history(answer["prompt_id"], timeout)

    def output_images(self, entry: dict) -> list[Path]:
        """Files the prompt's image outputs wrote, in order."""
        paths = []
        for output in entry["outputs"].values():
            for image in output.get("images", []):
                root = {
                    "output": self.output_dir, "temp": self.base_dir / "temp", "input": self.input_dir
                }[image["type"]]
                paths.append(root / image["subfolder"] / image["filename"])
        return paths

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def execution_error(entry: dict) -> str | None:
    """The ``exception_message`` of a failed prompt's history entry (None if it did not fail)."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_error":
            return data["exception_message"].strip()
    return None


def cached_nodes(entry: dict) -> list[str]:
    """Node ids the host took from its cache instead of executing them for this prompt."""
    for event, data in entry["status"].get("messages", []):
        if event == "execution_cached":
            return list(data["nodes"])
    return []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base_dir(base: Path, checkpoint: Path, adapters: Path, packs: tuple[Path, ...] = ()) -> None:
    """A ComfyUI base folder with only what the tests need; the pack is its one custom node, next
    to the third-party ``packs`` (folders installed by scripts/setup_packs.sh) when given."""
    for sub in ("models/checkpoints", "models/simda", "input", "output", "user", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for source, target in (
        (checkpoint, base / "models/checkpoints" / checkpoint.name), (adapters, base / "models/simda" / adapters.name)
    ):
        try:
            target.symlink_to(source)
        except OSError:
            shutil.copy2(source, target)
    (base / "custom_nodes" / "simda").symlink_to(PACK_DIR, target_is_directory=True)
    for pack in packs:
        (base / "custom_nodes" / pack.name).symlink_to(pack, target_is_directory=True)


VIDEO_PACKS = ("ComfyUI-VideoHelperSuite", "ComfyUI-AnimateDiff-Evolved", "ComfyUI-Advanced-ControlNet")
"""The third-party packs of the compatibility tests, at the commits scripts/setup_packs.sh pins."""


def installed_video_packs() -> tuple[Path, ...]:
    """VideoHelperSuite and AnimateDiff-Evolved in the host's custom_nodes/, installed there by
    scripts/setup_packs.sh first (git clone at the pinned commits, or the archives in
    SIMDA_PACKS_DIR; it does nothing when both are in place). Its one-sentence refusal fails the
    test set-up."""
    result = subprocess.run(
        ["bash", str(PACK_DIR / "scripts" / "setup_packs.sh"), str(HOST_DIR)], capture_output=True, text=True
    )
    if result.returncode != 0:
        pytest.fail(
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "scripts/setup_packs.sh failed",
            pytrace=False,
        )
    return tuple(HOST_DIR / "custom_nodes" / name for name in VIDEO_PACKS)


def start_server(base: Path, timeout: float = STARTUP_TIMEOUT_S, extra_args: tuple[str, ...] = ()) -> ComfyServer:
    """Start the host's ``main.py`` on ``base`` (CPU, a free port, an in-memory database, and
    ``extra_args``) and wait until ``/object_info`` answers."""
    port = free_port()
    log_path = base / "comfyui.log"
    command = [
        sys.executable, str(HOST_DIR / "main.py"),
        "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--base-directory", str(base),
        "--database-url", "sqlite:///:memory:",
        "--disable-auto-launch", "--disable-api-nodes", "--dont-print-server", *extra_args,
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    # One CPU thread unless the caller says otherwise: on a busy 2-core machine two OpenMP threads
    # stall each other (a test UNet call took 4.4 s with two threads, 0.9 s with one, at load 9).
    env.setdefault("OMP_NUM_THREADS", "1")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=str(HOST_DIR), stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(base_url=f"http://127.0.0.1:{port}", base_dir=base, log_path=log_path, process=process)
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


@contextlib.contextmanager
def serving(base: Path, **start):
    """A server on ``base`` (``start_server``'s options) for the length of a ``with`` block, stopped
    after it whatever happens inside."""
    server = start_server(base, **start)
    try:
        yield server
    finally:
        server.stop()


def wait_ready(server: ComfyServer, timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Until the server's /object_info answers (after a start or a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise server.fail("ComfyUI exited before /object_info answered")
        if time.monotonic() > deadline:
            raise server.fail(f"ComfyUI did not answer /object_info within {timeout} s")
        try:
            with urllib.request.urlopen(server.base_url + "/object_info", timeout=30) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)


@pytest.fixture(scope="module")
def comfy_server_with_packs(tmp_path_factory):
    """Like ``comfy_server``, with VideoHelperSuite and AnimateDiff-Evolved installed next to SimDA."""
    packs = installed_video_packs()
    checkpoint, adapters = cached_test_models()
    base = tmp_path_factory.mktemp("comfyui_base_packs")
    make_base_dir(base, checkpoint, adapters, packs)
    with serving(base) as server:
        yield server


@pytest.fixture(scope="module")
def comfy_server(tmp_path_factory):
    """A ComfyUI server for the test module, on a temporary base folder holding the random SD1.5
    checkpoint (models/checkpoints) and random SimDA adapters (models/simda). Each module that
    imports this fixture gets its own server, stopped when the module is done (a session scope would
    keep one server per importing module alive until the end: about 1-6 GB each)."""
    checkpoint, adapters = cached_test_models()
    base = tmp_path_factory.mktemp("comfyui_base")
    make_base_dir(base, checkpoint, adapters)
    with serving(base) as server:
        yield server
