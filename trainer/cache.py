"""A disk cache of what the frozen encoders compute: each image's latent distribution (and its mirror
image's, when flipping) and each caption's text embeddings. Computed once, reused across epochs and
runs; keyed by the data, the model and the image transform, so a change to any of them starts afresh.

The latent *distribution* is cached, not one sample of it, so a cached run draws the very same
latents, from the same generator, as an uncached one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def data_fingerprint(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Names, sizes and modification times: an image replaced in place changes the key."""
    fingerprint = []
    for path in paths:
        stat = path.stat()
        fingerprint.append((str(path), stat.st_size, stat.st_mtime_ns))
    return fingerprint


class EncodingCache:
    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self.read_s = self.compute_s = 0.0

    def get(self, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        path = self.folder / f"{name}.safetensors"
        if path.is_file():
            started = time.perf_counter()
            tensor = load_file(path)["value"]
            self.read_s += time.perf_counter() - started
            self.hits += 1
            return tensor
        started = time.perf_counter()
        tensor = compute().detach().to("cpu").contiguous()
        self.compute_s += time.perf_counter() - started
        self.misses += 1
        # Written under a temporary name and renamed: a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        save_file({"value": tensor}, temporary)
        os.replace(temporary, path)
        return tensor

    def report(self) -> dict[str, float]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_read_ms_per_item": 1000 * self.read_s / max(1, self.hits),
            "encode_ms_per_item": 1000 * self.compute_s / max(1, self.misses),
        }
