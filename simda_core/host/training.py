"""The host's side of training adapters: a clone of the MODEL that backward can run through (its
inference weights wrapped, a streamed MODEL replaced by its non-dynamic delegate), loaded whole as
the host's own training node loads, the host's ``in_training`` flag, and the precision a training
step runs in (the host's training node's rule, but fp16 with a loss scaler for fp32 weights on CUDA)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..model.patch_functions import mark
from .memory import is_dynamic, unload


@mark
def _fresh(weight: torch.Tensor) -> torch.Tensor:
    """Weight wrapper: the layer's weight as a tensor autograd may save for backward. The host
    already hands a wrapped layer a per-call copy; an inference tensor is copied here otherwise."""
    return weight.clone() if weight.is_inference() else weight



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
                "SimDA: this ComfyUI streams the model's weights (Dynamic VRAM) but offers no non-dynamic copy to "
                "train through; start ComfyUI with --disable-dynamic-vram to tune SimDA adapters."
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
    own training node asks for (``load_models_gpu(..., memory_required=1e20, force_full_load=True)`` in
    ``TrainLoraNode.execute``; lines per host in docs/HOST_COMPAT.md); afterwards, also after Cancel, an error or
    out-of-memory, its weight wrappers are off the host's layers and it is unloaded, so the shared
    UNet carries nothing of it."""
    import comfy.model_management as mm

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


@dataclass(frozen=True)
class TrainingPrecision:
    """How a training step computes: autocast to ``dtype`` on ``device_type`` (None: the model's own
    dtypes, no autocast) and whether a loss scaler guards fp16 gradients."""

    device_type: str
    dtype: torch.dtype | None
    loss_scaling: bool

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)


def training_precision(model_patcher, mixed_precision: bool = True) -> TrainingPrecision:
    """The precision a training step runs in, from the dtype the model's weights are stored in.

    fp16, bf16 and fp8 weights: as the host's own training node picks it (TrainLoraNode with
    ``training_dtype`` "none", ComfyUI 0.33+; it autocasts on the input's device type; lines per host
    in docs/HOST_COMPAT.md): fp16 weights train under fp16 autocast with a loss scaler, bf16 and fp8
    weights under bf16 autocast. A device without bf16 (older CUDA cards) gets fp16 with a loss scaler
    instead. fp32 weights: fp16 autocast with a loss scaler on CUDA, where the host's node picks bf16,
    because fp16 mixed precision is SimDA's recipe (the authors') and keeps more mantissa bits, the
    scaler guarding its range; no autocast on other devices, where half-precision matmuls are slow.
    ``mixed_precision`` False trains in the model's own dtypes."""
    device_type = torch.device(model_patcher.load_device).type
    if not mixed_precision:
        return TrainingPrecision(device_type, None, False)
    stored = model_patcher.model.get_dtype()
    if stored == torch.float16:
        return TrainingPrecision(device_type, torch.float16, True)
    if stored != torch.float32:  # bf16 and the fp8 formats
        if device_type == "cuda" and not torch.cuda.is_bf16_supported():
            return TrainingPrecision(device_type, torch.float16, True)
        return TrainingPrecision(device_type, torch.bfloat16, False)
    if device_type == "cuda":
        return TrainingPrecision(device_type, torch.float16, True)
    return TrainingPrecision(device_type, None, False)
