"""The nodes' help pages (web/docs/<NodeID>.md) as ComfyUI serves them and its frontend shows them.

The pack's ``WEB_DIRECTORY`` (web/) is served at ``/extensions/<pack folder>/``. For a node of a custom
pack the frontend fetches ``/extensions/<pack folder>/docs/<NodeID>/<locale>.md``, then
``/extensions/<pack folder>/docs/<NodeID>.md``, renders the markdown with image paths relative to
``docs/``, and falls back to the node's description when neither is there. Frontend 1.32.9 (ComfyUI
0.3.75) shows the page in the node library's sidebar, opened by a node's help button there or by the
info button of the selection toolbox; 1.49.6 (upstream 0.33.0) shows it in the right-side panel's Info
tab, opened by the info button (its default, redesigned node library has no help button).

Here, on the host's real server and in its real page (the browser helpers of tests/test_frontend.py):
every SimDA node the server lists has a page; web/ is served file for file and nothing outside it
is; each node's page opens from the node's info button, and from the node library where the
frontend's library has a help button, showing the page's first heading and loading its pictures.
A last test opens each node's template (example_workflows/) and saves a picture of the node with the
nodes wired to it in tests/output/help/; ``scripts/make_help_images.py`` turns those into the pages'
pictures (web/docs/images/). The pages as the user sees them land there too (``<NodeID>.info.page.png``,
``<NodeID>.library.page.png``).
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest

# test_frontend first: it imports live_server and tests/host.py, which put the host on sys.path.
from test_frontend import assert_loads, browser, load_workflow, open_page  # noqa: F401
from live_server import comfy_server  # noqa: F401  (a fixture)
from host import PACK_DIR
from node_info import NodeInput, help_pages, node_inputs, pack_folder_name, pack_nodes

DOCS = PACK_DIR / "web" / "docs"
HELP_SHOTS = PACK_DIR / "tests" / "output" / "help"


def schema_node_ids() -> list[str]:
    """The ``node_id`` of every schema in nodes/nodes_*.py, read from the source."""
    ids = []
    for path in sorted((PACK_DIR / "nodes").glob("nodes_*.py")):
        ids += re.findall(r"""node_id\s*=\s*["']([A-Za-z0-9_]+)["']""", path.read_text())
    return sorted(ids)


NODE_IDS = schema_node_ids()

TEMPLATE_OF = {
    "SimDAAdapterLoader": "text_to_video",
    "SimDALatentShiftPatch": "latent_shift_training_free",
    "SimDAVideoSampler": "text_to_video",
    "SimDAPromptTravel": "prompt_travel",
    "SimDAKeyframes": "image_to_video",
    "SimDAOneShotTuner": "video_edit",
    "SimDAInvert": "video_edit",
    "SimDAFitFrames": "video_edit_training_free",
    "SimDASaveAdapters": "video_edit",
    "SimDAVideoUpscaler": "text_to_video_upscaled",
}
"""The shipped workflow whose wiring each node's page shows. A deprecated node is in no template; its
page shows its replacement's picture."""


def first_heading(markdown: str) -> str:
    for line in markdown.splitlines():
        match = re.match(r"#{1,6}\s+(.+?)\s*#*\s*$", line)
        if match:
            return match.group(1)
    raise AssertionError("the page has no heading")


def image_paths(markdown: str) -> list[str]:
    """The pictures a page shows: markdown images and <img>/<video>/<source> tags."""
    return re.findall(r"!\[[^\]]*\]\(\s*([^)\s]+)", markdown) + re.findall(
        r"""<(?:img|video|source)\b[^>]*\ssrc=["']([^"']+)""", markdown)


def page_text(node_id: str) -> str:
    return (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


# -- the pages and the server ----------------------------------------------------------------------

def test_every_node_has_a_help_page_with_a_heading_and_pictures(comfy_server):
    served = pack_nodes(comfy_server)
    assert sorted(served) == NODE_IDS, f"the server lists {sorted(served)}; nodes/ declares {NODE_IDS}"
    pages = sorted(p.stem for p in DOCS.glob("*.md"))
    assert pages == NODE_IDS, f"web/docs holds pages for {pages}; the nodes are {NODE_IDS}"
    untemplated = [node_id for node_id in NODE_IDS if node_id not in TEMPLATE_OF]
    assert all(served[node_id].get("deprecated") for node_id in untemplated), f"no template for {untemplated}"
    for node_id in NODE_IDS:
        text = page_text(node_id)
        assert first_heading(text) == served[node_id]["display_name"], (node_id, first_heading(text))
        pictures = image_paths(text)
        assert pictures, f"{node_id}.md shows no picture"
        for picture in pictures:
            assert not re.match(r"(?:[a-z]+:)?//", picture), f"{node_id}.md: {picture} is not the pack's own file"
            path = (DOCS / picture).resolve()
            assert path.is_file() and DOCS in path.parents, f"{node_id}.md: {picture} is not a file under web/docs"


# -- the pages' inputs and /object_info -----------------------------------------------------------

@dataclass(frozen=True)
class DocumentedInput:
    """One input as a page's Inputs section documents it: ``- `name` (TYPE lo to hi, step s, optional,
    default v): text``. A combo is documented by what it offers (``ComfyUI's samplers``, ``file in
    `models/simda```) instead of a type; ``STRING input`` is a text taken from a link only."""

    name: str
    type: str | None
    link_only: bool = False
    optional: bool = False
    multiline: bool = False
    minimum: str | None = None
    maximum: str | None = None
    step: str | None = None
    default: str | None = None
    """As written: on/off, a number, a word, or `code` (lines of a multiline default joined by ` / `)."""


INPUT_LINE = re.compile(r"^- ((?:`[^`]+`(?:, )?)+) \(((?:`[^`]*`|[^()`])*)\):", re.M)
TYPE_PART = re.compile(r"^([A-Z][A-Z0-9_]*)( input)?(?: (-?[0-9.e+-]+) to (-?[0-9.e+-]+))?$")


def section(markdown: str, heading: str) -> str:
    match = re.search(rf"^## {heading}\s*$(.*?)(?=^## |\Z)", markdown, re.M | re.S)
    return match.group(1) if match else ""


def documented_inputs(markdown: str) -> tuple[dict[str, DocumentedInput], list[str]]:
    """The inputs of a page's ``## Inputs`` section, and the parts of it that could not be read."""
    found, unreadable = {}, []
    for match in INPUT_LINE.finditer(section(markdown, "Inputs")):
        names = re.findall(r"`([^`]+)`", match.group(1))
        parts = [p.strip() for p in re.findall(r"(?:`[^`]*`|[^,`])+", match.group(2))]
        fields = {}
        typed = TYPE_PART.match(parts[0])
        if typed:
            fields.update(type=typed.group(1), link_only=bool(typed.group(2)), minimum=typed.group(3),
                          maximum=typed.group(4))
        else:
            fields["type"] = None  # a combo, named by what it offers
        for part in parts[1:]:
            if part in ("optional", "multiline"):
                fields[part] = True
            elif m := re.fullmatch(r"(?:step|multiples of) (\S+)", part):
                fields["step"] = m.group(1)
            elif m := re.fullmatch(r"default (.+)", part):
                fields["default"] = m.group(1)
            else:
                unreadable.append(f"{', '.join(names)}: '{part}'")
        for name in names:
            found[name] = DocumentedInput(name, **fields)
    return found, unreadable


def documented_value(text: str, served: NodeInput):
    """A documented default as the server would serve it."""
    if "`" in text:
        return "\n".join(re.findall(r"`([^`]*)`", text))
    if served.type == "BOOLEAN":
        return {"on": True, "off": False}.get(text, text)
    if served.type in ("INT", "FLOAT"):
        try:
            return float(text)
        except ValueError:
            return text
    return text


def same_number(documented: str, served) -> bool:
    try:
        return served is not None and float(documented) == float(served)
    except ValueError:
        return False


def input_disagreements(node_id: str, page: DocumentedInput, served: NodeInput) -> list[str]:
    """What the page says about one input that /object_info does not."""
    where = f"{node_id}.md `{page.name}`"
    problems = []
    if page.type is not None and page.type != served.type:
        problems.append(f"{where}: documented as {page.type}, the server has {served.type}")
    if page.type is None and served.type != "COMBO":
        problems.append(f"{where}: documented as a choice, the server has {served.type}")
    if page.optional != served.optional:
        problems.append(f"{where}: documented as {'optional' if page.optional else 'required'}, the server has it "
                        f"{'optional' if served.optional else 'required'}")
    if page.link_only != bool(served.options.get("forceInput")):
        problems.append(f"{where}: documented as {'a link only' if page.link_only else 'a widget'}, the server "
                        f"disagrees (forceInput {served.options.get('forceInput', False)})")
    if page.multiline and not served.options.get("multiline"):
        problems.append(f"{where}: documented as multiline, the server's is not")
    for what, documented in (("min", page.minimum), ("max", page.maximum), ("step", page.step)):
        if documented is not None and not same_number(documented, served.options.get(what)):
            problems.append(f"{where}: documented {what} {documented}, the server's is {served.options.get(what)}")
    if page.default is None and served.has_default:
        problems.append(f"{where}: no default documented, the server's is {served.default!r}")
    elif page.default is not None and not served.has_default:
        problems.append(f"{where}: documented default {page.default!r}, the server has none")
    elif page.default is not None and documented_value(page.default, served) != served.default:
        problems.append(f"{where}: documented default {page.default!r}, the server's is {served.default!r}")
    return problems


def page_disagreements(node_id: str, markdown: str, served: dict[str, NodeInput]) -> list[str]:
    """Every difference between a page's Inputs section and the node's inputs on the server."""
    documented, unreadable = documented_inputs(markdown)
    problems = [f"{node_id}.md: cannot read {part}" for part in unreadable]
    problems += [f"{node_id}.md documents `{name}`, which the node does not have" for name in documented
                 if name not in served]
    problems += [f"{node_id}.md does not document `{name}`" for name in served if name not in documented]
    for name in documented.keys() & served.keys():
        problems += input_disagreements(node_id, documented[name], served[name])
    return problems


def test_each_pages_inputs_and_defaults_are_the_servers(comfy_server):
    """For every page in web/docs (every node's, whoever added it): the inputs it documents are the
    node's inputs on this host's server, with the same types, optional inputs, defaults, and ranges and
    steps where the page gives them."""
    served = pack_nodes(comfy_server)
    problems = []
    for node_id, path in help_pages().items():
        if node_id not in served:
            problems.append(f"{path.name}: the server has no node {node_id}")
            continue
        problems += page_disagreements(node_id, path.read_text(encoding="utf-8"), node_inputs(served[node_id]))
    assert not problems, f"{len(problems)} disagreements:\n" + "\n".join(problems)
    print(f"{len(help_pages())} pages agree with /object_info")


def test_the_page_check_sees_each_kind_of_disagreement(comfy_server):
    """The check above, on a page changed in one place at a time, finds each change."""
    node_id = "SimDAVideoUpscaler"
    served = node_inputs(pack_nodes(comfy_server)[node_id])
    page = page_text(node_id)
    assert page_disagreements(node_id, page, served) == []
    changes = {
        "a default": ("`steps` (INT, default 20)", "`steps` (INT, default 21)"),
        "a boolean default": ("`latent_shift` (BOOLEAN, default on)", "`latent_shift` (BOOLEAN, default off)"),
        "a combo default": ("default dpmpp_2m)", "default euler)"),
        "a range": ("`noise_augmentation` (FLOAT 0 to 1,", "`noise_augmentation` (FLOAT 0 to 2,"),
        "a step": ("`tile_size` (INT, step 8,", "`tile_size` (INT, step 16,"),
        "a name": ("- `seed` (INT", "- `noise_seed` (INT"),
        "a type": ("`cfg` (FLOAT,", "`cfg` (INT,"),
        "an optional input": ("`vae` (VAE)", "`vae` (VAE, optional)"),
        "an unreadable part": ("`steps` (INT, default 20)", "`steps` (INT, defaults to 20)"),
    }
    for what, (old, new) in changes.items():
        assert page.count(old) == 1, what
        assert page_disagreements(node_id, page.replace(old, new), served), f"{what} changed unseen"
    missing = re.sub(r"^- `tile_overlap`.*\n", "", page, flags=re.M)
    assert page_disagreements(node_id, missing, served) == [f"{node_id}.md does not document `tile_overlap`"]


MAX_PICTURE_BYTES = 300_000


def test_the_pages_pictures_are_small():
    pictures = sorted((DOCS / "images").iterdir())
    assert pictures, "web/docs/images is empty"
    too_big = {p.name: p.stat().st_size for p in pictures if p.stat().st_size >= MAX_PICTURE_BYTES}
    assert not too_big, f"pictures of {MAX_PICTURE_BYTES} bytes or more: {too_big}"


OUTSIDE_PER_FOLDER = 100
"""Files requested from each top-level folder of the pack other than web/ (sorted walk): all of the
pack's own folders, a sample of .git/ and of the host installation under .hosts/."""


def files_outside_web() -> list[str]:
    """Paths, relative to the pack, of its files outside web/."""
    found = []
    for entry in sorted(PACK_DIR.iterdir()):
        if entry.name == "web":
            continue
        if entry.is_file():
            found.append(entry.name)
            continue
        taken = 0
        for root, dirs, files in os.walk(entry):
            dirs.sort()
            for name in sorted(files):
                if taken == OUTSIDE_PER_FOLDER:
                    break
                found.append(os.path.relpath(os.path.join(root, name), PACK_DIR))
                taken += 1
            if taken == OUTSIDE_PER_FOLDER:
                break
    return found


def test_web_is_served_file_for_file_and_nothing_outside_it(comfy_server):
    pack = pack_folder_name(comfy_server)
    base = f"/extensions/{urllib.parse.quote(pack)}"
    inside = sorted(p for p in (PACK_DIR / "web").rglob("*") if p.is_file())
    for node_id in NODE_IDS:  # the address the frontend fetches, named as the frontend names it
        status, body = comfy_server.request("GET", f"{base}/docs/{node_id}.md")
        assert status == 200 and body == (DOCS / f"{node_id}.md").read_bytes(), f"docs/{node_id}.md: {status}"
    for path in inside:
        route = f"{base}/{urllib.parse.quote(path.relative_to(PACK_DIR / 'web').as_posix())}"
        status, body = comfy_server.request("GET", route)
        assert status == 200, f"{route} answered {status}"
        assert body == path.read_bytes(), f"{route} is not {path.relative_to(PACK_DIR)}"

    outside = files_outside_web()
    assert "__init__.py" in outside and "pyproject.toml" in outside
    served = []
    for relative in outside:
        route = f"{base}/{urllib.parse.quote(Path(relative).as_posix())}"
        status, _ = comfy_server.request("GET", route)
        if status < 400:
            served.append(f"{route} ({status})")
    # The way out of web/ through its own address: dot segments, encoded or not.
    for escape in ("docs/../../__init__.py", "docs/%2e%2e/%2e%2e/__init__.py", "..%2f__init__.py",
                   "docs/..%2f..%2fpyproject.toml", "%2e%2e/pyproject.toml"):
        status, _ = comfy_server.request("GET", f"{base}/{escape}")
        if status < 400:
            served.append(f"{base}/{escape} ({status})")
    assert served == [], f"{len(served)} of {len(outside)} files outside web/ are served: {served[:20]}"
    print(f"{len(inside)} files of web/ served; {len(outside)} files outside it and 5 escapes refused")


# -- the pages in the frontend -------------------------------------------------------------------

@pytest.fixture(scope="module")
def help_page(browser, comfy_server):  # noqa: F811  (browser: test_frontend's fixture)
    return open_page(browser, comfy_server)


ADD_NODE_JS = """(args) => {
    app.graph.clear();
    const node = LiteGraph.createNode(args.type);
    node.pos = app.clientPosToCanvasPos([args.x, args.y]);
    app.graph.add(node);
    app.canvas.setDirty(true, true);
    return app.canvasPosToClientPos([node.pos[0] + 30, node.pos[1] - LiteGraph.NODE_TITLE_HEIGHT / 2]);
}"""
"""Puts one node of ``type`` on an empty graph at client point (x, y); the client point of its title."""
SELECTED_JS = "Object.keys(app.canvas.selected_nodes ?? {}).length === 1"
NODE_AT = {"x": 760, "y": 280}
"""Clear of the left sidebar (1.32.9 shows the help there) and of the right-side panel (1.49.6)."""

SHOWN_JS = """(heading) => {
    const pages = [...document.querySelectorAll('.markdown-content')].filter((e) => e.offsetParent !== null);
    const page = pages.find((e) => e.querySelector('h1, h2, h3, h4, h5, h6')?.textContent.trim() === heading);
    if (!page) return null;
    const images = [...page.querySelectorAll('img')];
    if (!images.every((img) => img.complete)) return null;
    return images.map((img) => ({src: img.getAttribute('src'), width: img.naturalWidth}));
}"""
"""The pictures of the visible rendered help page whose first heading is ``heading``, once all are loaded."""

RENDERED_TEXT_JS = "[...document.querySelectorAll('.markdown-content')].map((e) => e.innerText.slice(0, 100))"
HELP_WAIT_MS = 30_000


def shown_help(page, node_id: str, pack: str, how: str) -> None:
    """The page now shows ``node_id``'s help page: its first heading, each of its pictures loaded from
    the pack's docs/, the page fetched from the pack's address, nothing else gone wrong."""
    text = page_text(node_id)
    heading = first_heading(text)
    HELP_SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        handle = page.page.wait_for_function(SHOWN_JS, arg=heading, timeout=HELP_WAIT_MS, polling=200)
    except Exception:
        shot = HELP_SHOTS / f"{node_id}.{how}.failed.png"
        page.page.screenshot(path=shot)
        shown = page.evaluate(RENDERED_TEXT_JS)
        raise AssertionError(f"{how}: no help page headed {heading!r} for {node_id} (shown: {shown}; {shot})") from None
    images = handle.json_value()
    expected = [f"/extensions/{pack}/docs/{path}" for path in image_paths(text)]
    assert [image["src"] for image in images] == expected, images
    assert all(image["width"] > 0 for image in images), f"{node_id}: a picture did not load: {images}"
    fetched = {(status, urllib.parse.urlparse(url).path) for status, url in page.responses}
    assert (200, f"/extensions/{pack}/docs/{node_id}.md") in fetched, sorted(fetched)
    # The frontend asks for a page in the user's language first (docs/<NodeID>/en.md); there is none.
    errors = page.errors_since_mark(expected=(f"/extensions/{pack}/docs/{node_id}/",))
    assert errors == [], "the page logged errors:\n" + "\n".join(errors)
    page.page.screenshot(path=HELP_SHOTS / f"{node_id}.{how}.page.png")  # the page as the user sees it


def select_by_click(page, point: list[float], attempts: int = 3) -> None:
    """Click the canvas at ``point`` (a node's title) until the node is selected. The canvas finds the
    node under the pointer as the pointer moves there; on a page that has just opened, a first click
    is sometimes taken before the canvas has seen the pointer, so it is repeated (at most ``attempts``)."""
    for _ in range(attempts):
        page.mouse.move(point[0] - 40, point[1] + 40)
        page.mouse.move(*point)
        page.wait_for_timeout(100)
        page.mouse.down()
        page.mouse.up()
        try:
            page.wait_for_function(SELECTED_JS, timeout=3000)
            return
        except Exception:
            continue
    raise AssertionError(f"{attempts} clicks at {point} selected no node")


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_opens_from_the_nodes_info_button(comfy_server, help_page, node_id):
    """Select the node on the canvas (a click on its title), click the selection toolbox's info button."""
    pack = pack_folder_name(comfy_server)
    help_page.mark()
    title = help_page.evaluate(ADD_NODE_JS, {"type": node_id, **NODE_AT})
    select_by_click(help_page.page, title)
    help_page.page.locator('[data-testid="info-button"]').first.click(timeout=HELP_WAIT_MS)
    shown_help(help_page, node_id, pack, "info")


HAS_NEW_LIBRARY_JS = "app.extensionManager.setting.get('Comfy.NodeLibrary.NewDesign') === true"
"""Whether the frontend shows its redesigned node library (1.49.6's default), which has no help button."""


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_help_page_opens_from_the_node_library(comfy_server, help_page, node_id):
    """Open the node library, search the node's name, click the help button of its entry."""
    if help_page.evaluate(HAS_NEW_LIBRARY_JS):
        version = help_page.evaluate("window.__COMFYUI_FRONTEND_VERSION__")
        pytest.skip(f"frontend {version}'s node library shows no help pages (its hover card holds the node's "
                    "description); the info button's test covers this frontend")
    pack = pack_folder_name(comfy_server)
    info = comfy_server.object_info(node_id)[node_id]
    if info.get("deprecated"):
        pytest.skip("the frontend's node library does not list deprecated nodes (they stay loadable in old "
                    "workflows); the info button's test opens this page")
    display_name = info["display_name"]
    page = help_page.page
    back = page.locator(".node-help-content").locator("xpath=..").locator(".pi-arrow-left")
    if back.count():  # a help page from the test before: back to the library
        back.first.click()
    if not page.locator(".node-lib-node-container").count() and not page.locator(".node-lib-search-box").count():
        help_page.evaluate("app.extensionManager.command.execute('Workspace.ToggleSidebarTab.node-library')")
    search = page.locator(".node-lib-search-box input").first
    search.fill(display_name, timeout=HELP_WAIT_MS)
    help_page.mark()
    entry = page.locator(".p-tree-node-content", has=page.locator(".node-lib-node-container")).filter(
        has_text=re.compile(rf"^\s*{re.escape(display_name)}\s*$")).first
    entry.hover(timeout=HELP_WAIT_MS)
    entry.locator(".help-button").click(timeout=HELP_WAIT_MS)
    shown_help(help_page, node_id, pack, "library")


# -- pictures of the wiring ----------------------------------------------------------------------

FRAME_NODES_JS = """(args) => {
    const nodes = args.ids.map((id) => app.graph.getNodeById(id));
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of nodes) {
        const [x, y, w, h] = node.getBounding();
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    const m = args.margin, region = args.region, ds = app.canvas.ds;
    const scale = Math.min(1, region.width / (x1 - x0 + 2 * m), region.height / (y1 - y0 + 2 * m));
    const rect = app.canvas.canvas.getBoundingClientRect();
    ds.scale = scale;
    ds.offset[0] = (region.x + region.width / 2 - rect.left) / scale - (x0 + x1) / 2;
    ds.offset[1] = (region.y + region.height / 2 - rect.top) / scale - (y0 + y1) / 2;
    app.canvas.deselectAll();
    app.canvas.setDirty(true, true);
    const [left, top] = app.canvasPosToClientPos([x0 - m, y0 - m]);
    const [right, bottom] = app.canvasPosToClientPos([x1 + m, y1 + m]);
    return {x: left, y: top, width: right - left, height: bottom - top, scale};
}"""
"""Zooms and pans the canvas so the nodes ``ids`` fill ``region`` (client pixels, at most 100%); their
box on screen, with ``margin`` canvas units around it."""
PICTURE_REGION = {"x": 120, "y": 140, "width": 1680, "height": 800}
"""Where the nodes are framed: clear of the page's menus, side bar and buttons."""


def wired_to(workflow: dict, node_id: int) -> list[int]:
    """``node_id`` and the nodes linked to it, in the file's order."""
    linked = {node_id}
    for _, origin, _, target, _, _ in workflow["links"]:
        if node_id in (origin, target):
            linked |= {origin, target}
    return [n["id"] for n in workflow["nodes"] if n["id"] in linked]


@pytest.mark.parametrize("node_id", sorted(TEMPLATE_OF))
def test_picture_of_the_node_in_its_template(help_page, node_id):
    """The node's template as shipped, framed on the node and the nodes wired to it; all of them drawn
    on the page. The picture lands in tests/output/help/<NodeID>.png."""
    workflow = load_workflow(TEMPLATE_OF[node_id])
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_id]
    ids = wired_to(workflow, node["id"])
    assert len(ids) > 1, f"{node_id} is wired to nothing in {TEMPLATE_OF[node_id]}.json"
    help_page.mark()
    assert_loads(help_page, workflow)
    box = help_page.evaluate(FRAME_NODES_JS, {"ids": ids, "margin": 24, "region": PICTURE_REGION})
    help_page.page.wait_for_timeout(500)  # a few frames of the canvas
    region = PICTURE_REGION
    assert region["x"] - 1 <= box["x"] and box["x"] + box["width"] <= region["x"] + region["width"] + 1, box
    assert region["y"] - 1 <= box["y"] and box["y"] + box["height"] <= region["y"] + region["height"] + 1, box
    assert box["scale"] >= 0.5, f"{len(ids)} nodes only fit at {box['scale']:.2f}x: the picture would be unreadable"
    HELP_SHOTS.mkdir(parents=True, exist_ok=True)
    clip = {k: box[k] for k in ("x", "y", "width", "height")}
    help_page.page.screenshot(path=HELP_SHOTS / f"{node_id}.png", clip=clip)
    drawn = help_page.evaluate(
        "(ids) => ids.filter((id) => app.canvas.visible_nodes.some((n) => String(n.id) === String(id)))", ids)
    assert sorted(map(str, drawn)) == sorted(map(str, ids)), f"drawn {drawn} of {ids}"
    errors = help_page.errors_since_mark(expected=tuple(
        f"/api/view?type=input&filename={urllib.parse.quote(n['widgets_values'][0])}&"
        for n in workflow["nodes"] if n["type"] in ("LoadVideo", "LoadImage")))
    assert errors == [], "the page logged errors:\n" + "\n".join(errors)
    print(f"{node_id}: {TEMPLATE_OF[node_id]}.json, nodes {ids}, at {box['scale']:.2f}x: {json.dumps(box)}")
