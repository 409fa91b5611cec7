"""The pack as the Comfy Registry takes it: a pyproject.toml that names no address before the pack is
published (docs/PUBLISHING.md lists the fields that are filled in then, and the files its Icon and
Banner will point at: a square PNG of at most 400x400 and a 21:9 PNG under web/), and the archive
``comfy node pack`` / ``comfy node publish`` upload, built here by comfy-cli's own packing code
(``comfy_cli.file_utils.zip_files``: the git-tracked files minus .comfyignore, plus ``[tool.comfy]
includes``).

The archive is built from a copy of the files git tracks or would track once they are committed
(``git ls-files --cached --others --exclude-standard``), in a fresh git repository, because
``zip_files`` packs the working folder's git-tracked files; that way a page added but not yet
committed is judged too. Nothing goes to the network.
"""
from __future__ import annotations

import os
import re
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

PUBLISHING = PACK_DIR / "docs" / "PUBLISHING.md"
FILLED_IN_WHEN_PUBLISHED = {
    "[project.urls] Repository": ("project", "urls", "Repository"),
    "[tool.comfy] PublisherId": ("tool", "comfy", "PublisherId"),
    "[tool.comfy] Icon": ("tool", "comfy", "Icon"),
    "[tool.comfy] Banner": ("tool", "comfy", "Banner"),
}
"""The fields docs/PUBLISHING.md has the publisher fill in, and where each lives in pyproject.toml."""
MAX_PICTURE_BYTES = 200_000
MAX_ARCHIVE_BYTES = 3_000_000
"""The archive's limit here: the pack's code, pages, templates and texts are about 1 MB packed;
the test suite alone (5.5 MB) would break it."""


def pyproject() -> dict:
    return tomllib.loads((PACK_DIR / "pyproject.toml").read_text(encoding="utf-8"))


def addresses(value, where: str = "") -> list[str]:
    """Every string in a parsed TOML value that holds an address (``scheme://``), with its key path."""
    if isinstance(value, dict):
        return [found for key, item in value.items() for found in addresses(item, f"{where}.{key}".lstrip("."))]
    if isinstance(value, list):
        return [found for index, item in enumerate(value) for found in addresses(item, f"{where}[{index}]")]
    return [f"{where} = {value!r}"] if isinstance(value, str) and "://" in value else []


def test_pyproject_names_no_address_before_publishing():
    """No repository, documentation, icon or banner address exists until the pack is published, so
    pyproject.toml names none; the fields that will hold them are the ones docs/PUBLISHING.md lists."""
    assert addresses(pyproject()) == [], "pyproject.toml names an address before the pack is published"
    guide = PUBLISHING.read_text(encoding="utf-8")
    for field, (*table, key) in FILLED_IN_WHEN_PUBLISHED.items():
        section, name = field.split(" ")
        assert f"`{section} {name}`" in guide, f"docs/PUBLISHING.md does not say how to fill in {field}"
        holder = pyproject()
        for part in table:
            holder = holder.get(part, {})
        assert key not in holder, f"pyproject.toml sets {field} = {holder[key]!r}; it is filled in when publishing"


def picture_for(field: str) -> tuple[Path, Image.Image]:
    """The repository file that docs/PUBLISHING.md says ``field``'s address will serve, and its picture."""
    row = next((line for line in PUBLISHING.read_text(encoding="utf-8").splitlines()
                if line.startswith(f"| `{field}` |")), None)
    assert row is not None, f"docs/PUBLISHING.md has no row for {field}"
    named = re.findall(r"`(web/[^`]+\.png)`", row)
    assert len(named) == 1, f"docs/PUBLISHING.md's {field} row names {named}, not one PNG under web/"
    path = PACK_DIR / named[0]
    assert path.is_file(), f"{field} names {named[0]}, which is not in the repository"
    assert path.resolve().parent.is_relative_to(PACK_DIR / "web"), f"{field}: {path} is not under web/"
    assert path.stat().st_size < MAX_PICTURE_BYTES, f"{field}: {path.stat().st_size} bytes"
    picture = Image.open(BytesIO(path.read_bytes()))
    picture.load()
    return path, picture


def test_icon_is_a_square_png_of_at_most_400_pixels():
    path, icon = picture_for("[tool.comfy] Icon")
    assert icon.format == "PNG", f"{path.name} is {icon.format}"
    assert icon.width == icon.height, f"{path.name} is {icon.width}x{icon.height}, not square"
    assert 64 <= icon.width <= 400, f"{path.name} is {icon.width}x{icon.height}"


def test_banner_is_a_21_by_9_png():
    path, banner = picture_for("[tool.comfy] Banner")
    assert banner.format == "PNG", f"{path.name} is {banner.format}"
    assert abs(banner.width * 9 / 21 - banner.height) <= 1, f"{path.name} is {banner.width}x{banner.height}, not 21:9"
    assert banner.width >= 630, f"{path.name} is {banner.width} pixels wide"


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[zipfile.ZipFile, int]:
    """The registry archive of the pack, made by comfy-cli's ``zip_files`` in a copy of the pack
    that is a fresh git repository; ``(archive, size in bytes)``."""
    from comfy_cli.file_utils import zip_files
    from comfy_cli.registry.config_parser import extract_node_configuration

    copy = tmp_path_factory.mktemp("registry") / "pack"
    for name in host.pack_files():
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
    tracked = host.pack_files()
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
    assert any(name.startswith("tests/") for name in host.pack_files()), "tests/ is not tracked"
    left_in = [name for name in names if name.split("/")[0] in ("tests", "bench", ".ci", ".hosts", ".cache", ".venv")]
    assert left_in == [], f"the archive holds {left_in[:10]}"
    assert size < MAX_ARCHIVE_BYTES, f"the archive is {size} bytes"
