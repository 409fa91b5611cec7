"""Training SimDA adapters on a frozen SD UNet (SIMDA_SPEC.md section 5): the denoising loss at
uniform DDPM timesteps, AdamW with gradient clipping, fp16 mixed precision on CUDA.

Used by the Edit Tuner node (one clip, 300 steps) and by the collection trainer. The UNet is the
host's, called with the SimDA patches of a ModelPatcher clone; only adapter parameters train.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from .adapters import SimDAAdapters
from .model_info import call_options, is_dynamic

NUM_TIMESTEPS = 1000


@dataclass(frozen=True)
class TuningRecipe:
    """The authors' optimiser settings for one-shot editing; every number can be changed by the
    caller. How many steps to train is the caller's loop; gradient checkpointing is a property of
    the SimDA patches (``SimDAConfig.gradient_checkpointing``)."""

    learning_rate: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: bool = True
    """fp16 autocast with loss scaling where the UNet runs on CUDA; ignored on the CPU."""


def initial_adapters(sites, seed: int = 0, device=None) -> SimDAAdapters:
    """Fresh fp32 adapters, initialised as the authors' (outputs zero until trained), drawn from
    ``seed`` on the CPU whatever the device (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapters = SimDAAdapters(sites, dtype=torch.float32, device="cpu")
    return adapters.to(device) if device is not None else adapters


def _fresh(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: the layer's weight as a tensor autograd may save for backward. The host
    already hands a wrapped layer a per-call copy; an inference tensor is copied here otherwise."""
    return weight.clone() if weight.is_inference() else weight


_fresh.simda_patch = True


def training_patcher(model_patcher):
    """A clone of ``model_patcher`` to train adapters through, leaving the host's UNet as it is.

    - A MODEL whose weights the host streams (the newest host's Dynamic VRAM: ``is_dynamic()``) is
      trained through the host's non-dynamic delegate: streamed weights share reused buffers, and a
      tensor saved for backward could be overwritten by the next layer's cast.
    - The host loads weights as inference tensors, which backward cannot save. Every weight and bias
      of the host's layers gets a weight wrapper on this clone (the mechanism the host's own LoRA
      training uses), so each layer computes with a per-call copy; the shared UNet's parameter
      objects, their values and the host's pinned-memory bookkeeping are never touched.
    """
    patcher = model_patcher
    if is_dynamic(patcher):
        delegate = getattr(patcher, "get_non_dynamic_delegate", None)
        if delegate is None:
            raise RuntimeError(
                "SimDA: this ComfyUI streams the model's weights (Dynamic VRAM) but offers no non-dynamic copy to train "
                "through; start ComfyUI with --disable-dynamic-vram to tune SimDA adapters."
            )
        try:
            patcher = delegate()
        except RuntimeError as error:
            # The host's delegate is a fresh load through the loader's cached_patcher_init; a MODEL
            # from a loader that registered none cannot have one (model_patcher.py, 0.33 and 0.38).
            if "cached_patcher_init" not in str(error):
                raise
            raise RuntimeError(
                "SimDA: this MODEL streams its weights (Dynamic VRAM) and came from a loader that cannot reload it "
                "without streaming, which training needs; load the checkpoint with ComfyUI's own Load Checkpoint node, "
                "or start ComfyUI with --disable-dynamic-vram to tune SimDA adapters."
            ) from None
    patcher = patcher.clone()
    for name, module in patcher.model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for param in ("weight", "bias"):
            if getattr(module, param, None) is not None:
                patcher.add_weight_wrapper(f"{name}.{param}", _fresh)
    return patcher


def release_training_wrappers(model_patcher) -> None:
    """Take :func:`training_patcher`'s weight wrappers off the host's layers once training is done
    (the host leaves wrappers of a fully loaded model on its layers until the next load)."""
    for module in model_patcher.model.modules():
        for attribute in ("weight_function", "bias_function"):
            functions = getattr(module, attribute, None)
            if functions:
                setattr(module, attribute, [f for f in functions if f is not _fresh])


@contextlib.contextmanager
def loaded_for_training(training):
    """``training`` (from :func:`training_patcher`) loaded whole, with the memory headroom the host's
    own training node asks for (``load_models_gpu(..., memory_required=1e20, force_full_load=True)``:
    0.3.75 ``nodes_train.py`` l. 595, 0.33 l. 1226); afterwards, also after Cancel, an error or
    out-of-memory, its weight wrappers are off the host's layers and it is unloaded, so the shared
    UNet carries nothing of it."""
    import comfy.model_management as mm

    from .host_patch import unload

    try:
        mm.load_models_gpu([training], memory_required=1e20, force_full_load=True)
        yield training
    finally:
        release_training_wrappers(training)
        unload(training)


@contextlib.contextmanager
def host_training_mode():
    """The host's ``in_training`` flag on while adapters train (newest host; feature-detected)."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    saved = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = saved


def denoising_target(model_sampling, sigma: torch.Tensor, x_noisy: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The raw UNet output that would denoise ``x_noisy`` to ``x0`` exactly: the noise for an
    epsilon model, v for a v-prediction model. Found from the host's own ``calculate_denoised``,
    which is affine in the output: ``denoised = a * x + b * out``."""
    zeros = torch.zeros_like(x_noisy)
    a_x = model_sampling.calculate_denoised(sigma, zeros, x_noisy)
    b = model_sampling.calculate_denoised(sigma, torch.ones_like(x_noisy), zeros)
    return (x0 - a_x) / b


def unet_output(
    model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, groups: int,
    conds: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The host UNet's raw output for a noisy batch of ``groups`` clips (the patcher must be
    loaded/patched), through the host's own model call as sampling makes it: the MODEL's
    ``model_function_wrapper`` where one is set, then ``BaseModel.apply_model`` with its
    ``APPLY_MODEL`` wrappers (so what other packs register there applies while training too).

    ``conds``: the model's extra conditioning of the batch (``BaseModel.extra_conds`` processed to
    the batch size, e.g. the x4 upscaler's ``c_concat`` and ``y``, SDXL's ``y``), passed by name
    as the host passes them. The host returns the denoised estimate; the raw output is the one
    that denoises to it (:func:`denoising_target`)."""
    base = model_patcher.model
    cond_or_uncond = [0] * groups
    inputs = {
        "c_crossattn": context,
        "transformer_options": call_options(model_patcher, cond_or_uncond, training=torch.is_grad_enabled()),
        **(conds or {}),
    }
    wrapper = model_patcher.model_options.get("model_function_wrapper")
    if wrapper is not None:
        denoised = wrapper(base.apply_model, {"input": x_noisy, "timestep": sigma, "c": inputs, "cond_or_uncond": cond_or_uncond})
    else:
        denoised = base.apply_model(x_noisy, sigma, **inputs)
    return denoising_target(base.model_sampling, sigma, x_noisy, denoised)


class HostConditioning:
    """A CONDITIONING as the host's sampler uses it, for a training loss: every entry (with its
    strength, area, mask, timestep range, pooled output and the model's extra conditioning, e.g.
    SDXL's size vector) is run and the entries are combined by the host's own ``calc_cond_batch``,
    exactly as one cond of a sampling step."""

    def __init__(self, model_patcher, conditioning: list, x0: torch.Tensor, seed: int = 0):
        import comfy.sampler_helpers
        import comfy.samplers

        if not conditioning:
            raise ValueError("the conditioning is empty; connect a CLIP Text Encode output.")
        converted = comfy.sampler_helpers.convert_cond(conditioning)
        device = model_patcher.load_device
        self.conds = comfy.samplers.process_conds(
            model_patcher.model, x0, {"positive": converted}, device, latent_image=x0, seed=seed
        )["positive"]

    def denoised(self, model_patcher, x_noisy: torch.Tensor, sigma: torch.Tensor, training: bool) -> torch.Tensor:
        import comfy.samplers

        base = model_patcher.model
        options = dict(model_patcher.model_options)
        options["transformer_options"] = call_options(model_patcher, [0], training=training)
        previous = getattr(base, "current_patcher", None)
        base.current_patcher = model_patcher  # as the host's sampler sets it for the run
        try:
            return comfy.samplers.calc_cond_batch(base, [self.conds], x_noisy, sigma, options)[0]
        finally:
            base.current_patcher = previous


def host_conditioned_output(model_patcher, conditioning: HostConditioning, x_noisy: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The raw UNet output (noise or v) that the host's combined prediction for ``conditioning``
    amounts to: the output that would denoise ``x_noisy`` to that prediction."""
    denoised = conditioning.denoised(model_patcher, x_noisy, sigma, training=torch.is_grad_enabled())
    return denoising_target(model_patcher.model.model_sampling, sigma, x_noisy, denoised)


class AdapterTrainer:
    """Optimises the adapters of a SimDA-patched ModelPatcher clone on clips of latents."""

    MAX_SKIPPED_IN_A_ROW = 10
    """Loss-scaler skips in a row after which training stops: the loss diverged, it did not overflow."""

    def __init__(
        self, model_patcher, adapters: SimDAAdapters, recipe: TuningRecipe, seed: int = 0, loss_scaling: str | None = None
    ):
        """``loss_scaling``: the device type of a ``GradScaler`` to use whatever the precision (e.g.
        ``"cpu"``); by default the scaler runs with fp16 mixed precision on CUDA and is off otherwise."""
        self.model_patcher = model_patcher
        self.adapters = adapters
        self.recipe = recipe
        self.parameters = [p for p in adapters.parameters()]
        for p in self.parameters:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay, eps=recipe.eps
        )
        self.device = model_patcher.load_device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.use_amp = recipe.mixed_precision and torch.device(self.device).type == "cuda"
        if loss_scaling is not None:
            self.scaler = torch.amp.GradScaler(loss_scaling, enabled=True)
        else:
            self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.steps_done = 0
        self.skipped_steps = 0
        """Steps the loss scaler skipped (non-finite gradients: the adapters were left as they were)."""
        self.skipped_in_a_row = 0

    def loss(
        self,
        x0: torch.Tensor,
        context: "torch.Tensor | HostConditioning",
        clips: int,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        conds: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Denoising loss of ``clips`` clips: ``x0`` ``[clips * F, C, H, W]`` clean latents in the
        model's space, ``context`` ``[clips * F, tokens, dim]`` (or a whole CONDITIONING as
        :class:`HostConditioning`, combined as the host's sampling combines it), ``conds`` the model's extra
        conditioning per frame (see :func:`unet_output`). One timestep per clip.

        ``timesteps`` ``[clips]`` and ``noise`` (shaped like ``x0``) are drawn from the trainer's
        generator unless given; a caller that must reproduce a clip's draw wherever it is computed
        (data-parallel training) passes its own."""
        sampling = self.model_patcher.model.model_sampling
        frames = x0.shape[0] // clips
        if timesteps is None:
            timesteps = torch.randint(0, NUM_TIMESTEPS, (clips,), generator=self.generator)
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.generator)
        sigma = sampling.sigmas.cpu()[timesteps.cpu()].repeat_interleave(frames).to(self.device)
        noise = noise.to(self.device)
        x0 = x0.to(self.device)
        x_noisy = sampling.noise_scaling(sigma, noise, x0)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
            if isinstance(context, HostConditioning):
                out = host_conditioned_output(self.model_patcher, context, x_noisy, sigma)
            else:
                out = unet_output(self.model_patcher, x_noisy, sigma, context.to(self.device), clips, conds)
        target = denoising_target(sampling, sigma, x_noisy, x0)
        return torch.nn.functional.mse_loss(out.float(), target.float())

    def step(self, x0: torch.Tensor, context: "torch.Tensor | HostConditioning", clips: int = 1) -> float:
        loss = self.loss(x0, context, clips)
        self.backward_and_update(loss)
        return float(loss.detach())

    def backward_and_update(
        self, loss: torch.Tensor, reduce_gradients: Callable[[list[torch.nn.Parameter]], None] | None = None
    ) -> bool:
        """Backward, then (optionally) ``reduce_gradients(parameters)`` on the still-scaled gradients,
        e.g. averaging them across data-parallel processes, then unscale, clip and step.

        Returns whether the adapters were updated. With loss scaling, non-finite gradients make the
        scaler skip the step and lower its scale: the step is counted in ``skipped_steps`` and
        training goes on, unless it is the ``MAX_SKIPPED_IN_A_ROW``-th skip in a row. Without loss
        scaling non-finite gradients stop training at once. Both stops raise ``FloatingPointError``
        before the adapters change (the same in every process: the gradients are reduced first)."""
        self.scaler.scale(loss).backward()
        if reduce_gradients is not None:
            reduce_gradients(self.parameters)
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.recipe.max_grad_norm)
        if not self.scaler.is_enabled() and not bool(torch.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(
                f"the gradients became non-finite (loss {float(loss.detach()):.4g}) without loss scaling, so training "
                "stopped before the adapters changed; lower the learning rate."
            )
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            if self.skipped_in_a_row >= self.MAX_SKIPPED_IN_A_ROW:
                raise FloatingPointError(
                    f"the loss scaler skipped {self.skipped_in_a_row} steps in a row (non-finite gradients down to loss "
                    f"scale {self.scaler.get_scale():g}, loss {float(loss.detach()):.4g}): the training diverged; lower the "
                    "learning rate or train without mixed precision."
                )
            return False
        self.skipped_in_a_row = 0
        return True

    def state_dict(self) -> dict:
        """Optimizer, loss scaler, step count and noise generator, for resuming (adapters apart)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "steps_done": self.steps_done,
            "skipped_steps": self.skipped_steps,
            "skipped_in_a_row": self.skipped_in_a_row,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.steps_done = int(state["steps_done"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        self.generator.set_state(state["generator"])
