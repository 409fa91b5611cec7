"""Cancel, an error or out-of-memory halfway through a SimDA node leaves nothing behind, in-process
on the real host with MODELs from the host's own checkpoint loader: the shared UNet carries no
training weight wrappers, no replaced forwards and no loaded SimDA clone; the MODEL passed in is
unchanged; and the next plain and SimDA calls are bit-identical to ones made before.

The host's interrupt is raised as the user's Cancel raises it (``interrupt_current_processing``,
set once the Edit Tuner's training MODEL is loaded, or between two pieces of the upscaler) or, at a
chosen point inside a host layer, by a forward hook on that layer that raises the host's
``InterruptProcessingException`` (or torch's out-of-memory error), which is what the host's own
sampling loops and CUDA do at those points. The Edit Tuner's points are named by training step
and pass (forward, or the recomputation of a checkpointed layer in backward), which the test reads
from torch's optimizer-step and gradient hooks, and each case checks that the raise came there.
"""
from __future__ import annotations

import contextlib

import host  # noqa: F401  (first: puts the host on sys.path, imports the pack as simda_pack)

import comfy.model_management as mm
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from test_host_compat import host_loaded_model, random_adapters
from test_upscaler import smooth_frames, upscale, x4  # noqa: F401  (x4 is a fixture)

from simda_pack.nodes import nodes_upscale
from simda_pack.nodes.nodes_edit import SimDAEditTuner
from simda_pack.nodes.nodes_sampler import SimDAVideoSampler
from simda_pack.nodes.simda_model import simda_clone
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

Interrupt = mm.InterruptProcessingException


@pytest.fixture(autouse=True)
def no_pending_interrupt():
    mm.interrupt_current_processing(False)
    mm.unload_all_models()
    yield
    mm.interrupt_current_processing(False)
    mm.unload_all_models()


def ours_left_on(model) -> list[str]:
    """What of SimDA sits on the shared UNet of ``model``: weight wrappers, replaced forwards, and
    loaded MODELs that carry SimDA."""
    found = []
    for name, module in model.model.named_modules():
        for attribute in ("weight_function", "bias_function"):
            if getattr(module, attribute, None):
                found.append(f"{name}.{attribute}")
        forward = module.__dict__.get("forward")
        if forward is not None and getattr(forward, "__func__", None) is not type(module).forward:
            found.append(f"{name}.forward")
    found += ["a loaded SimDA MODEL" for loaded in mm.current_loaded_models
              if loaded.model is not None and "simda" in loaded.model.attachments]
    return found


def record(model) -> tuple:
    """What the MODEL passed in holds that a node could change."""
    options = model.model_options.get("transformer_options", {})
    return (dict(model.object_patches), set(model.attachments), {k: len(v) for k, v in model.wrappers.items()},
            {k: len(v) for k, v in model.callbacks.items()}, set(options.get("patches", {})),
            set(options.get("patches_replace", {})))


def calls(model, simda) -> tuple[torch.Tensor, torch.Tensor]:
    """One plain and one SimDA UNet call of 2 frames, as the host's sampler makes them."""
    g = torch.Generator().manual_seed(11)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    timesteps = torch.full((2,), 400.0)
    return host.unet_forward(model, x, timesteps, context), host.unet_forward(simda, x, timesteps, context)


@contextlib.contextmanager
def raising_in(layer: torch.nn.Module, when, error: BaseException | None):
    """``layer`` raises ``error`` in the forward call for which ``when()`` is true; yields the
    number of forward calls so far."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1
        if error is not None and when():
            raise error

    handle = layer.register_forward_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


def first_transformer_projection(model) -> torch.nn.Module:
    return next(m for name, m in model.model.diffusion_model.named_modules() if name.endswith(".proj_in"))


class TrainingSteps:
    """Where training is, seen from outside the trainer: ``finished`` counts the optimizer steps
    taken (torch's post-step hook, for every optimizer), and ``in_backward`` is true from the moment
    a step's backward pass starts (a gradient hook on the output of the UNet's last layer, which
    fires first in backward) until that step's update. A forward call of a host layer while
    ``in_backward`` is the recomputation of a checkpointed block during backward."""

    def __init__(self, model):
        self.last_layer = model.model.diffusion_model.out
        self.finished = 0
        self.in_backward = False

    def __enter__(self) -> "TrainingSteps":
        self.handles = [
            register_optimizer_step_post_hook(self.stepped),
            self.last_layer.register_forward_hook(self.watch_backward),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def stepped(self, optimizer, args, kwargs) -> None:
        self.finished += 1
        self.in_backward = False

    def watch_backward(self, module, args, output) -> None:
        if output.requires_grad:
            output.register_hook(self.backward_started)

    def backward_started(self, grad: torch.Tensor) -> None:
        self.in_backward = True

    def training(self) -> bool:
        return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def at(self, step: int, phase: str) -> bool:
        """In training step ``step`` (1-based), in its ``phase`` ("forward" or "backward")."""
        return self.training() and self.finished == step - 1 and self.in_backward == (phase == "backward")

    def where(self) -> str:
        if not self.training():
            return "inference"
        return f"step {self.finished + 1} {'backward' if self.in_backward else 'forward'}"


OOM = torch.OutOfMemoryError("CUDA out of memory (raised by the test)")
CASES = {
    # case: (where the host layer raises, the error)
    "cancel once the training model is loaded, before the first step": ("loaded", Interrupt()),
    "cancel in the forward pass of the first training step": ("step 1 forward", Interrupt()),
    "cancel in the second training step, after one update": ("step 2 forward", Interrupt()),
    "cancel in the backward pass (recomputed host layer)": ("step 1 backward", Interrupt()),
    "cancel during the inversion": ("inference", Interrupt()),
    "out of memory in the UNet": ("step 1 forward", OOM),
}


def passed_through_backward(raised: pytest.ExceptionInfo) -> bool:
    """Whether the exception came out of torch's ``Tensor.backward`` (autograd's engine)."""
    return any(entry.name == "backward" and "torch" in str(entry.path) for entry in raised.traceback)


def cancel_once_loaded_for_training(monkeypatch, steps: TrainingSteps) -> None:
    """The user's Cancel arrives as the host finishes loading a MODEL for training (grad on)."""
    load = mm.load_models_gpu

    def load_then_cancel(*args, **kwargs):
        loaded = load(*args, **kwargs)
        if steps.training():
            mm.interrupt_current_processing(True)
        return loaded

    monkeypatch.setattr(mm, "load_models_gpu", load_then_cancel)


@pytest.mark.parametrize("case", list(CASES))
def test_the_edit_tuner_leaves_nothing_behind(case, monkeypatch):
    """A host layer raises at the named point of a 2-step tuning with gradient checkpointing, or
    the user's Cancel arrives once the training MODEL is loaded; the test checks that the raise
    happened there (step count, inside or outside autograd's backward, inference) and that nothing
    stays behind."""
    model, clip, vae = host_loaded_model()
    simda = simda_clone(model, SimDAConfig(adapters=random_adapters(model, 3), latent_shift=LatentShiftSettings()))
    with torch.inference_mode():
        plain_before, simda_before = calls(model, simda)
        frames = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
        prompt = clip.encode_from_tokens_scheduled(clip.tokenize("a clip"))
    recorded = record(model)
    where, error = CASES[case]
    tune = dict(steps=2, learning_rate=1e-3, seed=0, frames=2, start_frame=0, stride=1, width=64, height=64,
                gradient_checkpointing=True, inversion_steps=2, inversion_scheduler="ddim_uniform", clip=clip)
    raised_at = []
    with TrainingSteps(model) as steps:
        def when() -> bool:
            if steps.where() == where:
                raised_at.append(where)
                return True
            return False

        if where == "loaded":
            cancel_once_loaded_for_training(monkeypatch, steps)
        with raising_in(first_transformer_projection(model), when, None if where == "loaded" else error) as count:
            with pytest.raises(type(error)) as raised, torch.inference_mode():
                SimDAEditTuner.execute(model, vae, frames, prompt, **tune)
        monkeypatch.undo()
    if where == "loaded":
        assert count[0] == 0 and steps.finished == 0, "a training step ran after the Cancel"
    else:
        assert raised_at == [where] and raised.value is error
        assert steps.finished == (int(where.split()[1]) - 1 if where.startswith("step") else 2)
    assert passed_through_backward(raised) == (where == "step 1 backward")
    assert ours_left_on(model) == []
    assert record(model) == recorded
    with torch.inference_mode():
        plain_after, simda_after = calls(model, simda)
    assert torch.equal(plain_after, plain_before) and torch.equal(simda_after, simda_before)


def test_the_video_sampler_leaves_nothing_behind_when_cancelled_mid_step():
    model, clip, _ = host_loaded_model()
    simda = simda_clone(model, SimDAConfig(adapters=random_adapters(model, 4), latent_shift=LatentShiftSettings()))
    with torch.inference_mode():
        plain_before, simda_before = calls(model, simda)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a clip"))
    recorded = record(simda)
    calls_so_far = [0]

    def third_call() -> bool:
        calls_so_far[0] += 1
        return calls_so_far[0] == 3

    with raising_in(first_transformer_projection(model), third_call, Interrupt()), pytest.raises(Interrupt):
        with torch.inference_mode():
            SimDAVideoSampler.execute(simda, cond, cond, 2, 64, 64, 0, 3, 5.0, "euler", "normal", 1.0, 0.0)
    assert ours_left_on(model) == []
    assert record(simda) == recorded
    with torch.inference_mode():
        plain_after, simda_after = calls(model, simda)
    assert torch.equal(plain_after, plain_before) and torch.equal(simda_after, simda_before)


def test_the_upscaler_leaves_nothing_behind_when_cancelled_between_tiles(x4, monkeypatch):  # noqa: F811
    """Nine one-step pieces (cfg 1: one UNet call each). The user's Cancel (the host's interrupt
    flag, as the server's Cancel sets it) arrives as the upscaler reports the second piece done, so
    the upscaler's own check before the third piece raises: two UNet calls, none of the third
    piece, the raise outside any UNet call. The next run upscales exactly as a run made before."""
    model, vae = x4
    frames = smooth_frames(1, 32, seed=6)
    settings = dict(steps=1, tile_size=16, tile_overlap=8)
    before = upscale(model, vae, frames, **settings)
    report_piece_done = nodes_upscale.PieceProgress.piece_done

    def cancel_after_the_second_piece(progress) -> None:
        report_piece_done(progress)
        if progress.done == 2 * progress.steps:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(nodes_upscale.PieceProgress, "piece_done", cancel_after_the_second_piece)
    with raising_in(first_transformer_projection(model), lambda: False, None) as count:
        with pytest.raises(Interrupt) as raised:
            upscale(model, vae, frames, **settings)
    assert count[0] == 2
    names = [entry.name for entry in raised.traceback]
    assert names[-2:] == ["upscale_latents", "throw_exception_if_processing_interrupted"], names
    monkeypatch.undo()
    assert ours_left_on(model) == []
    assert torch.equal(upscale(model, vae, frames, **settings), before)
