"""What a re-run with changed inversion settings costs: the one-node Edit Tuner (which trains again)
against One-Shot Tuner -> SimDA Invert (whose training the host serves from its cache), in one run.

Both graphs are tests/fixtures/old_edit_tuner/prompt.json (Load Video -> tuner -> Video Sampler, Save
Latent, Save SimDA Adapters, Save Animated WEBP, Plot Loss Graph) on the random SD1.5 test checkpoint
of tests/live_server.py, served by the host's own server (``--cache-classic``, where the host has the
flag). "before" runs it as saved, with SimDA Edit Tuner; "after" runs it in the two-node form
(tests/test_edit_split.py's ``two_node_form``). Each is queued once to fill the cache, then again
``--reruns`` times, each time with other inversion steps (and the Video Sampler's steps to match): the
time of those re-runs is the host's own (its ``execution_start`` to ``execution_success`` messages).

    python bench/bench_edit_rerun.py                       # 4 frames of 128x64, 100 training steps
    python bench/bench_edit_rerun.py --training-steps 300  # the tuner's default number of steps

Run it with the host's Python (COMFYUI_PATH as for the tests); it prints a Markdown table and writes
bench/out/edit_rerun.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PACK_DIR / "tests"))

import host  # noqa: E402  (first: it puts the host on sys.path and imports the pack)
import old_edit_tuner  # noqa: E402
from live_server import cached_test_models, execution_error, make_base_dir, start_server  # noqa: E402
from test_edit_split import INVERT, TUNER, cache_classic_args, two_node_form  # noqa: E402

SAMPLER = old_edit_tuner.SAMPLER


def graph(server, form: str, training_steps: int, inversion_steps: int) -> dict:
    """prompt.json in ``form`` ("before": as saved; "after": the two-node form) with these steps."""
    prompt = old_edit_tuner.old_form_prompt(server, f"bench_{form}")
    prompt[TUNER]["inputs"]["steps"] = training_steps
    prompt[SAMPLER]["inputs"]["steps"] = inversion_steps
    if form == "before":
        prompt[TUNER]["inputs"]["inversion_steps"] = inversion_steps
        return prompt
    prompt = two_node_form(prompt)
    prompt[INVERT]["inputs"]["steps"] = inversion_steps
    return prompt


def run_seconds(server, prompt: dict) -> tuple[float, list[str]]:
    """The host's time for ``prompt`` (execution_start to execution_success) and the nodes it took from its cache."""
    entry = server.run_prompt(prompt, timeout=3600)
    problem = execution_error(entry)
    if problem:
        raise RuntimeError(problem)
    stamps = {event: data["timestamp"] for event, data in entry["status"]["messages"] if "timestamp" in data}
    cached = next((data["nodes"] for event, data in entry["status"]["messages"] if event == "execution_cached"), [])
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000, list(cached)


def measure(server, training_steps: int, inversion_steps: int, reruns: int) -> dict:
    """Per form: the first run, then the re-runs (one graph after the other: the host's classic cache
    keeps what the last prompt used, so another graph in between would empty it)."""
    results = {form: {"first": None, "reruns": [], "cached": []} for form in ("before", "after")}
    for form in results:
        results[form]["first"], _ = run_seconds(server, graph(server, form, training_steps, inversion_steps))
        for rerun in range(1, reruns + 1):
            seconds, cached = run_seconds(server, graph(server, form, training_steps, inversion_steps + rerun))
            results[form]["reruns"].append(seconds)
            results[form]["cached"].append(TUNER in cached)
    return results


def table(results: dict, args) -> str:
    before = statistics.median(results["before"]["reruns"])
    after = statistics.median(results["after"]["reruns"])
    lines = [
        "| graph | first run s | re-run with other inversion steps, s (median) | tuner from the cache | x before |",
        "|---|---|---|---|---|",
    ]
    for form, median in (("before", before), ("after", after)):
        name = "Edit Tuner (one node)" if form == "before" else "One-Shot Tuner -> SimDA Invert"
        runs = ", ".join(f"{s:.1f}" for s in results[form]["reruns"])
        lines.append(f"| {name} | {results[form]['first']:.1f} | {median:.1f} ({runs}) | "
                     f"{'yes' if all(results[form]['cached']) else 'no'} | {median / before:.3f} |")
    lines.append("")
    fit = json.loads(old_edit_tuner.PROMPT.read_text())[TUNER]["inputs"]
    lines.append(f"{fit['frames']} frames of {fit['width']}x{fit['height']}, {args.training_steps} training steps, "
                 f"{args.inversion_steps}+k inversion and "
                 f"sampling steps; {platform.processor() or platform.machine()}, ComfyUI "
                 f"{'.'.join(map(str, host.HOST_VERSION))}.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-steps", type=int, default=100)
    parser.add_argument("--inversion-steps", type=int, default=10)
    parser.add_argument("--reruns", type=int, default=2)
    args = parser.parse_args()
    checkpoint, adapters = cached_test_models()
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        make_base_dir(base, checkpoint, adapters)
        server = start_server(base, extra_args=cache_classic_args())
        try:
            old_edit_tuner.provide_source_clip(server)
            results = measure(server, args.training_steps, args.inversion_steps, args.reruns)
        finally:
            server.stop()
    out = PACK_DIR / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "edit_rerun.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=1))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
