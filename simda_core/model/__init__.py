"""SimDA's model in plain PyTorch: the adapters, latent-shift attention, frame-shared GroupNorm,
the clip layout of a batch, the per-call state, and the functions shaped for the host's hooks.
Nothing here imports ComfyUI."""
