"""The host's samplers as SimDA uses them: which add fresh noise at every step (and so undo an
inverted start), and the DDIM inversion run as a host sampler.

No host API says which samplers add noise. The samplers of ComfyUI 0.3.75 were read and run once (the two lists below);
a sampler the pack does not know, one a newer host added, is probed once per process: it samples
a toy model twice from the same start with zero noise and two different seeds (and two states of
torch's global generator), and adds noise exactly when the two results differ.
"""
from __future__ import annotations

import functools

import torch

from ..video.inversion import ddim_invert, vp_input_scale

KNOWN_NOISE_FREE = (
    "ddim", "euler", "euler_cfg_pp", "heun", "heunpp2", "dpm_2", "lms", "dpm_fast", "dpm_adaptive",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp",
    "gradient_estimation", "gradient_estimation_cfg_pp", "uni_pc", "uni_pc_bh2",
)
"""ComfyUI 0.3.75's samplers that add no noise with their default settings."""

KNOWN_NOISE_ADDING = (
    "euler_ancestral", "euler_ancestral_cfg_pp", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp",
    "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece",
)
"""ComfyUI 0.3.75's samplers that add fresh noise at every step."""

TOY_UNET = dict(
    model_channels=32, channel_mult=[1], num_res_blocks=[1], transformer_depth=[1, 0], transformer_depth_middle=1,
    transformer_depth_output=[1, 1], context_dim=32, num_heads=8, use_linear_in_transformer=False, in_channels=4,
    out_channels=4, use_spatial_transformer=True, legacy=False, adm_in_channels=None, use_temporal_attention=False,
    use_temporal_resblock=False, image_size=32,
)
"""A one-level SD1.x UNet: every sampler runs on it in well under a second (the adaptive DPM solver
takes the most calls)."""


def adds_fresh_noise(sampler_name: str) -> bool:
    """Whether the host's sampler ``sampler_name`` adds fresh noise (known, else probed once)."""
    if sampler_name in KNOWN_NOISE_FREE:
        return False
    if sampler_name in KNOWN_NOISE_ADDING:
        return True
    return probe_adds_fresh_noise(sampler_name)


def noise_free_samplers(sampler_names) -> list[str]:
    """The names among ``sampler_names`` (the host's) that add no fresh noise, in the host's order."""
    return [name for name in sampler_names if not adds_fresh_noise(name)]


@functools.cache
def probe_adds_fresh_noise(sampler_name: str) -> bool:
    """Run the host's sampler ``sampler_name`` twice on the toy model from one start, with zero
    noise and different seeds: does the result change?"""
    import comfy.samplers

    model, sigmas, start, context = _toy_setup()
    results = []
    with torch.inference_mode():
        for seed in (1, 2):
            fork = torch.random.fork_rng(devices=[])
            with fork:
                torch.manual_seed(seed)
                guider = comfy.samplers.CFGGuider(model)
                guider.set_conds([[context, {}]], [[context, {}]])
                guider.set_cfg(1.0)
                results.append(guider.sample(
                    torch.zeros_like(start), start, comfy.samplers.sampler_object(sampler_name), sigmas,
                    disable_pbar=True, seed=seed,
                ))
    return not torch.equal(results[0], results[1])


@functools.cache
def _toy_setup():
    """The toy model (a host BaseModel around :data:`TOY_UNET`, seeded weights, on the CPU), a
    4-step schedule, a start latent and a text context."""
    import comfy.model_base
    import comfy.model_patcher
    import comfy.samplers
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(dict(TOY_UNET))
    model_config.set_inference_dtype(torch.float32, None)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode(False), torch.no_grad():
        model = comfy.model_base.BaseModel(model_config, device="cpu")
        for name, parameter in model.diffusion_model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.ndim >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "normal", 4)
    start = 3 * torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 6, TOY_UNET["context_dim"], generator=generator)
    return patcher, sigmas, start, context


def host_sampler_inversion():
    """A host ``KSAMPLER`` that runs :func:`ddim_invert` instead of sampling, so the inversion
    goes through the host's guider (conditioning, patches, wrappers, model loading). Give it the
    ascending schedule ``[0, s1, ..., s_max]`` and zero noise; it returns the latent at ``s_max``.
    Its callback reports, per step, the latent, the sigma it now lies at, and the step's clean
    estimate as ``denoised``."""
    import comfy.samplers

    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}
        s_in = x.new_ones([x.shape[0]])
        sampling = model.inner_model.inner_model.model_sampling if hasattr(model, "inner_model") else None

        def denoise(x_, sigma):
            return model(x_, sigma * s_in, **extra_args)

        def input_scale(sigma):
            if sampling is None:
                return vp_input_scale(sigma)
            return sampling.calculate_input(sigma.reshape(1), torch.ones((1,), dtype=x.dtype, device=x.device))[0]

        def report(index, current, sigma, clean):
            if callback is not None:
                callback({"i": index, "x": current, "sigma": sigma, "sigma_hat": sigma, "denoised": clean})

        return ddim_invert(denoise, x, sigmas, report, input_scale)

    return comfy.samplers.KSAMPLER(invert)


def sample_ddim(model_patcher, noise, steps: int, cfg: float, positive, negative, latent, seed: int):
    """Latents sampled by the host's KSampler with DDIM (``ddim_uniform``), without a progress bar:
    the trainer's sample clips."""
    import comfy.sample

    return comfy.sample.sample(
        model_patcher, noise, steps, cfg, "ddim", "ddim_uniform", positive, negative, latent, disable_pbar=True,
        seed=seed,
    )
