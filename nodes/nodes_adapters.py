"""SimDA Adapter Loader: trained SimDA adapters onto an SD UNet."""
from __future__ import annotations

import logging
from dataclasses import replace

from comfy_api.latest import io

from ..simda_core.formats import AdapterFileError, build_adapters, read_adapter_file
from ..simda_core.host.family import adapter_storage_dtype
from ..simda_core.host.register import get_config, model_sites
from ..simda_core.model.config import SimDAConfig
from .folders import adapter_files, adapter_path
from .simda_model import check_family, simda_clone

log = logging.getLogger("SimDA")

STRENGTH_RANGE = (0.0, 2.0)


class SimDAAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SimDAAdapterLoader",
            display_name="SimDA Adapter Loader",
            category="SimDA",
            description=(
                "Turns an SD1.x, SD2.x or SDXL image model into a video model with trained SimDA adapters "
                "(spatial, temporal and frame-shared GroupNorm). Reads our .safetensors files and the "
                "authors' training output from models/simda. Follow it with SimDA Latent-Shift Patch. "
                "A second Adapter Loader on the same MODEL replaces the first one's adapters."
            ),
            inputs=[
                io.Model.Input(
                    "model",
                    tooltip=(
                        "An SD1.x, SD2.x or SDXL MODEL (from Load Checkpoint). "
                        "It is not changed; a patched copy comes out."
                    ),
                ),
                io.Combo.Input(
                    "adapter_name",
                    options=adapter_files(),
                    tooltip=(
                        "Adapter file in models/simda: our .safetensors, or the "
                        "authors' unet/diffusion_pytorch_model.bin/.safetensors."
                    ),
                ),
                io.Float.Input(
                    "strength", default=1.0, min=STRENGTH_RANGE[0], max=STRENGTH_RANGE[1], step=0.05,
                    tooltip=(
                        "Scale of every adapter's contribution: 1 as trained, 0 "
                        "turns the adapters off (frame-shared GroupNorm included)."
                    ),
                ),
            ],
            outputs=[
                io.Model.Output(
                    display_name="MODEL",
                    tooltip="The model with SimDA adapters, for the Latent-Shift Patch and Video Sampler.",
                )
            ],
        )

    @classmethod
    def execute(cls, model, adapter_name, strength) -> io.NodeOutput:
        lo, hi = STRENGTH_RANGE
        if not lo <= strength <= hi:
            raise ValueError(
                f"SimDA Adapter Loader: strength {strength} is out of range; use a value from {lo} to {hi}."
            )
        path = adapter_path(adapter_name)
        try:
            adapter_file = read_adapter_file(path)
            check_family(model, adapter_file.family, f"SimDA adapter file '{adapter_file.name}'")
            adapters = build_adapters(
                adapter_file, model_sites(model), dtype=adapter_storage_dtype(model)
            )
        except AdapterFileError as e:
            raise ValueError(f"SimDA Adapter Loader: {e}") from None
        adapters.requires_grad_(False)
        config = get_config(model) or SimDAConfig()
        if config.adapters is not None:
            log.info(
                "SimDA Adapter Loader: the MODEL already carries adapters ('%s'); '%s' replaces them.",
                config.adapter_name or "tuned", adapter_file.name,
            )
        config = replace(
            config, adapters=adapters, adapter_name=adapter_file.name, family=adapter_file.family, strength=strength
        )
        return io.NodeOutput(simda_clone(model, config))
