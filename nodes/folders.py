"""The ``models/simda`` folder, registered with the host's ``folder_paths``."""
from __future__ import annotations

import os

import folder_paths

from ..simda_core.formats import is_adapter_candidate

FOLDER = "simda"
EXTENSIONS = {".safetensors", ".bin"}


def register_simda_folder() -> None:
    """Add ``<models>/simda`` to the host's folder list, keeping paths that
    ``extra_model_paths.yaml`` already registered under the same name."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    entry = folder_paths.folder_names_and_paths.get(FOLDER)
    if entry is None:
        folder_paths.folder_names_and_paths[FOLDER] = ([default], set(EXTENSIONS))
        return
    paths, extensions = entry
    if default not in paths:
        paths.append(default)
    extensions = set(extensions) | EXTENSIONS
    folder_paths.folder_names_and_paths[FOLDER] = (paths, extensions)


def adapter_files() -> list[str]:
    """The Adapter Loader's choices: adapter files in models/simda, and of an authors' training output
    only its ``unet/`` weights (not its text encoder, VAE or optimizer state)."""
    return [name for name in folder_paths.get_filename_list(FOLDER) if is_adapter_candidate(name)]


def adapter_path(name: str) -> str:
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(
            f"SimDA adapter file '{name}' is not in the models/simda "
            "folder; put it there (or refresh the page) and pick it again."
        )
    return path


def save_folder() -> str:
    return folder_paths.get_folder_paths(FOLDER)[0]
