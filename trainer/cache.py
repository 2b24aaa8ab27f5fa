"""A disk cache of what the frozen encoders compute: each image's latent distribution (and its mirror
image's, when flipping; one per aspect-ratio bucket) and each caption's text embeddings. Computed once,
reused across epochs and runs; keyed by the data, the model and the image transform, so a change to any
of them starts afresh.

The latent *distribution* is cached, not one sample of it, so a cached run draws the very same
latents, from the same generator, as an uncached one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)


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
    """Entries are read in the DataLoader's workers and written by the training process, which counts both."""

    def __init__(self, root: Path, key: str) -> None:
        self.folder = root / key
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0
        self.read_s = self.compute_s = 0.0

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.safetensors"

    def read(self, name: str) -> torch.Tensor | None:
        """The entry, or None when it is missing or unreadable (it is then computed and written again)."""
        try:
            return load_file(self._path(name))["value"]
        except FileNotFoundError:
            return None
        except (SafetensorError, OSError, KeyError) as error:
            logger.warning("encoder cache entry %s is unreadable (%s): encoding it again", self._path(name), error)
            return None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        # Written under a temporary name and renamed: a reader never sees half a file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
        os.close(handle)
        save_file({"value": tensor.detach().to("cpu").contiguous()}, temporary)
        os.replace(temporary, self._path(name))

    def missing(self, names: set[str]) -> list[str]:
        present = {path.name.removesuffix(".safetensors") for path in self.folder.glob("*.safetensors")}
        return sorted(names - present)

    def count(self, hits: int, misses: int, read_s: float = 0.0, compute_s: float = 0.0) -> None:
        self.hits += hits
        self.misses += misses
        self.read_s += read_s
        self.compute_s += compute_s

    def report(self) -> dict[str, float]:
        return {
            "cache_hits": self.hits,
            "cache_misses": self.misses,
            "cache_read_ms_per_item": 1000 * self.read_s / max(1, self.hits),
            "encode_ms_per_item": 1000 * self.compute_s / max(1, self.misses),
        }
