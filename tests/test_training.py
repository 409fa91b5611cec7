"""Adapter training on the real host UNet: every adapter gets its gradient, with or without
gradient checkpointing (the authors' code skips the down/up temporal adapters when it is on)."""
from __future__ import annotations

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)

import pytest
import torch

from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

from simda_pack.simda_core.host.register import apply_simda, model_sites
from simda_pack.simda_core.host.training import training_patcher
from simda_pack.simda_core.training.trainer import AdapterTrainer, TuningRecipe, initial_adapters

FRAMES = 4


def clip_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(FRAMES, 4, 8, 8, generator=generator)
    context = torch.randn(1, 8, host.TINY_UNET["context_dim"], generator=generator).repeat(FRAMES, 1, 1)
    return x0, context


def trainer_for(base, adapters, checkpointing: bool, lr: float = 1e-3) -> tuple[AdapterTrainer, object]:
    clone = training_patcher(base)
    apply_simda(
        clone, SimDAConfig(adapters=adapters, latent_shift=LatentShiftSettings(), gradient_checkpointing=checkpointing)
    )
    recipe = TuningRecipe(learning_rate=lr, mixed_precision=False)
    return AdapterTrainer(clone, adapters, recipe, seed=3), clone


@pytest.fixture(scope="module")
def base():
    return host.build_model(host.TINY_UNET, seed=11)


def random_adapters(base, seed: int):
    adapters = initial_adapters(model_sites(base), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return adapters


def gradients(base, adapters, checkpointing: bool) -> dict[str, torch.Tensor]:
    trainer, clone = trainer_for(base, adapters, checkpointing)
    x0, context = clip_batch()
    with host.patched(clone):
        loss = trainer.loss(x0, context, clips=1)
        loss.backward()
    grads = {name: p.grad.clone() for name, p in adapters.named_parameters()}
    adapters.zero_grad(set_to_none=True)
    return grads


def test_gradient_checkpointing_gives_the_same_gradients(base):
    adapters = random_adapters(base, seed=5)
    plain = gradients(base, adapters, checkpointing=False)
    checkpointed = gradients(base, adapters, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7), name
    assert sum(float(g.abs().sum()) for g in plain.values()) > 0


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_every_adapter_trains(base, checkpointing):
    adapters = initial_adapters(model_sites(base), seed=1)
    output_layers = [name for name, _ in adapters.named_parameters() if ".fc2." in name or ".up." in name]
    assert len(output_layers) == 2 * 3 * 16  # (weight, bias) x (attn, ffn, temporal) x 16 sites
    trainer, clone = trainer_for(base, adapters, checkpointing)
    x0, context = clip_batch()
    touched: set[str] = set()
    with host.patched(clone):
        for step in range(3):
            loss = trainer.loss(x0, context, clips=1)
            trainer.scaler.scale(loss).backward()
            grads = {name: p.grad for name, p in adapters.named_parameters()}
            if step == 0:
                silent = [n for n in output_layers if grads[n] is None or not bool(grads[n].abs().sum() > 0)]
                assert not silent, f"zero-initialised output layers without gradient on step 1: {silent[:5]}"
            touched |= {n for n, g in grads.items() if g is not None and bool(g.abs().sum() > 0)}
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
    untouched = sorted(set(dict(adapters.named_parameters())) - touched)
    assert not untouched, f"adapter parameters that never got a gradient: {untouched[:5]}"


def test_tuning_loss_combines_every_conditioning_entry_as_the_host_does(base):
    """The Edit Tuner's loss sees the whole source CONDITIONING: each entry is run and the
    entries are combined by their strengths (the host's calc_cond_batch), and one entry gives what
    a direct UNet call with its tensor gives."""
    from simda_pack.simda_core.host.unet_call import HostConditioning, host_conditioned_output, unet_output

    adapters = initial_adapters(model_sites(base), seed=5)
    host.randomize_(adapters, 5)
    clone = training_patcher(base)
    apply_simda(clone, SimDAConfig(adapters=adapters.requires_grad_(False), latent_shift=LatentShiftSettings()))
    x0, context = clip_batch(seed=6)
    g = torch.Generator().manual_seed(7)
    other = torch.randn(1, 8, host.TINY_UNET["context_dim"], generator=g)
    first = [[context[:1], {}]]
    second = [[other, {"strength": 0.5}]]
    sampling = clone.model.model_sampling
    sigma = sampling.sigmas[torch.full((FRAMES,), 400)]
    x_noisy = sampling.noise_scaling(sigma, torch.randn(x0.shape, generator=g), x0)
    with host.patched(clone), torch.no_grad():
        out_first = host_conditioned_output(clone, HostConditioning(clone, first, x0), x_noisy, sigma)
        out_second = host_conditioned_output(clone, HostConditioning(clone, second, x0), x_noisy, sigma)
        both = host_conditioned_output(clone, HostConditioning(clone, first + second, x0), x_noisy, sigma)
        direct = unet_output(clone, x_noisy, sigma, context, 1)
    torch.testing.assert_close(out_first, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both, (out_first + 0.5 * out_second) / 1.5, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(both, out_first, atol=1e-3)


def test_a_training_step_goes_through_the_hosts_model_call_and_other_packs_wrappers(base):
    """Collection training's forward (a context tensor per frame) is the host's own model call:
    an ``APPLY_MODEL`` wrapper and a ``model_function_wrapper`` that another pack put on the MODEL
    both run on every training step, and the loss is what it is without them."""
    import comfy.patcher_extension

    seen = {"apply_model": 0, "model_function_wrapper": 0}

    def apply_model_wrapper(executor, *args, **kwargs):
        seen["apply_model"] += 1
        return executor(*args, **kwargs)

    def model_function_wrapper(apply_model, call):
        seen["model_function_wrapper"] += 1
        return apply_model(call["input"], call["timestep"], **call["c"])

    x0, context = clip_batch(seed=8)
    losses = []
    for wrapped in (False, True):
        adapters = random_adapters(base, 9)
        trainer, clone = trainer_for(base, adapters, checkpointing=False)
        if wrapped:
            clone.add_wrapper_with_key(
                comfy.patcher_extension.WrappersMP.APPLY_MODEL, "other_pack", apply_model_wrapper
            )
            clone.set_model_unet_function_wrapper(model_function_wrapper)
        with host.patched(clone), torch.inference_mode(False), torch.enable_grad():
            losses.append(trainer.step(x0, context))
    assert seen == {"apply_model": 1, "model_function_wrapper": 1}
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
