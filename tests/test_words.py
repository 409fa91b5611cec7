"""Every citation in the repository resolves to a file in it, and no file names an address or a document
that does not exist.

Read: every tracked Markdown file (README, docs/, web/docs/, bench/RESULTS.md, ...) and the comments and
docstrings of every tracked Python file. A cited path is a repository path in backquotes or plain text
that starts with one of the repository's own top-level folders (``docs/METHOD.md``, ``simda_core/...``,
``tests/...``, ``scripts/...``) or, inside ``simda_core/``, with one of its packages (``host/register.py``),
and a Markdown link or picture (resolved from the page's folder). Paths with a placeholder (``<NodeID>``,
``{...}``, ``*``) are patterns, not citations; a path git ignores is an output location (``bench/out/``).
Pure text reading: no server, no model.
"""
from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

import host  # noqa: F401  (the test session imports the pack as a package: the host must be on sys.path)
from host import PACK_DIR

TOP_FOLDERS = ("docs", "simda_core", "nodes", "tests", "scripts", "bench", "web", "example_workflows")
CORE_PACKAGES = ("model", "host", "video", "training")
"""Folders of ``simda_core/`` that its own modules cite without the ``simda_core/`` prefix."""
PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)+[\w.-]*[\w/])")
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
PLACEHOLDER = re.compile(r"[<>{}*]|\.\.\.")
FORBIDDEN = ("github.com/" + "simda-comfyui", "SIMDA" + "_SPEC")
"""An address that does not exist, and a document that is not in the repository."""


def ignored(paths: list[str]) -> set[str]:
    """The paths git ignores (outputs such as bench/out/...), asked in one call."""
    if not paths:
        return set()
    result = subprocess.run(
        ["git", "-C", str(PACK_DIR), "check-ignore", "--no-index", "--stdin"],
        input="\n".join(paths), capture_output=True, text=True,
    )
    return set(result.stdout.split())


def python_prose(source: str) -> str:
    """The comments and docstrings of a Python file, one per line."""
    parts = [token.string for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
        # attribute docstrings: a string statement right after an assignment
        body = getattr(node, "body", None)
        if isinstance(body, list):
            parts += [statement.value.value for statement in body[1:]
                      if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
                      and isinstance(statement.value.value, str)]
    return "\n".join(parts)


def prose_of(name: str) -> str:
    text = (PACK_DIR / name).read_text(encoding="utf-8", errors="replace")
    return python_prose(text) if name.endswith(".py") else text


def read_files() -> list[str]:
    return [name for name in host.pack_files() if name.endswith((".md", ".py"))]


def candidates(name: str, cited: str) -> list[str]:
    """Where a path cited in file ``name`` may live, in repository terms; [] if it is not ours to check."""
    cited = cited.rstrip("/").removeprefix("./")
    first = cited.split("/")[0]
    if first in TOP_FOLDERS:
        return [cited]
    if name.startswith("simda_core/") and first in CORE_PACKAGES:
        return [f"simda_core/{cited}"]
    return []


def citations(name: str) -> list[tuple[str, list[str]]]:
    """``(as cited, candidate repository paths)`` of every path cited in file ``name``."""
    text = prose_of(name)
    found = []
    for match in PATH.finditer(text):
        cited = match.group(1).rstrip(".,;:")
        around = text[max(0, match.start() - 12):match.end() + 1]
        if PLACEHOLDER.search(cited) or PLACEHOLDER.search(text[match.end():match.end() + 1]) or "://" in around:
            continue
        places = candidates(name, cited)
        if places:
            found.append((cited, places))
    if name.endswith(".md"):
        folder = Path(name).parent
        for match in MARKDOWN_LINK.finditer(text):
            target = match.group(1).split("#")[0]
            if not target or "://" in match.group(1) or match.group(1).startswith(("#", "mailto:")):
                continue
            found.append((target, [(folder / target).as_posix()]))
    return found


def unresolved(files: list[str]) -> list[str]:
    """``file: cited path`` for every citation in ``files`` that names no file or folder of the repository."""
    missing = []
    for name in files:
        for cited, places in citations(name):
            if not any((PACK_DIR / place).exists() for place in places):
                missing.append((name, cited, places))
    asked = [form for _, _, places in missing for place in places for form in (place, f"{place}/")]
    outputs = {form.rstrip("/") for form in ignored(asked)}
    return [f"{name}: {cited}" for name, cited, places in missing if not any(p in outputs for p in places)]


def test_every_cited_repository_path_exists():
    files = read_files()
    assert "docs/METHOD.md" in files and "README.md" in files, "the files to read were not found"
    assert sum(len(citations(name)) for name in files) > 100, "the reader finds almost no citations"
    missing = unresolved(files)
    assert missing == [], "cited paths that are not in the repository:\n" + "\n".join(missing)


def test_the_reader_sees_citations_in_each_kind_of_place():
    """The reader finds citations where they are written: prose, Markdown links, comments, docstrings,
    and simda_core's package-relative form."""
    def cited(name: str) -> set[str]:
        return {place for _, places in citations(name) for place in places}

    assert "docs/METHOD.md" in cited("README.md")
    assert "docs/images/text_to_video.png" in cited("README.md")  # a Markdown picture
    assert "simda_core/model/adapters.py" in cited("docs/METHOD.md")
    assert "docs/METHOD.md" in cited("simda_core/model/latent_shift.py")  # a module docstring
    assert "simda_core/host/register.py" in cited("simda_core/model/patch_functions.py")  # package-relative
    assert not any(place.startswith("comfy/") for place in cited("docs/HOST_COMPAT.md"))  # host files: not ours


def test_no_file_names_a_missing_address_or_document():
    found = []
    for name in host.pack_files():
        try:
            text = (PACK_DIR / name).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # pictures, archives, weights
        found += [f"{name}: {word}" for word in FORBIDDEN if word.lower() in text.lower()]
    assert found == [], "\n".join(found)


HOST_LINE = re.compile(r"\b(?:l\.|lines?)\s*\d+")


def test_code_names_host_functions_not_their_line_numbers():
    """Host line numbers go stale with every host release: code comments and docstrings name the host
    function, and docs/HOST_COMPAT.md keeps the lines, per host version."""
    found = []
    for name in read_files():
        if name.endswith(".py"):
            prose = prose_of(name)
            found += [f"{name}: ...{prose[max(0, m.start() - 50):m.end()]}" for m in HOST_LINE.finditer(prose)]
    assert found == [], "line numbers in code prose (move them to docs/HOST_COMPAT.md):\n" + "\n".join(found)
    assert HOST_LINE.search((PACK_DIR / "docs" / "HOST_COMPAT.md").read_text(encoding="utf-8")), \
        "docs/HOST_COMPAT.md keeps no host line numbers"
