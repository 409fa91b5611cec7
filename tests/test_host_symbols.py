"""A host symbol that only one feature needs, missing (moved by a later ComfyUI), costs that feature
and never the pack: the pack is imported afresh with the symbol taken away, every node still loads,
the others still sample, and the feature that needs it says in one sentence what it needs."""
from __future__ import annotations

import asyncio
import importlib.util
import sys

import host  # noqa: F401  (first: puts the host on sys.path, imports the pack as simda_pack)

import comfy.context_windows
import comfy_extras.nodes_sdupscale
import pytest
import torch

NAME = "simda_pack_without_host_symbols"
SHIFT = dict(frames_per_clip=0, full_resolution=True, half_resolution=True, quarter_resolution=True,
             eighth_resolution=True, start_percent=0.0, end_percent=1.0, frame_group_norm=False)


@pytest.fixture
def pack_without_host_symbols(monkeypatch):
    """The pack imported as a second package after the host lost SD_4XUpscale_Conditioning (and
    IndexListContextHandler, which the pack no longer names: context windows are served through the
    handler object a MODEL carries, whatever its class)."""
    monkeypatch.delattr(comfy.context_windows, "IndexListContextHandler")
    monkeypatch.delattr(comfy_extras.nodes_sdupscale, "SD_4XUpscale_Conditioning")
    spec = importlib.util.spec_from_file_location(NAME, host.PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(host.PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == NAME or n.startswith(NAME + ".")]:
            del sys.modules[name]


def output(node_output):
    return node_output.result if hasattr(node_output, "result") else node_output


def test_every_node_loads_and_the_others_sample_without_the_symbols(pack_without_host_symbols):
    nodes = asyncio.run(asyncio.run(pack_without_host_symbols.comfy_entrypoint()).get_node_list())
    import simda_pack

    assert len(nodes) == len(asyncio.run(asyncio.run(simda_pack.comfy_entrypoint()).get_node_list()))
    for node in nodes:
        assert node.define_schema().node_id.startswith("SimDA")
    by_id = {node.define_schema().node_id: node for node in nodes}

    base = host.build_model(host.TINY_UNET, seed=0)
    (patched,) = output(by_id["SimDALatentShiftPatch"].execute(base, **SHIFT))
    cond = [[torch.randn(1, 8, host.TINY_UNET["context_dim"], generator=torch.Generator().manual_seed(1)), {}]]
    sampler = by_id["SimDAVideoSampler"]
    (latent,) = output(sampler.execute(patched, cond, cond, 3, 64, 64, 0, 2, 1.0, "euler", "normal", 1.0, 0.0))
    assert latent["samples"].shape == (3, 4, 8, 8) and torch.isfinite(latent["samples"]).all()

    upscaler = by_id["SimDAVideoUpscaler"]
    arguments = [[v] for v in (torch.zeros(2, 16, 16, 3), base, None, cond, cond, 0.2, 0, 2, 1.0, "euler",
                               "normal", 0, 0, 0, 0, True)]
    with pytest.raises(RuntimeError) as error:
        upscaler.execute(*arguments)
    message = str(error.value)
    assert "SD_4XUpscale_Conditioning" in message and "ComfyUI 0.3.75 and newer" in message and "\n" not in message
