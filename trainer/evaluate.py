"""`python -m trainer eval`: does the adapter follow held-out captions better than the base model?

Held-out captions (from the adapter's `held_out.json`, written by the trainer, or a text file of
prompts) are rendered with fixed seeds through the worker's own pipeline and adapter registry, once on
the base model and once with the adapter, so the images are the ones users would get. CLIP scores each
image against its caption: 100 × the cosine similarity of their embeddings, floored at 0, as in
torchmetrics' CLIPScore. Both renders of a caption share its seed, so the difference is paired, and its
confidence interval is a bootstrap over captions.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.publish import EVALUATION_HEADING, HELD_OUT

REPORT = "report.json"
GRID = "grid.png"
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
BOOTSTRAP_RESAMPLES = 10_000


class EvaluationError(ValueError):
    """The adapter, the captions or a model cannot be used; the message says what to do."""


@dataclass
class EvalConfig:
    adapter: Path
    base_model: str
    model_cache_dir: Path
    clip_model: str = DEFAULT_CLIP_MODEL
    captions_file: Path | None = None
    prompts: int = 32
    seed: int = 0
    steps: int = 25
    resolution: int | None = None
    scale: float = 1.0
    grid_prompts: int = 8
    confidence: float = 0.95
    device: str = "auto"
    dtype: str = "auto"
    output: Path | None = None


def parse_args(argv: list[str] | None = None) -> EvalConfig:
    parser = argparse.ArgumentParser(prog="python -m trainer eval", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapter",
        required=True,
        help="The adapter's folder (e.g. loradir/flickr30k), or its name inside LORA_DIR.",
    )
    parser.add_argument("--base-model", help="Base model (default: the one the adapter was trained on).")
    parser.add_argument("--model-cache-dir", type=Path, help="Where built-in models (`tiny`) are kept.")
    parser.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP_MODEL,
        help=f"CLIP model that scores the images: a hub id or a local folder (default {DEFAULT_CLIP_MODEL}).",
    )
    parser.add_argument(
        "--captions-file",
        type=Path,
        help="A text file with one prompt per line, instead of the adapter's held-out captions.",
    )
    parser.add_argument("--prompts", type=int, default=32, help="How many captions to render (default 32).")
    parser.add_argument("--seed", type=int, default=0, help="Caption i is rendered with seed + i (default 0).")
    parser.add_argument("--steps", type=int, default=25, help="Inference steps per image (default 25).")
    parser.add_argument("--resolution", type=int, help="Image side (default: the training resolution).")
    parser.add_argument("--scale", type=float, default=1.0, help="Adapter strength (default 1.0).")
    parser.add_argument("--grid-prompts", type=int, default=8, help="Captions shown in the grid (default 8).")
    parser.add_argument("--confidence", type=float, default=0.95, help="Confidence level of the interval.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto).")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (default auto).")
    parser.add_argument("--output", type=Path, help="Where the report and grid go (default: ADAPTER/eval).")
    args = parser.parse_args(argv)

    from worker.settings import WorkerSettings

    worker_settings = WorkerSettings()  # LORA_DIR and MODEL_CACHE_DIR as the workers read them
    adapter = Path(args.adapter).expanduser()
    if not adapter.is_dir():
        adapter = worker_settings.lora_dir / args.adapter
    if not adapter.is_dir():
        raise EvaluationError(f"--adapter {args.adapter}: no such folder, nor an adapter of that name in LORA_DIR")
    training_file = adapter / "training_config.json"
    training = json.loads(training_file.read_text()) if training_file.is_file() else {}
    base_model = args.base_model or training.get("base_model")
    if base_model is None:
        raise EvaluationError(f"{adapter} has no training_config.json: give --base-model")
    config = EvalConfig(
        adapter=adapter,
        base_model=base_model,
        model_cache_dir=args.model_cache_dir or Path(training.get("model_cache_dir", worker_settings.model_cache_dir)),
        clip_model=args.clip_model,
        captions_file=args.captions_file,
        prompts=args.prompts,
        seed=args.seed,
        steps=args.steps,
        resolution=args.resolution or training.get("resolution") or 512,
        scale=args.scale,
        grid_prompts=args.grid_prompts,
        confidence=args.confidence,
        device=args.device,
        dtype=args.dtype,
        output=args.output or adapter / "eval",
    )
    if config.prompts < 2:
        raise EvaluationError("--prompts must be at least 2: a confidence interval needs several captions")
    if not 0 < config.confidence < 1:
        raise EvaluationError(f"--confidence must be between 0 and 1 (got {config.confidence})")
    if config.steps < 1 or config.grid_prompts < 1 or config.resolution % 8:
        raise EvaluationError("--steps and --grid-prompts must be at least 1, --resolution a multiple of 8")
    return config


def load_captions(config: EvalConfig) -> list[dict]:
    """Up to `prompts` captions, as (caption, image) records: every held-out image's first caption,
    then their second ones, and so on, so the captions cover as many pictures as they can."""
    if config.captions_file is not None:
        lines = [line.strip() for line in config.captions_file.read_text().splitlines() if line.strip()]
        chosen = [{"caption": line, "image": None} for line in lines[: config.prompts]]
    else:
        held_out_file = config.adapter / HELD_OUT
        if not held_out_file.is_file():
            raise EvaluationError(
                f"{config.adapter} has no {HELD_OUT} (it was not trained by this trainer): give --captions-file"
            )
        held_out = json.loads(held_out_file.read_text())
        chosen = []
        for round_ in range(max((len(entry["captions"]) for entry in held_out), default=0)):
            for entry in held_out:
                if round_ < len(entry["captions"]) and len(chosen) < config.prompts:
                    chosen.append({"caption": entry["captions"][round_], "image": entry["image"]})
    if len(chosen) < 2:
        raise EvaluationError(
            f"only {len(chosen)} caption(s) to evaluate on; a confidence interval needs at least 2 "
            "(train with a larger --holdout-fraction, or give --captions-file)"
        )
    return chosen


def clip_scores(clip_model: str, images, captions: list[str], device: torch.device) -> np.ndarray:
    """CLIP score of each image against its caption: 100 × max(cosine similarity, 0)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(clip_model).to(device).eval()
        processor = CLIPProcessor.from_pretrained(clip_model)
    except OSError as error:
        raise EvaluationError(
            f"could not load the CLIP model '{clip_model}' ({str(error).splitlines()[0]}). Without hub access, "
            f"download it where the hub is reachable (`hf download {clip_model} --local-dir clip`), copy the "
            "folder here and pass --clip-model clip"
        ) from error
    scores = []
    with torch.no_grad():
        for start in range(0, len(images), 8):
            inputs = processor(
                text=captions[start : start + 8],
                images=images[start : start + 8],
                return_tensors="pt",
                padding=True,
                truncation=True,
            ).to(device)
            output = model(**inputs)
            image_embeds = torch.nn.functional.normalize(output.image_embeds, dim=-1)
            text_embeds = torch.nn.functional.normalize(output.text_embeds, dim=-1)
            scores.append((100 * (image_embeds * text_embeds).sum(dim=-1).clamp(min=0)).float().cpu().numpy())
    return np.concatenate(scores)


def bootstrap_interval(differences: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean over captions, with a fixed generator: the same report every run."""
    rng = np.random.default_rng(seed)
    resampled = differences[rng.integers(0, len(differences), (BOOTSTRAP_RESAMPLES, len(differences)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(resampled, [tail, 1 - tail])
    return float(low), float(high)


def evaluate(config: EvalConfig) -> dict:
    from trainer.validation import comparison_grid, render_prompts
    from worker.adapters import AdapterRegistry
    from worker.pipeline import choose_placement, load_pipeline

    chosen = load_captions(config)
    captions = [entry["caption"] for entry in chosen]
    placement = choose_placement(config.device, config.dtype)
    pipe = load_pipeline(config.base_model, placement, config.model_cache_dir, safety_checker=False)
    registry = AdapterRegistry(pipe, config.adapter.parent)
    loaded = registry.load(config.adapter.name)
    print(f"rendering {len(captions)} held-out captions on {config.base_model}, without and with {loaded.name}")
    registry.activate(())
    base_images = render_prompts(pipe, captions, config.seed, config.steps, config.resolution)
    registry.activate(((loaded.name, config.scale),))
    adapter_images = render_prompts(pipe, captions, config.seed, config.steps, config.resolution)
    del pipe, registry  # the CLIP model needs the memory next

    # One pass, so the CLIP model is loaded once.
    scores = clip_scores(config.clip_model, base_images + adapter_images, captions * 2, placement.device)
    base, adapted = scores[: len(captions)], scores[len(captions) :]
    differences = adapted - base
    low, high = bootstrap_interval(differences, config.confidence, config.seed)
    report = {
        "adapter": loaded.name,
        "adapter_version": loaded.version,
        "base_model": config.base_model,
        "clip_model": config.clip_model,
        "captions": len(captions),
        "seed": config.seed,
        "steps": config.steps,
        "resolution": config.resolution,
        "scale": config.scale,
        "clip_score_base": float(base.mean()),
        "clip_score_adapter": float(adapted.mean()),
        "difference": float(differences.mean()),
        "confidence": config.confidence,
        "difference_interval": [low, high],
        "per_caption": [
            entry | {"seed": config.seed + index, "base": float(base[index]), "adapter": float(adapted[index])}
            for index, entry in enumerate(chosen)
        ],
    }
    config.output.mkdir(parents=True, exist_ok=True)
    shown = slice(0, config.grid_prompts)
    comparison_grid(base_images[shown], adapter_images[shown]).save(config.output / GRID)
    _write_atomically(config.output / REPORT, json.dumps(report, indent=2) + "\n")
    _update_model_card(config, report)
    return report


def _write_atomically(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w") as file:
        file.write(text)
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def format_result(report: dict) -> str:
    low, high = report["difference_interval"]
    percent = round(100 * report["confidence"])
    return (
        f"CLIP score on {report['captions']} held-out captions: base {report['clip_score_base']:.2f}, "
        f"adapter {report['clip_score_adapter']:.2f}, difference {report['difference']:+.2f} "
        f"({percent} % CI {low:+.2f} to {high:+.2f})"
    )


def _update_model_card(config: EvalConfig, report: dict) -> None:
    """Rewrite the card's evaluation section, which the trainer puts last, and keep the rest."""
    card_path = config.adapter / "README.md"
    card = card_path.read_text() if card_path.is_file() else f"# LoRA adapter `{config.adapter.name}`\n"
    card = card.split(EVALUATION_HEADING)[0].rstrip() + "\n\n"
    grid = os.path.relpath(config.output / GRID, config.adapter)
    report_path = os.path.relpath(config.output / REPORT, config.adapter)
    section = [
        EVALUATION_HEADING,
        "",
        format_result(report) + ".",
        "",
        f"- CLIP model `{report['clip_model']}`; {report['steps']} steps at {report['resolution']} px; caption i "
        f"rendered with seed {report['seed']} + i on both models; adapter scale {report['scale']}",
        "- the interval is a bootstrap over captions of the paired differences; details per caption in "
        f"`{report_path}`",
        "",
        f"![base model (top) and adapter (bottom) on held-out captions]({grid})",
    ]
    _write_atomically(card_path, card + "\n".join(section) + "\n")


def main(argv: list[str] | None = None) -> int:
    from worker.adapters import AdapterError
    from worker.pipeline import ModelLoadError

    try:
        config = parse_args(argv)
        report = evaluate(config)
    except (EvaluationError, AdapterError, ModelLoadError) as error:
        print(f"trainer eval: {error}")
        return 2
    print(format_result(report))
    print(f"report and grid in {config.output}; model card updated: {config.adapter / 'README.md'}")
    return 0
