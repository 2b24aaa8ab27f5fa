"""`python -m trainer train`: LoRA on SD v1-4's UNet attention projections, everything else frozen.

One readable, linear script in the manner of diffusers' `train_text_to_image_lora.py`: arguments and
their checks, then loading, the loop, checkpoints, and publishing the adapter into LORA_DIR.

Every random choice (the order of images, the caption drawn, the crop, the flip, the noise and the
timesteps) is a function of the seed and the step alone, so a run resumed from a checkpoint makes
exactly the draws the uninterrupted run would have made, and ends on the same weights.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trainer.cache import EncodingCache, cache_key, data_fingerprint
from trainer.data import (
    SkipReport,
    load_records,
    open_rgb,
    split_by_image,
    to_training_array,
)
from trainer.publish import HELD_OUT, notify_workers, publish

logger = logging.getLogger(__name__)

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CHECKPOINTS = "checkpoints"
LORA_FILE = "lora.safetensors"
"""A checkpoint's LoRA weights, in PEFT's module naming."""
TENSORBOARD_RUN = "tensorboard"
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
    rank: int = 4
    alpha: float | None = None
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 0
    weight_decay: float = 1e-2
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
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
    parser.add_argument("--rank", type=int, help="LoRA rank (default 4).")
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
        "--mixed-precision", choices=["no", "fp16", "bf16"], help="Autocast precision; LoRA weights stay fp32."
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


def work_folder(config: TrainConfig) -> Path:
    """Checkpoints, metrics, validation grids and TensorBoard logs, beside the output under a hidden name
    (workers ignore entries starting with `.`)."""
    return config.output.parent / f".{config.output.name}.training"


# Randomness as a function of (seed, step) ---------------------------------------------------------


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    """The epoch's shuffled image order, computed once per epoch rather than once per example."""
    order = list(range(size))
    random.Random(f"{seed}:order:{epoch}").shuffle(order)
    return tuple(order)


def example_generator(seed: int, draw: int) -> torch.Generator:
    """The generator of the draw-th example of the run: its latent sample, noise and timestep depend on
    nothing else, so a batch split over several processes trains exactly as the same batch on one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + draw)


def normal_per_example(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])


def timesteps_per_example(generators: list[torch.Generator], count: int) -> torch.Tensor:
    return torch.stack([torch.randint(0, count, (), generator=generator) for generator in generators])


@dataclass(frozen=True)
class Example:
    index: int
    caption: str
    flip: bool
    crop_seed: str


def with_trigger_word(caption: str, trigger_word: str | None) -> str:
    return f"{trigger_word.strip()}, {caption}" if trigger_word else caption


class TrainingImages:
    """Training examples: the image at its position in an epoch, one of its captions drawn for that epoch."""

    def __init__(self, records, config: TrainConfig, report: SkipReport) -> None:
        self.config = config
        # Every image is checked once here, but not kept: 31,783 decoded Flickr30k images would not fit in
        # memory, and with the encoder cache most are never needed again.
        self.records = [record for record in records if open_rgb(record.image_path, report) is not None]

    def __len__(self) -> int:
        return len(self.records)

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
        return to_training_array(image, self.config.resolution, self.config.center_crop, example.flip, crop_rng)


# The run -------------------------------------------------------------------------------------------


def train(config: TrainConfig) -> Path:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params, compute_snr
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file, save_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from trainer.validation import ValidationGrids
    from worker.pipeline import resolve_base_model

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # Ampere and newer: faster float32 matmuls
    work = work_folder(config)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
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
    held_out_captions = [{"image": record.image_path.name, "captions": record.captions} for record in held_out]
    if main_process:
        (work / HELD_OUT).write_text(json.dumps(held_out_captions, indent=1))

    # Load models
    source = resolve_base_model(config.base_model, config.model_cache_dir)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device, dtype=weight_dtype)

    lora_config = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha or config.rank,
        init_lora_weights=True,  # A random, B zero: training starts from the base model exactly
        target_modules=list(TARGET_MODULES),
    )
    torch.manual_seed(config.seed)  # A's random initialisation: the same seed, the same starting point
    unet.add_adapter(lora_config)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.mixed_precision != "no":
        # The trainable LoRA weights stay fp32, or the grad scaler fails ("Attempting to unscale FP16 gradients").
        cast_training_params(unet, dtype=torch.float32)
    trainable = [parameter for parameter in unet.parameters() if parameter.requires_grad]
    trainable_count = sum(parameter.numel() for parameter in trainable)
    total = sum(p.numel() for model in (unet, vae, text_encoder) for p in model.parameters())
    accelerator.print(
        f"trainable LoRA parameters: {trainable_count:,} of {total:,} ({100 * trainable_count / total:.4f} %)"
    )

    examples_per_step = config.batch_size * config.gradient_accumulation_steps * processes
    max_steps = config.max_steps or config.epochs * math.ceil(len(images) / examples_per_step)
    if config.use_8bit_adam:
        try:
            import bitsandbytes
        except ImportError as error:
            raise ValueError("--use-8bit-adam needs bitsandbytes: pip install bitsandbytes") from error
        optimizer_class = bitsandbytes.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    optimizer = optimizer_class(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    # accelerate steps a prepared scheduler once per process on every optimizer step: count in those units.
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps * processes,
        num_training_steps=max_steps * processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    # Checkpoints hold the LoRA weights, not the whole frozen UNet (3.4 GB for SD v1-4), with the
    # optimizer and scheduler that accelerate saves beside them.
    def save_lora_only(models, weights, folder: str) -> None:
        for model in models:
            state = get_peft_model_state_dict(accelerator.unwrap_model(model))
            tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
            save_file(tensors, Path(folder, LORA_FILE))
        weights.clear()

    def load_lora_only(models, folder: str) -> None:
        while models:
            set_peft_model_state_dict(
                accelerator.unwrap_model(models.pop()), load_file(Path(folder, LORA_FILE)), adapter_name="default"
            )

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

    # TensorBoard: a resumed run replaces what the interrupted one logged after its checkpoint.
    hyperparameters = {key: _loggable(value) for key, value in asdict(config).items()}
    accelerator.init_trackers(TENSORBOARD_RUN, hyperparameters, init_kwargs={"tensorboard": {"purge_step": step + 1}})
    accelerator.print(f"TensorBoard: tensorboard --logdir {work / TENSORBOARD_RUN}")

    cache = None
    if config.cache:
        key = cache_key(
            data=data_fingerprint([record.image_path for record in images.records]),
            model=source,
            vae=dict(vae.config),
            text_encoder=text_encoder.config.to_dict(),
            resolution=config.resolution,
            dtype=str(weight_dtype),
        )
        cache = EncodingCache(config.cache_dir, key)
        accelerator.print(f"encoder cache: {cache.folder}")

    def latent_parameters(examples: list[Example]) -> torch.Tensor:
        def compute(batch: list[Example]) -> torch.Tensor:
            arrays = np.stack([images.pixels(example) for example in batch])
            pixels = torch.from_numpy(arrays).to(accelerator.device, dtype=weight_dtype)
            return vae.encode(pixels).latent_dist.parameters

        if cache is None:
            return compute(examples)
        parts = [
            cache.get(f"latent-{e.index}{'-flip' if e.flip else ''}", lambda e=e: compute([e])[0]) for e in examples
        ]
        return torch.stack(parts).to(accelerator.device)

    def text_states(captions: list[str]) -> torch.Tensor:
        def compute(texts: list[str]) -> torch.Tensor:
            ids = tokenizer(
                texts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(accelerator.device)
            return text_encoder(ids)[0]

        if cache is None:
            return compute(captions)
        parts = [
            cache.get("text-" + hashlib.sha256(text.encode()).hexdigest()[:24], lambda t=text: compute([t])[0])
            for text in captions
        ]
        return torch.stack(parts).to(accelerator.device)

    @torch.no_grad()
    def encode(examples: list[Example], generators: list[torch.Generator]):
        # Sampled from the distribution whether it was cached or not: the same generator, the same latents.
        distribution = DiagonalGaussianDistribution(latent_parameters(examples))
        epsilon = normal_per_example(generators, distribution.mean.shape[1:]).to(distribution.mean)
        latents = (distribution.mean + distribution.std * epsilon) * vae.config.scaling_factor
        return latents.float(), text_states([example.caption for example in examples])

    @torch.no_grad()
    def fixed_batch_loss() -> float:
        """The loss on the first training images at fixed noise and evenly spread timesteps: unlike the
        per-step loss, whose random timesteps make it noisy, it shows whether training helped."""
        generator = torch.Generator().manual_seed(config.seed)
        count = min(4, len(images))
        latents, states = encode([images.example(0, index) for index in range(count)], [generator] * count)
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        total = 0.0
        for timestep in torch.linspace(50, noise_scheduler.config.num_train_timesteps - 50, 4).long():
            timesteps = timestep.repeat(count).to(latents.device)
            with accelerator.autocast():
                prediction = unet(
                    noise_scheduler.add_noise(latents, noise, timesteps).to(weight_dtype), timesteps, states
                ).sample
            target = prediction_target(noise_scheduler, latents, noise, timesteps)
            total += F.mse_loss(prediction.float(), target.float()).item()
        return total / 4

    validation = None
    if main_process:
        # The held-out captions as training saw captions: with the trigger word (given prompts are as written).
        prompts = config.validation_prompts or [
            with_trigger_word(prompt, config.trigger_word)
            for prompt in _default_validation_prompts(held_out, images.records)
        ]
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            unet=accelerator.unwrap_model(unet),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            safety_checker=None,
            requires_safety_checker=False,
            dtype=weight_dtype,
        )
        pipe.set_progress_bar_config(disable=True)
        with accelerator.autocast():
            validation = ValidationGrids(
                pipe, prompts, config.seed, config.validation_steps, config.resolution, work / "validation"
            )
        tensorboard = accelerator.get_tracker("tensorboard", unwrap=True)
        tensorboard.add_text("validation/prompts", "\n\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), step)

    def log_validation_grid(at_step: int) -> Path | None:
        grid_path = None
        if validation is not None:
            with accelerator.autocast():
                grid_path, grid = validation.grid(at_step)
            tensorboard.add_image(VALIDATION_TAG, np.asarray(grid), at_step, dataformats="HWC")
        accelerator.wait_for_everyone()
        return grid_path

    # Train!
    step_at_start = step
    loss_before = fixed_batch_loss()
    metrics = (work / "metrics.jsonl").open("a") if main_process else None
    bar = tqdm(total=max_steps, initial=step, desc="training", unit="step", disable=not main_process)
    started = time.perf_counter()
    loss_value = float("nan")
    while step < max_steps:
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(config.gradient_accumulation_steps):
            # Each process takes its own slice of the step's examples.
            first = ((step * config.gradient_accumulation_steps + micro) * processes + rank) * config.batch_size
            positions = [(first + k) // len(images) for k in range(config.batch_size)]  # epochs
            batch = [
                images.example(epoch, epoch_order(config.seed, epoch, len(images))[(first + k) % len(images)])
                for k, epoch in enumerate(positions)
            ]
            generators = [example_generator(config.seed, first + k) for k in range(config.batch_size)]
            latents, states = encode(batch, generators)
            noise = normal_per_example(generators, latents.shape[1:]).to(latents.device)
            if config.noise_offset:
                offset = normal_per_example(generators, (latents.shape[1], 1, 1))
                noise += config.noise_offset * offset.to(latents.device)
            timesteps = timesteps_per_example(generators, noise_scheduler.config.num_train_timesteps)
            timesteps = timesteps.to(latents.device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = prediction_target(noise_scheduler, latents, noise, timesteps)
            with accelerator.accumulate(unet), accelerator.autocast():
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
                # Every process stops together: one that went on alone would wait forever in the next all-reduce.
                if not accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all():
                    last = _latest_checkpoint(checkpoints)
                    value = loss.item() if not torch.isfinite(loss) else "non-finite on another process"
                    for tracker in accelerator.trackers:
                        tracker.finish()  # what TensorBoard logged up to here stays readable
                    raise TrainingStopped(
                        f"the loss became {value} at step {step + 1}; training stopped. "
                        f"The last good checkpoint is {last or 'none (no checkpoint yet)'}; "
                        "try a lower --learning-rate, or --mixed-precision bf16 instead of fp16"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_loss += loss.detach() / config.gradient_accumulation_steps
        # The step's loss over all its examples, on every process.
        loss_value = accelerator.reduce(step_loss, reduction="mean").item()
        step += 1
        elapsed = time.perf_counter() - started
        learning_rate = lr_scheduler.get_last_lr()[0]
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{learning_rate:.2e}", refresh=False)
        bar.update(1)
        accelerator.log({"train/loss": loss_value, "train/learning_rate": learning_rate}, step=step)
        if metrics is not None:
            line = {"step": step, "loss": loss_value, "lr": learning_rate, "elapsed_s": round(elapsed, 4)}
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
        if (step % config.checkpoint_every == 0 or step == max_steps) and main_process:
            _save_checkpoint(accelerator, checkpoints, step, config.keep_checkpoints, run_shape)
        if config.validation_every and step % config.validation_every == 0 and step < max_steps:
            log_validation_grid(step)
    bar.close()
    final_grid = log_validation_grid(max_steps)
    loss_after = fixed_batch_loss()
    # Every process's cache traffic and peak GPU memory, not the main process's alone.
    local = [cache.hits, cache.misses] if cache else [0, 0]
    local.append(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0)
    gathered = accelerator.gather(torch.tensor([local], device=accelerator.device)).cpu()
    # end_training also destroys the process group, which DDP's reducer in the wrapped model holds: a
    # reducer freed after its group can deadlock (seen with gloo), so every reference to the wrapped
    # model goes first, ours and accelerate's.
    unet = accelerator.unwrap_model(unet)
    accelerator.free_memory()
    accelerator.end_training()
    lora_state = get_peft_model_state_dict(unet)
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
                "trainable_parameters": trainable_count,
                "total_parameters": total,
                "steps": max_steps,
                "processes": processes,
                "skipped_images": dict(report.counts),
            }
        )
    )
    final = publish(config, lora_state, lora_config, loss_value, max_steps, trainable_count, work, report, final_grid)
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


def _check_same_run(checkpoint: Path, run_shape: dict) -> None:
    """A checkpoint continues only the run that made it: with other processes, batch or seed, the data
    position and the learning-rate schedule would silently shift."""
    saved = json.loads((checkpoint / "progress.json").read_text())
    differences = [
        f"{key.replace('_', ' ')} {saved[key]} then, {value} now"
        for key, value in run_shape.items()
        if key in saved and saved[key] != value
    ]
    if differences:
        raise ValueError(
            f"{checkpoint} belongs to a run of another shape ({'; '.join(differences)}): resume it with the same "
            "number of processes, --batch-size, --gradient-accumulation-steps and --seed, or start afresh"
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
