"""What every micro-batch of a run holds, and the Dataset that prepares it ahead of the GPU.

Micro-batch g of a run, counted over all processes (g = (step × accumulation + micro) × processes + rank),
holds examples that are a function of the seed and g alone: a resumed run, or one split over several
processes, trains on exactly the examples of the uninterrupted single-process run. Without buckets an
epoch walks one shuffled order of all images; with aspect-ratio buckets (kohya's `--enable_bucket`) an
epoch is a shuffled list of batches, each from one bucket, so no image is squeezed into a square.

`MicroBatches` does, in a DataLoader's worker processes, all that needs no model: read and crop the images
(or read their encodings from the cache), draw each example's latent sample, noise and timestep from its
own generator. The training loop only encodes what the cache lacked, in one batch, and runs the UNet.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from trainer.cache import EncodingCache
from trainer.data import MAX_ASPECT_RATIO, SkipReport, open_rgb, to_training_array

Size = tuple[int, int]
"""(width, height) in pixels."""


@dataclass(frozen=True)
class Example:
    index: int
    caption: str
    flip: bool
    crop_seed: str


def with_trigger_word(caption: str, trigger_word: str | None) -> str:
    return f"{trigger_word.strip()}, {caption}" if trigger_word else caption


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Sizes of at most resolution² pixels, as close to it as sides in multiples of `step` allow, from
    1:MAX_ASPECT_RATIO to MAX_ASPECT_RATIO:1 (at 512 and 64: …, 640×384, 576×448, 512×512, 448×576, …):
    each landscape size with its portrait twin."""
    area = resolution * resolution
    sizes = set()
    for width in range(resolution // step * step, int(resolution * MAX_ASPECT_RATIO) + 1, step):
        height = area // width // step * step
        if height >= step and width / height <= MAX_ASPECT_RATIO:
            sizes |= {(width, height), (height, width)}
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log ratio: 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda size: abs(math.log(size[0] / size[1]) - aspect))


class TrainingImages:
    """Training examples: the image at its position in an epoch, one of its captions drawn for that epoch,
    and, with buckets, the size each image trains at."""

    def __init__(self, records, config, report: SkipReport) -> None:
        self.config = config
        self.records = []
        self.sizes: list[Size] = []
        candidates = bucket_sizes(config.resolution, config.bucket_step) if config.buckets else None
        limit = config.bucket_max_upscale
        # Every image is checked once here, but not kept: 31,783 decoded Flickr30k images would not fit in
        # memory, and with the encoder cache most are never needed again.
        for record in records:
            image = open_rgb(record.image_path, report)
            if image is None:
                continue
            size = (config.resolution, config.resolution)
            if candidates is not None:
                size = nearest_bucket(*image.size, candidates)
                if max(size[0] / image.width, size[1] / image.height) > limit:
                    report.skip(f"upscaled more than {limit:g}x to fit its bucket", record.image_path)
                    continue
            self.records.append(record)
            self.sizes.append(size)

    def __len__(self) -> int:
        return len(self.records)

    def buckets(self) -> dict[Size, list[int]]:
        grouped: dict[Size, list[int]] = {}
        for index, size in enumerate(self.sizes):
            grouped.setdefault(size, []).append(index)
        return grouped

    def merge_small_buckets(self, batch_size: int) -> list[str]:
        """Move the images of every bucket holding fewer than `batch_size` of them into the nearest bucket (by
        aspect ratio) that holds enough, so that no bucket gives only partial batches (a bucket's last batch
        may still be partial); says what moved. Raises ValueError when no bucket holds enough."""
        grouped = self.buckets()
        full = [size for size, members in grouped.items() if len(members) >= batch_size]
        if not full:
            counts = ", ".join(f"{w}x{h}: {len(members)}" for (w, h), members in sorted(grouped.items()))
            raise ValueError(
                f"with --batch-size {batch_size}, no aspect-ratio bucket holds a whole batch ({counts}): lower "
                "--batch-size, add images, or train without --buckets"
            )
        notes = []
        for size, members in sorted(grouped.items()):
            if len(members) >= batch_size:
                continue
            target = nearest_bucket(*size, full)
            for index in members:
                self.sizes[index] = target
            names = ", ".join(self.records[index].image_path.name for index in members[:3])
            names += ", ..." if len(members) > 3 else ""
            notes.append(
                f"bucket {size[0]}x{size[1]} holds {len(members)} image(s) ({names}), "
                f"fewer than --batch-size {batch_size}: trained in bucket {target[0]}x{target[1]} instead"
            )
        return notes

    def example(self, epoch: int, index: int) -> Example:
        rng = random.Random(f"{self.config.seed}:example:{epoch}:{index}")
        caption = with_trigger_word(rng.choice(self.records[index].captions), self.config.trigger_word)
        flip = self.config.flip and rng.random() < 0.5
        # A draw of its own: the dropout leaves every other choice of the run as it was without it.
        dropout = random.Random(f"{self.config.seed}:caption-dropout:{epoch}:{index}")
        if self.config.caption_dropout and dropout.random() < self.config.caption_dropout:
            caption = ""
        return Example(index, caption, flip, f"{self.config.seed}:crop:{epoch}:{index}")

    def pixels(self, example: Example) -> np.ndarray:
        path = self.records[example.index].image_path
        image = open_rgb(path, SkipReport())
        if image is None:
            raise ValueError(f"{path} was readable when training started and is not any more")
        crop_rng = random.Random(example.crop_seed)
        size = self.sizes[example.index]
        return to_training_array(image, size, self.config.center_crop, example.flip, crop_rng)

    def latent_name(self, example: Example) -> str:
        """The image's cache entry: one per image, bucket and mirroring."""
        width, height = self.sizes[example.index]
        square = width == height == self.config.resolution
        return f"latent-{example.index}{'' if square else f'-{width}x{height}'}{'-flip' if example.flip else ''}"

    def cache_names(self) -> set[str]:
        """Every cache entry a run over these images may read: what a complete cache holds."""
        names = set()
        for index, record in enumerate(self.records):
            for flip in (False, True) if self.config.flip else (False,):
                names.add(self.latent_name(Example(index, "", flip, "")))
            for caption in record.captions:
                names.add(text_name(with_trigger_word(caption, self.config.trigger_word)))
        if self.config.caption_dropout:
            names.add(text_name(""))
        return names


def text_name(caption: str) -> str:
    return "text-" + hashlib.sha256(caption.encode()).hexdigest()[:24]


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    """The epoch's shuffled image order, computed once per epoch rather than once per example."""
    order = list(range(size))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return tuple(order)


class BatchPlan:
    """Which examples micro-batch g holds: (epoch, image index, draw) for each, draw being the example's
    position in the whole run, which seeds its generator."""

    def __init__(self, images: TrainingImages, seed: int, batch_size: int, buckets: bool) -> None:
        self.images, self.seed, self.batch_size = images, seed, batch_size
        grouped = images.buckets() if buckets else None
        # By size, as a hashable value for the per-epoch cache.
        self.buckets = tuple(tuple(grouped[size]) for size in sorted(grouped)) if grouped else None
        if self.buckets is not None:
            self.batches_per_epoch = sum(math.ceil(len(members) / batch_size) for members in self.buckets)

    def steps(self, epochs: int, examples_per_step: int) -> int:
        """Optimizer steps of `epochs` passes over the images."""
        if self.buckets is None:
            return epochs * math.ceil(len(self.images) / examples_per_step)
        return epochs * math.ceil(self.batches_per_epoch * self.batch_size / examples_per_step)

    def batch(self, g: int) -> list[tuple[int, int, int]]:
        first = g * self.batch_size
        if self.buckets is None:
            count = len(self.images)
            return [
                (
                    (first + k) // count,
                    epoch_order(self.seed, (first + k) // count, count)[(first + k) % count],
                    first + k,
                )
                for k in range(self.batch_size)
            ]
        epoch = g // self.batches_per_epoch
        members = bucket_batches(self.seed, epoch, self.buckets, self.batch_size)[g % self.batches_per_epoch]
        return [(epoch, index, first + k) for k, index in enumerate(members)]


@functools.lru_cache(maxsize=2)
def bucket_batches(
    seed: int, epoch: int, buckets: tuple[tuple[int, ...], ...], batch_size: int
) -> tuple[tuple[int, ...], ...]:
    """The epoch's batches: each bucket's images shuffled and cut into batches, then the batches shuffled."""
    rng = random.Random(f"{seed}:buckets:{epoch}")
    batches = []
    for bucket in buckets:
        members = list(bucket)
        rng.shuffle(members)
        batches += [tuple(members[i : i + batch_size]) for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return tuple(batches)


def example_generator(seed: int, draw: int) -> torch.Generator:
    """The generator of the draw-th example of the run: its latent sample, noise and timestep depend on
    nothing else, so a batch split over several processes trains exactly as the same batch on one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)


def normal_per_example(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])


@dataclass(frozen=True)
class LatentSpace:
    """What the VAE's config says of its latents, known without loading it."""

    channels: int
    downscale: int
    scaling_factor: float

    @classmethod
    def of(cls, vae_config: dict) -> LatentSpace:
        return cls(
            vae_config["latent_channels"],
            2 ** (len(vae_config["block_out_channels"]) - 1),
            vae_config["scaling_factor"],
        )


class MicroBatches(torch.utils.data.Dataset):
    """Item i: this process's i-th micro-batch of the run, everything but the models' work done.

    An item holds, for its examples: the latent distributions read from the cache (one stacked tensor when
    all were there; otherwise a list with None where one is missing, and the missing ones' pixels), the
    captions' text states likewise (None for all when they are not cached) with the missing ones' token
    ids, and each example's latent sample `epsilon`, `noise` and `timesteps`, drawn in that order from its
    own generator. Everything is a tensor the DataLoader can pin, for copies that do not wait.
    """

    def __init__(
        self,
        images: TrainingImages,
        plan: BatchPlan,
        processes: int,
        rank: int,
        latent_space: LatentSpace,
        num_train_timesteps: int,
        noise_offset: float,
        cache: EncodingCache | None,
        cache_text: bool,
        tokenizer,
        length: int,
    ) -> None:
        self.images, self.plan = images, plan
        self.processes, self.rank = processes, rank
        self.latent_space = latent_space
        self.num_train_timesteps = num_train_timesteps
        self.noise_offset = noise_offset
        self.cache, self.cache_text = cache, cache_text
        self.tokenizer = tokenizer
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        entries = self.plan.batch(i * self.processes + self.rank)
        examples = [self.images.example(epoch, index) for epoch, index, _ in entries]
        generators = [example_generator(self.images.config.seed, draw) for _, _, draw in entries]
        return self.prepare(examples, generators)

    def prepare(self, examples: list[Example], generators: list[torch.Generator]) -> dict:
        started = time.perf_counter()
        latent_names = [self.images.latent_name(example) for example in examples]
        latents = [self.cache.read(name) if self.cache else None for name in latent_names]
        captions = [example.caption for example in examples]
        text_names = [text_name(caption) for caption in captions]
        texts = [self.cache.read(name) if self.cache and self.cache_text else None for name in text_names]
        read_s = time.perf_counter() - started
        missing = [k for k, latent in enumerate(latents) if latent is None]
        pixels = torch.from_numpy(np.stack([self.images.pixels(examples[k]) for k in missing])) if missing else None
        uncached = [caption for caption, text in zip(captions, texts, strict=True) if text is None]
        input_ids = None
        if uncached:
            input_ids = self.tokenizer(
                uncached,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids

        width, height = self.images.sizes[examples[0].index]
        space = self.latent_space
        shape = (space.channels, height // space.downscale, width // space.downscale)
        epsilon = normal_per_example(generators, shape)
        noise = normal_per_example(generators, shape)
        if self.noise_offset:
            noise += self.noise_offset * normal_per_example(generators, (shape[0], 1, 1))
        timesteps = torch.stack(
            [torch.randint(0, self.num_train_timesteps, (), generator=generator) for generator in generators]
        )
        return {
            "latent_names": latent_names,
            "latents": torch.stack(latents) if not missing else latents,
            "pixels": pixels,
            "text_names": text_names,
            "texts": torch.stack(texts) if not uncached else texts,
            "input_ids": input_ids,
            "epsilon": epsilon,
            "noise": noise,
            "timesteps": timesteps,
            "cache_read_s": read_s,
        }
