"""Adapter files: bad input gets one clear AdapterFileError naming the file; our format keeps
its metadata and never overwrites."""
from __future__ import annotations

import builtins
import json
import os
import pickle

import host
import pytest
import torch
from safetensors.torch import save_file

from simda_pack.simda_core import formats, host_patch
from simda_pack.simda_core.formats import AdapterFileError

AUTHORS_FIXTURE = host.FIXTURES / "simda_authors_tiny"
OTHER_UNET = dict(host.TINY_UNET, channel_mult=[1, 2, 4, 4])
"""Same block structure as the tiny UNet, with 32/64/128/128 channels at levels 0..3."""


@pytest.fixture(scope="module")
def tiny_sites():
    return host_patch.model_sites(host.build_model(host.TINY_UNET))


@pytest.fixture(scope="module")
def other_sites():
    return host_patch.model_sites(host.build_model(OTHER_UNET))


def trained_adapters(sites, seed=0):
    """Adapters with every tensor non-zero, as after training."""
    adapters = formats.SimDAAdapters(sites)
    host.randomize_(adapters, seed)
    return adapters


def read_error(path) -> str:
    """The AdapterFileError message for ``path``, checked to be one plain sentence naming the file."""
    with pytest.raises(AdapterFileError) as e:
        formats.read_adapter_file(path)
    return clear_message(e.value, path.name)


def clear_message(error: AdapterFileError, name: str) -> str:
    message = str(error)
    assert name in message, message
    assert "\n" not in message and message.endswith("."), message
    assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None), "chained traceback"
    return message


# -- unreadable files -----------------------------------------------------------------------------

def test_truncated_safetensors(tmp_path, tiny_sites):
    path = formats.save_adapters(trained_adapters(tiny_sites), tmp_path / "cut.safetensors", family="sd1")
    formats.read_adapter_file(path)  # whole, it reads
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    message = read_error(path)
    assert "truncated or corrupt" in message and "again" in message


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1)), id="random"),
        pytest.param(torch.tensor([64, 0, 0, 0, 0, 0, 0, 0] + [7] * 200), id="garbage-header"),
        pytest.param(torch.tensor([1]), id="one-byte"),
    ],
)
def test_random_bytes_safetensors(tmp_path, content):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(bytes(content.to(torch.uint8).tolist()))
    assert "not a readable safetensors file" in read_error(path)


def test_truncated_bin(tmp_path):
    path = tmp_path / "cut.bin"
    torch.save({"down_blocks.0.attentions.0.transformer_blocks.0.adapter_s.D_fc1.weight": torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "could not be read" in read_error(path)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "adapters.ckpt.zip"
    path.write_bytes(b"PK")
    assert "unknown adapter file type '.zip'" in read_error(path)


# -- readable files that are not SimDA adapters ---------------------------------------------------

def plain_state():
    return {"conv_in.weight": torch.randn(8, 4, 3, 3), "conv_in.bias": torch.zeros(8), "time_embedding.linear_1.weight": torch.randn(8, 8)}


def test_bin_without_adapter_keys(tmp_path):
    path = tmp_path / "some_unet.bin"
    torch.save(plain_state(), path)
    message = read_error(path)
    assert "holds no SimDA adapter weights" in message


def test_safetensors_without_adapter_keys(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    save_file(plain_state(), str(path))
    assert "holds no SimDA adapter weights" in read_error(path)


def test_bin_that_is_not_a_dictionary_of_tensors(tmp_path):
    path = tmp_path / "list.bin"
    torch.save([torch.randn(2), torch.randn(3)], path)
    assert "does not hold a dictionary of tensors" in read_error(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_values_in_our_file(tmp_path, tiny_sites, bad):
    adapters = trained_adapters(tiny_sites)
    key = "output_blocks.5.1.transformer_blocks.0.ffn_adapter.fc2.weight"
    with torch.no_grad():
        adapters.ffn_adapter("output_blocks.5.1.transformer_blocks.0").fc2.weight[3, 1] = bad
    path = formats.save_adapters(adapters, tmp_path / "diverged.safetensors", family="sd1")
    message = read_error(path)
    assert "NaN or infinite" in message and key in message


def test_non_finite_values_in_authors_file(tmp_path):
    state = torch.load(AUTHORS_FIXTURE / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    key = "mid_block.temp_adapter.0.stadapt_conv3d_1.weight"
    state[key] = state[key].clone()
    state[key][0, 0, 1, 0, 0] = float("nan")
    (tmp_path / "run" / "unet").mkdir(parents=True)
    torch.save(state, tmp_path / "run" / "unet" / "diffusion_pytorch_model.bin")
    message = read_error(tmp_path / "run" / "unet" / "diffusion_pytorch_model.bin")
    assert "run/unet/diffusion_pytorch_model.bin" in message
    assert "NaN or infinite" in message and "middle_block.1.temporal_adapter.depthwise.weight" in message


# -- pickles that would run code ------------------------------------------------------------------

class CreatesFile:
    """Unpickling this calls ``open(marker, "w")``: the file appears if the pickle's code runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("container", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_without_running(tmp_path, container):
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "adapter_model.bin"
    payload = {"down_blocks.0.attentions.0.transformer_blocks.0.adapter_s.D_fc1.weight": torch.randn(4, 4), "x": CreatesFile(marker)}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    message = read_error(path)
    assert not marker.exists(), "reading the file ran the pickle's code"
    assert "refused" in message and "run code" in message
    # The payload is live: an unrestricted load does create the file (so the check above can fail).
    if container == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as f:
            pickle.load(f)
    assert marker.exists()


# -- paths ----------------------------------------------------------------------------------------

def test_missing_path(tmp_path):
    message = read_error(tmp_path / "nowhere.safetensors")
    assert "does not exist" in message and "models/simda" in message


def test_folder_without_unet_weights(tmp_path):
    folder = tmp_path / "training_output"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text((AUTHORS_FIXTURE / "unet" / "config.json").read_text())
    message = read_error(folder)
    assert "folder without unet/diffusion_pytorch_model" in message


def test_authors_folder_reads(tmp_path):
    # the positive case of the two above: the training output folder and its unet/ both work
    for path in (AUTHORS_FIXTURE, AUTHORS_FIXTURE / "unet"):
        adapter_file = formats.read_adapter_file(path)
        assert adapter_file.source == "authors" and len(adapter_file.tensors) == 16 * 8 + 16 * 6


# -- a file made for another UNet -----------------------------------------------------------------

def test_our_file_for_another_layout(tmp_path, tiny_sites, other_sites):
    path = formats.save_adapters(trained_adapters(tiny_sites), tmp_path / "tiny.safetensors", family="sd1")
    adapter_file = formats.read_adapter_file(path)
    formats.build_adapters(adapter_file, tiny_sites)  # fits its own UNet
    with pytest.raises(AdapterFileError) as e:
        formats.build_adapters(adapter_file, other_sites)
    message = clear_message(e.value, "tiny.safetensors")
    assert "32 channels" in message and "32/64/128 channels" in message
    with pytest.raises(AdapterFileError) as e:
        formats.build_adapters(adapter_file, tiny_sites[:-1])
    assert "16 places" in clear_message(e.value, "tiny.safetensors")


def test_authors_file_for_another_layout(other_sites):
    adapter_file = formats.read_adapter_file(AUTHORS_FIXTURE)
    with pytest.raises(AdapterFileError) as e:
        formats.build_adapters(adapter_file, other_sites)
    message = clear_message(e.value, "simda_authors_tiny/unet/diffusion_pytorch_model.bin")
    assert "does not fit the connected model" in message and "of another shape" in message


# -- saving ---------------------------------------------------------------------------------------

def test_save_refuses_to_overwrite_and_leaves_no_temp_files(tmp_path, tiny_sites):
    path = formats.save_adapters(trained_adapters(tiny_sites, seed=1), tmp_path / "mine.safetensors", family="sd1")
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]
    before = path.read_bytes()
    with pytest.raises(AdapterFileError) as e:
        formats.save_adapters(trained_adapters(tiny_sites, seed=2), path, family="sd1")
    assert "already exists" in clear_message(e.value, "mine.safetensors")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]
    # asked for explicitly, overwriting replaces the content, again without leftovers
    formats.save_adapters(trained_adapters(tiny_sites, seed=2), path, family="sd1", overwrite=True)
    assert path.read_bytes() != before
    assert sorted(os.listdir(tmp_path)) == ["mine.safetensors"]


def test_save_wants_safetensors_name(tmp_path, tiny_sites):
    with pytest.raises(AdapterFileError) as e:
        formats.save_adapters(trained_adapters(tiny_sites), tmp_path / "mine.bin", family="sd1")
    assert ".safetensors" in clear_message(e.value, "mine.bin")
    assert os.listdir(tmp_path) == []


def test_newer_format_version_is_refused(tmp_path, tiny_sites):
    path = formats.save_adapters(
        trained_adapters(tiny_sites), tmp_path / "future.safetensors", family="sd1",
        extra_metadata={"format_version": str(formats.FORMAT_VERSION + 1)},
    )
    message = read_error(path)
    assert f"format {formats.FORMAT_VERSION + 1}" in message and "update the pack" in message


def test_metadata_round_trip(tmp_path, other_sites):
    adapters = trained_adapters(other_sites, seed=5)
    path = formats.save_adapters(adapters, tmp_path / "other.safetensors", family="sd2", frames_trained=24)
    adapter_file = formats.read_adapter_file(path)
    assert adapter_file.source == "simda"
    assert adapter_file.family == "sd2" and adapter_file.family_label() == "an SD2.x UNet"
    assert adapter_file.frames_trained == 24
    # levels 0..2 of the input/output blocks, and the middle block at the deepest level 3
    assert json.loads(adapter_file.metadata["level_channels"]) == [32, 64, 128, 128]
    assert adapter_file.sites == other_sites
    assert [s.channels for s in adapter_file.sites] == [32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32]
    assert (adapter_file.spatial_ratio, adapter_file.temporal_ratio) == (0.25, 0.5)
    expected = adapters.file_state_dict()
    assert adapter_file.tensors.keys() == expected.keys()
    assert all(torch.equal(adapter_file.tensors[k], expected[k]) for k in expected)
    rebuilt = formats.build_adapters(adapter_file, other_sites)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), adapters.state_dict().values()))
