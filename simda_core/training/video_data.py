"""Clips with captions for collection training: plain PyTorch and PyAV, no host code.

A collection is either a folder of clips with side-car captions (``walk.mp4`` + ``walk.txt``, found
recursively) or a CSV in the style of WebVid. Each sample is ``frames`` frames taken every
``stride``-th from a random start, cropped to the target aspect (randomly or in the centre) and
resized to ``width x height``: float ``[F, H, W, 3]`` in 0..1, as the host's VAE takes them.

Every random choice of a sample (start frame, crop) comes from the sample's own seed, so a sample is
the same whichever process or data-loader worker makes it (see :class:`GlobalBatchPlan`).
"""
from __future__ import annotations

import csv
import functools
import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

log = logging.getLogger("SimDA")

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
PATH_COLUMNS = ("path", "video", "file")
"""CSV header names (case-insensitive) for the clip's file, relative to the data folder."""
CAPTION_COLUMNS = ("caption", "name", "text")
"""CSV header names for the caption (``name`` is WebVid's caption column)."""
WEBVID_ID_COLUMN, WEBVID_DIR_COLUMN = "videoid", "page_dir"
"""Without a path column, a WebVid CSV row names ``<page_dir>/<videoid>.mp4`` (or ``<videoid>.mp4``)."""
CROPS = ("random", "center")


class VideoDataError(ValueError):
    """The collection cannot be used as it is; the message says what to do."""


class ClipTooShortError(VideoDataError):
    """A clip has fewer frames than one sample spans."""


@dataclass(frozen=True)
class ClipEntry:
    path: Path
    caption: str


@dataclass(frozen=True)
class ClipSampling:
    """How a training sample is cut from a clip."""

    frames: int = 16
    stride: int = 2
    width: int = 512
    height: int = 512
    crop: str = "random"
    """``random``: a random window of the target aspect; ``center``: the middle one."""

    def __post_init__(self):
        if self.frames < 2:
            raise VideoDataError(f"frames is {self.frames}; a video sample needs at least 2 frames.")
        if self.stride < 1:
            raise VideoDataError(f"stride is {self.stride}; use 1 (every frame) or more.")
        if self.width < 8 or self.height < 8 or self.width % 8 or self.height % 8:
            raise VideoDataError(
                f"{self.width}x{self.height} is not a multiple of 8 "
                "on both sides; SD latents are 1/8 of the image size."
            )
        if self.crop not in CROPS:
            raise VideoDataError(f"crop '{self.crop}' is unknown; use one of {', '.join(CROPS)}.")

    @property
    def span(self) -> int:
        """Source frames one sample covers: first to last picked frame."""
        return (self.frames - 1) * self.stride + 1


# -- finding clips -------------------------------------------------------------------------------

def _shown(paths: list[Path], root: Path, limit: int = 5) -> str:
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths[:limit]]
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(names) + more


def find_clips(folder: str | Path) -> list[ClipEntry]:
    """Clips under ``folder`` (recursively, sorted by path; hidden files such as macOS ``._`` files
    left out) with their side-car ``.txt`` captions. Every clip must have a non-empty caption; all
    missing ones are named in one error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise VideoDataError(
            f"the data folder '{folder}' does not exist; pass a folder of clips with .txt captions, or --csv."
        )
    clips = sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not clips:
        raise VideoDataError(
            f"the data folder '{folder}' holds no clips ({', '.join(VIDEO_EXTENSIONS)}); put clips with a .txt caption "
            "next to each in it, or pass a CSV with --csv."
        )
    entries, missing = [], []
    for clip in clips:
        caption_file = clip.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.is_file() else ""
        if caption:
            entries.append(ClipEntry(clip, " ".join(caption.split())))
        else:
            missing.append(clip)
    if missing:
        raise VideoDataError(
            f"{len(missing)} of {len(clips)} clips in '{folder}' have no caption ({_shown(missing, folder)}): add a "
            "non-empty .txt file with the same name next to each clip (walk.mp4 -> walk.txt)."
        )
    return entries


def _column(header: list[str], names: tuple[str, ...]) -> str | None:
    by_lower = {h.strip().lower(): h for h in header}
    return next((by_lower[n] for n in names if n in by_lower), None)


def read_csv(csv_path: str | Path, root: str | Path | None = None) -> list[ClipEntry]:
    """Clips listed in a CSV, in row order. Header names (case-insensitive): the clip from ``path``,
    ``video`` or ``file`` (else WebVid's ``videoid`` [+ ``page_dir``] -> ``<page_dir>/<videoid>.mp4``),
    the caption from ``caption``, ``name`` or ``text``. Relative paths are taken from ``root``
    (default: the CSV's folder). Rows whose file does not exist are skipped with one warning (a
    partial download is normal); a row without a caption is an error."""
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    if not csv_path.is_file():
        raise VideoDataError(f"the CSV '{csv_path}' does not exist.")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        path_column = _column(header, PATH_COLUMNS)
        id_column = _column(header, (WEBVID_ID_COLUMN,))
        dir_column = _column(header, (WEBVID_DIR_COLUMN,))
        caption_column = _column(header, CAPTION_COLUMNS)
        if caption_column is None or (path_column is None and id_column is None):
            raise VideoDataError(
                f"the CSV '{csv_path.name}' has the columns {header}; it needs a clip column "
                f"({'/'.join(PATH_COLUMNS)}, or WebVid's videoid) and a caption column ({'/'.join(CAPTION_COLUMNS)})."
            )
        entries, absent, uncaptioned = [], [], []
        for row_number, row in enumerate(reader, start=2):
            if path_column is not None:
                name = (row.get(path_column) or "").strip()
            else:
                video_id = (row.get(id_column) or "").strip()
                page = (row.get(dir_column) or "").strip() if dir_column else ""
                name = str(Path(page) / f"{video_id}.mp4") if video_id else ""
            caption = " ".join((row.get(caption_column) or "").split())
            if not name:
                raise VideoDataError(
                    f"row {row_number} of '{csv_path.name}' names no clip; fill in its {path_column or id_column}."
                )
            path = Path(name) if Path(name).is_absolute() else root / name
            if not caption:
                uncaptioned.append(row_number)
            elif not path.is_file():
                absent.append(path)
            else:
                entries.append(ClipEntry(path, caption))
    if uncaptioned:
        rows = ", ".join(map(str, uncaptioned[:10])) + (" ..." if len(uncaptioned) > 10 else "")
        raise VideoDataError(
            f"{len(uncaptioned)} rows of '{csv_path.name}' have no caption (rows {rows}); fill in the "
            f"'{caption_column}' column or remove those rows."
        )
    if absent:
        log.warning(
            "SimDA data: %d clips listed in %s do not exist and are skipped (%s).",
            len(absent), csv_path.name, _shown(absent, root),
        )
    if not entries:
        raise VideoDataError(
            f"none of the clips listed in '{csv_path.name}' exist under '{root}'; point --data at the folder the "
            "CSV's paths are relative to."
        )
    return entries


# -- decoding ------------------------------------------------------------------------------------

def _frame_count(container, stream) -> int:
    """Frames in the stream: the container's count where it has one, else its packets counted."""
    if stream.frames and stream.frames > 0:
        return int(stream.frames)
    return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(path: Path, start: int, frames: int, stride: int) -> tuple[list, int]:
    """RGB ``uint8`` arrays of frames ``start, start + stride, ...`` (up to ``frames``) and the
    number of frames decoded (the clip's length when it ended early)."""
    import av

    picked, decoded = [], 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            decoded = index + 1
            if index >= start and (index - start) % stride == 0:
                picked.append(frame.to_ndarray(format="rgb24"))
                if len(picked) == frames:
                    break
    return picked, decoded


def clip_frame_count(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoDataError(f"'{path.name}' has no video stream.")
        return _frame_count(container, container.streams.video[0])


def crop_box(height: int, width: int, aspect: float, position: float) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of the largest window of ``aspect`` (width / height) in a frame;
    ``position`` 0..1 slides it along the side that is cut (0.5 = centre)."""
    if width / height > aspect:
        w = max(1, min(width, round(height * aspect)))
        return 0, round((width - w) * position), height, w
    h = max(1, min(height, round(width / aspect)))
    return round((height - h) * position), 0, h, width


def fit_frames(frames: torch.Tensor, width: int, height: int, position: float = 0.5) -> torch.Tensor:
    """``[F, H, W, 3]`` frames (``uint8``, or float in 0..1) cropped to the aspect of ``width x height``
    at ``position`` (0.5: the centre) and resized to it with an antialiased filter, so a large
    source shrinks without aliasing: float ``[F, height, width, 3]`` in 0..1. The one way the Edit
    Tuner and the collection trainer fit frames to a size."""
    _, source_height, source_width, _ = frames.shape
    top, left, h, w = crop_box(source_height, source_width, width / height, position)
    pixels = frames[:, top:top + h, left:left + w, :3].permute(0, 3, 1, 2)
    pixels = pixels.float() / 255.0 if not pixels.is_floating_point() else pixels.float()
    if (h, w) != (height, width):
        pixels = torch.nn.functional.interpolate(
            pixels, size=(height, width), mode="bilinear", align_corners=False, antialias=True
        )
    return pixels.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def load_sample(path: Path, sampling: ClipSampling, seed: int) -> torch.Tensor:
    """One training sample of a clip: ``[frames, height, width, 3]`` float in 0..1. The start frame
    and crop come from ``seed``. Raises :class:`ClipTooShortError` when the clip has fewer than
    ``sampling.span`` frames."""
    rng = random.Random(seed)
    total = clip_frame_count(path)
    for _ in range(2):  # a container's frame count can be wrong: retry once with the decoded count
        if total < sampling.span:
            raise ClipTooShortError(
                f"'{path.name}' has {total} frames; a sample of {sampling.frames} frames every {sampling.stride}"
                f" needs {sampling.span}."
            )
        start = rng.randint(0, total - sampling.span)
        picked, decoded = _decode_frames(path, start, sampling.frames, sampling.stride)
        if len(picked) == sampling.frames:
            break
        total = decoded
    else:
        raise ClipTooShortError(f"'{path.name}' could not be decoded to {sampling.span} frames.")
    position = 0.5 if sampling.crop == "center" else rng.random()
    return fit_frames(torch.from_numpy(np.stack(picked)), sampling.width, sampling.height, position)


# -- the dataset and the global batch plan -------------------------------------------------------

def derived_seed(seed: int, *parts) -> int:
    """A 63-bit seed from ``seed`` and ``parts``, the same on every machine and process."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


class VideoClipDataset(Dataset):
    """Samples addressed by ``(clip index, sample seed)`` keys (from :class:`GlobalBatchPlan`).

    A clip that is too short for one sample or cannot be decoded is skipped with a warning and the
    next clip of the collection takes its place (deterministically, so every process agrees);
    training only stops when no clip at all is usable. Skipping rather than failing lets a large
    collection with a few short or broken files train; the warnings name them."""

    def __init__(self, entries: list[ClipEntry], sampling: ClipSampling):
        if not entries:
            raise VideoDataError("the collection holds no clips.")
        self.entries = list(entries)
        self.sampling = sampling
        self._unusable: set[int] = set()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        for offset in range(len(self.entries)):
            candidate = (index + offset) % len(self.entries)
            if candidate in self._unusable:
                continue
            entry = self.entries[candidate]
            try:
                frames = load_sample(entry.path, self.sampling, seed)
            except ClipTooShortError as e:
                log.warning("SimDA data: skipping %s: %s", entry.path, e)
            except Exception as e:  # noqa: BLE001  (PyAV raises many kinds for a broken file)
                log.warning("SimDA data: skipping %s: it cannot be decoded (%s: %s).", entry.path, type(e).__name__, e)
            else:
                return {"frames": frames, "caption": entry.caption, "path": str(entry.path)}
            self._unusable.add(candidate)
        raise VideoDataError(
            f"none of the {len(self.entries)} clips gives a sample of {self.sampling.frames} frames every "
            f"{self.sampling.stride} (each needs {self.sampling.span} "
            "frames); use shorter --frames or --stride, or longer clips."
        )


@functools.lru_cache(maxsize=2)
def _permutation(clips: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    return torch.randperm(clips, generator=generator)


@dataclass(frozen=True)
class GlobalBatchPlan:
    """Which samples make up each step's global batch, independent of the number of processes.

    Sample ``n = step * global_batch + slot`` is clip ``perm_e[n % clips]`` of epoch
    ``e = n // clips`` (``perm_e`` a seeded permutation), with its own sample seed. Process ``rank``
    of ``world`` takes the slots ``[rank * B, (rank + 1) * B)`` with ``B = global_batch / world``."""

    clips: int
    global_batch: int
    seed: int

    def permutation(self, epoch: int) -> torch.Tensor:
        return _permutation(self.clips, self.seed, epoch)

    def sample_number(self, step: int, slot: int) -> int:
        return step * self.global_batch + slot

    def key(self, step: int, slot: int) -> tuple[int, int]:
        n = self.sample_number(step, slot)
        return int(self.permutation(n // self.clips)[n % self.clips]), derived_seed(self.seed, "sample", n)

    def slots(self, rank: int, world: int) -> range:
        if self.global_batch % world:
            raise VideoDataError(f"a global batch of {self.global_batch} does not split evenly over {world} processes.")
        per_rank = self.global_batch // world
        return range(rank * per_rank, (rank + 1) * per_rank)

    def shard(self, step: int, rank: int, world: int) -> list[tuple[int, int]]:
        return [self.key(step, slot) for slot in self.slots(rank, world)]


class ShardSampler(Sampler):
    """Per step, this process's keys of the global batch (a ``batch_sampler`` for DataLoader)."""

    def __init__(self, plan: GlobalBatchPlan, rank: int, world: int, start_step: int, end_step: int):
        self.plan, self.rank, self.world = plan, rank, world
        self.start_step, self.end_step = start_step, end_step
        plan.slots(rank, world)  # checks the split

    def __len__(self) -> int:
        return max(0, self.end_step - self.start_step)

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            yield self.plan.shard(step, self.rank, self.world)


def collate_clips(items: list[dict]) -> dict:
    return {
        "frames": torch.stack([item["frames"] for item in items]),
        "captions": [item["caption"] for item in items],
        "paths": [item["path"] for item in items],
    }
