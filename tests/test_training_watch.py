"""Training you can watch, in the right precision: the precision a model trains in (autocast on the
model's device type, a loss scaler with fp16), which for fp16, bf16 and fp8 weights is what the host's
own training node picks and for fp32 weights is the pack's own rule, and the Edit Tuner's loss shown
under the node while it trains and handed on as the host's LOSS_MAP."""
from __future__ import annotations

import asyncio
import math
import re
import struct
import threading

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import aiohttp
import pytest
import torch
from PIL import Image

import comfy.sd
from live_server import (  # noqa: F401  (comfy_server is a fixture)
    cached_nodes, cached_test_models, comfy_server, execution_error,
)
from simda_pack.simda_core.host.register import apply_simda, model_sites
from simda_pack.simda_core.host.training import training_patcher, training_precision
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

pytestmark = pytest.mark.usefixtures("unload_host_models")

FRAMES = 4
SIZE = 64
TEXT_EVENT = 3
"""The host's binary websocket event for a node's progress text (protocol.py ``BinaryEventTypes.TEXT``)."""


STORED = [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
STORED_IDS = ["fp32", "fp16", "bf16", "fp8"]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (torch.float32, (None, False)),
        (torch.float16, (torch.float16, True)),
        (torch.bfloat16, (torch.bfloat16, False)),
        (torch.float8_e4m3fn, (torch.bfloat16, False)),
    ],
    ids=STORED_IDS,
)
def test_the_precision_follows_the_stored_dtype(stored, expected):
    """On the CPU: fp16 weights train under fp16 autocast with a loss scaler, bf16 and fp8 weights
    under bf16 autocast (these three as the host's training node picks: the next test reads its
    choice), fp32 weights without autocast (the host's node: bf16); without mixed precision never
    autocast."""
    model = host.build_model(host.TINY_UNET, seed=None, dtype=stored)
    precision = training_precision(model)
    assert (precision.device_type, precision.dtype, precision.loss_scaling) == ("cpu", *expected)
    assert training_precision(model, mixed_precision=False).dtype is None


class HostChoice(Exception):
    """Raised from the host's TrainSampler once it is built: the host's training node has chosen."""

    def __init__(self, dtype: torch.dtype | None, loss_scaling: bool):
        super().__init__(dtype, loss_scaling)
        self.dtype, self.loss_scaling = dtype, loss_scaling


def host_training_node_choice(model, monkeypatch) -> tuple[str, torch.dtype | None, bool]:
    """What the host's own training node (TrainLoraNode) trains ``model`` in: ``(training_dtype
    input used, autocast dtype, whether it scales the loss)``, read from the TrainSampler the node
    builds (it is stopped there, before any step). training_dtype is "none" (the model's stored
    dtype decides) where the host offers that, else the input's default; lora_dtype is fp32, as the
    pack's adapters are (the host scales the loss only for parameters that are not bf16); every
    other input is the schema's default, read at run time."""
    import comfy.model_management
    from comfy_extras import nodes_train

    host_sampler = nodes_train.TrainSampler

    class StopWhenBuilt(host_sampler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            raise HostChoice(self.training_dtype, getattr(self, "grad_scaler", None) is not None)

    monkeypatch.setattr(nodes_train, "TrainSampler", StopWhenBuilt)
    if hasattr(comfy.model_management, "training_fp8_bwd"):  # the node sets it from its input
        monkeypatch.setattr(comfy.model_management, "training_fp8_bwd", comfy.model_management.training_fp8_bwd)
    inputs = {item.id: item for item in nodes_train.TrainLoraNode.define_schema().inputs}
    training_dtype = "none" if "none" in inputs["training_dtype"].options else inputs["training_dtype"].default
    context = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0))
    # The node takes every input as a list; two latents (0.3.75's node needs a list of several).
    given = {"model": [model], "latents": [{"samples": torch.zeros(1, 4, 8, 8)}] * 2, "positive": [[[context, {}]]],
             "steps": [1], "training_dtype": [training_dtype], "lora_dtype": ["fp32"],
             "gradient_checkpointing": [False]}
    arguments = {name: given[name] if name in given else [item.default] for name, item in inputs.items()}
    with pytest.raises(HostChoice) as chosen:
        nodes_train.TrainLoraNode.execute(**arguments)
    return training_dtype, chosen.value.dtype, chosen.value.loss_scaling


@pytest.mark.parametrize("stored", STORED, ids=STORED_IDS)
def test_fp16_bf16_and_fp8_weights_train_as_the_hosts_training_node_picks_and_fp32_ones_do_not(stored, monkeypatch):
    """The host's TrainLoraNode, run on the same model (the SD1.5 test checkpoint through the host's
    loader, weights stored in ``stored``), against the pack's choice. Where the host
    lets the model's dtype decide (training_dtype "none", 0.33+): fp16, bf16 and fp8 weights get the
    host's autocast dtype and loss scaling; fp32 weights get bf16 from the host, and from the pack
    no autocast on the CPU (fp16 with a loss scaler on CUDA). A host without "none" (0.3.75) trains
    every model in its training_dtype default, bf16, so the pack differs there for fp16 and fp32."""
    checkpoint, _ = cached_test_models()  # the host's training node clones only what its loader made
    with torch.inference_mode():
        model, *_ = comfy.sd.load_checkpoint_guess_config(
            str(checkpoint), output_vae=False, output_clip=False, model_options={"dtype": stored}
        )
    assert model.model.get_dtype() == stored
    training_dtype, host_dtype, host_scaling = host_training_node_choice(model, monkeypatch)
    ours = training_precision(model)
    if training_dtype != "none":
        assert (training_dtype, host_dtype, host_scaling) == ("bf16", torch.bfloat16, False)
        assert ours.dtype == (torch.float16 if stored == torch.float16 else None if stored == torch.float32
                              else torch.bfloat16)
    elif stored == torch.float32:
        assert (host_dtype, host_scaling) == (torch.bfloat16, False)
        assert (ours.dtype, ours.loss_scaling) == (None, False)  # the pack's own rule, not the host's
    else:
        assert (ours.dtype, ours.loss_scaling) == (host_dtype, host_scaling)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_training_step_runs_under_the_models_autocast_on_its_device(stored):
    """A real training step through the host's UNet stored in ``stored``: the UNet computes under
    autocast on the CPU in that dtype (seen from inside a host layer), the loss scaler runs for fp16,
    and the adapters change."""
    base = host.build_model(host.TINY_UNET, seed=3, dtype=stored)
    adapters = initial_adapters(model_sites(base), seed=1)
    training = training_patcher(base)
    apply_simda(training, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings()))
    trainer = AdapterTrainer(training, adapters, TuningRecipe(learning_rate=1e-3), seed=0)
    seen = []
    layer = training.model.diffusion_model.input_blocks[0][0]
    handle = layer.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
    )
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(FRAMES, 4, 8, 8, generator=generator)
    context = torch.randn(FRAMES, 8, host.TINY_UNET["context_dim"], generator=generator)
    before = {name: p.detach().clone() for name, p in adapters.named_parameters()}
    try:
        with torch.inference_mode(False), torch.enable_grad(), host.patched(training):
            losses = [trainer.step(x0, context) for _ in range(2)]
    finally:
        handle.remove()
    assert seen and all(state == (True, stored) for state in seen), seen
    assert trainer.scaler.is_enabled() == (stored == torch.float16)
    assert all(math.isfinite(loss) for loss in losses)
    assert trainer.steps_done == 2
    assert any(not torch.equal(p, before[name]) for name, p in adapters.named_parameters()), "nothing trained"


def collect_texts(url: str, received: list[tuple[str, str]], ready: threading.Event, stop: threading.Event) -> None:
    """Read the server's websocket until ``stop``, keeping each node progress text as ``(node id, text)``."""

    async def listen():
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(url) as socket:
                ready.set()
                while not stop.is_set():
                    try:
                        message = await socket.receive(timeout=0.2)
                    except asyncio.TimeoutError:
                        continue
                    if message.type == aiohttp.WSMsgType.BINARY:
                        event, = struct.unpack(">I", message.data[:4])
                        if event == TEXT_EVENT:
                            length, = struct.unpack(">I", message.data[4:8])
                            node = message.data[8:8 + length].decode()
                            received.append((node, message.data[8 + length:].decode()))
                    elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return

    asyncio.run(listen())


def test_the_edit_tuner_shows_its_loss_and_the_hosts_plot_loss_graph_draws_its_loss_map(comfy_server):
    """Over HTTP: the Edit Tuner sends one progress text per step to the page (step, loss, mean of the
    last steps) and its loss_map output goes into the host's own Plot Loss Graph, which saves it."""
    steps = 3
    tuner, graph = "20", "30"
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": comfy_server.checkpoint_name}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a grey clip", "clip": ["1", 1]}},
        "21": {"class_type": "EmptyImage", "inputs": {
            "width": SIZE, "height": SIZE, "batch_size": FRAMES, "color": 0x6080A0}},
        tuner: {"class_type": "SimDAEditTuner", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "source_frames": ["21", 0], "source_prompt": ["2", 0],
            "clip": ["1", 1], "steps": steps, "learning_rate": 1e-3, "seed": 0, "frames": FRAMES, "start_frame": 0,
            "stride": 1, "width": SIZE, "height": SIZE, "gradient_checkpointing": False, "inversion_steps": 1,
            "inversion_scheduler": "ddim_uniform", "source_fps": 8.0,
        }},
        graph: {"class_type": "LossGraphNode", "inputs": {"loss": [tuner, 4], "filename_prefix": "simda_loss"}},
    }
    received: list[tuple[str, str]] = []
    ready, stop = threading.Event(), threading.Event()
    url = comfy_server.base_url.replace("http", "ws", 1) + f"/ws?clientId={comfy_server.client_id}"
    listener = threading.Thread(target=collect_texts, args=(url, received, ready, stop), daemon=True)
    listener.start()
    assert ready.wait(30), "the server's websocket did not open"
    try:
        entry = comfy_server.run_prompt(prompt, timeout=300)
    finally:
        stop.set()
        listener.join(10)
    assert execution_error(entry) is None, execution_error(entry)
    assert tuner not in cached_nodes(entry), "the tuner did not run"
    texts = [text for node, text in received if node == tuner]
    assert len(texts) == steps, received
    pattern = re.compile(r"step (\d+)/(\d+): loss ([0-9.]+), mean of the last (\d+) ([0-9.]+)")
    for index, text in enumerate(texts, start=1):
        match = pattern.fullmatch(text)
        assert match, text
        assert (int(match[1]), int(match[2]), int(match[4])) == (index, steps, index)
        assert math.isfinite(float(match[3]))
    assert len(entry["outputs"].get(graph, {}).get("images", [])) == 1, entry["outputs"]
    pictures = comfy_server.output_images(entry)
    assert len(pictures) == 1, pictures
    with Image.open(pictures[0]) as picture:  # the host saves the graph as a preview (temp/) on newer hosts
        assert picture.width > picture.height > 0
