"""The run's output folder and its resume point: atomic writes, adapter file names, the training
state (adapters, optimizer, scaler, step, RNG, losses, options) and the checks made on resuming."""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Callable

import torch

from ...host.loaders import load_weights_file
from ...model.adapters import SimDAAdapters
from ..trainer import AdapterTrainer
from .data_parallel import Processes
from .options import TrainingOptions, TrainingSetupError

STATE_NAME = "training_state.pt"
STATE_FORMAT = "simda-training-state"
STATE_VERSION = 1
ADAPTER_PREFIX = "simda_adapters_step"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix + ".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def adapter_file_name(output: Path, step: int) -> Path:
    """``simda_adapters_step{N}.safetensors``; when that name exists (a resumed run passing the
    step again) a suffix ``-1``, ``-2``, ... keeps the earlier file."""
    path = output / f"{ADAPTER_PREFIX}{step:06d}.safetensors"
    suffix = 0
    while path.exists():
        suffix += 1
        path = output / f"{ADAPTER_PREFIX}{step:06d}-{suffix}.safetensors"
    return path

def rng_states() -> dict:
    states = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_state(path: Path, step: int, adapters: SimDAAdapters, trainer: AdapterTrainer, losses: list[float],
               options: TrainingOptions, family: str, processes: Processes) -> None:
    state = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "step": step,
        "family": family,
        "world_size": processes.world,
        "global_batch": options.batch_per_process * processes.world,
        "adapters": {k: v.detach().cpu().clone() for k, v in adapters.file_state_dict().items()},
        "trainer": trainer.state_dict(),
        "losses": list(losses),
        "rng": rng_states(),
        "options": options.as_record(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: Path) -> dict:
    if not path.is_file():
        raise TrainingSetupError(f"--resume: there is no {STATE_NAME} in '{path.parent}'; start without --resume.")
    try:
        state = load_weights_file(path)
    except Exception as e:  # noqa: BLE001  (a cut or foreign file)
        raise TrainingSetupError(
            f"--resume: '{path}' cannot be read ({type(e).__name__}: {e}); it is damaged."
        ) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainingSetupError(f"--resume: '{path}' is not a SimDA training state.")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise TrainingSetupError(f"--resume: '{path}' was written by a newer version of this trainer; update the pack.")
    return state


RESUME_CHECKED = ("frames", "stride", "width", "height", "crop", "learning_rate", "seed", "data", "csv")


def resume_differences(saved: dict, options: TrainingOptions) -> list[str]:
    now = options.as_record()
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in RESUME_CHECKED if saved.get(k) != now.get(k)]

def check_output(options: TrainingOptions) -> Path:
    """The state path; refuses to start a fresh run over an earlier one."""
    output = Path(options.output)
    state_path = output / STATE_NAME
    if output.exists() and not output.is_dir():
        raise TrainingSetupError(f"the output '{output}' is a file; pass a folder.")
    if not options.resume:
        earlier = [p.name for p in (output.glob(f"{ADAPTER_PREFIX}*.safetensors") if output.is_dir() else [])]
        if state_path.exists() or earlier:
            raise TrainingSetupError(
                f"the output folder '{output}' already holds a training run "
                f"({STATE_NAME if state_path.exists() else earlier[0]}); "
                "pass --resume to continue it, or choose another output folder."
            )
    elif not state_path.is_file():
        raise TrainingSetupError(f"--resume: there is no {STATE_NAME} in '{output}'; start without --resume.")
    return state_path

