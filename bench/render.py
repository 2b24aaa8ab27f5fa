"""Rendering speed: the worker's renderer against a plain diffusers pipeline, in one run on one machine.

    .venv/bin/python bench/render.py --base-model tiny --size 64 --steps 20
    .venv/bin/python bench/render.py --base-model random-sd-v1-4 --size 128 --steps 4 --stream-steps 2
    # on a GPU: SD v1-4's architecture at 512², random weights (no download), fp16
    .venv/bin/python bench/render.py --base-model random-sd-v1-4 --size 512 --steps 30 --compile

The baseline is what a service built on diffusers' documentation does: `StableDiffusionPipeline.from_pretrained`,
`load_lora_weights` of the adapter (PEFT's LoRA layers, active at scale 1), one pipeline call per prompt, each
image encoded to PNG on the same thread. Ours is the worker's own code: `load_pipeline` (channels-last on
CUDA), the `AdapterRegistry` with the adapter fused (FUSE_DEFAULT_ADAPTER), the `Renderer` (timesteps kept
on the CPU, batches of compatible jobs), and the worker's `Finisher` thread for the PNGs; `--compile` adds
`torch.compile` as COMPILE=true does, warmed up before anything is timed.

Two figures, each as a ratio to the baseline:
- steps per second at batch 1 (one image, classifier-free guidance): the difference in time between a
  `--steps` call and a call of a third of those steps, so that text encoding and decoding cancel out;
- images per second on a stream of `--jobs` jobs, one image each, different prompts and seeds, all
  queued at once (the best case for batching: every job fits one batch key), end to end to their PNGs.
The first image of both sides is compared too: the same seed renders nearly the same picture. On CUDA, the
host syncs per step of each side are counted too (torch's sync debug mode): ours should have none.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagine.contract import Limits, parse_job_options
from tests.helpers import make_lora_state, write_adapter
from worker.adapters import AdapterRegistry
from worker.jobs import Finisher
from worker.pipeline import (
    choose_placement,
    compile_pipeline,
    load_pipeline,
    resolve_base_model,
    serve_compiled_shapes_only,
)
from worker.renderer import Renderer

ADAPTER = "flickr30k"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def write_bench_adapter(args, cache: Path) -> Path:
    """A rank-4 LoRA on to_q, to_k, to_v, to_out.0 of the model's UNet, in the PEFT layout, in a fresh LORA_DIR."""
    lora_dir = Path(tempfile.mkdtemp(prefix="bench-render-"))
    unet = load_pipeline(args.base_model, choose_placement("cpu", "float32"), cache, safety_checker=False).unet
    write_adapter(lora_dir / ADAPTER, "peft", make_lora_state(unet, seed=1, rank=4, alpha=4, std=0.01))
    return lora_dir


class Baseline:
    """A plain diffusers pipeline with the adapter loaded, one call per prompt."""

    def __init__(self, args, placement, cache: Path, lora_dir: Path) -> None:
        from diffusers import StableDiffusionPipeline

        source = resolve_base_model(args.base_model, cache)
        self.pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=placement.dtype, safety_checker=None, requires_safety_checker=False
        ).to(placement.device)
        self.pipe.load_lora_weights(lora_dir / ADAPTER, adapter_name=ADAPTER)
        self.pipe.set_progress_bar_config(disable=True)
        self.args, self.device = args, placement.device

    def image(self, prompt: str, seed: int, steps: int) -> Image.Image:
        return self.pipe(
            prompt,
            num_inference_steps=steps,
            width=self.args.size,
            height=self.args.size,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]

    def stream(self, jobs: list[tuple[str, int]], steps: int) -> list[bytes]:
        pngs = []
        for prompt, seed in jobs:
            buffer = io.BytesIO()
            self.image(prompt, seed, steps).save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return pngs


class Ours:
    """The worker's renderer, the adapter fused, batches handed to the worker's finisher thread."""

    def __init__(self, args, placement, cache: Path, lora_dir: Path) -> None:
        self.pipe = load_pipeline(args.base_model, placement, cache, safety_checker=False)
        if args.compile:
            self.pipe.enable_lora_hotswap(target_rank=64)
        registry = AdapterRegistry(self.pipe, lora_dir, fuse=ADAPTER, scales_as_tensors=args.compile)
        registry.load(ADAPTER)
        self.renderer = Renderer(self.pipe, registry, ADAPTER, allow_safety_checker_off=False)
        if args.compile:
            self.renderer.uncompiled_calls = compile_pipeline(self.pipe, args.compile_backend, args.compile_mode)
        self.args, self.device = args, placement.device
        self.limits = Limits(max_steps=max(100, args.steps))
        self.delivered: list[bytes] = []
        self.finisher = Finisher(self._finish)

    def options(self, prompt: str, seed: int, steps: int):
        size = self.args.size
        return parse_job_options(
            {"prompt": prompt, "seed": seed, "num_inference_steps": steps, "width": size, "height": size}, self.limits
        )

    def image(self, prompt: str, seed: int, steps: int) -> bytes:
        return self.renderer.render(self.options(prompt, seed, steps)).images[0]

    def _finish(self, members, batch) -> None:
        for output in self.renderer.finish_images(batch):
            self.delivered += output.images

    def stream(self, jobs: list[tuple[str, int]], steps: int) -> list[bytes]:
        self.delivered = []
        for start in range(0, len(jobs), self.args.batch):
            chunk = [self.options(prompt, seed, steps) for prompt, seed in jobs[start : start + self.args.batch]]
            entries = self.renderer.entries([(options, self.renderer.plan(options)) for options in chunk])
            self.finisher.submit([], self.renderer.render_batch(entries))
        self.finisher.drain()
        return self.delivered

    def warm_up(self, steps: int) -> float:
        """What the worker's warm-up does: every batch shape served, before any timing."""
        started = time.perf_counter()
        for batch in sorted({1, self.args.batch, self.args.jobs % self.args.batch or self.args.batch}):
            self.stream([(f"warm-up {n}", n) for n in range(batch)], steps)
        self.image("warm-up", 0, steps)
        if self.args.compile:
            serve_compiled_shapes_only()  # as the worker serves: a shape not warmed up renders uncompiled
        return time.perf_counter() - started


def steps_per_second(side, device: torch.device, steps: int, repeats: int) -> float:
    """Denoising steps per second: the time a call of `steps` takes beyond a call of a third as many."""
    few = max(1, steps // 3)
    rates = []
    for repeat in range(repeats):
        times = {}
        for count in (few, steps):
            synchronize(device)
            started = time.perf_counter()
            side.image("a dog running on the beach", repeat, count)
            synchronize(device)
            times[count] = time.perf_counter() - started
        extra_s = times[steps] - times[few]
        if extra_s <= 0:
            raise RuntimeError(
                f"a call of {steps} steps took no longer than one of {few} ({times[steps]:.3f} s against "
                f"{times[few]:.3f} s): the machine's noise exceeds the steps' time; measure with more --steps"
            )
        rates.append((steps - few) / extra_s)
    return statistics.median(rates)


def host_syncs_per_step(side, steps: int = 5) -> float | str:
    """On CUDA: the stream syncs the host waits for, per denoising step (torch's sync debug mode warns at each),
    from a call of twice `steps` steps against one of `steps`, so that each call's own (its PNG) cancel out.
    An error comes back as its text: it must not cost the run its other figures."""
    try:
        return _host_syncs_per_step(side, steps)
    except Exception as error:  # reported in the figures, beside the others
        return f"not measured: {error!r}"


def _host_syncs_per_step(side, steps: int) -> float:
    counts = []
    for count in (steps, 2 * steps):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                side.image("a dog running on the beach", 0, count)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(warning.message).lower() for warning in caught))
    return (counts[1] - counts[0]) / steps


def images_per_second(side, device: torch.device, jobs: int, steps: int) -> float:
    stream = [(f"photo {n}: a person riding a bicycle down a street", 1000 + n) for n in range(jobs)]
    synchronize(device)
    started = time.perf_counter()
    pngs = side.stream(stream, steps)
    synchronize(device)
    elapsed = time.perf_counter() - started
    if len(pngs) != jobs:
        raise RuntimeError(f"the stream delivered {len(pngs)} images of {jobs}")
    return jobs / elapsed


def pixel_difference(ours: bytes, theirs: Image.Image) -> tuple[int, float]:
    """The largest difference of one value, and the share of values that differ at all."""
    with Image.open(io.BytesIO(ours)) as image:
        a = np.asarray(image.convert("RGB"), np.int16)
    b = np.asarray(theirs.convert("RGB"), np.int16)
    difference = np.abs(a - b)
    return int(difference.max()), float((difference > 0).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--size", type=int, default=64, help="Width and height of every image.")
    parser.add_argument("--steps", type=int, default=20, help="Steps of the calls that measure steps per second.")
    parser.add_argument("--stream-steps", type=int, help="Steps of each job of the stream (default: --steps).")
    parser.add_argument("--jobs", type=int, default=32, help="Jobs in the stream, one image each.")
    parser.add_argument("--batch", type=int, default=8, help="BATCH_MAX_IMAGES of our side.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile our UNet and VAE decoder (COMPILE).")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--compile-mode", default=None)
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()
    stream_steps = args.stream_steps or args.steps

    cache = Path("~/.cache/imagine").expanduser()
    placement = choose_placement(args.device, args.dtype)
    lora_dir = write_bench_adapter(args, cache)
    device_name = torch.cuda.get_device_name(placement.device) if placement.device.type == "cuda" else "cpu"
    print(f"{args.base_model} at {args.size}² on {device_name} ({placement.dtype}), rank-4 adapter active", flush=True)

    figures: dict = {"base_model": args.base_model, "size": args.size, "device": device_name}
    figures |= {"dtype": str(placement.dtype), "steps": args.steps, "stream_steps": stream_steps}
    figures |= {"jobs": args.jobs, "batch": args.batch, "compile": args.compile}
    baseline = Baseline(args, placement, cache, lora_dir)
    baseline.image("warm-up", 0, 2)
    figures["baseline_steps_per_s"] = steps_per_second(baseline, placement.device, args.steps, args.repeats)
    figures["baseline_images_per_s"] = images_per_second(baseline, placement.device, args.jobs, stream_steps)
    reference = baseline.image("the same seed", 7, stream_steps)
    if placement.device.type == "cuda":
        figures["baseline_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["baseline_host_syncs_per_step"] = host_syncs_per_step(baseline)
    del baseline
    if placement.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    ours = Ours(args, placement, cache, lora_dir)
    figures["ours_warm_up_s"] = ours.warm_up(stream_steps)
    uncompiled = ours.renderer.uncompiled_calls
    uncompiled_before = uncompiled.count if uncompiled else 0
    figures["ours_steps_per_s"] = steps_per_second(ours, placement.device, args.steps, args.repeats)
    figures["ours_images_per_s"] = images_per_second(ours, placement.device, args.jobs, stream_steps)
    figures["max_pixel_difference"], figures["share_of_values_differing"] = pixel_difference(
        ours.image("the same seed", 7, stream_steps), reference
    )
    if uncompiled:
        # Model calls of the timed runs that no warmed-up graph covered: the compiled figures hold only if 0.
        figures["ours_uncompiled_calls"] = uncompiled.count - uncompiled_before
        if figures["ours_uncompiled_calls"]:
            print(f"warning: {figures['ours_uncompiled_calls']} model calls ran uncompiled", flush=True)
    if placement.device.type == "cuda":
        figures["ours_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        figures["ours_host_syncs_per_step"] = host_syncs_per_step(ours)
    ours.finisher.stop()
    figures["steps_per_s_ratio"] = figures["ours_steps_per_s"] / figures["baseline_steps_per_s"]
    figures["images_per_s_ratio"] = figures["ours_images_per_s"] / figures["baseline_images_per_s"]

    f = figures
    for label, key in (("steps/s at batch 1", "steps_per_s"), (f"images/s, {args.jobs} jobs", "images_per_s")):
        print(
            f"{label:<20} baseline {f['baseline_' + key]:9.2f}  ours {f['ours_' + key]:9.2f}  {f[key + '_ratio']:.2f}×"
        )
    print(
        f"the same seed: values differ by at most {f['max_pixel_difference']} "
        f"({f['share_of_values_differing']:.2%} of them differ); our warm-up took {f['ours_warm_up_s']:.1f} s"
    )
    if "ours_host_syncs_per_step" in f:
        syncs = f["baseline_host_syncs_per_step"], f["ours_host_syncs_per_step"]
        print(f"host syncs per step  baseline {syncs[0]}  ours {syncs[1]}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
