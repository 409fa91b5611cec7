"""DDIM inversion (docs/METHOD.md §8) against an independent implementation of the VP
formula that Tune-A-Video and SimDA use, and samplers for inverted starts.

The reference below works in the VP parametrisation (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps): each
step predicts the noise from the current latent at the NEXT timestep, then moves the clean
estimate to the next level. ``ddim_invert`` works in the host's parametrisation
(x = x_vp / sqrt(a), sigma = sqrt((1 - a) / a)), where the model scales its input itself.

Both start from sigma 0 (a = 1). Tune-A-Video starts at the alpha-bar of timestep 0 (0.99915 on the
SD schedule, 0.085% below 1); on the Gaussian data below that moves the inverted latent by 0.93% of
its spread (max abs), so the comparison is made from the same start.

- Gaussian data N(mu, std^2) have a closed-form noise predictor, E[eps | x_t], and a closed-form
  probability-flow map; the unit tests use it in float64 (agreement to 1e-4 asked, ~1e-12 seen).
- On the host's model path: the host's CFGGuider with our inversion KSAMPLER (``invert_clip``) on a
  tiny host UNet, against the reference calling that UNet directly with VP inputs (float64).
- On a SimDA MODEL (latent shift, seeded random adapters), where inverting and sampling back does
  not return the clip exactly and no bound on the error follows without a Lipschitz constant: each
  inversion step against one step of the host's own DDIM sampler, by the identity that holds for
  any model (the round trip's error is the sigma step times the difference of two noise predictions).
- The record of how noise was inverted, and the Video Sampler's check of it: steps, scheduler,
  sampler, and the SimDA state of the MODEL that inverted.
"""
from __future__ import annotations

import host  # noqa: F401  (first: puts the host on sys.path, imports the pack as simda_pack)

import comfy.model_sampling
import comfy.samplers
import pytest
import torch

from simda_pack.nodes.inverted_noise import check_start_latent
from simda_pack.nodes.nodes_invert import invert_clip
from simda_pack.nodes.simda_model import simda_clone
from simda_pack.simda_core.host.register import get_config, model_sites
from simda_pack.simda_core.host.samplers import (
    KNOWN_NOISE_FREE, adds_fresh_noise, host_sampler_inversion, probe_adds_fresh_noise,
)
from simda_pack.simda_core.model.adapters import SimDAAdapters
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig
from simda_pack.simda_core.video.inversion import (
    INVERSION_KEY, SimDAState, ddim_invert, inversion_record, simda_state, vp_input_scale,
)

STEPS = 50
MU, STD = 0.4, 0.6
ONE_LEVEL_UNET = dict(
    host.TINY_UNET, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1, 0], transformer_depth_output=[1, 1],
)


class SDSampling(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS):
    """The host's SD1.x model sampling (discrete DDPM schedule, epsilon prediction)."""


@pytest.fixture(scope="module")
def sampling():
    return SDSampling()


def ascending_levels(sampling, steps: int = STEPS, scheduler: str = "ddim_uniform") -> torch.Tensor:
    sigmas = comfy.samplers.calculate_sigmas(sampling, scheduler, steps).double()
    return torch.flip(sigmas, [0])  # [0, s_1, ..., s_max]


def gaussian_eps(x_vp: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """E[eps | x_t] for data N(MU, STD^2): x_t ~ N(sqrt(a) MU, a STD^2 + 1 - a)."""
    return (1 - alpha).sqrt() * (x_vp - alpha.sqrt() * MU) / (alpha * STD**2 + 1 - alpha)


def gaussian_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The same predictor as a host eps model: input scaled by 1/sqrt(1 + sigma^2), denoised = x - sigma eps."""
    alpha = 1 / (1 + sigma**2)
    return x - sigma * gaussian_eps(x * alpha.sqrt(), alpha)


def reference_inversion(eps_model, x0_vp: torch.Tensor, alphas: list[torch.Tensor], alpha_start=1.0):
    """Tune-A-Video's loop in VP terms: ``eps_model(x_vp, index)`` is asked about the CURRENT latent
    at the NEXT timestep (``alphas[index]``). Returns the final latent, the latent after each step and
    each step's clean estimate."""
    x, alpha_prev = x0_vp, torch.as_tensor(alpha_start, dtype=x0_vp.dtype)
    latents, clean = [], []
    for index, alpha in enumerate(alphas):
        eps = eps_model(x, index)
        x0_pred = (x - (1 - alpha_prev).sqrt() * eps) / alpha_prev.sqrt()
        x = alpha.sqrt() * x0_pred + (1 - alpha).sqrt() * eps
        alpha_prev = alpha
        latents.append(x)
        clean.append(x0_pred)
    return x, latents, clean


def gaussian_data(shape=(3, 4, 8, 8), seed=0) -> torch.Tensor:
    return MU + STD * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_inversion_matches_the_vp_formula_on_gaussian_data(sampling):
    levels = ascending_levels(sampling)
    alphas = [1 / (1 + s**2) for s in levels[1:]]
    x0 = gaussian_data()
    expected, _, _ = reference_inversion(lambda x, i: gaussian_eps(x, alphas[i]), x0, alphas)
    ours = ddim_invert(gaussian_denoise, x0, levels) * alphas[-1].sqrt()  # host -> VP
    error = float((ours - expected).abs().max() / expected.std())
    assert error < 1e-4, error


def test_inversion_follows_the_probability_flow_of_gaussian_data(sampling):
    """The exact probability-flow ODE keeps each value's z-score: x_T = sqrt(a) MU + sqrt(a STD^2 + 1 - a) z.
    The inversion is a first-order scheme (the noise is taken at the next level from the current latent):
    measured 7.1% / 4.1% / 2.4% of the spread (max abs) at 50 / 100 / 200 steps, and it must keep
    converging. A latent handed to the UNet at the next level's scale lands 48% away at 50 steps."""
    errors = {}
    for steps in (50, 200):
        levels = ascending_levels(sampling, steps)
        alpha_max = 1 / (1 + levels[-1] ** 2)
        x0 = gaussian_data()
        z = (x0 - MU) / STD
        exact = alpha_max.sqrt() * MU + (alpha_max * STD**2 + 1 - alpha_max).sqrt() * z
        ours = ddim_invert(gaussian_denoise, x0, levels) * alpha_max.sqrt()
        errors[steps] = float((ours - exact).abs().max() / exact.std())
    assert errors[50] < 0.1 and errors[200] < 0.5 * errors[50], errors


def test_callback_reports_the_level_reached_and_the_clean_estimate(sampling):
    levels = ascending_levels(sampling, steps=10)
    alphas = [1 / (1 + s**2) for s in levels[1:]]
    x0 = gaussian_data(seed=1)
    _, latents, clean = reference_inversion(lambda x, i: gaussian_eps(x, alphas[i]), x0, alphas)
    reports = []
    inversion = host_sampler_inversion()

    def model(x, sigma, **extra):  # a host model's call signature: denoised = model(x, sigma * s_in, **extra_args)
        return gaussian_denoise(x, sigma.reshape(-1, 1, 1, 1))

    result = inversion.sampler_function(model, x0.clone(), levels, extra_args={}, callback=reports.append)
    assert [r["i"] for r in reports] == list(range(10))
    for r, sigma, alpha, latent, estimate in zip(reports, levels[1:], alphas, latents, clean):
        assert float(r["sigma"]) == pytest.approx(float(sigma), rel=1e-12)
        assert torch.allclose(r["x"] * alpha.sqrt(), latent, rtol=0, atol=1e-10)
        assert torch.allclose(r["denoised"], estimate, rtol=0, atol=1e-10)
    # The first step starts from the clean latents: its clean estimate is the data itself.
    assert torch.allclose(reports[0]["denoised"], x0, atol=1e-12)
    assert torch.equal(result, reports[-1]["x"])


@pytest.fixture(scope="module")
def tiny():
    """In float64, so that the host path and the reference agree to their arithmetic (float32 leaves 6e-4)."""
    return host.build_model(host.TINY_UNET, seed=5, dtype=torch.float64)


def test_host_guider_path_matches_the_reference_on_a_host_unet(tiny):
    """``invert_clip`` (the host's CFGGuider, cfg 1, our KSAMPLER, process_latent_in/out) against the
    reference calling the host UNet directly on VP latents at the next timestep."""
    steps, frames = 8, 2
    generator = torch.Generator().manual_seed(2)
    latent = torch.randn(frames, 4, 8, 8, generator=generator, dtype=torch.float64)  # VAE space
    context = torch.randn(1, 6, host.TINY_UNET["context_dim"], generator=generator, dtype=torch.float64)
    sampling = tiny.get_model_object("model_sampling")
    levels = torch.flip(comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", steps), [0])
    timesteps = [sampling.timestep(s) for s in levels[1:]]
    alphas = [1 / (1 + s.double() ** 2) for s in levels[1:]]
    assert [round(float(t)) for t in timesteps] == list(range(1, 1000, 1000 // steps))[:steps]

    with torch.no_grad():
        inverted = invert_clip(tiny, latent, [[context, {}]], steps, "ddim_uniform")

        def unet_eps(x_vp, index):
            with host.patched(tiny) as model:
                t = timesteps[index].expand(frames).double()
                return model.diffusion_model(x_vp, t, context=context.expand(frames, -1, -1))

        x0 = tiny.model.process_latent_in(latent).double()
        expected_vp, _, _ = reference_inversion(unet_eps, x0, alphas)
        expected = tiny.model.process_latent_out(expected_vp / alphas[-1].sqrt())
    # Measured 8e-7 (the host keeps its schedule in float32); the UNet at the next level's scale: 1.9.
    error = float((inverted.double() - expected).abs().max() / expected.std())
    assert error < 1e-5, error


# -- a SimDA MODEL: each step against the host's DDIM step --------------------------------------

def random_adapters(model, seed: int) -> SimDAAdapters:
    """Adapters for ``model``'s UNet with every weight seeded and non-zero (``0.02 * randn``)."""
    adapters = SimDAAdapters(model_sites(model))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapters.parameters():
            parameter.copy_(0.02 * torch.randn(parameter.shape, generator=generator))
    return adapters.requires_grad_(False)


def host_ddim_step(model, x: torch.Tensor, sigma_from, sigma_to, conditioning) -> torch.Tensor:
    """One step of the host's own DDIM sampler (KSampler's "ddim", cfg 1) from ``x`` at ``sigma_from`` to
    ``sigma_to``, in the model's latent space (after ``process_latent_in``)."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    latent = model.model.process_latent_out(x)
    sigmas = torch.stack([torch.as_tensor(sigma_from), torch.as_tensor(sigma_to)]).float()
    out = guider.sample(torch.zeros_like(latent), latent, comfy.samplers.sampler_object("ddim"), sigmas,
                        disable_pbar=True, seed=0)
    return model.model.process_latent_in(out)


def test_each_inversion_step_is_the_host_ddim_step_walked_back():
    """On a SimDA MODEL (the host's UNet with seeded random weights, latent shift, random adapters):
    step k of the inversion moves x_k at sigma s to x_k+1 at s'. One step of the host's DDIM sampler
    back from x_k+1 to s lands at x_k + (s' - s) (eps_inv - eps_fwd), where eps_inv is the noise the
    host's model predicts told s' for the latent the inversion handed it (x_k rescaled to s') and
    eps_fwd the one it predicts for x_k+1 at s' (each read from one host DDIM step from that latent).
    The identity holds for any model; here it is checked for every step, and the round trip itself is
    far from exact, so the identity is what is tested, not a vanishing error."""
    base = host.build_model(ONE_LEVEL_UNET, seed=7)
    model = simda_clone(base, SimDAConfig(adapters=random_adapters(base, 8), latent_shift=LatentShiftSettings()))
    steps, frames = 4, 3
    generator = torch.Generator().manual_seed(9)
    latent = torch.randn(frames, 4, 8, 8, generator=generator)
    conditioning = [[torch.randn(1, 6, host.TINY_UNET["context_dim"], generator=generator), {}]]
    reached = []
    with torch.no_grad():
        inverted = invert_clip(model, latent, conditioning, steps, "ddim_uniform",
                               callback=lambda step, clean, x, total: reached.append(x.clone()))
        sampling = model.get_model_object("model_sampling")
        levels = torch.flip(comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", steps), [0])
        x = [model.model.process_latent_in(latent)] + reached
        assert len(reached) == steps
        assert torch.allclose(model.model.process_latent_out(reached[-1]), inverted, rtol=1e-6, atol=1e-6)
        for k in range(steps):
            sigma, following = levels[k], levels[k + 1]
            handed = x[k] * (vp_input_scale(sigma) / vp_input_scale(following))
            back = host_ddim_step(model, x[k + 1], following, sigma, conditioning)
            eps_forward = (back - x[k + 1]) / (sigma - following)
            eps_inverse = (host_ddim_step(model, handed, following, sigma, conditioning) - handed) / (sigma - following)
            round_trip = back - x[k]
            expected = (following - sigma) * (eps_inverse - eps_forward)
            error = float((round_trip - expected).abs().max() / expected.abs().max())
            # Measured 0.7e-6 to 4.4e-6 (float32); the round trip misses x_k by 0.11 to 6.6 times x_k's spread.
            assert error < 1e-4, (k, error)
            assert float(round_trip.abs().max()) > 100 * error * float(expected.abs().max()), k


# -- the record of an inversion and the Video Sampler's check -----------------------------------

def test_inversion_record_names_its_sampler_and_the_simda_state():
    state = SimDAState(latent_shift=LatentShiftSettings())
    assert inversion_record(50, "ddim_uniform", state) == {
        "steps": 50, "scheduler": "ddim_uniform", "sampler": "ddim", "simda": state,
    }


@pytest.fixture(scope="module")
def plain():
    """A plain MODEL (no SimDA): the state of the inverted starts below."""
    return host.build_model(ONE_LEVEL_UNET, seed=6)


def simda_models(plain) -> dict:
    """MODELs in different SimDA states over one UNet."""
    adapters = random_adapters(plain, 1)
    same_weights = random_adapters(plain, 1)  # another object with the same weights (a reload)
    other_weights = random_adapters(plain, 2)
    shift = LatentShiftSettings()
    return {
        "plain": plain,
        "shift": simda_clone(plain, SimDAConfig(latent_shift=shift)),
        "shift on half the schedule": simda_clone(plain, SimDAConfig(latent_shift=LatentShiftSettings(
            levels=frozenset({0}))),
        ),
        "adapters": simda_clone(plain, SimDAConfig(adapters=adapters, latent_shift=shift)),
        "adapters reloaded": simda_clone(plain, SimDAConfig(adapters=same_weights, latent_shift=shift)),
        "adapters at 0.5": simda_clone(plain, SimDAConfig(adapters=adapters, latent_shift=shift, strength=0.5)),
        "adapters at 0": simda_clone(plain, SimDAConfig(adapters=adapters, latent_shift=shift, strength=0.0)),
        "other adapters": simda_clone(plain, SimDAConfig(adapters=other_weights, latent_shift=shift)),
        "looped": simda_clone(plain, SimDAConfig(adapters=adapters, latent_shift=shift, loop=True)),
    }


@pytest.mark.parametrize("inverted_with, sampled_with, words", [
    ("adapters", "plain", ("no latent shift", "no adapters")),
    ("plain", "shift", ("inverted by a MODEL with no latent shift", "sampling it has latent shift")),
    ("shift", "shift on half the schedule", ("latent shift (levels None", "latent shift (levels frozenset({0})")),
    ("adapters", "adapters at 0.5", ("adapter strength 1, ", "adapter strength 0.5")),
    ("adapters", "other adapters", ("inverted by a MODEL with adapters ",)),
    ("adapters", "looped", ("loop off", "loop on")),
    ("adapters at 0.5", "shift", ("no adapters", "frame group norm off")),
])
def test_the_video_sampler_refuses_noise_inverted_in_another_simda_state(plain, inverted_with, sampled_with, words):
    models = simda_models(plain)
    start = inverted_start(simda_state(get_config(models[inverted_with])))
    with pytest.raises(ValueError) as error:
        check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name="ddim", model=models[sampled_with])
    message = str(error.value)
    assert message.startswith("SimDA Video Sampler: start_latent was inverted by a MODEL with "), message
    assert all(word in message for word in words), message
    assert "connect the MODEL that goes into the Video Sampler to SimDA Invert" in message and "\n" not in message


@pytest.mark.parametrize("inverted_with, sampled_with", [
    ("adapters", "adapters"), ("adapters", "adapters reloaded"), ("plain", "plain"), ("shift", "shift"),
    ("adapters at 0", "shift"),  # strength 0: the adapters (and their frame GroupNorm) are off
])
def test_the_video_sampler_takes_noise_inverted_in_the_same_state(plain, inverted_with, sampled_with):
    models = simda_models(plain)
    start = inverted_start(simda_state(get_config(models[inverted_with])))
    model = models[sampled_with].clone()  # (a clone, as the Video Sampler's context windows make one)
    samples = check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name="ddim", model=model)
    assert samples is start["samples"]


# -- samplers for inverted starts -----------------------------------------------------------------

def sample_twice(
    model, sampler_name: str, start: torch.Tensor, context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The host's sampler ``sampler_name`` from ``start`` with zero noise (as the Video Sampler samples
    an inverted start), run with two different seeds."""
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "ddim_uniform", 4)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds([[context, {}]], [[context, {}]])
        guider.set_cfg(1.0)
        results.append(guider.sample(torch.zeros_like(start), start, comfy.samplers.sampler_object(sampler_name),
                                     sigmas, disable_pbar=True, seed=seed))
    return results[0], results[1]


def test_noise_free_samplers_are_exactly_the_host_samplers_that_ignore_the_seed():
    """Every sampler of the host runs twice from the same start with zero noise and different seeds:
    those that add no fresh noise give the same latents, the others do not. The pack's answer for
    each (known or probed) and its probe alone, as for a sampler a later host adds, both agree.
    (A one-level UNet: the adaptive DPM solver takes hundreds of calls; about a minute in all.)"""
    model = host.build_model(ONE_LEVEL_UNET, seed=6)
    generator = torch.Generator().manual_seed(3)
    start = 3 * torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 6, host.TINY_UNET["context_dim"], generator=generator)
    seed_free = set()
    with torch.no_grad():
        for name in comfy.samplers.SAMPLER_NAMES:
            first, second = sample_twice(model, name, start, context)
            assert torch.isfinite(first).all(), name
            if torch.equal(first, second):
                seed_free.add(name)
    assert seed_free == {name for name in comfy.samplers.SAMPLER_NAMES if not adds_fresh_noise(name)}
    assert seed_free == {name for name in comfy.samplers.SAMPLER_NAMES if not probe_adds_fresh_noise(name)}
    assert set(KNOWN_NOISE_FREE) <= seed_free


def inverted_start(state: SimDAState = SimDAState(), steps=50, scheduler="ddim_uniform"):
    """Inverted noise of 4 frames of 64x64 as a MODEL in ``state`` (default: a plain MODEL) made it."""
    return {"samples": torch.zeros(4, 4, 8, 8), INVERSION_KEY: inversion_record(steps, scheduler, state)}


@pytest.mark.parametrize(
    "sampler_name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_sde", "lcm", "ddpm", "er_sde", "sa_solver"]
)
def test_video_sampler_refuses_a_noise_adding_sampler_for_an_inverted_start(plain, sampler_name):
    with pytest.raises(ValueError) as e:
        check_start_latent(inverted_start(), 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name=sampler_name, model=plain)
    message = str(e.value)
    assert f"'{sampler_name}' adds fresh noise" in message and "\n" not in message and message.endswith(".")
    assert all(name in message for name in ("ddim", "euler", "dpmpp_2m", "uni_pc"))


@pytest.mark.parametrize("sampler_name", KNOWN_NOISE_FREE)
def test_video_sampler_accepts_a_noise_free_sampler_for_an_inverted_start(plain, sampler_name):
    start = inverted_start()
    samples = check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name=sampler_name, model=plain)
    assert samples is start["samples"]


def test_video_sampler_refuses_an_unreadable_inversion_record(plain):
    start = {"samples": torch.zeros(4, 4, 8, 8), INVERSION_KEY: {"steps": 50}}
    with pytest.raises(ValueError, match="unreadable inversion settings"):
        check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name="ddim", model=plain)


def test_a_sampler_the_pack_does_not_know_is_probed_once(plain, monkeypatch):
    """With no remembered answers (as for samplers a later host adds), the Video Sampler's check
    probes the chosen sampler once and caches the answer: euler walks an inversion back, euler
    ancestral is refused."""
    from simda_pack.simda_core.host import samplers

    monkeypatch.setattr(samplers, "KNOWN_NOISE_FREE", ())
    monkeypatch.setattr(samplers, "KNOWN_NOISE_ADDING", ())
    probe_adds_fresh_noise.cache_clear()
    try:
        start = inverted_start()
        for _ in range(2):
            samples = check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name="euler", model=plain)
            assert samples is start["samples"]
        assert probe_adds_fresh_noise.cache_info().misses == 1
        with pytest.raises(ValueError, match="'euler_ancestral' adds fresh noise"):
            check_start_latent(start, 4, 8, 8, 50, "ddim_uniform", 1.0, sampler_name="euler_ancestral", model=plain)
    finally:
        probe_adds_fresh_noise.cache_clear()
