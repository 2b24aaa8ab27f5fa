"""`python -m trainer train`: LoRA on SD v1-4's UNet attention projections (or, by option, more of the
UNet, DoRA, and the text encoder too), everything else frozen.

One readable, linear script in the manner of diffusers' `train_text_to_image_lora.py`: arguments and
their checks, then loading, the loop, checkpoints, and publishing the adapter into LORA_DIR.

Every random choice (the order of images, the caption drawn, the crop, the flip, the noise and the
timesteps) is a function of the seed and the step alone (`batches.py`), so a run resumed from a
checkpoint makes exactly the draws the uninterrupted run would have made, and ends on the same weights.
The GPU is kept busy: batches are prepared ahead by DataLoader workers, only what the encoder cache lacks
is encoded, and the loss is read back only every --log-every steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.batches import BatchPlan, LatentSpace, MicroBatches, TrainingImages, with_trigger_word
from trainer.cache import EncodingCache, cache_key, data_fingerprint
from trainer.data import SkipReport, load_records, split_by_image
from trainer.publish import HELD_OUT, TrainedAdapter, notify_workers, publish

logger = logging.getLogger(__name__)

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_PRESETS = {
    "attention": ATTENTION,
    # The transformer blocks whole: their attention, the feed-forward layers and the projections around them.
    "attention-ff": (*ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    # LyCORIS' LoCon: the transformer blocks and the ResNet blocks' convolutions (and resampling ones).
    "locon": (
        *ATTENTION,
        "ff.net.0.proj",
        "ff.net.2",
        "proj_in",
        "proj_out",
        "conv1",
        "conv2",
        "conv_shortcut",
        "conv",
    ),
}
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
"""CLIP's attention projections, as diffusers' own scripts adapt them."""
CHECKPOINTS = "checkpoints"
LORA_FILE = "lora.safetensors"
"""A checkpoint's LoRA weights, in PEFT's module naming."""
TEXT_ENCODER_LORA_FILE = "text_encoder_lora.safetensors"
TENSORBOARD_RUN = "tensorboard"
WANDB_PROJECT = "imagine-trainer"
VALIDATION_TAG = "validation/base (top) vs adapter (bottom)"
DEFAULT_VALIDATION_PROMPTS = 4


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (a NaN loss); the message says why and what was kept."""


@dataclass
class TrainConfig:
    data: Path
    output: Path
    base_model: str = "CompVis/stable-diffusion-v1-4"
    model_cache_dir: Path = field(default_factory=lambda: Path("~/.cache/imagine").expanduser())
    max_steps: int | None = None
    epochs: int | None = None
    resolution: int = 512
    center_crop: bool = True
    flip: bool = False
    caption_dropout: float = 0.0
    """The share of examples trained on the empty caption, which keeps classifier-free guidance working."""
    trigger_word: str | None = None
    """Put before every caption (and validation prompt): the word that calls the adapter's subject up."""
    buckets: bool = False
    """Aspect-ratio buckets: each image trains at about resolution² pixels in (nearly) its own aspect ratio."""
    bucket_step: int = 64
    bucket_max_upscale: float = 2.0
    rank: int = 4
    alpha: float | None = None
    target_modules: str = "attention"
    """A preset of TARGET_PRESETS, or module names separated by commas."""
    use_dora: bool = False
    train_text_encoder: bool = False
    text_encoder_lr: float | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    """no, fp16 or bf16; None: bf16 on a GPU that supports it, no elsewhere."""
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    holdout_fraction: float = 0.01
    seed: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = None
    notify: bool = False
    cache: bool = True
    cache_dir: Path = field(default_factory=lambda: Path("~/.cache/imagine/trainer").expanduser())
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    validation_prompts: list[str] | None = None
    validation_every: int = 500
    validation_steps: int = 25
    validation_size: str | None = None
    """WIDTHxHEIGHT of the validation images; the training resolution's square by default."""
    log_every: int = 10
    dataloader_workers: int | None = None
    report_to: str = "tensorboard"


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m trainer train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="TOML or YAML file whose keys are these flags; flags override it.")
    parser.add_argument(
        "--data", type=Path, help="Flickr30k folder (results.csv + flickr30k_images/) or images + metadata.jsonl."
    )
    parser.add_argument(
        "--output", type=Path, help="Where the adapter goes, e.g. loradir/flickr30k (published atomically)."
    )
    parser.add_argument(
        "--base-model", help="Hub id, local diffusers folder, or `tiny` (default: CompVis/stable-diffusion-v1-4)."
    )
    parser.add_argument("--model-cache-dir", type=Path, help="Where built-in models (`tiny`) are saved.")
    parser.add_argument("--max-steps", type=int, help="Optimizer steps to train (or --epochs).")
    parser.add_argument("--epochs", type=int, help="Passes over the training images (or --max-steps).")
    parser.add_argument("--resolution", type=int, help="Training size in pixels, a multiple of 8 (default 512).")
    parser.add_argument(
        "--random-crop",
        dest="center_crop",
        action="store_false",
        default=None,
        help="Crop at random instead of the centre.",
    )
    parser.add_argument("--flip", action="store_true", default=None, help="Mirror half of the images at random.")
    parser.add_argument(
        "--caption-dropout",
        type=float,
        help="Share of examples trained on the empty caption, 0 to 1 (default 0; 0.05 to 0.1 is usual): it keeps "
        "classifier-free guidance working.",
    )
    parser.add_argument("--trigger-word", help="A word put before every caption, as in 'flkr, a dog runs'.")
    parser.add_argument(
        "--buckets",
        action="store_true",
        default=None,
        help="Aspect-ratio buckets (kohya's --enable_bucket): each image trains at about --resolution² pixels in "
        "nearly its own aspect ratio instead of a square crop; each batch comes from one bucket.",
    )
    parser.add_argument("--bucket-step", type=int, help="Bucket sides are multiples of this (default 64).")
    parser.add_argument(
        "--bucket-max-upscale",
        type=float,
        help="Images that would be enlarged more than this to fill their bucket are skipped (default 2).",
    )
    parser.add_argument("--rank", type=int, help="LoRA rank (default 4).")
    parser.add_argument(
        "--target-modules",
        help=f"UNet layers given a LoRA: a preset ({', '.join(TARGET_PRESETS)}; default attention) or module "
        "names separated by commas, e.g. to_q,to_v,ff.net.2,conv1.",
    )
    parser.add_argument(
        "--use-dora", action="store_true", default=None, help="DoRA (weight-decomposed LoRA, peft's use_dora)."
    )
    parser.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="Also train a LoRA on the text encoder's attention (its encodings are then not cached).",
    )
    parser.add_argument(
        "--text-encoder-lr", type=float, help="The text encoder LoRA's learning rate (default: --learning-rate)."
    )
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank, a scale of 1).")
    parser.add_argument("--learning-rate", type=float, help="AdamW learning rate (default 1e-4).")
    parser.add_argument(
        "--lr-scheduler",
        choices=["constant", "constant_with_warmup", "linear", "cosine"],
        help="Learning-rate schedule (default cosine).",
    )
    parser.add_argument("--lr-warmup-steps", type=int, help="Warm-up steps of the schedule (default 0).")
    parser.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01).")
    parser.add_argument("--batch-size", type=int, help="Images per step and device (default 1).")
    parser.add_argument("--gradient-accumulation-steps", type=int, help="Batches per optimizer step (default 1).")
    parser.add_argument("--max-grad-norm", type=float, help="Gradient clipping norm (default 1.0).")
    parser.add_argument(
        "--mixed-precision",
        choices=["no", "fp16", "bf16"],
        help="Autocast precision; LoRA weights stay fp32 (default bf16 on GPUs that have it, else no).",
    )
    parser.add_argument("--snr-gamma", type=float, help="Min-SNR loss weighting gamma (5 is usual); off by default.")
    parser.add_argument("--noise-offset", type=float, help="Noise offset (0.05 is usual); 0 by default.")
    parser.add_argument(
        "--holdout-fraction", type=float, help="Images kept out of training for evaluation (default 0.01)."
    )
    parser.add_argument("--seed", type=int, help="Seed of every random draw (default 0).")
    parser.add_argument("--checkpoint-every", type=int, help="Steps between checkpoints (default 500).")
    parser.add_argument("--keep-checkpoints", type=int, help="Checkpoints kept, newest first (default 3).")
    parser.add_argument("--resume", help="`latest` or a checkpoint folder to continue from.")
    parser.add_argument(
        "--no-cache",
        dest="cache",
        action="store_false",
        default=None,
        help="Encode every batch with the VAE and text encoder instead of reading the cache.",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help="Where the encoder cache lives (default ~/.cache/imagine/trainer)."
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="Trade compute for memory in the UNet."
    )
    parser.add_argument(
        "--use-8bit-adam", action="store_true", default=None, help="bitsandbytes' 8-bit AdamW (CUDA only)."
    )
    parser.add_argument(
        "--validation-prompt",
        dest="validation_prompts",
        action="append",
        help="A prompt for the validation grids; repeat for several (default: captions of 4 held-out images).",
    )
    parser.add_argument(
        "--validation-every",
        type=int,
        help="Steps between validation grids, adapter against base model (default 500; 0: only at the end).",
    )
    parser.add_argument("--validation-steps", type=int, help="Inference steps of a validation image (default 25).")
    parser.add_argument(
        "--validation-size", help="WIDTHxHEIGHT of the validation images (default: --resolution square)."
    )
    parser.add_argument(
        "--log-every", type=int, help="Steps between reading the loss back from the GPU and logging it (default 10)."
    )
    parser.add_argument(
        "--dataloader-workers",
        type=int,
        help="Processes preparing batches ahead of the GPU (default 4 with CUDA, 1 without; 0: in the training loop).",
    )
    parser.add_argument(
        "--report-to",
        choices=["tensorboard", "wandb"],
        help="tensorboard (default), or wandb to log to Weights & Biases as well (pip install wandb).",
    )
    parser.add_argument(
        "--notify", action="store_true", default=None, help="Ask the workers to hot-reload the adapter at the end."
    )
    args = parser.parse_args(argv)

    values = _read_config_file(args.config) if args.config else {}
    values.update({key: value for key, value in vars(args).items() if value is not None and key != "config"})
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) in {args.config}: {', '.join(sorted(unknown))}")
    for required in ("data", "output"):
        if required not in values:
            raise ValueError(f"--{required} is required (as a flag or in the config file)")
    for key in ("data", "output", "model_cache_dir", "cache_dir"):
        if key in values:
            values[key] = Path(values[key]).expanduser()
    config = TrainConfig(**values)
    check_config(config)
    return config


def _read_config_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix == ".toml":
        import tomllib

        raw = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        raw = yaml.safe_load(text) or {}
    else:
        raise ValueError(f"--config must be a .toml or .yaml file (got {path.name})")
    return {key.replace("-", "_"): value for key, value in raw.items()}


def check_config(config: TrainConfig) -> None:
    """Impossible combinations fail here, before any model is loaded."""
    if (config.max_steps is None) == (config.epochs is None):
        raise ValueError("give exactly one of --max-steps and --epochs")
    if (config.max_steps or 1) < 1 or (config.epochs or 1) < 1:
        raise ValueError("--max-steps and --epochs must be at least 1")
    if config.resolution < 64 or config.resolution % 8:
        raise ValueError(f"--resolution must be a multiple of 8, at least 64 (got {config.resolution})")
    if not 0 <= config.caption_dropout < 1:
        raise ValueError(f"--caption-dropout must be in [0, 1) (got {config.caption_dropout})")
    if config.trigger_word is not None and (not config.trigger_word.strip() or not config.trigger_word.isprintable()):
        raise ValueError(
            f"--trigger-word must be printable text on one line, no newline or tab (got {config.trigger_word!r})"
        )
    if config.rank < 1:
        raise ValueError(f"--rank must be at least 1 (got {config.rank})")
    target_modules(config.target_modules)
    if config.text_encoder_lr is not None and not config.train_text_encoder:
        raise ValueError("--text-encoder-lr is the text encoder LoRA's: add --train-text-encoder")
    if config.learning_rate <= 0 or (config.text_encoder_lr is not None and config.text_encoder_lr <= 0):
        raise ValueError("--learning-rate and --text-encoder-lr must be more than 0")
    if config.buckets:
        if config.bucket_step < 8 or config.bucket_step % 8 or config.bucket_step > config.resolution:
            raise ValueError(
                f"--bucket-step must be a multiple of 8 between 8 and --resolution (got {config.bucket_step})"
            )
        if config.bucket_max_upscale < 1:
            raise ValueError(f"--bucket-max-upscale must be at least 1 (got {config.bucket_max_upscale})")
    validation_size(config)
    if config.log_every < 1:
        raise ValueError(f"--log-every must be at least 1 (got {config.log_every})")
    if config.dataloader_workers is not None and config.dataloader_workers < 0:
        raise ValueError(f"--dataloader-workers must be 0 or more (got {config.dataloader_workers})")
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            "--report-to wandb needs Weights & Biases: pip install wandb, then `wandb login` "
            "(or WANDB_MODE=offline to log locally)"
        )
    if config.batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise ValueError("--batch-size and --gradient-accumulation-steps must be at least 1")
    if not 0 <= config.holdout_fraction < 1:
        raise ValueError(f"--holdout-fraction must be in [0, 1) (got {config.holdout_fraction})")
    if config.checkpoint_every < 1 or config.keep_checkpoints < 1:
        raise ValueError("--checkpoint-every and --keep-checkpoints must be at least 1")
    if config.validation_every < 0 or config.validation_steps < 1:
        raise ValueError("--validation-every must be at least 0 and --validation-steps at least 1")
    if config.validation_prompts is not None and not all(
        isinstance(prompt, str) and prompt.strip() for prompt in config.validation_prompts
    ):
        raise ValueError("every --validation-prompt must be a non-empty text")
    if config.cache and not config.center_crop:
        raise ValueError("--random-crop changes every epoch, so it cannot be cached: add --no-cache")
    if config.use_8bit_adam and not torch.cuda.is_available():
        raise ValueError("--use-8bit-adam needs a CUDA GPU (bitsandbytes)")
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if not config.data.is_dir():
        raise ValueError(f"--data {config.data} is not a folder")
    if config.resume not in (None, "latest") and not Path(config.resume).is_dir():
        raise ValueError(f"--resume {config.resume} is not a checkpoint folder")
    from imagine.contract import ADAPTER_NAME_PATTERN

    if not ADAPTER_NAME_PATTERN.match(config.output.name):
        raise ValueError(f"--output must end in an adapter name (letters, digits, '.', '_', '-'), got {config.output}")
    earlier = _latest_checkpoint(work_folder(config) / CHECKPOINTS)
    if config.resume is None and earlier is not None:
        raise ValueError(
            f"an earlier run into {config.output} left checkpoints ({earlier}): add --resume latest to continue "
            f"it, or delete {work_folder(config)} to start afresh"
        )


def target_modules(option: str) -> list[str]:
    """The UNet module names of --target-modules: a preset, or names separated by commas."""
    if option in TARGET_PRESETS:
        return list(TARGET_PRESETS[option])
    names = [name.strip() for name in option.split(",") if name.strip()]
    if not names or not all(re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", name) for name in names):
        raise ValueError(
            f"--target-modules must be a preset ({', '.join(TARGET_PRESETS)}) or module names separated by "
            f"commas, such as to_q,to_v,ff.net.2 (got {option!r})"
        )
    return names


def validation_size(config: TrainConfig) -> tuple[int, int]:
    """(width, height) of the validation images: --validation-size, or the training resolution's square."""
    if config.validation_size is None:
        return config.resolution, config.resolution
    match = re.fullmatch(r"(\d+)x(\d+)", config.validation_size.strip().lower())
    if match is None or any(int(side) < 64 or int(side) % 8 for side in match.groups()):
        raise ValueError(
            f"--validation-size must be WIDTHxHEIGHT, each a multiple of 8 and at least 64, e.g. 640x384 "
            f"(got {config.validation_size!r})"
        )
    return int(match[1]), int(match[2])


def work_folder(config: TrainConfig) -> Path:
    """Checkpoints, metrics, validation grids and TensorBoard logs, beside the output under a hidden name
    (workers ignore entries starting with `.`)."""
    return config.output.parent / f".{config.output.name}.training"


# The run -------------------------------------------------------------------------------------------


def default_mixed_precision() -> str:
    """bf16 on a GPU that has it (Ampere and newer): the speed of fp16 without its grad scaler's host sync
    and overflow; full precision elsewhere."""
    # Without emulation: a V100 or T4 "supports" bf16 only in slow software.
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False) else "no"


def unmatched_targets(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """Target names that name no module (peft matches a name or a dotted suffix of one)."""
    names = [name for name, _ in model.named_modules()]
    return [target for target in targets if not any(n == target or n.endswith(f".{target}") for n in names)]


def count_parameters(model_class, config) -> int:
    """A model's size from its config alone, without loading (or allocating) its weights."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = model_class.from_config(config) if hasattr(model_class, "from_config") else model_class(config)
    return sum(parameter.numel() for parameter in model.parameters())


class FrozenEncoders:
    """The VAE and the frozen text encoder, loaded the first time something needs them: a run whose
    encoder cache is complete trains without them, and loads them only to render validation grids."""

    def __init__(self, source: str, device, dtype: torch.dtype) -> None:
        self.source, self.device, self.dtype = source, device, dtype
        self._vae = self._text_encoder = None
        self.purpose = "training"
        self.loaded: list[str] = []
        """What was loaded, for what: `vae for training`, `text_encoder for validation`, ..."""

    def _load(self, model_class, subfolder: str):
        model = model_class.from_pretrained(self.source, subfolder=subfolder)
        model.requires_grad_(False)
        self.loaded.append(f"{subfolder} for {self.purpose}")
        return model.to(self.device, dtype=self.dtype)

    def vae(self):
        if self._vae is None:
            from diffusers import AutoencoderKL

            self._vae = self._load(AutoencoderKL, "vae")
        return self._vae

    def text_encoder(self):
        if self._text_encoder is None:
            from transformers import CLIPTextModel

            self._text_encoder = self._load(CLIPTextModel, "text_encoder")
        return self._text_encoder

    def release(self) -> None:
        self._vae = self._text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def train(config: TrainConfig) -> Path:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from trainer.validation import ValidationGrids
    from worker.pipeline import resolve_base_model

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and newer: faster float32 matmuls
    config = replace(config, mixed_precision=config.mixed_precision or default_mixed_precision())
    work = work_folder(config)
    trackers = ["tensorboard"]
    if config.report_to == "wandb":
        from accelerate.tracking import WandBTracker

        # A project of its own (WANDB_PROJECT to choose it), the run named after the adapter, its files in the
        # work folder rather than wherever the trainer was started.
        project = os.environ.get("WANDB_PROJECT", WANDB_PROJECT)
        trackers.append(WandBTracker(project, name=config.output.name, dir=str(work)))
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=str(work),
    )
    main_process = accelerator.is_main_process
    work.mkdir(parents=True, exist_ok=True)
    # One optimizer step takes batch-size x accumulation examples on each of the processes.
    processes, rank = accelerator.num_processes, accelerator.process_index
    run_shape = {
        "processes": processes,
        "batch_size": config.batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "seed": config.seed,
        "data": str(config.data),
        "holdout_fraction": config.holdout_fraction,
        "resolution": config.resolution,
        "flip": config.flip,
        "buckets": [config.bucket_step, config.bucket_max_upscale] if config.buckets else False,
        "caption_dropout": config.caption_dropout,
        "trigger_word": config.trigger_word,
        "rank": config.rank,
        "target_modules": config.target_modules,
        "use_dora": config.use_dora,
        "train_text_encoder": config.train_text_encoder,
    }
    checkpoints = work / CHECKPOINTS
    resume_from = None
    if config.resume:
        resume_from = _latest_checkpoint(checkpoints) if config.resume == "latest" else Path(config.resume)
        if resume_from is not None:
            _check_same_run(resume_from, run_shape)

    # Data
    report = SkipReport()
    train_records, held_out = split_by_image(load_records(config.data), config.holdout_fraction, config.seed)
    images = TrainingImages(train_records, config, report)
    accelerator.print(f"data: {len(images)} training images, {len(held_out)} held out; {report.summary()}")
    if not len(images):
        raise ValueError(f"no usable training image in {config.data} ({report.summary()})")
    if config.buckets:
        for note in images.merge_small_buckets(config.batch_size):
            accelerator.print(f"buckets: {note}")
        sizes = ", ".join(f"{w}x{h}: {len(members)}" for (w, h), members in sorted(images.buckets().items()))
        accelerator.print(f"buckets (width x height: images): {sizes}")
    plan = BatchPlan(images, config.seed, config.batch_size, config.buckets)
    held_out_captions = [{"image": record.image_path.name, "captions": record.captions} for record in held_out]
    if main_process:
        (work / HELD_OUT).write_text(json.dumps(held_out_captions, indent=1))

    # Load models: the UNet, and the encoders only where the cache does not cover their work.
    source = resolve_base_model(config.base_model, config.model_cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    vae_config = dict(AutoencoderKL.load_config(source, subfolder="vae"))
    text_encoder_config = CLIPTextConfig.from_pretrained(source, subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    unet.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    unet.to(accelerator.device, dtype=weight_dtype)
    encoders = FrozenEncoders(source, accelerator.device, weight_dtype)

    targets = target_modules(config.target_modules)
    unmatched = unmatched_targets(unet, targets)
    if unmatched:
        raise ValueError(
            f"--target-modules: {', '.join(unmatched)} name(s) no module of the UNet; the presets are "
            f"{', '.join(TARGET_PRESETS)}, or give module names such as to_q, ff.net.2, conv1"
        )
    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        init_lora_weights=True,  # A random, B zero: training starts from the base model exactly
        target_modules=targets,
        use_dora=config.use_dora,
    )
    torch.manual_seed(config.seed)  # A's random initialisation: the same seed, the same starting point
    try:
        unet.add_adapter(lora_config)
    except ValueError as error:  # a target peft cannot adapt (a norm, an embedding)
        raise ValueError(f"--target-modules {config.target_modules}: {error}") from error
    text_encoder = text_encoder_lora_config = None
    if config.train_text_encoder:
        text_encoder = encoders.text_encoder()  # trained: loaded, and kept, whatever the cache holds
        text_encoder_lora_config = LoraConfig(
            r=config.rank,
            lora_alpha=config.alpha or config.rank,
            init_lora_weights=True,
            target_modules=list(TEXT_ENCODER_TARGETS),
            use_dora=config.use_dora,
        )
        inject_adapter_in_model(text_encoder_lora_config, text_encoder)
    trained_models = [unet] + ([text_encoder] if text_encoder is not None else [])
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.mixed_precision != "no":
        # The trainable LoRA weights stay fp32, or the grad scaler fails ("Attempting to unscale FP16 gradients").
        cast_training_params(trained_models, dtype=torch.float32)
    unet_parameters = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    text_parameters = [p for p in text_encoder.parameters() if p.requires_grad] if text_encoder is not None else []
    trainable = unet_parameters + text_parameters
    trainable_count = sum(parameter.numel() for parameter in trainable)
    frozen_text_encoder = 0 if text_encoder is not None else count_parameters(CLIPTextModel, text_encoder_config)
    total = (
        sum(p.numel() for model in trained_models for p in model.parameters())
        + count_parameters(AutoencoderKL, vae_config)
        + frozen_text_encoder
    )
    accelerator.print(
        f"trainable LoRA parameters: {trainable_count:,} of {total:,} ({100 * trainable_count / total:.4f} %)"
    )

    examples_per_step = config.batch_size * config.gradient_accumulation_steps * processes
    max_steps = config.max_steps or plan.steps(config.epochs, examples_per_step)
    groups = [{"params": unet_parameters}]
    if text_parameters:
        text_lr = config.learning_rate if config.text_encoder_lr is None else config.text_encoder_lr
        groups.append({"params": text_parameters, "lr": text_lr})
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer = bitsandbytes.optim.AdamW8bit(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    else:
        # fused: one kernel for every parameter's update instead of a dozen per tensor.
        optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)
    # accelerate steps a prepared scheduler once per process on every optimizer step: count in those units.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * processes,
        num_training_steps=max_steps * processes,
    )
    if text_encoder is not None:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(unet, text_encoder, optimizer, lr_scheduler)
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    trained_models = [unet] + ([text_encoder] if text_encoder is not None else [])
    unet_module = accelerator.unwrap_model(unet)

    # Checkpoints hold the LoRA weights, not the whole frozen UNet (3.4 GB for SD v1-4), with the
    # optimizer and scheduler that accelerate saves beside them.
    def lora_file(model) -> str:
        return LORA_FILE if accelerator.unwrap_model(model) is unet_module else TEXT_ENCODER_LORA_FILE

    def save_lora_only(models, weights, folder: str) -> None:
        for model in models:
            state = get_peft_model_state_dict(accelerator.unwrap_model(model))
            tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_file(tensors, Path(folder, lora_file(model)))
        weights.clear()

    def load_lora_only(models, folder: str) -> None:
        while models:
            model = models.pop()
            state = load_file(Path(folder, lora_file(model)))
            set_peft_model_state_dict(accelerator.unwrap_model(model), state, adapter_name="default")

    accelerator.register_save_state_pre_hook(save_lora_only)
    accelerator.register_load_state_pre_hook(load_lora_only)

    # Resume
    step = 0
    if config.resume and resume_from is None:
        accelerator.print("no checkpoint to resume from: starting at step 0")
    elif resume_from is not None:
        accelerator.load_state(str(resume_from))
        step = json.loads((resume_from / "progress.json").read_text())["step"]
        accelerator.print(f"resumed from {resume_from} at step {step}")
        if step >= max_steps and config.output.is_dir():
            accelerator.print(f"this run finished at step {step} and published {config.output}: nothing to do")
            return config.output
    if main_process:
        _truncate_metrics(work / "metrics.jsonl", step)  # steps after the checkpoint are run again

    # TensorBoard: a resumed run replaces what the interrupted one logged after its checkpoint (in W&B, a
    # resumed run is a run of its own).
    hyperparameters = {key: _loggable(value) for key, value in asdict(config).items()}
    accelerator.init_trackers(TENSORBOARD_RUN, hyperparameters, init_kwargs={"tensorboard": {"purge_step": step + 1}})
    accelerator.print(f"TensorBoard: tensorboard --logdir {work / TENSORBOARD_RUN}")

    cache = None
    cache_text = text_encoder is None  # a text encoder in training changes its output every step
    encoders_needed = True
    if config.cache:
        key = cache_key(
            data=data_fingerprint([record.image_path for record in images.records]),
            model=source,
            vae=vae_config,
            text_encoder=text_encoder_config.to_dict(),
            resolution=config.resolution,
            dtype=str(weight_dtype),
        )
        cache = EncodingCache(config.cache_dir, key)
        names = images.cache_names()
        if not cache_text:
            names = {name for name in names if name.startswith("latent-")}
        missing = cache.missing(names)
        encoders_needed = bool(missing)
        state = f"{len(names) - len(missing)} of {len(names)} entries"
        if not missing:
            frozen = "the VAE" if text_encoder is not None else "the VAE and the text encoder"
            state += f"; complete, so {frozen} load(s) only for validation"
        accelerator.print(f"encoder cache: {cache.folder} ({state})")

    latent_space = LatentSpace.of(vae_config)
    dataset = MicroBatches(
        images,
        plan,
        processes,
        rank,
        latent_space,
        noise_scheduler.config.num_train_timesteps,
        config.noise_offset,
        cache,
        cache_text,
        tokenizer,
        max_steps * config.gradient_accumulation_steps,
    )
    workers = config.dataloader_workers
    if workers is None:
        workers = 4 if torch.cuda.is_available() else 1
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # an item is a whole micro-batch, from one bucket
        sampler=range(step * config.gradient_accumulation_steps, len(dataset)),
        num_workers=workers,
        pin_memory=accelerator.device.type == "cuda",
        prefetch_factor=2 if workers else None,
    )

    def on_device(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(accelerator.device, non_blocking=True)

    def cached_or_encoded(entries, names: list[str], rows, encode, read_s: float, counted: bool) -> torch.Tensor:
        """The examples' encodings, stacked: those a DataLoader worker read from the cache (one tensor when it
        found all), the rest encoded in one batch from `rows` (pixels or token ids, pinned: one row per
        missing entry) and written to the cache. An entry written since the worker looked (it reads ahead
        of the step that writes) is read rather than encoded twice. `counted`: in the cache's hits and
        misses (those of the training steps)."""
        if isinstance(entries, torch.Tensor):
            if cache is not None and counted:
                cache.count(len(entries), 0, read_s)
            return on_device(entries)
        missing = [k for k, entry in enumerate(entries) if entry is None]
        parts = list(entries)
        if cache is not None:
            for k in missing:
                parts[k] = cache.read(names[k])
        still = [k for k in missing if parts[k] is None]
        started = time.perf_counter()
        if still:
            if len(still) < len(missing):
                rows = rows[[missing.index(k) for k in still]]
            with torch.no_grad():
                computed = encode(on_device(rows))
            for k, tensor in zip(still, computed, strict=True):
                parts[k] = tensor
                if cache is not None:
                    cache.write(names[k], tensor)
        if cache is not None and counted:
            cache.count(len(parts) - len(still), len(still), read_s, time.perf_counter() - started)
        return torch.stack([on_device(part) for part in parts])

    def latents_of(item: dict, counted: bool = True) -> torch.Tensor:
        """The examples' latents, sampled from their distributions (cached, or encoded now)."""
        parameters = cached_or_encoded(
            item["latents"],
            item["latent_names"],
            item["pixels"],
            lambda pixels: encoders.vae().encode(pixels.to(weight_dtype)).latent_dist.parameters,
            item["cache_read_s"],
            counted,
        )
        # Sampled from the distribution whether it was cached or not: the same generator, the same latents.
        distribution = DiagonalGaussianDistribution(parameters)
        epsilon = on_device(item["epsilon"]).to(distribution.mean)
        return ((distribution.mean + distribution.std * epsilon) * latent_space.scaling_factor).float()

    def text_states(item: dict, counted: bool = True) -> torch.Tensor:
        """The captions' text encoder states: cached, or encoded now (every one, with gradients, when the text
        encoder trains)."""
        if text_encoder is not None:
            return text_encoder(on_device(item["input_ids"]))[0]
        return cached_or_encoded(
            item["texts"],
            item["text_names"],
            item["input_ids"],
            lambda ids: encoders.text_encoder()(ids)[0],
            0.0,
            counted,
        )

    @torch.no_grad()
    def fixed_batch_loss() -> float:
        """The loss on the first training images at fixed noise and evenly spread timesteps: unlike the
        per-step loss, whose random timesteps make it noisy, it shows whether training helped."""
        total = torch.zeros((), device=accelerator.device)
        count = min(4, len(images))
        for index in range(count):  # one at a time: with buckets they may differ in size
            item = dataset.prepare([images.example(0, index)], [torch.Generator().manual_seed(config.seed + index)])
            # As in the loop (what either writes to the cache is the same), not counted in its hits and misses.
            latents = latents_of(item, counted=False)
            with accelerator.autocast():
                states = text_states(item, counted=False)
            noise = on_device(item["noise"])
            for timestep in torch.linspace(50, noise_scheduler.config.num_train_timesteps - 50, 4).long():
                timesteps = timestep.reshape(1).to(latents.device)
                with accelerator.autocast():
                    prediction = unet(
                        noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype), timesteps, states
                    ).sample
                target = prediction_target(noise_scheduler, latents, noise, timesteps)
                total += F.mse_loss(prediction.float(), target.float())
        return (total / (4 * count)).item()

    validation = None
    if main_process:
        # The held-out captions as training saw captions: with the trigger word (given prompts are as written).
        prompts = config.validation_prompts or [
            with_trigger_word(prompt, config.trigger_word)
            for prompt in _default_validation_prompts(held_out, images.records)
        ]
        width, height = validation_size(config)
        validation = ValidationGrids(prompts, config.seed, config.validation_steps, width, height, work / "validation")
        tensorboard = accelerator.get_tracker("tensorboard", unwrap=True)
        tensorboard.add_text("validation/prompts", "\n\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), step)

    def log_validation_grid(at_step: int) -> Path | None:
        grid_path = None
        if validation is not None:
            encoders.purpose = "validation"
            trained_text_encoder = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
            pipe = StableDiffusionPipeline.from_pretrained(
                source,
                unet=unet_module,
                vae=encoders.vae(),
                text_encoder=trained_text_encoder or encoders.text_encoder(),
                tokenizer=tokenizer,
                safety_checker=None,
                requires_safety_checker=False,
                dtype=weight_dtype,
            )
            pipe.set_progress_bar_config(disable=True)
            with accelerator.autocast():
                grid_path, grid = validation.grid(pipe, at_step)
            del pipe
            encoders.purpose = "training"
            if not encoders_needed:
                encoders.release()
            tensorboard.add_image(VALIDATION_TAG, np.asarray(grid), at_step, dataformats="HWC")
            if config.report_to == "wandb":
                import wandb

                accelerator.get_tracker("wandb", unwrap=True).log({VALIDATION_TAG: wandb.Image(grid)}, step=at_step)
        accelerator.wait_for_everyone()
        return grid_path

    # Train!
    step_at_start = step
    loss_before = fixed_batch_loss()
    metrics = (work / "metrics.jsonl").open("a") if main_process else None
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", disable=not main_process)
    started = time.perf_counter()
    # Each step's loss stays on the device until the next log point, where all are read back at once: the
    # GPU never waits for the host in between (a NaN is found there, before any checkpoint could keep it).
    pending_losses: list[torch.Tensor] = []
    pending_rates: list[float] = []
    loss_value = float("nan")

    def read_back_losses() -> None:
        nonlocal loss_value
        values = accelerator.reduce(torch.stack(pending_losses), reduction="mean").tolist()  # the one host sync
        elapsed = time.perf_counter() - started
        first = step - len(values) + 1
        for offset, (value, learning_rate) in enumerate(zip(values, pending_rates, strict=True)):
            if not math.isfinite(value):
                last = _latest_checkpoint(checkpoints)
                for tracker in accelerator.trackers:
                    tracker.finish()  # what TensorBoard logged up to here stays readable
                raise TrainingStopped(
                    f"the loss became {value} at step {first + offset}; training stopped. "
                    f"The last good checkpoint is {last or 'none (no checkpoint yet)'}; "
                    "try a lower --learning-rate, or --mixed-precision bf16 instead of fp16"
                )
            accelerator.log({"train/loss": value, "train/learning_rate": learning_rate}, step=first + offset)
            if metrics is not None:
                line = {"step": first + offset, "loss": value, "lr": learning_rate, "elapsed_s": round(elapsed, 4)}
                metrics.write(json.dumps(line) + "\n")
        if metrics is not None:
            metrics.flush()
        loss_value = values[-1]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{pending_rates[-1]:.2e}", refresh=False)
        pending_losses.clear()
        pending_rates.clear()

    batches = iter(loader)
    while step < max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for _ in range(config.gradient_accumulation_steps):
            item = next(batches)
            latents = latents_of(item)
            noise = on_device(item["noise"])
            timesteps = on_device(item["timesteps"])
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = prediction_target(noise_scheduler, latents, noise, timesteps)
            with accelerator.accumulate(*trained_models), accelerator.autocast():
                states = text_states(item)
                prediction = unet(noisy.to(weight_dtype), timesteps, states).sample
                if config.snr_gamma is None:
                    loss = F.mse_loss(prediction.float(), target.float())
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    weights = torch.minimum(snr, torch.full_like(snr, config.snr_gamma)) / snr
                    if noise_scheduler.config.prediction_type == "v_prediction":
                        weights = weights / (snr + 1)
                    squared_errors = F.mse_loss(prediction.float(), target.float(), reduction="none")
                    example_losses = squared_errors.mean(dim=(1, 2, 3))
                    loss = (example_losses * weights).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / config.gradient_accumulation_steps
        step += 1
        pending_losses.append(step_loss)
        pending_rates.append(lr_scheduler.get_last_lr()[0])
        bar.update(1)
        checkpoint_now = step % config.checkpoint_every == 0 or step == max_steps
        validate_now = config.validation_every and step % config.validation_every == 0 and step < max_steps
        if checkpoint_now or validate_now or step % config.log_every == 0:
            read_back_losses()
        if checkpoint_now and main_process:
            _save_checkpoint(accelerator, checkpoints, step, config.keep_checkpoints, run_shape)
        if validate_now:
            log_validation_grid(step)
    bar.close()
    # The training loop's peak (with any grid rendered on the way), not the final grid's encoders.
    peak_gpu_memory = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    final_grid = log_validation_grid(max_steps)
    loss_after = fixed_batch_loss()
    # Every process's cache traffic and peak GPU memory, not the main process's alone.
    local = [cache.hits, cache.misses, peak_gpu_memory] if cache else [0, 0, peak_gpu_memory]
    gathered = accelerator.gather(torch.tensor([local], device=accelerator.device)).cpu()
    # end_training also destroys the process group, which DDP's reducer in the wrapped model holds: a
    # reducer freed after its group can deadlock (seen with gloo), so every reference to the wrapped
    # model goes first, ours and accelerate's.
    unet = unet_module
    text_encoder = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    trained_models = []
    del loader, batches
    accelerator.free_memory()
    accelerator.end_training()
    lora_state = get_peft_model_state_dict(unet)
    text_encoder_state = get_peft_model_state_dict(text_encoder) if text_encoder is not None else None
    if not main_process:
        return config.output
    metrics.close()
    start = "before training" if resume_from is None else f"at step {step_at_start}, where this run resumed"
    print(f"loss on a fixed batch: {loss_before:.5f} {start}, {loss_after:.5f} after")
    totals = {}
    if cache:
        totals = cache.report() | {"cache_hits": int(gathered[:, 0].sum()), "cache_misses": int(gathered[:, 1].sum())}
    if torch.cuda.is_available():
        totals["peak_gpu_memory_bytes"] = int(gathered[:, 2].max())
    (work / "summary.json").write_text(
        json.dumps(
            {
                "fixed_batch_loss_before": loss_before,
                "fixed_batch_loss_after": loss_after,
                "fixed_batch_loss_before_at_step": step_at_start,
                **totals,
                "encoders_loaded": encoders.loaded,
                "trainable_parameters": trainable_count,
                "total_parameters": total,
                "steps": max_steps,
                "processes": processes,
                "mixed_precision": config.mixed_precision,
                "buckets": {f"{w}x{h}": len(m) for (w, h), m in sorted(images.buckets().items())}
                if config.buckets
                else None,
                "skipped_images": dict(report.counts),
            }
        )
    )
    trained = TrainedAdapter(lora_state, lora_config, text_encoder_state, text_encoder_lora_config, trainable_count)
    final = publish(config, trained, loss_value, max_steps, work, report, final_grid)
    if config.notify:
        notify_workers(final.name)
    return final


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet learns to predict: the noise, or the velocity for a v-prediction model (SD 2.x)."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return noise


def _default_validation_prompts(held_out, training) -> list[str]:
    """The first caption of held-out images, which the adapter never sees; of training images if too
    few are held out."""
    return [record.captions[0] for record in [*held_out, *training][:DEFAULT_VALIDATION_PROMPTS]]


def _loggable(value):
    """TensorBoard's hyperparameters take numbers, booleans and text only."""
    if value is None or isinstance(value, (Path, list)):
        return str(value)
    return value


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _checkpoints_oldest_first(checkpoints: Path) -> list[Path]:
    return sorted(checkpoints.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))


def _latest_checkpoint(checkpoints: Path) -> Path | None:
    found = _checkpoints_oldest_first(checkpoints)
    return found[-1] if found else None


OPTIONS_BEFORE_THEY_WERE_RECORDED = {"buckets": False, "target_modules": "attention", "use_dora": False}
OPTIONS_BEFORE_THEY_WERE_RECORDED["train_text_encoder"] = False
"""What a checkpoint written before these options existed was trained with (others it lacks are not checked)."""


def _check_same_run(checkpoint: Path, run_shape: dict) -> None:
    """A checkpoint continues only the run that made it: with other processes, batch, seed, buckets or
    captions, the data position and the learning-rate schedule would silently shift."""
    saved = OPTIONS_BEFORE_THEY_WERE_RECORDED | json.loads((checkpoint / "progress.json").read_text())
    differences = [
        f"{key.replace('_', ' ')} {saved[key]} then, {value} now"
        for key, value in run_shape.items()
        if key in saved and saved[key] != value
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} belongs to a run of another shape ({'; '.join(differences)}): resume it with the same "
            "options and number of processes, or start afresh"
        )


def _save_checkpoint(accelerator, checkpoints: Path, step: int, keep: int, run_shape: dict) -> None:
    """Written under a temporary name and renamed: a checkpoint on disk is always whole."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=checkpoints))
    accelerator.save_state(str(staging))
    (staging / "progress.json").write_text(json.dumps({"step": step} | run_shape))
    staging.rename(checkpoints / f"checkpoint-{step}")
    for old in _checkpoints_oldest_first(checkpoints)[:-keep]:
        shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = parse_args(argv)
    except ValueError as error:
        print(f"trainer: {error}")
        return 2
    try:
        train(config)
    except TrainingStopped as stopped:
        print(f"trainer: {stopped}")
        return 1
    except ValueError as error:  # the data or an option turned out unusable once loaded
        print(f"trainer: {error}")
        return 2
    return 0
