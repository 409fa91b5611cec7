"""Turns the frontend tests' screenshots of the workflows' graphs into the templates' thumbnails
(example_workflows/<workflow>.jpg, shown by ComfyUI's template browser) and the README's pictures
(docs/images/<workflow>.png).

    bash scripts/test.sh tests/test_frontend.py     # writes tests/output/frontend/<workflow>.png
    .venv/bin/python scripts/make_thumbnails.py [SCREENSHOTS] [--only WORKFLOW ...]

``--only`` remakes the pictures of the named workflows (file stems) and leaves the others as they are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

PACK_DIR = Path(__file__).resolve().parents[1]
WORKFLOWS = PACK_DIR / "example_workflows"
DOCS_IMAGES = PACK_DIR / "docs" / "images"

THUMBNAIL_WIDTH, THUMBNAIL_QUALITY, THUMBNAIL_MAX_BYTES = 512, 80, 200_000
DOCS_WIDTH, DOCS_COLOURS, DOCS_MAX_BYTES = 1200, 256, 300_000
THUMBNAIL_ASPECT = 4 / 3
"""The template browser's cards are about 4:3."""


def resized(image: Image.Image, width: int) -> Image.Image:
    if image.width <= width:
        return image.copy()
    return image.resize((width, round(image.height * width / image.width)), Image.Resampling.LANCZOS)


def middle(image: Image.Image, aspect: float) -> Image.Image:
    """The middle of ``image`` at ``aspect`` (width / height): a wide graph loses its two ends
    (the loader on the left, the save nodes on the right) and keeps the SimDA nodes readable; a
    tall one is framed in the colour of its top-left pixel (the canvas)."""
    if image.width > image.height * aspect:
        width = round(image.height * aspect)
        left = (image.width - width) // 2
        return image.crop((left, 0, left + width, image.height))
    frame = Image.new("RGB", (round(image.height * aspect), image.height), image.getpixel((0, 0)))
    frame.paste(image, ((frame.width - image.width) // 2, 0))
    return frame


def thumbnail(screenshot: Path, target: Path) -> int:
    with Image.open(screenshot) as image:
        picture = resized(middle(image.convert("RGB"), THUMBNAIL_ASPECT), THUMBNAIL_WIDTH)
    picture.save(target, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True, progressive=True)
    return target.stat().st_size


def docs_picture(screenshot: Path, target: Path, width: int = DOCS_WIDTH, colours: int = DOCS_COLOURS) -> int:
    """A smaller PNG with a reduced palette (the graph is flat UI colours; it stays sharp); its size in bytes."""
    with Image.open(screenshot) as image:
        picture = resized(image.convert("RGB"), width)
    picture.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(target, "PNG", optimize=True)
    return target.stat().st_size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("screenshots", nargs="?", type=Path, default=PACK_DIR / "tests" / "output" / "frontend")
    parser.add_argument("--only", nargs="+", metavar="WORKFLOW", help="only these workflows (file stems)")
    args = parser.parse_args()
    names = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    unknown = sorted(set(args.only or ()) - set(names))
    if unknown:
        print(f"no workflow {', '.join(unknown)} in {WORKFLOWS}", file=sys.stderr)
        return 1
    names = sorted(args.only) if args.only else names
    missing = [n for n in names if not (args.screenshots / f"{n}.png").is_file()]
    if missing:
        print(f"no screenshot of {', '.join(missing)} in {args.screenshots}: run tests/test_frontend.py first",
              file=sys.stderr)
        return 1
    DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
    too_big = []
    for name in names:
        screenshot = args.screenshots / f"{name}.png"
        for target, make, limit in ((WORKFLOWS / f"{name}.jpg", thumbnail, THUMBNAIL_MAX_BYTES),
                                    (DOCS_IMAGES / f"{name}.png", docs_picture, DOCS_MAX_BYTES)):
            size = make(screenshot, target)
            print(f"{target.relative_to(PACK_DIR)}: {size // 1000} kB")
            if size > limit:
                too_big.append(f"{target.name} ({size} bytes > {limit})")
    if too_big:
        print("too big: " + ", ".join(too_big), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
