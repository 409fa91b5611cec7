"""The host's UNet with SimDA applied reproduces the authors' own UNet3DConditionModel
(tests/fixtures/simda_authors_tiny: their code run on seeded random weights, adapters included)."""
from __future__ import annotations

import host
import pytest
import torch

import comfy.utils
from simda_pack.simda_core import formats
from simda_pack.simda_core.host.register import apply_simda, model_sites
from simda_pack.simda_core.model.config import LatentShiftSettings, SimDAConfig

FIXTURE = host.FIXTURES / "simda_authors_tiny"
CASES = ["io_f6_16x16", "io_f3_16x16", "io_f8_12x12", "io_f1_16x16", "io_f2_12x12"]
TOLERANCE = 1e-4
GROUP_NORM_PATCHES = ("in_layers.0.forward", "out_layers.0.forward", ".out.0.forward")


def authors_state() -> dict[str, torch.Tensor]:
    return torch.load(FIXTURE / "unet" / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def base():
    """The host's UNet holding the authors' base (non-adapter) weights."""
    patcher = host.build_model(host.TINY_UNET, seed=None)
    state = authors_state()
    mapping = comfy.utils.unet_to_diffusers(dict(host.TINY_UNET))  # diffusers key -> ldm key
    ldm = {ldm_key: state[key] for key, ldm_key in mapping.items() if key in state}
    unet = patcher.model.diffusion_model
    unet.load_state_dict(ldm, strict=True)  # every host UNet weight comes from the file
    return patcher


def cases():
    return {name: torch.load(FIXTURE / f"{name}.pt", map_location="cpu", weights_only=True) for name in CASES}


@pytest.fixture(scope="module")
def io_cases():
    return cases()


def simda(base, adapter_path, latent_shift=LatentShiftSettings()):
    adapter_file = formats.read_adapter_file(adapter_path)
    adapters = formats.build_adapters(adapter_file, model_sites(base))
    return apply_simda(base.clone(), SimDAConfig(adapters=adapters, latent_shift=latent_shift))


def run(patcher, case):
    """The authors' ``[1, 4, F, H, W]`` clip as the host's batch of F frames -> output in their layout."""
    frames = case["frames"]
    x = case["sample"][0].permute(1, 0, 2, 3).contiguous()  # [F, 4, H, W]
    timesteps = case["timestep"].repeat(frames)
    context = case["context"].repeat(frames, 1, 1)
    y = host.unet_forward(patcher, x, timesteps, context)
    return y.permute(1, 0, 2, 3).unsqueeze(0)  # [1, 4, F, H, W]


def relative_error(y, expected):
    return float((y - expected).norm() / expected.norm())


@pytest.fixture(scope="module")
def authors_outputs(base, io_cases):
    patcher = simda(base, FIXTURE)
    return {name: run(patcher, case) for name, case in io_cases.items()}


def test_fixture_is_what_the_readme_says():
    state = authors_state()
    adapter_keys = [k for k in state if ".adapter_s." in k or ".adapter_ffn." in k or ".temp_adapter." in k]
    assert len(adapter_keys) == 16 * 4 * 2 + 16 * 6  # 16 sites: 2 spatial adapters x 4 tensors, 6 temporal
    assert all(state[k].abs().sum() > 0 for k in adapter_keys if "stadapt_up_1" in k or "D_fc2" in k)


@pytest.mark.parametrize("name", CASES)
def test_reproduces_the_authors_unet(name, authors_outputs, io_cases):
    expected = io_cases[name]["output"]
    y = authors_outputs[name]
    assert y.shape == expected.shape
    error = relative_error(y, expected)
    print(f"{name}: relative error {error:.3g}")
    assert error <= TOLERANCE, f"{name}: relative error {error:.3g} > {TOLERANCE}"


def test_without_frame_group_norm_the_error_is_large(base, io_cases):
    patcher = simda(base, FIXTURE)
    removed = [key for key in patcher.object_patches if key.endswith(GROUP_NORM_PATCHES)]
    resblocks = sum(type(m).__name__ == "ResBlock" for m in base.model.diffusion_model.modules())
    assert resblocks == 22 and len(removed) == 2 * resblocks + 1  # both norms of each ResBlock, and the output norm
    for key in removed:
        del patcher.object_patches[key]
    for name, case in io_cases.items():
        error = relative_error(run(patcher, case), case["output"])
        print(f"{name} without frame GroupNorm: relative error {error:.3g}")
        if name == "io_f1_16x16":
            # GroupNorm over a one-frame clip is the per-frame GroupNorm.
            assert error <= TOLERANCE, name
        else:
            assert error > 0.05, name


def test_without_latent_shift_the_error_is_large(base, io_cases):
    patcher = simda(base, FIXTURE, latent_shift=None)
    case = io_cases["io_f6_16x16"]
    error = relative_error(run(patcher, case), case["output"])
    print(f"without latent shift: relative error {error:.3g}")
    assert error > 0.01


def test_our_format_round_trip_gives_identical_outputs(base, io_cases, authors_outputs, tmp_path):
    adapters = formats.build_adapters(formats.read_adapter_file(FIXTURE), model_sites(base))
    path = formats.save_adapters(adapters, tmp_path / "tiny.safetensors", family="sd1")
    reread = formats.read_adapter_file(path)
    assert reread.source == "simda" and reread.family == "sd1"
    patcher = simda(base, path)
    for name, case in io_cases.items():
        assert torch.equal(run(patcher, case), authors_outputs[name]), name


def test_authors_safetensors_gives_identical_outputs(base, io_cases, authors_outputs, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "authors_run"
    (folder / "unet").mkdir(parents=True)
    state = {k: v.contiguous() for k, v in authors_state().items()}
    save_file(state, str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    adapter_file = formats.read_adapter_file(folder)
    assert (
        adapter_file.source == "authors" and adapter_file.name == "authors_run/unet/diffusion_pytorch_model.safetensors"
    )
    patcher = simda(base, folder)
    for name, case in io_cases.items():
        assert torch.equal(run(patcher, case), authors_outputs[name]), name
