"""Draws the Comfy Registry's pictures of the pack: web/registry/icon.png (square, 400x400) and
web/registry/banner.png (21:9, 1260x540), named by pyproject.toml's [tool.comfy] Icon and Banner.

What they show is what SimDA does: a clip is a strip of frames, each frame a grid of latent tokens;
an object (orange tokens) moves from frame to frame, and in Latent-Shift Attention every frame also
attends to tokens shifted in from the frame before it (the outlined teal tokens, where the object
was one frame earlier). Everything is drawn here with Pillow and its built-in font.

    .hosts/0.33.0/venv/bin/python scripts/make_registry_pictures.py
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PACK_DIR = Path(__file__).resolve().parents[1]
PICTURES = PACK_DIR / "web" / "registry"
ICON_SIZE = 400
BANNER_SIZE = (1260, 540)
"""21:9 exactly (1260 / 540 = 2.333...)."""

BACKGROUND = (23, 26, 33)
FRAME = (44, 49, 61)
FRAME_EDGE = (88, 97, 118)
TOKEN = (64, 71, 88)
OBJECT = (255, 140, 50)
SHIFTED = (40, 190, 175)
TEXT = (236, 239, 244)
MUTED = (150, 160, 180)
GRID = 6
"""Tokens per side of one frame's latent grid."""


PATH = ((2, 0), (2, 1), (2, 2), (3, 2), (3, 3), (3, 4))
"""Top-left token of the moving object in each frame: it walks right, then down, then right."""


def object_cells(frame: int) -> set[tuple[int, int]]:
    """(row, column) tokens the moving 2x2 object covers in ``frame``."""
    row, col = PATH[frame]
    return {(row + dr, col + dc) for dr in (0, 1) for dc in (0, 1)}


def draw_frame(draw: ImageDraw.ImageDraw, x: float, y: float, side: float, frame: int) -> None:
    """One frame at (x, y), ``side`` pixels wide: its token grid with the object of ``frame`` and,
    from the second frame on, the tokens shifted in from the frame before."""
    pad = side * 0.07
    draw.rounded_rectangle((x, y, x + side, y + side), radius=side * 0.08, fill=FRAME, outline=FRAME_EDGE,
                           width=max(1, round(side / 90)))
    cell = (side - 2 * pad) / GRID
    gap = cell * 0.14
    here = object_cells(frame)
    before = object_cells(frame - 1) if frame > 0 else set()
    for row in range(GRID):
        for col in range(GRID):
            box = (x + pad + col * cell + gap, y + pad + row * cell + gap,
                   x + pad + (col + 1) * cell - gap, y + pad + (row + 1) * cell - gap)
            colour = OBJECT if (row, col) in here else TOKEN
            draw.rounded_rectangle(box, radius=cell * 0.18, fill=colour)
            if (row, col) in before:
                draw.rounded_rectangle(box, radius=cell * 0.18, outline=SHIFTED, width=max(2, round(cell / 9)))


def draw_shift_arrow(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, size: float) -> None:
    """A teal arrow from one frame to the next: tokens flow forward in time."""
    width = max(2, round(size / 7))
    draw.line((x0, y, x1 - size, y), fill=SHIFTED, width=width)
    draw.polygon(((x1, y), (x1 - size, y - size * 0.6), (x1 - size, y + size * 0.6)), fill=SHIFTED)


def icon() -> Image.Image:
    """Three frames of the clip stacked in depth, the front one with its shifted tokens."""
    picture = Image.new("RGB", (ICON_SIZE, ICON_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(picture)
    side, step = 250, 48
    for frame in range(3):  # the oldest frame at the back (top left), the newest in front
        corner = 26 + step * frame
        draw_frame(draw, corner, corner, side, frame)
    return picture


def banner() -> Image.Image:
    """A strip of six frames with arrows between them, and the pack's name and one line on what it does."""
    width, height = BANNER_SIZE
    picture = Image.new("RGB", BANNER_SIZE, BACKGROUND)
    draw = ImageDraw.Draw(picture)
    title = ImageFont.load_default(size=92)
    line = ImageFont.load_default(size=34)
    draw.text((70, 40), "SimDA", font=title, fill=TEXT)
    draw.text((74, 150), "turns a Stable Diffusion image model into a video model", font=line, fill=MUTED)
    draw.text((74, 194), "latent-shift attention across frames + small trained adapters", font=line, fill=MUTED)
    frames, side, gap = 6, 168, 32
    left = (width - frames * side - (frames - 1) * gap) / 2
    top = 262
    for frame in range(frames):
        x = left + frame * (side + gap)
        draw_frame(draw, x, top, side, frame)
        if frame:
            draw_shift_arrow(draw, x - gap + 5, x - 4, top + side / 2, 12)
    key = ImageFont.load_default(size=26)
    y = top + side + 40
    draw.rounded_rectangle((left, y, left + 26, y + 26), radius=5, fill=OBJECT)
    draw.text((left + 40, y - 2), "the moving object, frame by frame", font=key, fill=MUTED)
    middle = left + 3 * (side + gap)
    draw.rounded_rectangle((middle, y, middle + 26, y + 26), radius=5, fill=TOKEN, outline=SHIFTED, width=4)
    draw.text((middle + 40, y - 2), "tokens shifted in from the frame before", font=key, fill=MUTED)
    return picture


def main() -> int:
    PICTURES.mkdir(parents=True, exist_ok=True)
    for name, picture in (("icon.png", icon()), ("banner.png", banner())):
        target = PICTURES / name
        picture.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(target, "PNG", optimize=True)
        print(f"{target.relative_to(PACK_DIR)}: {picture.width}x{picture.height}, {target.stat().st_size // 1000} kB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
