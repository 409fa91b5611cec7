"""Training SimDA adapters on a frozen SD UNet (docs/METHOD.md §7): the denoising loss at
uniform DDPM timesteps, AdamW with gradient clipping, mixed precision chosen from the model's stored dtype
(``host.training.training_precision``).

Used by the One-Shot Tuner node (one clip, 300 steps) and by the collection trainer. The UNet is the
host's, called with the SimDA patches of a ModelPatcher clone; only adapter parameters train.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..host.training import training_precision
from ..host.unet_call import HostConditioning, denoising_target, host_conditioned_output, unet_output
from ..model.adapters import SimDAAdapters

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
    """Autocast in the precision ``host.training.training_precision`` picks from the model's stored
    dtype; False trains in the model's own dtypes."""


def initial_adapters(sites, seed: int = 0, device=None) -> SimDAAdapters:
    """Fresh fp32 adapters, initialised as the authors' (outputs zero until trained), drawn from
    ``seed`` on the CPU whatever the device (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapters = SimDAAdapters(sites, dtype=torch.float32, device="cpu")
    return adapters.to(device) if device is not None else adapters


class AdapterTrainer:
    """Optimises the adapters of a SimDA-patched ModelPatcher clone on clips of latents."""

    MAX_SKIPPED_IN_A_ROW = 10
    """Loss-scaler skips in a row after which training stops: the loss diverged, it did not overflow."""

    def __init__(
        self, model_patcher, adapters: SimDAAdapters, recipe: TuningRecipe, seed: int = 0,
        loss_scaling: str | None = None,
    ):
        """``loss_scaling``: the device type of a ``GradScaler`` to use whatever the precision (e.g.
        ``"cpu"``); by default the scaler runs where the precision asks for one (fp16 autocast)."""
        self.model_patcher = model_patcher
        self.adapters = adapters
        self.recipe = recipe
        self.parameters = [p for p in adapters.parameters()]
        for p in self.parameters:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=recipe.learning_rate, betas=recipe.betas, weight_decay=recipe.weight_decay,
            eps=recipe.eps,
        )
        self.device = model_patcher.load_device
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.precision = training_precision(model_patcher, recipe.mixed_precision)
        if loss_scaling is not None:
            self.scaler = torch.amp.GradScaler(loss_scaling, enabled=True)
        else:
            self.scaler = torch.amp.GradScaler(self.precision.device_type, enabled=self.precision.loss_scaling)
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
        with self.precision.autocast():
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
                    f"the loss scaler skipped {self.skipped_in_a_row} steps in a row (non-finite gradients down to "
                    f"loss scale {self.scaler.get_scale():g}, loss {float(loss.detach()):.4g}): the training diverged; "
                    "lower the learning rate or train without mixed precision."
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
