"""Trainer throughput and peak memory against diffusers' own LoRA recipe, in one run on one machine.

    .venv/bin/python bench/trainer.py --base-model tiny --resolution 128 --steps 40
    .venv/bin/python bench/trainer.py --base-model random-sd-v1-4 --resolution 128 --steps 12 --batch-size 2
    # on a GPU (SD v1-4's architecture, random weights: no download needed)
    .venv/bin/python bench/trainer.py --base-model random-sd-v1-4 --resolution 512 --steps 60 --batch-size 16

Every variant is its own process, trained on the same generated dataset with the same batch and precision:
- diffusers recipe: the loop of diffusers' `train_text_to_image_lora.py` (a DataLoader without workers,
  the VAE and the text encoder run on every batch, non-fused AdamW, the loss read back every step);
- ours, no cache: `python -m trainer train --no-cache` (encodes every batch too);
- ours, cold cache: the same, writing every encoding to the cache (a first epoch);
- ours, warm cache: every encoding read from the cache (every later epoch, and later runs), the encoders
  not even loaded.
Samples per second are timed after the first `--warmup` steps; peak memory is the process's largest
resident set (`os.wait4`: for ours, it includes the final validation grid, for which a warm-cache run
loads the encoders) and, on CUDA, torch's peak allocation over the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "recipe": "diffusers recipe",
    "no-cache": "ours, no cache",
    "cold": "ours, cold cache",
    "warm": "ours, warm cache",
}


def make_dataset(folder: Path, count: int) -> None:
    """Photo-sized JPEGs (500x375, as most of Flickr30k) of smooth random colour fields, two captions each,
    in the metadata.jsonl layout."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC).save(folder / f"{index}.jpg")
        for caption in (f"a field of colours number {index}", f"photo {index} of blurred colours"):
            lines.append(json.dumps({"file_name": f"{index}.jpg", "text": caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def diffusers_recipe(args) -> None:
    """The training loop of diffusers' examples/text_to_image/train_text_to_image_lora.py, pared to what
    runs per step; prints its timings as JSON. (torchvision's transforms become their PIL equivalents.)"""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from worker.pipeline import resolve_base_model

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    source = resolve_base_model(args.base_model, args.model_cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision, torch.float32)
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    for model in (unet, vae, text_encoder):
        model.to(accelerator.device, dtype=weight_dtype)
    if args.mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)
    lora_layers = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(lora_layers, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    entries = [json.loads(line) for line in (args.data / "metadata.jsonl").read_text().splitlines()]

    def example(index: int) -> dict:
        entry = entries[index % len(entries)]
        with Image.open(args.data / entry["file_name"]) as image:
            image = image.convert("RGB")
            scale = args.resolution / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
            left, top = (image.width - args.resolution) // 2, (image.height - args.resolution) // 2
            image = image.crop((left, top, left + args.resolution, top + args.resolution))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        ids = tokenizer(
            entry["text"],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}

    class Captioned(torch.utils.data.Dataset):  # decoded on the fly, as `dataset.with_transform` does
        def __len__(self) -> int:
            return len(entries)

        def __getitem__(self, index: int) -> dict:
            return example(index)

    loader = torch.utils.data.DataLoader(Captioned(), batch_size=args.batch_size, shuffle=True, num_workers=0)
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    times, step = [], 0
    while step < args.steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype=weight_dtype)).latent_dist.sample()
                latents = latents * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                ).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                avg_loss = accelerator.gather(loss.repeat(args.batch_size)).mean()
                train_loss = avg_loss.item()  # the recipe's per-step read-back, for its progress bar
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_layers, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            times.append(time.perf_counter())
            if step == args.steps:
                break
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    print(json.dumps({"times": times, "peak_gpu_memory_bytes": peak_gpu, "last_loss": train_loss}))


def run(command: list[str], label: str) -> tuple[str, float]:
    """Run a variant; its output and its peak resident memory in GiB."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{label} failed:\n{log[-3000:]}")
    return log, usage.ru_maxrss / 2**20  # kilobytes on Linux


def run_recipe(args, data: Path) -> dict:
    command = [sys.executable, __file__, "--recipe", "--data", str(data), "--base-model", args.base_model]
    command += ["--model-cache-dir", str(args.model_cache_dir), "--resolution", str(args.resolution)]
    command += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += ["--mixed-precision", args.mixed_precision]
    log, rss = run(command, "the diffusers recipe")
    figures = json.loads(log.strip().splitlines()[-1])
    times = figures["times"][args.warmup - 1 :]
    return {
        "variant": VARIANTS["recipe"],
        "samples_per_s": (len(times) - 1) * args.batch_size / (times[-1] - times[0]),
        "peak_rss_gib": rss,
        "peak_gpu_gib": figures["peak_gpu_memory_bytes"] / 2**30 or None,
    }


def run_ours(args, data: Path, work: Path, variant: str) -> dict:
    output = work / variant.split(", ")[1].replace(" ", "-") / "adapter"
    cache = ["--no-cache"] if variant.endswith("no cache") else ["--cache-dir", str(work / "encoder-cache")]
    command = [sys.executable, "-m", "trainer", "train", "--data", str(data), "--output", str(output)]
    command += ["--base-model", args.base_model, "--model-cache-dir", str(args.model_cache_dir)]
    command += ["--resolution", str(args.resolution), "--max-steps", str(args.steps)]
    command += ["--batch-size", str(args.batch_size), "--mixed-precision", args.mixed_precision]
    command += ["--holdout-fraction", "0", "--checkpoint-every", str(args.steps), "--log-every", str(args.warmup)]
    command += ["--validation-every", "0", "--validation-steps", "1", *cache]
    _, rss = run(command, variant)
    metrics = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    # The loss is read back every --log-every steps (set to --warmup): time from the first read-back to the last.
    start, end = metrics[args.warmup - 1], metrics[-1]
    summary = json.loads((output / "summary.json").read_text())
    return {
        "variant": variant,
        "samples_per_s": (end["step"] - start["step"]) * args.batch_size / (end["elapsed_s"] - start["elapsed_s"]),
        "peak_rss_gib": rss,
        "peak_gpu_gib": summary.get("peak_gpu_memory_bytes", 0) / 2**30 or None,
        "cache_hits": summary.get("cache_hits", 0),
        "cache_misses": summary.get("cache_misses", 0),
        "encoders_loaded": summary["encoders_loaded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny", help="tiny, random-sd-v1-4, or a model folder / hub id.")
    parser.add_argument("--model-cache-dir", type=Path, default=Path("~/.cache/imagine").expanduser())
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--steps", type=int, default=40, help="Optimizer steps per variant.")
    parser.add_argument("--warmup", type=int, default=5, help="First steps left out of the speed.")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="Default: the trainer's.")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"Which to run, separated by commas (default all: {','.join(VARIANTS)}); warm includes cold's run.",
    )
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    parser.add_argument("--recipe", action="store_true", help=argparse.SUPPRESS)  # the recipe's own process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mixed_precision is None:
        sys.path.insert(0, str(REPO))
        from trainer.train import default_mixed_precision

        args.mixed_precision = default_mixed_precision()
    if args.recipe:
        sys.path.insert(0, str(REPO))
        diffusers_recipe(args)
        return
    if args.warmup < 1 or args.steps < 2 * args.warmup:
        raise SystemExit("--warmup must be at least 1, and --steps at least twice as many")
    chosen = [name.strip() for name in args.variants.split(",")]
    if "recipe" not in chosen or not set(chosen) <= set(VARIANTS):
        raise SystemExit(f"--variants must include recipe (the baseline), from {', '.join(VARIANTS)}")

    with tempfile.TemporaryDirectory() as folder:
        work, data = Path(folder), Path(folder, "data")
        data.mkdir()
        # Enough images that no step of the cold run meets an image twice: a true first epoch.
        make_dataset(data, max(16, args.steps * args.batch_size))
        results = [run_recipe(args, data)]
        for name in ("no-cache", "cold", "warm"):
            if name in chosen or (name == "cold" and "warm" in chosen):  # a warm cache is a cold run's
                results.append(run_ours(args, data, work, VARIANTS[name]))
                if name == "cold" and "cold" not in chosen:
                    results.pop()

    print(f"{args.base_model}, {args.resolution}², batch {args.batch_size}, {args.mixed_precision}", end=", ")
    print(f"{args.steps} steps ({args.warmup} left out of the speed)")
    print(f"{'variant':<18} {'samples/s':>10} {'vs recipe':>10} {'peak RSS GiB':>13} {'peak GPU GiB':>13}")
    recipe = results[0]
    for result in results:
        gpu = f"{result['peak_gpu_gib']:.2f}" if result["peak_gpu_gib"] else "-"
        ratio = result["samples_per_s"] / recipe["samples_per_s"]
        print(
            f"{result['variant']:<18} {result['samples_per_s']:>10.2f} {ratio:>9.2f}x "
            f"{result['peak_rss_gib']:>13.2f} {gpu:>13}"
        )
    if args.json:
        figures = {"arguments": vars(args) | {"json": None}, "results": results}
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
