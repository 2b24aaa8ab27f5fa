"""Reading Flickr30k as Kaggle ships it, quirks included, and images that must not stop an epoch."""

from __future__ import annotations

import importlib.util
import json
import random

import numpy as np
import pytest
from PIL import Image

from trainer.data import (
    DatasetError,
    SkipReport,
    load_records,
    open_rgb,
    read_kaggle_captions,
    split_by_image,
    to_training_array,
)

CAPTIONS = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .
1000092795.jpg| 1| Two young , White males are outside near many bushes .
2199200615.jpg| 0| A dog runs .
2199200615.jpg| 4   A dog runs across the grass .
3000000000.jpg| 0| A "quoted" caption , with commas .
"""


def make_kaggle_folder(root, nested: bool) -> None:
    images = root / "flickr30k_images"
    if nested:
        images = images / "flickr30k_images"
    images.mkdir(parents=True)
    (root / "results.csv").write_text(CAPTIONS)
    for name in ("1000092795.jpg", "2199200615.jpg", "3000000000.jpg"):
        Image.new("RGB", (120, 90), (200, 30, 30)).save(images / name)


@pytest.mark.parametrize("nested", [False, True])
def test_kaggle_layout_with_the_malformed_line(tmp_path, nested):
    make_kaggle_folder(tmp_path, nested)
    records = load_records(tmp_path)
    assert [record.image_path.name for record in records] == ["1000092795.jpg", "2199200615.jpg", "3000000000.jpg"]
    assert records[1].captions == ["A dog runs .", "A dog runs across the grass ."]
    assert records[2].captions == ['A "quoted" caption , with commas .']
    assert all(record.image_path.is_file() for record in records)
    frame = read_kaggle_captions(tmp_path / "results.csv")
    assert frame.loc[3].tolist() == ["2199200615.jpg", "4", "A dog runs across the grass ."]


def test_metadata_jsonl_layout_and_bad_layouts(tmp_path):
    lines = [
        {"file_name": "a.png", "text": "a cat"},
        {"file_name": "a.png", "text": "a small cat"},
        {"file_name": "b.png", "text": "a dog"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    records = load_records(tmp_path)
    assert [(r.image_path.name, r.captions) for r in records] == [
        ("a.png", ["a cat", "a small cat"]),
        ("b.png", ["a dog"]),
    ]
    (tmp_path / "metadata.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(DatasetError, match=r"metadata\.jsonl:1: expected"):
        load_records(tmp_path)
    with pytest.raises(DatasetError, match="nowhere is not a folder"):
        load_records(tmp_path / "nowhere")


def test_split_is_by_image_and_repeatable(tmp_path):
    from trainer.data import ImageRecord

    records = [ImageRecord(tmp_path / f"{i}.jpg", [f"caption {i}", f"other {i}"]) for i in range(100)]
    train, held_out = split_by_image(records, 0.1, seed=3)
    assert len(held_out) == 10 and len(train) == 90
    assert not {r.image_path for r in train} & {r.image_path for r in held_out}
    assert split_by_image(records, 0.1, seed=3) == (train, held_out)


def test_odd_images_are_converted_and_bad_ones_skipped_and_counted(tmp_path):
    report = SkipReport()
    Image.new("L", (80, 80), 128).save(tmp_path / "gray.jpg")
    Image.new("RGBA", (80, 80), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    Image.new("CMYK", (80, 80), (0, 255, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("P", (80, 80), 3).save(tmp_path / "palette.gif")
    for name, expected in [
        ("gray.jpg", (128, 128, 128)),
        ("clear.png", (255, 255, 255)),
        ("cmyk.jpg", None),
        ("palette.gif", None),
    ]:
        image = open_rgb(tmp_path / name, report)
        assert image is not None and image.mode == "RGB", name
        if expected:
            assert image.getpixel((5, 5)) == expected, name

    Image.new("RGB", (200, 200)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "not-an-image.jpg").write_text("hello")
    Image.new("RGB", (40, 40)).save(tmp_path / "tiny.jpg")
    Image.new("RGB", (900, 100)).save(tmp_path / "banner.jpg")
    for name in ("truncated.jpg", "not-an-image.jpg", "tiny.jpg", "banner.jpg", "missing.jpg"):
        assert open_rgb(tmp_path / name, report) is None, name
    assert report.counts == {
        "unreadable or truncated": 2,
        "smaller than 64 px": 1,
        "aspect ratio over 4:1": 1,
        "missing": 1,
    }
    assert report.summary().startswith("5 images skipped: 2 unreadable or truncated")


def test_training_array_is_a_normalised_square_crop(tmp_path):
    image = Image.new("RGB", (300, 150), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 150, 150))  # left half blue
    rng = random.Random(0)
    array = to_training_array(image, (64, 64), center_crop=True, flip=False, rng=rng)
    assert array.shape == (3, 64, 64) and array.dtype == np.float32
    assert array.min() >= -1.0 and array.max() <= 1.0
    left_edge = to_training_array(image, (64, 64), center_crop=False, flip=False, rng=random.Random(1))
    flipped = to_training_array(image, (64, 64), center_crop=True, flip=True, rng=rng)
    assert np.allclose(flipped, array[:, :, ::-1])
    assert left_edge.shape == (3, 64, 64)


def make_download(root) -> None:
    """Kaggle's zip as it unzips: flickr30k_images/results.csv beside flickr30k_images/flickr30k_images/*.jpg."""
    make_kaggle_folder(root / "flickr30k_images", nested=True)


@pytest.mark.parametrize("given", ["", "flickr30k_images", "flickr30k_images/flickr30k_images"])
def test_every_layout_of_the_download_is_found(tmp_path, given):
    make_download(tmp_path)
    records = load_records(tmp_path / given)  # the download's root, the folder with results.csv, the images
    assert [record.image_path.name for record in records] == ["1000092795.jpg", "2199200615.jpg", "3000000000.jpg"]
    assert all(record.image_path.is_file() for record in records)


def test_images_beside_the_caption_file_and_a_layout_that_fits_nothing(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "results.csv").write_text(CAPTIONS)
    for name in ("1000092795.jpg", "2199200615.jpg", "3000000000.jpg"):
        Image.new("RGB", (120, 90)).save(flat / name)
    assert len(load_records(flat)) == 3
    (flat / "1000092795.jpg").unlink()  # the caption file's first image is nowhere
    with pytest.raises(DatasetError, match=r"names 1000092795\.jpg, but no image folder beside it holds it"):
        load_records(flat)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"nor one of them up to 2 folders down: give --data the folder that holds"):
        load_records(empty)


def test_images_with_only_empty_captions_are_left_out_and_all_empty_is_refused(tmp_path):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (80, 80)).save(tmp_path / name)
    lines = [
        {"file_name": "a.png", "text": "  "},
        {"file_name": "b.png", "text": "a dog"},
        {"file_name": "b.png", "text": ""},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    assert [(record.image_path.name, record.captions) for record in load_records(tmp_path)] == [("b.png", ["a dog"])]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": ""}))
    with pytest.raises(DatasetError, match=r"every caption in .* is empty"):
        load_records(tmp_path)


def test_caption_dropout_and_the_trigger_word(tmp_path):
    from trainer.batches import TrainingImages
    from trainer.train import TrainConfig

    make_kaggle_folder(tmp_path, nested=False)
    records = load_records(tmp_path)

    def examples(**options):
        config = TrainConfig(data=tmp_path, output=tmp_path / "out", max_steps=1, flip=True, **options)
        images = TrainingImages(records, config, SkipReport())
        return [images.example(epoch, index) for epoch in range(200) for index in range(len(records))]

    plain, dropped = examples(), examples(caption_dropout=0.25)
    empty = sum(example.caption == "" for example in dropped)
    assert 0.2 < empty / len(dropped) < 0.3 and not any(example.caption == "" for example in plain)
    # Every other draw is as it was without dropout: the same flips, the same captions where kept.
    assert [example.flip for example in plain] == [example.flip for example in dropped]
    assert all(a.caption == b.caption for a, b in zip(plain, dropped, strict=True) if b.caption)
    triggered = examples(trigger_word="flkr")
    assert [example.caption for example in triggered] == [f"flkr, {example.caption}" for example in plain]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trigger-word", "flkr\nstyle"], r"--trigger-word must be printable text on one line"),
        (["--trigger-word", "  "], r"--trigger-word must be printable text on one line"),
        (["--caption-dropout", "1.0"], r"--caption-dropout must be in \[0, 1\)"),
        (["--caption-dropout", "-0.1"], r"--caption-dropout must be in \[0, 1\)"),
        (["--buckets", "--bucket-step", "12"], r"--bucket-step must be a multiple of 8"),
        (["--buckets", "--bucket-max-upscale", "0.5"], r"--bucket-max-upscale must be at least 1"),
        (["--validation-size", "640x7"], r"--validation-size must be WIDTHxHEIGHT"),
        (["--target-modules", "to_q;rm -rf"], r"--target-modules must be a preset \(attention, attention-ff, locon\)"),
        (["--text-encoder-lr", "1e-5"], r"--text-encoder-lr is the text encoder LoRA's: add --train-text-encoder"),
        (["--log-every", "0"], r"--log-every must be at least 1"),
        pytest.param(
            ["--report-to", "wandb"],
            r"--report-to wandb needs Weights & Biases: pip install wandb",
            marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here"),
        ),
    ],
)
def test_bad_options_are_refused_before_any_model_loads(tmp_path, flags, message):
    from trainer.train import parse_args

    with pytest.raises(ValueError, match=message):
        parse_args(["--data", str(tmp_path), "--output", str(tmp_path / "loradir" / "x"), "--max-steps", "1", *flags])


def bucketed_images(tmp_path, sizes, **options):
    """TrainingImages over one image of each size, with buckets at 128 px in steps of 32."""
    from trainer.batches import TrainingImages
    from trainer.data import ImageRecord
    from trainer.train import TrainConfig

    records = []
    for index, size in enumerate(sizes):
        path = tmp_path / f"{index}.png"
        Image.new("RGB", size, (10 * index, 100, 200)).save(path)
        records.append(ImageRecord(path, [f"image {index}"]))
    config = TrainConfig(
        data=tmp_path, output=tmp_path / "out", max_steps=1, resolution=128, buckets=True, bucket_step=32, **options
    )
    report = SkipReport()
    return TrainingImages(records, config, report), report


def test_buckets_keep_each_image_near_its_aspect_ratio_and_never_upscale_past_the_limit(tmp_path):
    from trainer.batches import bucket_sizes

    for width, height in bucket_sizes(512, 64):
        assert width % 64 == 0 and height % 64 == 0 and width * height <= 512 * 512
        assert width * height >= 0.8 * 512 * 512  # about the training resolution's area
    assert {(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)} <= set(bucket_sizes(512, 64))

    # Flickr30k's usual landscape (500x375, 4:3) and portrait photos, a square one, a small one.
    images, report = bucketed_images(tmp_path, [(200, 150), (150, 200), (130, 130), (70, 70)])
    assert images.sizes == [(160, 96), (96, 160), (128, 128), (128, 128)]
    example = images.example(0, 0)
    assert images.pixels(example).shape == (3, 96, 160)  # channels, height, width
    assert images.latent_name(example) == "latent-0-160x96"  # the cache holds one entry per bucket
    assert images.latent_name(images.example(0, 2)) == "latent-2"

    # 70 px would be enlarged 1.83 times to 128: allowed by default (2), skipped and counted at 1.5.
    images, report = bucketed_images(tmp_path, [(200, 150), (70, 70)], bucket_max_upscale=1.5)
    assert len(images) == 1 and report.counts == {"upscaled more than 1.5x to fit its bucket": 1}


def test_every_batch_comes_from_one_bucket_and_every_image_trains_once_per_epoch(tmp_path):
    from trainer.batches import BatchPlan

    sizes = [(200, 150)] * 5 + [(150, 200)] * 4 + [(130, 130)] * 3
    images, _ = bucketed_images(tmp_path, sizes)
    plan = BatchPlan(images, seed=0, batch_size=2, buckets=True)
    assert plan.batches_per_epoch == 3 + 2 + 2  # 5, 4 and 3 images in batches of 2
    for epoch in range(3):
        batches = [plan.batch(g) for g in range(epoch * 7, (epoch + 1) * 7)]
        assert all(len({images.sizes[index] for _, index, _ in batch}) == 1 for batch in batches)
        assert sorted(index for batch in batches for _, index, _ in batch) == list(range(12))
        assert {e for batch in batches for e, _, _ in batch} == {epoch}
    # A function of the seed and the position alone (what an exact resume needs), reshuffled every epoch.
    again = BatchPlan(images, seed=0, batch_size=2, buckets=True)
    assert [again.batch(g) for g in range(14)] == [plan.batch(g) for g in range(14)]
    assert [[i for _, i, _ in plan.batch(g)] for g in range(7)] != [
        [i for _, i, _ in plan.batch(g)] for g in range(7, 14)
    ]
    assert plan.steps(epochs=2, examples_per_step=4) == 2 * 4  # 7 batches of 2 per epoch, 4 examples a step


def test_a_bucket_smaller_than_a_batch_joins_its_nearest_neighbour_and_says_so(tmp_path):
    images, _ = bucketed_images(tmp_path, [(200, 150)] * 3 + [(150, 200)] + [(130, 130)] * 2)
    notes = images.merge_small_buckets(batch_size=2)
    assert notes == [
        "bucket 96x160 holds 1 image(s) (3.png), fewer than --batch-size 2: trained in bucket 128x128 instead"
    ]
    assert {size: len(members) for size, members in images.buckets().items()} == {(160, 96): 3, (128, 128): 3}
    with pytest.raises(ValueError, match="no aspect-ratio bucket holds a whole batch"):
        images.merge_small_buckets(batch_size=4)
