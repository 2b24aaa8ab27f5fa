"""Rendering on the loaded pipeline: the model logic, separate from the queue that feeds it.

Jobs that can share a pipeline call (`BatchKey`: the same size, steps, guidance, scheduler, adapters and
scales, safety check, and for img2img the same starting image and strength) are rendered together, each
image with its own prompt, negative prompt and seed.
`render_batch` runs the pipeline and stops at the decoded images; `finish_images` runs the safety
checker and encodes the PNGs, which the worker does off the render thread, while the next batch renders.

A batched image is not bit-identical to the same job rendered alone: some convolution and matmul
kernels depend on the batch size (on a CPU, a pixel value in a few tens of thousands moves by one).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from imagine.contract import NO_ADAPTER, JobOptions, JobRejected, Limits
from imagine.images import decode_image, image_digest, resized
from imagine.wire import AdapterUse
from worker.adapters import Activation, AdapterError, AdapterRegistry
from worker.pipeline import TimestepOnDevice, UncompiledCalls
from worker.prompts import PromptEncoder

logger = logging.getLogger(__name__)

# Approximate RGB of SD 1.x latents: a cheap preview with no VAE decode (ComfyUI's published factors).
_LATENT_RGB_FACTORS = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)
PREVIEW_SIDE = 128


@dataclass(frozen=True)
class BatchKey:
    """What jobs must share to render in one pipeline call."""

    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    adapters: Activation
    """The adapters and their scales; empty for the base model alone (whatever scale was asked)."""
    safety_checker: bool
    init_image: str | None = None
    """The digest of the image img2img starts from; None to start from noise."""
    strength: float | None = None
    prompt_chunks: int = 1
    """How many chunks of 75 tokens the longer of its prompt and negative prompt takes (with prompt weights on)."""

    def shape(self, images: int) -> str:
        """What a compiled graph is specific to, for the logs: a batch of this key with `images` images (its
        scheduler, scales, guidance above 1 and starting image are not)."""
        adapters = "+".join(name for name, _ in self.adapters) or "none"
        guidance = ", no guidance" if self.guidance_scale <= 1 else ""  # a UNet batch of one per image, not two
        chunks = f", {self.prompt_chunks} prompt chunks" if self.prompt_chunks > 1 else ""
        return f"{self.width}x{self.height} ×{images}, adapters {adapters}{guidance}{chunks}"


@dataclass(frozen=True)
class RenderPlan:
    """What a job will render with, settled before it starts: known problems refuse it here."""

    adapters: list[AdapterUse]
    """What it blends, in the job's order (empty: the base model alone)."""
    warnings: list[str]
    batch_key: BatchKey

    @property
    def adapter(self) -> str | None:
        """The first adapter (the one, unless the job blends several)."""
        return self.adapters[0].name if self.adapters else None

    @property
    def adapter_version(self) -> str | None:
        return self.adapters[0].version if self.adapters else None


@dataclass(frozen=True)
class BatchEntry:
    """One job of a batch: its options, its plan, and its images' rows in the batch."""

    options: JobOptions
    plan: RenderPlan
    rows: slice


@dataclass
class DecodedBatch:
    """A batch's images, decoded (on the render device, values in [0, 1]), not yet checked or encoded."""

    images: torch.Tensor
    entries: list[BatchEntry]
    scheduler: str
    render_s: float
    uncompiled: bool = False
    """A compiled pipeline ran some of its calls uncompiled: no graph of the warm-up covers the batch's shapes."""


@dataclass
class RenderOutput:
    images: list[bytes | None]
    """PNG bytes of each image; None where the safety checker withheld it."""
    seeds: list[int]
    scheduler: str
    warnings: list[str] = field(default_factory=list)
    """The plan's warnings and the render's own (images the safety checker withheld)."""
    render_s: float = 0.0


StepCallback = Callable[[int, int, "torch.Tensor"], None]
"""Called after each denoising step with (step, total, latents of the whole batch); an exception it raises
stops the render."""


def _scheduler_classes() -> dict[str, type]:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    return {
        "pndm": PNDMScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "euler_ancestral": EulerAncestralDiscreteScheduler,
        "dpmpp_2m": DPMSolverMultistepScheduler,
    }


def with_timesteps_on_cpu(scheduler_class: type) -> type:
    """The scheduler, keeping its timesteps on the CPU whatever device the pipeline asks for.

    PNDM and DDIM (SD v1-4's default is PNDM) index CPU tensors with the step's timestep: with the timesteps
    on the GPU, each step then waits for the GPU a few times. On the CPU, the index is a CPU number, and the
    arithmetic is the same; `TimestepOnDevice` hands the UNet its timestep on the GPU without waiting."""

    class TimestepsOnCpu(scheduler_class):
        def set_timesteps(self, *args, device=None, **kwargs):
            return super().set_timesteps(*args, device="cpu", **kwargs)

    TimestepsOnCpu.__qualname__ = TimestepsOnCpu.__name__ = f"{scheduler_class.__name__}TimestepsOnCpu"
    return TimestepsOnCpu


def latent_preview(latents: torch.Tensor, side: int = PREVIEW_SIDE) -> bytes | None:
    """A small PNG approximating the first image from its latents, or None for a non-SD-1.x latent space."""
    if latents.shape[1] != _LATENT_RGB_FACTORS.shape[0]:
        return None
    rgb = torch.einsum("chw,cr->rhw", latents[0].float().cpu(), _LATENT_RGB_FACTORS)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    image = Image.fromarray(pixels)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def encode_png(image: Image.Image, metadata: dict[str, str]) -> bytes:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    # CPU allocations that fail raise a plain RuntimeError from c10's allocator.
    return isinstance(error, RuntimeError) and (
        "out of memory" in str(error).lower() or "can't allocate memory" in str(error).lower()
    )


def free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Renderer:
    """Turns validated job options into PNGs on one pipeline, with its adapters."""

    def __init__(
        self,
        pipe,
        adapters: AdapterRegistry,
        default_adapter: str,
        allow_safety_checker_off: bool,
        limits: Limits | None = None,
    ) -> None:
        from diffusers import StableDiffusionImg2ImgPipeline

        self.pipe = pipe
        self.limits = limits or Limits()
        self.adapters = adapters
        self.default_adapter = default_adapter or None
        self.allow_safety_checker_off = allow_safety_checker_off
        # The safety checker runs in `finish_images`, off the render thread: never inside the pipeline call.
        self.safety_checker, self.feature_extractor = pipe.safety_checker, pipe.feature_extractor
        pipe.safety_checker = None
        # img2img on the same modules (no copy): adapters, fusing and compiling apply to both.
        self.img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
        self.img2img.set_progress_bar_config(disable=True)
        self.prompt_encoder = PromptEncoder(pipe) if self.limits.prompt_weights else None
        TimestepOnDevice.install(pipe.unet)  # the other half of the schedulers' CPU timesteps
        classes = {name: with_timesteps_on_cpu(cls) for name, cls in _scheduler_classes().items()}
        classes["default"] = with_timesteps_on_cpu(type(pipe.scheduler))
        self._schedulers = {name: cls.from_config(pipe.scheduler.config) for name, cls in classes.items()}
        self._scheduler_names = {"default": type(pipe.scheduler).__name__} | {
            name: cls.__name__ for name, cls in _scheduler_classes().items()
        }
        self.uncompiled_calls: UncompiledCalls | None = None
        """Set once the pipeline is compiled (`compile_pipeline`)."""

    def plan(self, options: JobOptions) -> RenderPlan:
        """Resolve the adapter and check what can be checked before rendering. Raises AdapterError or
        JobRejected with a message for the user."""
        if not options.safety_checker and not self.allow_safety_checker_off and self.safety_checker is not None:
            raise JobRejected(
                "safety_checker: this service does not allow turning the safety checker off", "safety_checker"
            )
        blend = self._resolve_adapters(options)
        loaded = self.adapters.loaded
        missing = [name for name, _ in blend if name not in loaded]
        if missing:
            raise AdapterError(
                f"{'adapter' if len(missing) == 1 else 'adapters'} {', '.join(map(repr, missing))} "
                f"{'is' if len(missing) == 1 else 'are'} not loaded on this worker; "
                f"available: {', '.join(loaded) or 'none'}"
            )
        uses = [AdapterUse(name=name, version=loaded[name].version, scale=scale) for name, scale in blend]
        key = BatchKey(
            width=options.width,
            height=options.height,
            num_inference_steps=options.num_inference_steps,
            guidance_scale=options.guidance_scale,
            scheduler=options.scheduler,
            adapters=tuple(blend),
            safety_checker=options.safety_checker and self.safety_checker is not None,
            init_image=image_digest(options.image) if options.image is not None else None,
            strength=options.strength if options.image is not None else None,
            prompt_chunks=max(map(self.prompt_encoder.chunks, (options.prompt, options.negative_prompt)))
            if self.prompt_encoder
            else 1,
        )
        return RenderPlan(uses, self.prompt_warnings(options), key)

    def _resolve_adapters(self, options: JobOptions) -> list[tuple[str, float]]:
        """The job's adapters and scales: what it asks for, else the default adapter at `adapter_scale`."""
        if options.blend is not None:
            return options.blend
        if self.default_adapter is None:
            return []
        if self.default_adapter not in self.adapters.loaded:
            raise AdapterError(
                f"the default adapter {self.default_adapter!r} is not loaded on this worker (put it in LORA_DIR and "
                f"reload, or set DEFAULT_ADAPTER empty for the base model); ask for adapter '{NO_ADAPTER}' meanwhile"
            )
        return [(self.default_adapter, options.adapter_scale)]

    def prompt_warnings(self, options: JobOptions) -> list[str]:
        if self.prompt_encoder is not None:
            return []  # nothing is cut: long prompts are encoded in chunks
        warnings = []
        tokenizer = self.pipe.tokenizer
        limit = tokenizer.model_max_length
        for label, text in (("prompt", options.prompt), ("negative_prompt", options.negative_prompt)):
            ids = tokenizer(text, truncation=False).input_ids
            if len(ids) > limit:
                kept = tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True)
                dropped = tokenizer.decode(ids[limit - 1 : -1], skip_special_tokens=True)
                warnings.append(
                    f"The {label} is longer than the text encoder's {limit} tokens; it was cut after "
                    f"\u201c{kept[-40:]}\u201d and this part was ignored: \u201c{dropped[:200]}\u201d"
                )
        return warnings

    @staticmethod
    def entries(jobs: list[tuple[JobOptions, RenderPlan]]) -> list[BatchEntry]:
        """The jobs of one batch, each with the rows its images take, in order."""
        entries, row = [], 0
        for options, plan in jobs:
            entries.append(BatchEntry(options, plan, slice(row, row + options.num_images_per_prompt)))
            row += options.num_images_per_prompt
        return entries

    def render_batch(self, entries: list[BatchEntry], on_step: StepCallback | None = None) -> DecodedBatch:
        """Run the pipeline once for every image of the batch's jobs, which share one BatchKey."""
        keys = {entry.plan.batch_key for entry in entries}
        if len(keys) != 1:
            raise ValueError(f"a batch's jobs must share one BatchKey (got {len(keys)})")
        (key,) = keys
        self.adapters.activate(key.adapters)
        prompts, negative_prompts, generators = [], [], []
        for entry in entries:
            count = entry.options.num_images_per_prompt
            prompts += [entry.options.prompt] * count
            negative_prompts += [entry.options.negative_prompt] * count
            # CPU generators: the same seed gives the same starting noise on any device, alone or batched.
            generators += [torch.Generator("cpu").manual_seed(seed) for seed in entry.options.seeds]

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if on_step is not None:
                # Some schedulers (PNDM) take one step more than asked: report the true total.
                on_step(step + 1, pipe.num_timesteps, tensors["latents"])
            return tensors

        if key.init_image is None:
            pipe, start = self.pipe, {"width": key.width, "height": key.height}
        else:  # the jobs share the image (its digest is in the key): it is decoded once, as the contract did
            image = decode_image(entries[0].options.image, self.limits.max_image_bytes, self.limits.max_image_pixels)
            pipe, start = self.img2img, {"image": resized(image, key.width, key.height), "strength": key.strength}
        pipe.scheduler = self._schedulers[key.scheduler]
        uncompiled_before = self.uncompiled_calls.count if self.uncompiled_calls else 0
        started = time.perf_counter()
        if self.prompt_encoder is not None:
            embeds, negative_embeds = self.prompt_encoder.encode(prompts, negative_prompts)
            conditioning = {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds}
        else:
            conditioning = {"prompt": prompts, "negative_prompt": negative_prompts}
        images = pipe(
            **conditioning,
            num_inference_steps=key.num_inference_steps,
            guidance_scale=key.guidance_scale,
            generator=generators,
            callback_on_step_end=step_end,
            output_type="pt",
            **start,
        ).images
        render_s = time.perf_counter() - started
        uncompiled = self.uncompiled_calls is not None and self.uncompiled_calls.count > uncompiled_before
        return DecodedBatch(images, entries, self._scheduler_names[key.scheduler], render_s, uncompiled)

    def finish_images(self, batch: DecodedBatch) -> list[RenderOutput]:
        """The safety check and the PNGs of a rendered batch, one RenderOutput per job."""
        pixels = batch.images.permute(0, 2, 3, 1).float().cpu().numpy()
        flagged = [False] * len(pixels)
        if batch.entries[0].plan.batch_key.safety_checker:
            flagged = self._unsafe(pixels)
        outputs = []
        for entry in batch.entries:
            seeds, rows = entry.options.seeds, range(*entry.rows.indices(len(pixels)))
            png_text = {
                "prompt": entry.options.prompt,
                "adapter": entry.plan.adapter or NO_ADAPTER,
                "adapters": json.dumps([use.model_dump() for use in entry.plan.adapters]),
            }
            if entry.plan.batch_key.init_image is not None:
                png_text |= {"init_image": entry.plan.batch_key.init_image, "strength": str(entry.options.strength)}
            images = [
                None if flagged[row] else encode_png(_to_image(pixels[row]), {**png_text, "seed": str(seed)})
                for row, seed in zip(rows, seeds, strict=True)
            ]
            warnings = list(entry.plan.warnings)
            withheld = [seed for row, seed in zip(rows, seeds, strict=True) if flagged[row]]
            if withheld:
                warnings.append(
                    f"The safety checker withheld {len(withheld)} of {len(seeds)} images as possibly NSFW "
                    f"(seeds {', '.join(map(str, withheld))})."
                )
            outputs.append(RenderOutput(images, seeds, batch.scheduler, warnings, batch.render_s))
        return outputs

    def _unsafe(self, pixels: np.ndarray) -> list[bool]:
        """The safety checker's verdict on each image (as the pipeline's own `run_safety_checker` asks it)."""
        device, dtype = self.pipe.device, self.pipe.unet.dtype
        clip_input = self.feature_extractor(_to_images(pixels), return_tensors="pt").pixel_values
        _, flagged = self.safety_checker(images=pixels.copy(), clip_input=clip_input.to(device, dtype))
        return [bool(flag) for flag in flagged]

    def render(
        self, options: JobOptions, plan: RenderPlan | None = None, on_step: StepCallback | None = None
    ) -> RenderOutput:
        """One job alone, to its PNGs (warm-up, evaluation, tests)."""
        (entry,) = self.entries([(options, plan or self.plan(options))])
        (output,) = self.finish_images(self.render_batch([entry], on_step))
        return output


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().clip(0, 255).astype(np.uint8))


def _to_images(pixels: np.ndarray) -> list[Image.Image]:
    return [_to_image(image) for image in pixels]
