"""Clip-level utilities, host-free: how a clip is cut into windows, prompt schedules, keyframes,
spatial tiles, per-frame noise, DDIM inversion, and the agreement of conditionings with a clip."""
