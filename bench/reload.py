"""Hot reload of a rank-4 LoRA adapter, as a ratio of a full pipeline load, on the same machine and run.

    .venv/bin/python bench/reload.py --base-model random-sd-v1-4     # SD v1-4's architecture, random weights
    .venv/bin/python bench/reload.py --base-model tiny

The full load is what a restart would cost (from_pretrained + moving to the device, from a warm disk
cache); the reload is what `imagine-admin reload-adapter` costs a worker: read and hash the file,
check it, load it beside the old version, and drop the old one. Two different adapters alternate so
every reload really loads new weights.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_lora_state, write_adapter
from worker.adapters import AdapterRegistry
from worker.pipeline import choose_placement, load_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="random-sd-v1-4")
    parser.add_argument("--loads", type=int, default=3, help="Full pipeline loads to time.")
    parser.add_argument("--reloads", type=int, default=10, help="Adapter reloads to time.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()

    cache = Path("~/.cache/imagine").expanduser()
    placement = choose_placement("auto", "auto")
    load_pipeline(args.base_model, placement, cache, safety_checker=True)  # build / warm the disk cache once

    full_loads = []
    for _ in range(args.loads):
        started = time.perf_counter()
        pipe = load_pipeline(args.base_model, placement, cache, safety_checker=True)
        if placement.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        full_loads.append(time.perf_counter() - started)

    lora_dir = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    source = load_pipeline(args.base_model, choose_placement("cpu", "float32"), cache, safety_checker=False)
    versions = []
    for seed in (1, 2):
        folder = lora_dir / f".v{seed}"
        lora = make_lora_state(source.unet, seed=seed, rank=4, alpha=4)
        parameters = sum(tensor.numel() for name, tensor in lora.named_parameters() if "lora_" in name)
        write_adapter(folder, "peft", lora)
        source.unet = lora.unload()  # the bare UNet again, for the next adapter
        versions.append(folder)

    registry = AdapterRegistry(pipe, lora_dir)
    live = lora_dir / "flickr30k"
    reloads = []
    for index in range(args.reloads + 1):
        if live.exists():
            live.unlink()
        live.symlink_to(versions[index % 2].name)
        started = time.perf_counter()
        registry.load("flickr30k")
        if placement.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        if index:  # the first load is not a reload
            reloads.append(time.perf_counter() - started)

    full, reload = statistics.median(full_loads), statistics.median(reloads)
    print(f"{args.base_model} on {placement.device} ({placement.dtype}); rank-4 adapter, {parameters:,} parameters")
    print(f"full pipeline load   median {full:8.3f} s  ({args.loads} loads)")
    print(f"adapter hot reload   median {reload:8.3f} s  ({args.reloads} reloads)")
    print(
        f"reload / full load   {reload / full:.4f}  (a reload costs {100 * reload / full:.2f} % of a restart's load)"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "base_model": args.base_model,
                    "device": str(placement.device),
                    "full_load_s": full,
                    "reload_s": reload,
                    "ratio": reload / full,
                    "lora_parameters": parameters,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
