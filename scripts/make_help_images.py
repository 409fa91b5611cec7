"""Turns the help-page tests' pictures of each node in its template (tests/output/help/<NodeID>.png,
taken in ComfyUI's own frontend by tests/test_help_pages.py) into the pictures the nodes' help pages
show (web/docs/images/<NodeID>.png): at most 1000 pixels wide, a reduced palette (the canvas is flat
UI colours, so it stays sharp), well under 300 KB each.

    cd tests && COMFYUI_PATH=$PWD/../.hosts/0.3.75/ComfyUI ../.hosts/0.3.75/venv/bin/python -m pytest \
        test_help_pages.py -k in_its_template            # writes tests/output/help/<NodeID>.png
    .hosts/0.3.75/venv/bin/python scripts/make_help_images.py [SCREENSHOTS] [--only NodeID ...]

A page that shows another node's picture (a deprecated node's page shows its replacement's) gets
none of its own. ``--only`` remakes the pictures of the named nodes and leaves the others as they are.

Take them on ComfyUI 0.3.75 (frontend 1.32.9): frontend 1.49.6 (0.33.0) outlines in red every node whose
model file the test server lacks, and the templates name checkpoints and adapters it does not have.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from make_thumbnails import docs_picture

PACK_DIR = Path(__file__).resolve().parents[1]
DOCS = PACK_DIR / "web" / "docs"
WIDTH, COLOURS, MAX_BYTES = 1000, 128, 200_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("screenshots", nargs="?", type=Path, default=PACK_DIR / "tests" / "output" / "help")
    parser.add_argument("--only", nargs="+", metavar="NodeID", help="only these nodes' pictures")
    args = parser.parse_args()
    nodes = sorted(p.stem for p in DOCS.glob("*.md") if f"images/{p.stem}.png" in p.read_text(encoding="utf-8"))
    unknown = sorted(set(args.only or ()) - set(nodes))
    if unknown:
        print(f"no page in {DOCS} shows a picture of its own for {', '.join(unknown)}", file=sys.stderr)
        return 1
    nodes = sorted(args.only) if args.only else nodes
    missing = [n for n in nodes if not (args.screenshots / f"{n}.png").is_file()]
    if missing:
        print(f"no picture of {', '.join(missing)} in {args.screenshots}: run tests/test_help_pages.py first",
              file=sys.stderr)
        return 1
    (DOCS / "images").mkdir(parents=True, exist_ok=True)
    too_big = []
    for node in nodes:
        target = DOCS / "images" / f"{node}.png"
        size = docs_picture(args.screenshots / f"{node}.png", target, WIDTH, COLOURS)
        print(f"{target.relative_to(PACK_DIR)}: {size // 1000} kB")
        if size > MAX_BYTES:
            too_big.append(f"{target.name} ({size} bytes > {MAX_BYTES})")
    if too_big:
        print("too big: " + ", ".join(too_big), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
