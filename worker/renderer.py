"""Rendering one job on the loaded pipeline: the model logic, separate from the queue that feeds it."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image

from imagine.contract import NO_ADAPTER, JobOptions, JobRejected
from worker.adapters import AdapterError, AdapterRegistry

logger = logging.getLogger(__name__)

# Approximate RGB of SD 1.x latents: a cheap preview with no VAE decode (ComfyUI's published factors).
_LATENT_RGB_FACTORS = torch.tensor(
    [[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350], [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]]
)
PREVIEW_SIDE = 128


@dataclass(frozen=True)
class RenderPlan:
    """What a job will render with, settled before it starts: known problems refuse it here."""

    adapter: str | None
    adapter_version: str | None
    warnings: list[str]


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
"""Called after each denoising step with (step, total, latents); an exception it raises stops the render."""


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

    def __init__(self, pipe, adapters: AdapterRegistry, default_adapter: str, allow_safety_checker_off: bool) -> None:
        self.pipe = pipe
        self.adapters = adapters
        self.default_adapter = default_adapter or None
        self.allow_safety_checker_off = allow_safety_checker_off
        self._schedulers = {name: cls.from_config(pipe.scheduler.config) for name, cls in _scheduler_classes().items()}
        self._schedulers["default"] = pipe.scheduler

    def plan(self, options: JobOptions) -> RenderPlan:
        """Resolve the adapter and check what can be checked before rendering. Raises AdapterError or
        JobRejected with a message for the user."""
        if not options.safety_checker and not self.allow_safety_checker_off and self.pipe.safety_checker is not None:
            raise JobRejected(
                "safety_checker: this service does not allow turning the safety checker off", "safety_checker"
            )
        adapter = self._resolve_adapter(options)
        loaded = self.adapters.loaded.get(adapter) if adapter else None
        if adapter is not None and loaded is None:
            raise AdapterError(
                f"adapter {adapter!r} is not loaded on this worker; available: "
                f"{', '.join(self.adapters.loaded) or 'none'}"
            )
        return RenderPlan(adapter, loaded.version if loaded else None, self.prompt_warnings(options))

    def _resolve_adapter(self, options: JobOptions) -> str | None:
        if options.adapter == NO_ADAPTER:
            return None
        if options.adapter is not None:
            return options.adapter
        if self.default_adapter is not None and self.default_adapter not in self.adapters.loaded:
            raise AdapterError(
                f"the default adapter {self.default_adapter!r} is not loaded on this worker (put it in LORA_DIR and "
                f"reload, or set DEFAULT_ADAPTER empty for the base model); ask for adapter '{NO_ADAPTER}' meanwhile"
            )
        return self.default_adapter

    def prompt_warnings(self, options: JobOptions) -> list[str]:
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

    def render(
        self, options: JobOptions, plan: RenderPlan | None = None, on_step: StepCallback | None = None
    ) -> RenderOutput:
        plan = plan or self.plan(options)
        self.adapters.activate(plan.adapter, options.adapter_scale)
        scheduler = self._schedulers[options.scheduler]
        seeds = options.seeds
        # CPU generators: the same seed gives the same starting noise on any device.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            if on_step is not None:
                # Some schedulers (PNDM) take one step more than asked: report the true total.
                on_step(step + 1, pipe.num_timesteps, tensors["latents"])
            return tensors

        safety_checker = self.pipe.safety_checker
        started = time.perf_counter()
        try:
            self.pipe.scheduler = scheduler
            if not options.safety_checker:
                self.pipe.safety_checker = None
            output = self.pipe(
                prompt=options.prompt,
                negative_prompt=options.negative_prompt or None,
                num_inference_steps=options.num_inference_steps,
                guidance_scale=options.guidance_scale,
                width=options.width,
                height=options.height,
                num_images_per_prompt=options.num_images_per_prompt,
                generator=generators,
                callback_on_step_end=step_end,
            )
        finally:
            self.pipe.safety_checker = safety_checker
        render_s = time.perf_counter() - started

        flagged = output.nsfw_content_detected or [False] * len(output.images)
        png_text = {"prompt": options.prompt, "adapter": plan.adapter or NO_ADAPTER}
        images = [
            None if is_flagged else encode_png(image, {**png_text, "seed": str(seed)})
            for image, seed, is_flagged in zip(output.images, seeds, flagged, strict=True)
        ]
        warnings = list(plan.warnings)
        if any(flagged):
            warnings.append(
                f"The safety checker withheld {sum(flagged)} of {len(flagged)} images as possibly NSFW "
                f"(seeds {', '.join(str(s) for s, f in zip(seeds, flagged, strict=True) if f)})."
            )
        return RenderOutput(
            images=images,
            seeds=seeds,
            scheduler=type(scheduler).__name__,
            warnings=warnings,
            render_s=render_s,
        )
