"""SimDA in company, over HTTP on the real server: beside the nodes a user's video graph holds.

- Perturbed-Attention Guidance acts on a SimDA MODEL, in either order (its perturbed pass takes its
  block, latent shift the rest: ``host.attention_slots``).
- A hypernetwork (a per-token self-attention patch) runs with latent shift, in either order;
  HyperTile that really re-tiles the tokens is refused at the first UNet call, naming it.
- A ControlNet (random weights, the host's own ``comfy.cldm.cldm.ControlNet`` for the test
  checkpoint's UNet) takes 1 hint image or one per frame; any other count is refused naming both;
  in the host's context windows each window's UNet call gets its own frames' hints (KSampler and
  the Video Sampler), shown from outside: two runs whose hints differ only in the first window give
  identical frames in the second.
- Prompt Travel with the host's context windows reaches each window's calls with its own rows
  through KSampler, SamplerCustomAdvanced and the Video Sampler (2 steps for 8 frames: on ComfyUI
  0.3.75 the host's own step lookup needs frames = steps + 1).
- A ModelSampling node after the Latent-Shift Patch moves the shift's range with the schedule.
- AnimateDiff-Evolved's sampling with context windows and Advanced-ControlNet's ControlNet on a
  SimDA MODEL: each window takes its own hint frames.

What a run put out is read with the test-only nodes of tests/fixtures/recording_nodes (Save Tensor,
Load Images, Record UNet Calls), linked into the server's custom_nodes/.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)
from host import PACK_DIR
from live_server import (
    cached_hint_models, cached_test_models, execution_error, installed_video_packs, make_base_dir, serving,
)
from node_info import widget_values

FRAMES = 4
SIZE = 64
RECORDING_NODES = PACK_DIR / "tests" / "fixtures" / "recording_nodes"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real server with VideoHelperSuite, AnimateDiff-Evolved and Advanced-ControlNet, the test
    checkpoint, a random ControlNet (models/controlnet) and hypernetwork (models/hypernetworks), and
    the recording nodes."""
    packs = installed_video_packs()
    checkpoint, adapters = cached_test_models()
    controlnet, hypernetwork = cached_hint_models()
    base = tmp_path_factory.mktemp("comfyui_base_company")
    make_base_dir(base, checkpoint, adapters, packs)
    for folder, file in (("controlnet", controlnet), ("hypernetworks", hypernetwork)):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        (base / "models" / folder / file.name).symlink_to(file)
    (base / "custom_nodes" / RECORDING_NODES.name).symlink_to(RECORDING_NODES, target_is_directory=True)
    with serving(base) as server:
        server.controlnet_name, server.hypernetwork_name = controlnet.name, hypernetwork.name
        server.checkpoint_name = checkpoint.name
        yield server


@pytest.fixture(scope="module")
def info(server):
    return server.object_info()


class Graph:
    """An API prompt built node by node: every widget a node has on this host starts at the value
    /object_info gives it, then the test's values and links are set."""

    def __init__(self, server, info, tmp: Path):
        self.server, self.info, self.tmp, self.nodes = server, info, tmp, {}

    def add(self, class_type: str, **inputs) -> str:
        assert class_type in self.info, f"{class_type} is not registered on this server"
        node_id = str(len(self.nodes) + 1)
        values = widget_values(self.info[class_type])
        values.update({k: v for k, v in inputs.items() if v is not None})
        self.nodes[node_id] = {"class_type": class_type, "inputs": values}
        return node_id

    def has_input(self, class_type: str, name: str) -> bool:
        spec = self.info[class_type]["input"]
        return any(name in (spec.get(section) or {}) for section in ("required", "optional"))

    def checkpoint(self) -> tuple[list, list]:
        ckpt = self.add("CheckpointLoaderSimple", ckpt_name=self.server.checkpoint_name)
        return [ckpt, 0], [ckpt, 1]

    def text(self, clip, text: str) -> list:
        return [self.add("CLIPTextEncode", clip=clip, text=text), 0]

    def shift(self, model, **values) -> list:
        return [self.add("SimDALatentShiftPatch", model=model, **values), 0]

    def images(self, images: torch.Tensor) -> list:
        path = self.tmp / f"images_{uuid.uuid4().hex}.pt"
        torch.save(images, path)
        return [self.add("TestLoadImages", path=str(path)), 0]

    def controlnet(self, positive, negative, images, vae=None) -> tuple[list, list]:
        loader = self.add("ControlNetLoader", control_net_name=self.server.controlnet_name)
        apply = self.add(
            "ControlNetApplyAdvanced", positive=positive, negative=negative, control_net=[loader, 0],
            image=images, strength=1.0, start_percent=0.0, end_percent=1.0, vae=vae,
        )
        return [apply, 0], [apply, 1]

    def context_windows(self, model, length: int, overlap: int = 0, schedule: str = "standard_static") -> list:
        values = dict(context_length=length, context_overlap=overlap, context_schedule=schedule, dim=0,
                      fuse_method="pyramid")
        for name in ("freenoise", "causal_window_fix"):
            if self.has_input("ContextWindowsManual", name):
                values[name] = False
        return [self.add("ContextWindowsManual", model=model, **values), 0]

    def empty_latent(self, frames: int = FRAMES) -> list:
        return [self.add("EmptyLatentImage", width=SIZE, height=SIZE, batch_size=frames), 0]

    def ksampler(self, model, positive, negative, frames: int = FRAMES, steps: int = 2, cfg: float = 4.0) -> list:
        return [self.add(
            "KSampler", model=model, positive=positive, negative=negative, latent_image=self.empty_latent(frames),
            seed=0, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal", denoise=1.0,
        ), 0]

    def custom_sampler(self, model, positive, negative, frames: int = FRAMES, steps: int = 2, cfg: float = 4.0):
        noise = self.add("RandomNoise", noise_seed=0)
        guider = self.add("CFGGuider", model=model, positive=positive, negative=negative, cfg=cfg)
        sampler = self.add("KSamplerSelect", sampler_name="euler")
        sigmas = self.add("BasicScheduler", model=model, scheduler="normal", steps=steps, denoise=1.0)
        return [self.add(
            "SamplerCustomAdvanced", noise=[noise, 0], guider=[guider, 0], sampler=[sampler, 0],
            sigmas=[sigmas, 0], latent_image=self.empty_latent(frames),
        ), 0]

    def video_sampler(self, model, positive, negative, frames: int = FRAMES, steps: int = 2, cfg: float = 4.0):
        return [self.add(
            "SimDAVideoSampler", model=model, positive=positive, negative=negative, frames=frames, width=SIZE,
            height=SIZE, seed=0, steps=steps, cfg=cfg, sampler_name="euler", scheduler="normal",
        ), 0]

    def sample(self, path: str, model, positive, negative, **kwargs) -> list:
        return {"ksampler": self.ksampler, "custom": self.custom_sampler, "video": self.video_sampler}[path](
            model, positive, negative, **kwargs
        )

    def record(self, model) -> tuple[list, Path]:
        path = self.tmp / f"calls_{uuid.uuid4().hex}.jsonl"
        return [self.add("TestRecordUNetCalls", model=model, path=str(path)), 0], path

    def run(self, latent) -> torch.Tensor:
        """Queue the prompt with the latent saved; its samples, or the run's error as a failure."""
        path = self.tmp / f"latent_{uuid.uuid4().hex}.pt"
        self.add("TestSaveTensor", value=latent, path=str(path))
        entry = self.server.run_prompt(self.nodes, timeout=600)
        error = execution_error(entry)
        assert error is None, error
        return torch.load(path)["samples"]

    def error(self, latent) -> str:
        """Queue the prompt; the sentence it failed with (the test fails if it ran)."""
        self.add("TestSaveTensor", value=latent, path=str(self.tmp / "never.pt"))
        entry = self.server.run_prompt(self.nodes, timeout=600)
        error = execution_error(entry)
        assert error is not None, "the prompt ran"
        return error


@pytest.fixture
def graph(server, info, tmp_path):
    return lambda: Graph(server, info, tmp_path)


def differ(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# -- other attention nodes --------------------------------------------------------------------------

def guided(graph, order: str | None) -> torch.Tensor:
    """A 4-frame clip from the checkpoint with latent shift, and Perturbed-Attention Guidance before
    (``"before"``) or after (``"after"``) it, or none."""
    g = graph()
    model, clip = g.checkpoint()
    if order == "before":
        model = [g.add("PerturbedAttentionGuidance", model=model, scale=3.0), 0]
    model = g.shift(model)
    if order == "after":
        model = [g.add("PerturbedAttentionGuidance", model=model, scale=3.0), 0]
    return g.run(g.ksampler(model, g.text(clip, "a red panda walking"), g.text(clip, "blurry")))


def test_perturbed_attention_guidance_acts_on_a_simda_model_in_either_order(graph):
    alone, after, before = guided(graph, None), guided(graph, "after"), guided(graph, "before")
    assert differ(after, alone) > 1e-3, "PAG after SimDA changed nothing"
    assert differ(before, alone) > 1e-3, "PAG before SimDA changed nothing"
    assert torch.equal(after, before)  # both orders put the same patches on the MODEL


def hypernetwork_run(graph, order: str | None, shift: bool = True) -> torch.Tensor:
    g = graph()
    model, clip = g.checkpoint()

    def hypernetwork(m):
        return [g.add("HypernetworkLoader", model=m, hypernetwork_name=g.server.hypernetwork_name, strength=1.0), 0]

    if order == "before":
        model = hypernetwork(model)
    if shift:
        model = g.shift(model)
    if order == "after":
        model = hypernetwork(model)
    return g.run(g.ksampler(model, g.text(clip, "a red panda walking"), g.text(clip, "blurry")))


def test_a_hypernetwork_runs_with_latent_shift_in_either_order(graph):
    after, before = hypernetwork_run(graph, "after"), hypernetwork_run(graph, "before")
    assert torch.equal(after, before)
    assert differ(after, hypernetwork_run(graph, None)) > 1e-3, "the hypernetwork changed nothing"
    assert differ(after, hypernetwork_run(graph, "after", shift=False)) > 1e-3, "latent shift changed nothing"


def hypertile_run(graph, order: str, **hypertile) -> tuple:
    g = graph()
    model, clip = g.checkpoint()

    def tile(m):
        return [g.add("HyperTile", model=m, **hypertile), 0]

    model = g.shift(tile(model)) if order == "before" else tile(g.shift(model))
    return g, g.ksampler(model, g.text(clip, "a red panda walking"), g.text(clip, "blurry"))


@pytest.mark.parametrize("order", ["before", "after"])
def test_hypertile_that_tiles_is_refused_naming_it(graph, order):
    """Tiles of 32 px (4 latent pixels) with swap size 1 re-tile the 8x8 token grid of a 64 px frame."""
    g, latent = hypertile_run(graph, order, tile_size=32, swap_size=1, max_depth=0, scale_depth=False)
    error = g.error(latent)
    assert "token grid" in error and "hypertile_in (from comfy_extras.nodes_hypertile)" in error, error


def test_hypertile_that_does_not_tile_changes_nothing(graph):
    """With its defaults HyperTile tiles nothing below a latent side of 32: latent shift alone."""
    g, latent = hypertile_run(graph, "after")
    assert torch.equal(g.run(latent), guided(graph, None))


@pytest.mark.parametrize("order", ["before", "after"])
def test_self_attention_guidance_is_refused_in_either_order(graph, order):
    """Self-Attention Guidance replaces the middle block's self-attention on the MODEL itself."""
    g = graph()
    model, clip = g.checkpoint()

    def sag(m):
        return [g.add("SelfAttentionGuidance", model=m, scale=0.5, blur_sigma=2.0), 0]

    model = g.shift(sag(model)) if order == "before" else sag(g.shift(model))
    error = g.error(g.ksampler(model, g.text(clip, "a red panda walking"), g.text(clip, "blurry")))
    assert "replaces self-attention at ('middle', 0, 0) on this MODEL (" in error and "nodes_sag" in error, error


# -- ControlNet hints -----------------------------------------------------------------------------------

def hints(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` hint images [count, 64, 64, 3] in 0..1."""
    return torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def controlled(graph, path: str, images: torch.Tensor | None, windows: int = 0, frames: int = FRAMES, steps: int = 2,
               chained: torch.Tensor | None = None) -> tuple:
    g = graph()
    model, clip = g.checkpoint()
    model = g.shift(model)
    if windows:
        model = g.context_windows(model, windows)
    positive, negative = g.text(clip, "a red panda walking"), g.text(clip, "blurry")
    if chained is not None:
        positive, negative = g.controlnet(positive, negative, g.images(chained))
    if images is not None:
        positive, negative = g.controlnet(positive, negative, g.images(images))
    return g, g.sample(path, model, positive, negative, frames=frames, steps=steps)


@pytest.mark.parametrize("path", ["ksampler", "video"])
def test_controlnet_hints_are_one_image_or_one_per_frame(graph, path):
    g, latent = controlled(graph, path, None)
    plain = g.run(latent)
    for count in (1, FRAMES):
        g, latent = controlled(graph, path, hints(count))
        assert differ(g.run(latent), plain) > 1e-3, f"{count} hint image(s) changed nothing"
    g, latent = controlled(graph, path, hints(3))
    error = g.error(latent)
    assert "ControlNet on the positive conditioning has 3 hint images, but the clip has 4 frames" in error, error
    g, latent = controlled(graph, path, hints(1), chained=hints(2))  # the ControlNet applied before the last one
    assert "has 2 hint images, but the clip has 4 frames" in g.error(latent)


@pytest.mark.parametrize("path", ["ksampler", "video"])
def test_each_context_window_takes_its_own_hint_frames(graph, path):
    """Windows of 2 over 4 frames, no overlap: hints that differ only in the first window (frames 0-1)
    leave the second window's frames exactly as they were, and change the first window's."""
    first = hints(FRAMES, seed=1)
    changed = first.clone()
    changed[:2] = hints(2, seed=2)
    g, latent = controlled(graph, path, first, windows=2)
    a = g.run(latent)
    g, latent = controlled(graph, path, changed, windows=2)
    b = g.run(latent)
    assert torch.equal(a[2:], b[2:]), f"the second window moved by {differ(a[2:], b[2:]):.3g}"
    assert differ(a[:2], b[:2]) > 1e-3, "the first window's hints changed nothing"


# -- per-frame rows in every sampler path ----------------------------------------------------------------

TRAVEL = "0: a cat walking in a garden\n7: a tiger running on a beach"


def travel_calls(graph, path: str, windows: int) -> list[dict]:
    g = graph()
    model, clip = g.checkpoint()
    model = g.shift(model)
    if windows:
        model = g.context_windows(model, windows, overlap=1, schedule="standard_uniform")
    model, calls = g.record(model)
    positive = [g.add("SimDAPromptTravel", clip=clip, text=TRAVEL, frames=8), 0]
    g.run(g.sample(path, model, positive, g.text(clip, "blurry"), frames=8, steps=2, cfg=1.0))
    return [json.loads(line) for line in calls.read_text().splitlines()]


def frames_of(rows: list[list[float]], clip_rows: list[list[float]]) -> list[int]:
    """Which frame of the whole clip each row is (the nearest of the clip's own rows)."""
    clip = torch.tensor(clip_rows)
    return [int((clip - torch.tensor(row)).abs().sum(1).argmin()) for row in rows]


@pytest.mark.parametrize("path", ["ksampler", "custom", "video"])
def test_each_window_gets_its_own_prompt_rows_in_every_sampler_path(graph, path):
    (whole,) = {json.dumps(call["context"]) for call in travel_calls(graph, "ksampler", 0)}
    clip_rows = json.loads(whole)
    assert len({json.dumps(row) for row in clip_rows}) == 8, "the schedule's rows are not all different"
    calls = travel_calls(graph, path, 4)
    assert calls and all(call["shape"][0] < 8 for call in calls), "the sampler did not use the windows"
    seen = [frames_of(call["context"], clip_rows) for call in calls]
    for frames, call in zip(seen, calls):
        assert frames == sorted(frames) and len(set(frames)) == len(frames), frames  # one window's own frames
        for frame, row in zip(frames, call["context"]):
            torch.testing.assert_close(torch.tensor(row), torch.tensor(clip_rows[frame]), rtol=1e-3, atol=1e-4)
    assert set().union(*map(set, seen)) == set(range(8)), seen


# -- the schedule the MODEL samples with -------------------------------------------------------------------

def zsnr_steps_with_shift(steps: int, end_percent: float) -> tuple[int, int]:
    """How many of the first sampling steps lie at or above ``end_percent`` of the schedule: in the
    zero-terminal-SNR schedule the ModelSampling node gives (what the shift must follow), and in the
    checkpoint's own schedule (what a range fixed when the graph is built would follow). Read from
    the host's own ModelSamplingDiscrete and schedule, in the test process."""
    import comfy.samplers
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    model = host.build_model(host.TINY_UNET, seed=None)
    (patched,) = ModelSamplingDiscrete().patch(model, "eps", True)
    zsnr = patched.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(zsnr, "normal", steps)[:-1]
    own = model.get_model_object("model_sampling")
    return (int((sigmas >= zsnr.percent_to_sigma(end_percent)).sum()),
            int((sigmas >= own.percent_to_sigma(end_percent)).sum()))


def test_model_sampling_after_the_patch_moves_the_shift_with_the_schedule(graph):
    """Latent shift on the first 70% of the schedule, ModelSamplingDiscrete (zsnr) after the patch.
    Sampled in two parts by KSamplerAdvanced, split after the steps that lie in the first 70% of the
    zsnr schedule, it must equal latent shift on the whole schedule for the first part and the plain
    MODEL for the second: the shift's range follows the schedule the MODEL samples with. (Both runs
    are split at the same step, so the latent passes between the parts the same way.)"""
    steps, end = 8, 0.7  # 5 steps lie in the zsnr schedule's first 70%, 6 in the checkpoint's own
    shifted, fixed_when_built = zsnr_steps_with_shift(steps, end)
    assert 0 < shifted < steps and shifted != fixed_when_built, (shifted, fixed_when_built)

    def split(first_shift: dict | None, second_shift: dict | None, at: int) -> torch.Tensor:
        g = graph()
        model, clip = g.checkpoint()

        def model_with(shift):
            patched = g.shift(model, **shift) if shift is not None else model
            return [g.add("ModelSamplingDiscrete", model=patched, sampling="eps", zsnr=True), 0]

        common = dict(positive=g.text(clip, "a red panda walking"), negative=g.text(clip, "blurry"), noise_seed=0,
                      steps=steps, cfg=4.0, sampler_name="euler", scheduler="normal")
        first = g.add("KSamplerAdvanced", model=model_with(first_shift), latent_image=g.empty_latent(),
                      add_noise="enable", start_at_step=0, end_at_step=at, return_with_leftover_noise="enable",
                      **common)
        rest = g.add("KSamplerAdvanced", model=model_with(second_shift), latent_image=[first, 0], add_noise="disable",
                     start_at_step=at, end_at_step=10000, return_with_leftover_noise="disable", **common)
        return g.run([rest, 0])

    ranged = {"end_percent": end}
    expected = split({}, None, shifted)
    assert torch.equal(split(ranged, ranged, shifted), expected)
    assert not torch.equal(split({}, None, shifted + 1), expected), "one more shifted step changed nothing"


# -- AnimateDiff-Evolved + Advanced-ControlNet + SimDA --------------------------------------------------

def ade_acn(graph, images: torch.Tensor) -> torch.Tensor:
    g = graph()
    model, clip = g.checkpoint()
    context = g.add("ADE_StandardStaticContextOptions", context_length=2, context_overlap=0)
    model = [g.add("ADE_UseEvolvedSampling", model=g.shift(model), context_options=[context, 0]), 0]
    loader = g.add("ACN_ControlNetLoaderAdvanced", cnet=g.server.controlnet_name)
    apply = g.add(
        "ACN_AdvancedControlNetApply_v2", positive=g.text(clip, "a red panda walking"), negative=g.text(clip, "blurry"),
        control_net=[loader, 0], image=g.images(images), strength=1.0, start_percent=0.0, end_percent=1.0,
    )
    return g.run(g.ksampler(model, [apply, 0], [apply, 1]))


def test_animatediff_evolved_windows_with_advanced_controlnet_on_a_simda_model(graph):
    """ADE's static context windows of 2 (no overlap) over 4 frames, Advanced-ControlNet with one hint
    per frame: hints that differ only in the first window change that window and leave the second."""
    first = hints(FRAMES, seed=3)
    changed = first.clone()
    changed[:2] = hints(2, seed=4)
    a, b = ade_acn(graph, first), ade_acn(graph, changed)
    assert torch.equal(a[2:], b[2:]), f"the second window moved by {differ(a[2:], b[2:]):.3g}"
    assert differ(a[:2], b[:2]) > 1e-3, "the first window's hints changed nothing"
