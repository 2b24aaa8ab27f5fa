"""Hot reload of a rank-4 LoRA adapter, as a ratio of a full pipeline load, on the same machine and run.

    .venv/bin/python bench/reload.py --base-model random-sd-v1-4     # SD v1-4's architecture, random weights
    .venv/bin/python bench/reload.py --base-model tiny

Two baselines, both with a warm disk cache: `from_pretrained` + move to the device in this process
(safetensors are memory-mapped, so on CPU this touches few weights), and a restart: a new process
that imports, loads and renders one 64 px step (which touches every weight), until it could serve.
The reload is what `imagine-admin reload-adapter` costs a worker: read and hash the file, check it,
and copy the new version's tensors into the old one's LoRA layers (they have the same modules and ranks).
Two versions alternate so every reload loads new weights. For comparison, the way every reload went
before versions were swapped in place: the adapter loaded beside the old one (peft injects new LoRA
layers into the UNet's modules) and the old one deleted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers import make_lora_state, write_adapter
from worker.adapters import AdapterRegistry
from worker.pipeline import choose_placement, load_pipeline

RESTART = """
from pathlib import Path
from worker.pipeline import choose_placement, load_pipeline
pipe = load_pipeline("{model}", choose_placement("auto", "auto"), Path("{cache}"), safety_checker=True)
pipe("warm", num_inference_steps=1, width=64, height=64)
"""


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

    restarts = []
    for _ in range(args.loads):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", RESTART.format(model=args.base_model, cache=str(cache))],
            check=True,
            capture_output=True,
        )
        restarts.append(time.perf_counter() - started)

    lora_dir = Path(tempfile.mkdtemp(prefix="bench-reload-"))
    source = load_pipeline(args.base_model, choose_placement("cpu", "float32"), cache, safety_checker=False)
    versions = []
    for seed, rank in ((1, 4), (2, 4), (3, 8), (4, 4)):
        folder = lora_dir / f".v{seed}"
        lora = make_lora_state(source.unet, seed=seed, rank=rank, alpha=rank)
        if seed == 1:
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
        reloads.append(timed(lambda: registry.load("flickr30k"), placement.device))
    reloads = reloads[1:]  # the first load is not a reload
    if registry.loaded["flickr30k"].internal_name != "adapter1":
        raise RuntimeError("the reloads were not swapped in place")

    # What a reload costs where the new version does not fit the old one's layers (another rank), and what
    # every reload cost before versions were swapped in place: loaded beside the old one (peft injects new
    # LoRA layers into the UNet's modules), then the old one deleted.
    injections = []
    for index in range(args.reloads):
        live.unlink()
        live.symlink_to(versions[2 + index % 2].name)
        injections.append(timed(lambda: registry.load("flickr30k"), placement.device))

    full, restart = statistics.median(full_loads), statistics.median(restarts)
    reload, injection = statistics.median(reloads), statistics.median(injections)
    print(f"{args.base_model} on {placement.device} ({placement.dtype}); rank-4 adapter, {parameters:,} parameters")
    print(f"from_pretrained + to(device)  median {full:8.3f} s  ({args.loads} loads)")
    print(f"restart until it can serve    median {restart:8.3f} s  ({args.loads} restarts)")
    print(f"reload to another rank        median {injection:8.3f} s  ({args.reloads} reloads, loaded beside)")
    print(f"hot reload, swapped in place  median {reload:8.3f} s  ({args.reloads} reloads)")
    print(f"in place / beside             {reload / injection:.4f}")
    print(f"reload / from_pretrained      {reload / full:.4f}")
    print(f"reload / restart              {reload / restart:.4f}")
    if args.json:
        figures = {
            "base_model": args.base_model,
            "device": str(placement.device),
            "from_pretrained_s": full,
            "restart_s": restart,
            "load_beside_s": injection,
            "reload_s": reload,
            "reload_over_load_beside": reload / injection,
            "reload_over_from_pretrained": reload / full,
            "reload_over_restart": reload / restart,
            "lora_parameters": parameters,
        }
        args.json.write_text(json.dumps(figures, indent=2))


def timed(load, device) -> float:
    started = time.perf_counter()
    load()
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
