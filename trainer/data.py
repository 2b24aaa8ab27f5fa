"""Flickr30k as people have it (Kaggle's `results.csv` + `flickr30k_images/`, from the download's root, the
folder with `results.csv`, or the image folder itself), or a folder of images with a `metadata.jsonl` (the
diffusers convention), turned into (image, captions) records, a held-out split by image, and the reading
of one image into a training array (a bad image is skipped and counted, never stopping an epoch)."""

from __future__ import annotations

import csv
import json
import logging
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from imagine.images import to_rgb

logger = logging.getLogger(__name__)

KAGGLE_CAPTIONS = "results.csv"
KAGGLE_IMAGES = "flickr30k_images"
METADATA = "metadata.jsonl"
MIN_SIDE = 64
"""Images smaller than this on their short side are skipped: upscaling them teaches blur."""
MAX_ASPECT_RATIO = 4.0
"""Beyond this, a center crop keeps too little of the picture for its caption to still describe it."""
# A caption line whose second `|` is missing: `2199200615.jpg| 4   A dog runs across the grass .`
_MISSING_SEPARATOR = re.compile(r"^\s*(\d+)\s+(\S.*)$")


class DatasetError(ValueError):
    """The data folder is not in a layout we read; the message says what was expected."""


@dataclass
class ImageRecord:
    image_path: Path
    captions: list[str]


@dataclass
class SkipReport:
    """Images left out, by reason, so a run can say what it did not train on."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def skip(self, reason: str, path: Path | str) -> None:
        self.counts[reason] += 1
        self.examples.setdefault(reason, str(path))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no image skipped"
        parts = [f"{count} {reason} (e.g. {self.examples[reason]})" for reason, count in self.counts.most_common()]
        return f"{self.total} images skipped: " + "; ".join(parts)


def read_kaggle_captions(csv_path: Path) -> pd.DataFrame:
    """`image_name| comment_number| comment` lines, the one line with a missing `|` included."""
    frame = pd.read_csv(
        csv_path,
        sep="|",
        header=0,
        names=["image_name", "comment_number", "comment"],
        dtype=str,
        quoting=csv.QUOTE_NONE,
        skipinitialspace=True,
        keep_default_na=False,
        engine="python",
    )
    frame = frame.fillna("").apply(lambda column: column.str.strip())
    broken = frame["comment"] == ""
    for index in frame.index[broken]:
        match = _MISSING_SEPARATOR.match(frame.at[index, "comment_number"])
        if match is None:
            raise DatasetError(f"{csv_path}: cannot read the caption line for {frame.at[index, 'image_name']!r}")
        frame.at[index, "comment_number"], frame.at[index, "comment"] = match.groups()
    if broken.any():
        logger.info("%s: repaired %d caption lines with a missing '|'", csv_path.name, int(broken.sum()))
    return frame


SEARCH_DEPTH = 2
"""How many folders down from --data the caption file is looked for (Kaggle's zip nests it one down)."""


def find_caption_file(data_dir: Path) -> Path | None:
    """`results.csv` or `metadata.jsonl` in the folder or up to SEARCH_DEPTH folders below it (the nearest
    first), or, given the image folder itself, in the folder above it."""
    candidates = [data_dir]
    level = [data_dir]
    for _ in range(SEARCH_DEPTH):
        level = sorted(child for folder in level for child in folder.iterdir() if child.is_dir())
        candidates += level
    candidates.append(data_dir.parent)
    for folder in candidates:
        for name in (KAGGLE_CAPTIONS, METADATA):
            if (folder / name).is_file():
                return folder / name
    return None


def _find_images_folder(captions: Path, first_image: str) -> Path:
    """The folder beside the caption file that holds its images: `flickr30k_images/`, the same nested once more
    (`flickr30k_images/flickr30k_images/`, as the zip has it), or the caption file's own folder."""
    root = captions.parent
    tried = [root / KAGGLE_IMAGES / KAGGLE_IMAGES, root / KAGGLE_IMAGES, root]
    for folder in tried:
        if (folder / first_image).is_file():
            return folder
    raise DatasetError(
        f"{captions} names {first_image}, but no image folder beside it holds it (looked in "
        f"{', '.join(str(folder) for folder in tried)}); give --data the folder that holds {KAGGLE_CAPTIONS} "
        f"and {KAGGLE_IMAGES}/"
    )


def load_records(data_dir: Path) -> list[ImageRecord]:
    """Every image of the data folder with its non-empty captions, in a stable order. An image whose every
    caption is empty is left out with a warning (it would teach nothing but the empty prompt)."""
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir} is not a folder: give --data the folder that holds {KAGGLE_CAPTIONS}")
    captions = find_caption_file(data_dir)
    if captions is None:
        raise DatasetError(
            f"{data_dir} holds neither Kaggle's Flickr30k layout ({KAGGLE_CAPTIONS} + {KAGGLE_IMAGES}/) nor a "
            f"folder of images with a {METADATA} of {{'file_name', 'text'}} lines, nor one of them up to "
            f"{SEARCH_DEPTH} folders down: give --data the folder that holds {KAGGLE_CAPTIONS} (or {METADATA})"
        )
    if captions != data_dir / captions.name:
        logger.info("reading %s (found under --data %s)", captions, data_dir)
    if captions.name == KAGGLE_CAPTIONS:
        frame = read_kaggle_captions(captions)
        if frame.empty:
            raise DatasetError(f"{captions} holds no caption lines")
        grouped = frame.groupby("image_name", sort=True)["comment"].apply(list)
        images = _find_images_folder(captions, str(grouped.index[0]))
        records = [ImageRecord(images / name, texts) for name, texts in grouped.items()]
    else:
        by_image: dict[str, list[str]] = {}
        for number, line in enumerate(captions.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                by_image.setdefault(entry["file_name"], []).append(str(entry["text"]))
            except (ValueError, KeyError, TypeError) as error:
                raise DatasetError(f"{captions}:{number}: expected {{'file_name', 'text'}} ({error})") from None
        records = [ImageRecord(captions.parent / name, texts) for name, texts in sorted(by_image.items())]
    kept = []
    for record in records:
        texts = [text.strip() for text in record.captions if text.strip()]
        if texts:
            kept.append(ImageRecord(record.image_path, texts))
    if len(kept) < len(records):
        logger.warning("%d images have only empty captions and are left out", len(records) - len(kept))
    if not kept:
        raise DatasetError(f"every caption in {captions} is empty: there is nothing to learn from")
    return kept


def split_by_image(
    records: list[ImageRecord], holdout_fraction: float, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out): a split by image, never by caption, so no held-out picture is ever trained on."""
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout fraction must be in [0, 1) (got {holdout_fraction})")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(records) * holdout_fraction)) if holdout_fraction and len(records) > 1 else 0
    held_out = sorted(order[:held])
    kept = sorted(order[held:])
    return [records[i] for i in kept], [records[i] for i in held_out]


def open_rgb(path: Path, report: SkipReport) -> Image.Image | None:
    """The image in RGB (grayscale, RGBA, CMYK, palette converted), or None, counted in `report`."""
    try:
        with Image.open(path) as image:
            image.load()
            converted = to_rgb(image)
    except FileNotFoundError:
        report.skip("missing", path)
        return None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        report.skip("unreadable or truncated", path)
        return None
    width, height = converted.size
    if min(width, height) < MIN_SIDE:
        report.skip(f"smaller than {MIN_SIDE} px", path)
        return None
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        report.skip(f"aspect ratio over {MAX_ASPECT_RATIO:g}:1", path)
        return None
    return converted


def to_training_array(image: Image.Image, size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random):
    """Resize the image to cover `size` (width, height) keeping its aspect ratio, crop that (centre or
    random), maybe mirror it, and scale to [-1, 1] as a CHW float32 array."""
    target_width, target_height = size
    width, height = image.size
    scale = max(target_width / width, target_height / height)
    resized = image.resize(
        (max(target_width, round(width * scale)), max(target_height, round(height * scale))),
        Image.Resampling.BICUBIC,
    )
    width, height = resized.size
    if center_crop:
        left, top = (width - target_width) // 2, (height - target_height) // 2
    else:
        left, top = rng.randint(0, width - target_width), rng.randint(0, height - target_height)
    cropped = resized.crop((left, top, left + target_width, top + target_height))
    if flip:
        cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0
    return array.transpose(2, 0, 1)
