"""Trainer speed and peak memory with and without the encoder cache, in one run on one machine.

    .venv/bin/python bench/trainer.py --base-model tiny --resolution 128 --steps 30
    .venv/bin/python bench/trainer.py --base-model random-sd-v1-4 --resolution 128 --steps 8
    # on a GPU (SD v1-4's architecture, random weights: no download needed)
    .venv/bin/python bench/trainer.py --base-model random-sd-v1-4 --resolution 512 --steps 60 --mixed-precision bf16

Each variant is a real `python -m trainer train` process on a dataset this script generates:
- no cache: the VAE encodes every image and the text encoder every caption, on every step;
- cold cache: the same, plus writing each encoding to the cache (a first epoch);
- warm cache: every encoding read from the cache (every later epoch, and later runs).
Steps per second are measured from `metrics.jsonl` over the steps after `--warmup`; peak memory is the
process's largest resident set (from `os.wait4`) and, on CUDA, torch's peak allocation (`summary.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("no cache", "cold cache", "warm cache")


def make_dataset(folder: Path, count: int) -> None:
    """Photos-sized JPEGs of smooth random colour fields, two captions each, in the metadata.jsonl layout."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC).save(folder / f"{index}.jpg")
        for caption in (f"a field of colours number {index}", f"photo {index} of blurred colours"):
            lines.append(json.dumps({"file_name": f"{index}.jpg", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run_variant(args, data: Path, work: Path, variant: str) -> dict:
    output = work / variant.replace(" ", "-") / "adapter"
    cache = ["--no-cache"] if variant == "no cache" else ["--cache-dir", str(work / "encoder-cache")]
    command = [
        sys.executable,
        "-m",
        "trainer",
        "train",
        "--data",
        str(data),
        "--output",
        str(output),
        "--base-model",
        args.base_model,
        "--resolution",
        str(args.resolution),
        "--max-steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--mixed-precision",
        args.mixed_precision,
        "--holdout-fraction",
        "0",
        "--checkpoint-every",
        str(args.steps + 1),
        "--validation-every",
        "0",
        "--validation-steps",
        "1",
        *cache,
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{variant} failed:\n{log[-3000:]}")
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = metrics[args.warmup - 1 :]
    summary = json.loads((output / "summary.json").read_text())
    return {
        "variant": variant,
        "steps_per_s": (len(timed) - 1) / (timed[-1]["elapsed_s"] - timed[0]["elapsed_s"]),
        "peak_rss_gib": usage.ru_maxrss / 2**20,  # kilobytes on Linux
        "peak_gpu_gib": summary.get("peak_gpu_memory_bytes", 0) / 2**30 or None,
        "cache_hits": summary.get("cache_hits", 0),
        "cache_misses": summary.get("cache_misses", 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny", help="tiny, random-sd-v1-4, or a model folder / hub id.")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="Optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=3, help="First steps left out of the speed.")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < args.warmup + 2:
        raise SystemExit("--warmup must be at least 1, and --steps exceed it by at least 2")

    with tempfile.TemporaryDirectory() as folder:
        work, data = Path(folder), Path(folder, "data")
        data.mkdir()
        # Enough images that no step of the warm run repeats one of the cold run's batches in memory.
        make_dataset(data, max(8, args.steps * args.batch_size))
        results = [run_variant(args, data, work, variant) for variant in VARIANTS]

    print(f"{args.base_model}, {args.resolution}², batch {args.batch_size}, {args.mixed_precision}", end=", ")
    print(f"{args.steps} steps ({args.warmup} left out of the speed)")
    print(f"{'variant':<12} {'steps/s':>9} {'peak RSS GiB':>13} {'peak GPU GiB':>13} {'hits':>6} {'misses':>7}")
    for result in results:
        gpu = f"{result['peak_gpu_gib']:.2f}" if result["peak_gpu_gib"] else "-"
        print(
            f"{result['variant']:<12} {result['steps_per_s']:>9.3f} {result['peak_rss_gib']:>13.2f} {gpu:>13} "
            f"{result['cache_hits']:>6} {result['cache_misses']:>7}"
        )
    uncached, _, warm = results
    print(f"warm cache / no cache: {warm['steps_per_s'] / uncached['steps_per_s']:.2f}x the steps per second")
    if args.json:
        args.json.write_text(json.dumps({"arguments": vars(args) | {"json": None}, "results": results}, indent=2))


if __name__ == "__main__":
    main()
