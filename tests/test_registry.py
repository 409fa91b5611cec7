"""The pack as the Comfy Registry takes it: the pictures pyproject.toml's [tool.comfy] names (Icon: a
square PNG of at most 400x400; Banner: a 21:9 PNG; both files of this repository, at the addresses
GitHub serves them from), and the archive ``comfy node pack`` / ``comfy node publish`` upload, built
here by comfy-cli's own packing code (``comfy_cli.file_utils.zip_files``: the git-tracked files
minus .comfyignore, plus ``[tool.comfy] includes``).

The archive is built from a copy of the files git tracks or would track once they are committed
(``git ls-files --cached --others --exclude-standard``), in a fresh git repository, because
``zip_files`` packs the working folder's git-tracked files; that way a page added but not yet
committed is judged too. Nothing goes to the network.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
import zipfile
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image

import host  # noqa: F401  (puts the host on sys.path, imports the pack as simda_pack)
from host import PACK_DIR

RAW_FILES = "https://raw.githubusercontent.com/{owner}/{repo}/main/"
MAX_PICTURE_BYTES = 200_000
MAX_ARCHIVE_BYTES = 3_000_000
"""The archive's limit here: the pack's code, pages, templates and texts are about 1 MB packed;
the test suite alone (5.5 MB) would break it."""


def pyproject() -> dict:
    return tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))


def raw_file_prefix() -> str:
    """Where GitHub serves the files of the repository that [project.urls] Repository names."""
    repository = pyproject()["project"]["urls"]["Repository"].removesuffix(".git").rstrip("/")
    owner, repo = repository.removeprefix("https://github.com/").split("/")
    return RAW_FILES.format(owner=owner, repo=repo)


def picture_of(key: str) -> tuple[Path, Image.Image]:
    """The repository file that [tool.comfy] ``key`` points at, and the picture in it."""
    url = pyproject()["tool"]["comfy"].get(key, "")
    prefix = raw_file_prefix()
    assert url.startswith(prefix), f"[tool.comfy] {key} = {url!r} is not a file of {prefix}"
    path = PACK_DIR / url.removeprefix(prefix)
    assert path.is_file(), f"[tool.comfy] {key} names {path.relative_to(PACK_DIR)}, which is not in the repository"
    assert path.resolve().parent.is_relative_to(PACK_DIR / "web"), f"{key}: {path} is not under web/"
    assert path.stat().st_size < MAX_PICTURE_BYTES, f"{key}: {path.stat().st_size} bytes"
    data = path.read_bytes()
    picture = Image.open(BytesIO(data))
    picture.load()
    return path, picture


def test_icon_is_a_square_png_of_at_most_400_pixels():
    path, icon = picture_of("Icon")
    assert icon.format == "PNG", f"{path.name} is {icon.format}"
    assert icon.width == icon.height, f"{path.name} is {icon.width}x{icon.height}, not square"
    assert 64 <= icon.width <= 400, f"{path.name} is {icon.width}x{icon.height}"


def test_banner_is_a_21_by_9_png():
    path, banner = picture_of("Banner")
    assert banner.format == "PNG", f"{path.name} is {banner.format}"
    assert abs(banner.width * 9 / 21 - banner.height) <= 1, f"{path.name} is {banner.width}x{banner.height}, not 21:9"
    assert banner.width >= 630, f"{path.name} is {banner.width} pixels wide"


def files_git_would_track() -> list[str]:
    """The pack's files as a commit of the working tree would hold them (deleted ones left out)."""
    try:
        listed = subprocess.run(
            ["git", "-C", str(PACK_DIR), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True, check=True,
        ).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"the pack is not a git checkout here, so its tracked files are unknown ({error})")
    return sorted(name for name in listed if name and (PACK_DIR / name).is_file())


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[zipfile.ZipFile, int]:
    """The registry archive of the pack, made by comfy-cli's ``zip_files`` in a copy of the pack
    that is a fresh git repository; ``(archive, size in bytes)``."""
    from comfy_cli.file_utils import zip_files
    from comfy_cli.registry.config_parser import extract_node_configuration

    copy = tmp_path_factory.mktemp("registry") / "pack"
    for name in files_git_would_track():
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACK_DIR / name, copy / name)
    subprocess.run(["git", "init", "-q", str(copy)], check=True)
    subprocess.run(["git", "-C", str(copy), "add", "-A"], check=True)
    config = extract_node_configuration(str(copy / "pyproject.toml"))
    assert config is not None, "comfy-cli cannot read pyproject.toml"
    target = copy.parent / "node.zip"
    cwd = os.getcwd()
    os.chdir(copy)  # zip_files packs the current folder, as `comfy node pack` runs in the pack
    try:
        zip_files(str(target), includes=config.tool_comfy.includes or [])
    finally:
        os.chdir(cwd)
    with zipfile.ZipFile(target) as packed:
        yield packed, target.stat().st_size


def test_archive_holds_what_comfyui_loads_and_users_read(archive):
    packed, size = archive
    names = set(packed.namelist())
    tracked = files_git_would_track()
    wanted = [name for name in tracked if name.split("/")[0] in ("nodes", "simda_core", "web", "example_workflows")]
    wanted += ["__init__.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt"]
    assert any(name.startswith("web/docs/") and name.endswith(".md") for name in wanted), "no help page is tracked"
    missing = sorted(set(wanted) - names)
    assert missing == [], f"the archive lacks {missing}"
    for name in ("__init__.py", "web/docs/SimDAEditTuner.md"):
        assert packed.read(name) == (PACK_DIR / name).read_bytes(), name
    print(f"registry archive: {len(names)} files, {size} bytes ({size / 1e6:.2f} MB)")


def test_archive_leaves_out_tests_and_development_files(archive):
    packed, size = archive
    names = packed.namelist()
    assert any(name.startswith("tests/") for name in files_git_would_track()), "tests/ is not tracked"
    left_in = [name for name in names if name.split("/")[0] in ("tests", "bench", ".ci", ".hosts", ".cache", ".venv")]
    assert left_in == [], f"the archive holds {left_in[:10]}"
    assert size < MAX_ARCHIVE_BYTES, f"the archive is {size} bytes"
