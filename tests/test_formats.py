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

from simda_pack.simda_core import formats
from simda_pack.simda_core.formats import AdapterFileError
from simda_pack.simda_core.host import register

AUTHORS_FIXTURE = host.FIXTURES / "simda_authors_tiny"
OTHER_UNET = dict(host.TINY_UNET, channel_mult=[1, 2, 4, 4])
"""Same block structure as the tiny UNet, with 32/64/128/128 channels at levels 0..3."""


@pytest.fixture(scope="module")
def tiny_sites():
    return register.model_sites(host.build_model(host.TINY_UNET))


@pytest.fixture(scope="module")
def other_sites():
    return register.model_sites(host.build_model(OTHER_UNET))


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
    return {"conv_in.weight": torch.randn(8, 4, 3, 3), "conv_in.bias": torch.zeros(8),
            "time_embedding.linear_1.weight": torch.randn(8, 8)}


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
    payload = {"down_blocks.0.attentions.0.transformer_blocks.0.adapter_s.D_fc1.weight": torch.randn(4, 4),
               "x": CreatesFile(marker)}
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
    assert [s.channels for s in adapter_file.sites] == [
        32, 32, 64, 64, 128, 128, 128, 128, 128, 128, 64, 64, 64, 32, 32, 32
    ]
    assert (adapter_file.spatial_ratio, adapter_file.temporal_ratio) == (0.25, 0.5)
    expected = adapters.file_state_dict()
    assert adapter_file.tensors.keys() == expected.keys()
    assert all(torch.equal(adapter_file.tensors[k], expected[k]) for k in expected)
    rebuilt = formats.build_adapters(adapter_file, other_sites)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), adapters.state_dict().values()))


# -- broken metadata in our format ------------------------------------------------------------------

@pytest.mark.parametrize(
    "key, value, words",
    [
        ("sites", "[{'path': ", "'sites' is not valid JSON"),
        ("sites", '{"path": "input_blocks.1.1"}', "'sites' is not a list"),
        ("sites", '[{"path": "input_blocks.1.1", "channels": 32}]',
         "'sites' has an entry that is not a transformer place"),
        ("sites", '[7]', "'sites' has an entry that is not a transformer place"),
        ("sites", '[{"path": "a", "channels": "32", "inner_dim": 32, "depth": 1, "level": 0}]',
         "fields of the wrong type"),
        ("spatial_ratio", "a quarter", "'spatial_ratio' is 'a quarter', not a number"),
        ("temporal_ratio", "-0.5", "'temporal_ratio' is '-0.5', not a positive number"),
        ("temporal_ratio", "nan", "not a positive number"),
        ("frames_trained", "24.5", "'frames_trained' is '24.5', not a whole number"),
        ("frames_trained", "-3", "below 0"),
        ("format_version", "one", "'format_version' is 'one', not a whole number"),
    ],
    ids=["sites-json", "sites-dict", "sites-fields", "sites-number", "sites-types", "ratio-text", "ratio-negative",
         "ratio-nan", "frames-float", "frames-negative", "version-text"],
)
def test_broken_metadata_gets_a_clear_error(tmp_path, tiny_sites, key, value, words):
    path = formats.save_adapters(trained_adapters(tiny_sites), tmp_path / "edited.safetensors", family="sd1",
                                 extra_metadata={key: value})
    message = read_error(path)
    assert words in message and "broken metadata" in message, message


# -- the authors' run folders -----------------------------------------------------------------------

def authors_run(tmp_path, config_changes: dict | None = None, config_text: str | None = None, legacy: bool = False):
    """A copy of the authors' fixture run (``run/unet/``) with its config changed or replaced."""
    unet = tmp_path / "run" / "unet"
    unet.mkdir(parents=True)
    state = torch.load(AUTHORS_FIXTURE / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save(state, unet / "diffusion_pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    config = json.loads((AUTHORS_FIXTURE / "unet" / "config.json").read_text())
    config.update(config_changes or {})
    (unet / "config.json").write_text(config_text if config_text is not None else json.dumps(config))
    return unet / "diffusion_pytorch_model.bin"


def test_authors_run_family_comes_from_its_config(tmp_path):
    assert formats.read_adapter_file(AUTHORS_FIXTURE).family == "sd1"  # cross_attention_dim 32: not SD2
    sd2 = authors_run(
        tmp_path, {"cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20], "use_linear_projection": True}
    )
    adapter_file = formats.read_adapter_file(sd2.parent.parent)
    assert adapter_file.family == "sd2" and adapter_file.family_label() == "an SD2.x UNet"
    sd1 = formats.read_adapter_file(authors_run(tmp_path / "sd1", {"cross_attention_dim": 768}))
    assert sd1.family == "sd1"


def test_authors_run_without_config_is_told_by_its_text_width(tmp_path):
    state = torch.load(AUTHORS_FIXTURE / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert state[key].shape[1] == 32
    state[key] = torch.zeros(state[key].shape[0], 1024)
    for suffix, write in (
        (".bin", lambda p: torch.save(state, p)), (".safetensors", lambda p: save_file(state, str(p)))
    ):
        path = tmp_path / suffix[1:] / "unet" / f"diffusion_pytorch_model{suffix}"
        path.parent.mkdir(parents=True)
        write(path)
        assert formats.read_adapter_file(path).family == "sd2", suffix


@pytest.mark.parametrize(
    "config_text, words",
    [("{not json", "is not readable JSON"), ("[1, 2]", "is not a UNet configuration"),
     ('{"cross_attention_dim": "1024"}', "cross_attention_dim '1024', not a whole number")],
    ids=["json", "list", "dim-text"],
)
def test_authors_run_with_a_broken_config(tmp_path, config_text, words):
    path = authors_run(tmp_path, config_text=config_text)
    message = read_error(path)
    assert words in message and "unet/config.json" in message


def test_legacy_pickle_bin_is_read_without_a_memory_map(tmp_path):
    path = authors_run(tmp_path, legacy=True)
    assert not __import__("zipfile").is_zipfile(path)
    legacy = formats.read_adapter_file(path)
    current = formats.read_adapter_file(AUTHORS_FIXTURE)
    assert legacy.tensors.keys() == current.tensors.keys()
    assert all(torch.equal(legacy.tensors[k], current.tensors[k]) for k in current.tensors)


def test_only_adapter_tensors_are_kept_from_an_authors_file(tmp_path):
    state = torch.load(AUTHORS_FIXTURE / "unet" / "diffusion_pytorch_model.bin", weights_only=True)
    path = tmp_path / "whole.safetensors"
    save_file(state, str(path))
    adapter_file = formats.read_adapter_file(path)
    expected = formats.convert_authors_state_dict(state)
    assert adapter_file.tensors.keys() == expected.keys() and len(expected) < len(state)
    assert all(torch.equal(adapter_file.tensors[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "relative_path, listed",
    [
        ("mine.safetensors", True),
        ("runs/mine_step1000.safetensors", True),
        ("car-turn/unet/diffusion_pytorch_model.bin", True),
        ("car-turn/unet/diffusion_pytorch_model.safetensors", True),
        ("car-turn/checkpoint-500/pytorch_model.bin", True),
        ("car-turn/text_encoder/pytorch_model.bin", False),
        ("car-turn/text_encoder/model.safetensors", False),
        ("car-turn/vae/diffusion_pytorch_model.bin", False),
        ("car-turn/vae/diffusion_pytorch_model.safetensors", False),
        ("car-turn/checkpoint-500/optimizer.bin", False),
        ("car-turn/checkpoint-500/scheduler.bin", False),
        ("car-turn\\tokenizer\\vocab.bin", False),
        ("car-turn/inv_latents/ddim_latent-500.pt", False),
    ],
)
def test_adapter_candidates_of_a_run_folder(relative_path, listed):
    assert formats.is_adapter_candidate(relative_path) is listed


def test_loader_lists_a_runs_unet_and_not_its_other_parts(tmp_path, monkeypatch):
    import folder_paths
    from simda_pack.nodes import folders

    run = tmp_path / "simda" / "car-turn"
    for part in ("unet/diffusion_pytorch_model.bin", "text_encoder/pytorch_model.bin",
                 "vae/diffusion_pytorch_model.bin", "unet/config.json"):
        (run / part).parent.mkdir(parents=True, exist_ok=True)
        (run / part).write_bytes(b"x")
    (tmp_path / "simda" / "mine.safetensors").write_bytes(b"x")
    monkeypatch.setitem(
        folder_paths.folder_names_and_paths, folders.FOLDER, ([str(tmp_path / "simda")], set(folders.EXTENSIONS))
    )
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    assert sorted(folders.adapter_files()) == ["car-turn/unet/diffusion_pytorch_model.bin", "mine.safetensors"]
