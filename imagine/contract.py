"""The job contract every front end and every worker share.

This module imports no torch, so the bot can validate options before anything reaches the queue; the
worker validates again with the same code, because a message on the queue may come from an old or
hostile client. Option names follow diffusers (`num_inference_steps`, `guidance_scale`, ...).
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from imagine.images import ImageRejected, decode_image, encode_image, render_size
from imagine.prompts import PromptSyntaxError, weighted_fragments

SCHEDULERS = ("default", "pndm", "ddim", "euler", "euler_ancestral", "dpmpp_2m")
"""Scheduler names a job may ask for; `default` is the one the model folder ships."""

NO_ADAPTER = "none"
"""The adapter name that asks for the base model alone."""

ADAPTER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 2000
HARD_MAX_IMAGES = 4
GUIDANCE_RANGE = (0.0, 30.0)
ADAPTER_SCALE_RANGE = (0.0, 2.0)
STRENGTH_RANGE = (0.0, 1.0)


class JobRejected(ValueError):
    """A job refused before it runs; the message names the option and what it accepts."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


@dataclass(frozen=True)
class Limits:
    """Bounds that protect the GPU; the settings of each process fill them in."""

    max_steps: int = 100
    max_images: int = HARD_MAX_IMAGES
    max_side: int = 1024
    max_pixels: int = 1024 * 1024
    min_side: int = 64
    max_adapters: int = 4
    max_image_bytes: int = 10 * 2**20
    """The largest file a job may start from (Discord's default attachment limit)."""
    max_image_pixels: int = 4096 * 4096
    """The largest image a job may start from, in pixels (it is resized to the render size)."""
    prompt_weights: bool = True
    """Prompts are read with A1111's weights, `(word:1.3)`, and encoded beyond 77 tokens; off, they are plain
    text cut at the text encoder's 77 tokens."""

    def ranges(self) -> dict[str, tuple[float, float]]:
        """The allowed range of each numeric option, as shown in error messages and help texts."""
        return {
            "num_inference_steps": (1, self.max_steps),
            "guidance_scale": GUIDANCE_RANGE,
            "width": (self.min_side, self.max_side),
            "height": (self.min_side, self.max_side),
            "seed": (0, MAX_SEED),
            "num_images_per_prompt": (1, min(self.max_images, HARD_MAX_IMAGES)),
            "adapter_scale": ADAPTER_SCALE_RANGE,
            "strength": STRENGTH_RANGE,
        }


class AdapterChoice(BaseModel):
    """One adapter of a job's blend, at its strength."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    scale: float = 1.0

    @field_validator("name")
    @classmethod
    def _adapter_name(cls, value: str) -> str:
        if not ADAPTER_NAME_PATTERN.match(value) or value == NO_ADAPTER:
            raise ValueError(
                "adapters: each name is letters, digits, '.', '_' or '-' (at most 64, no path); "
                f"for the base model alone give adapter '{NO_ADAPTER}' instead (got {value!r})"
            )
        return value


class JobOptions(BaseModel):
    """What a user may ask of one job. Build it with `parse_job_options`, which checks the limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    negative_prompt: str = ""
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    seed: int | None = None
    num_images_per_prompt: int = 1
    adapter: str | None = None
    """None: the worker's DEFAULT_ADAPTER; `none`: the base model alone."""
    adapter_scale: float = 1.0
    adapters: list[AdapterChoice] | None = None
    """Several adapters blended in one render, each at its scale; instead of `adapter` and `adapter_scale`."""
    image: str | None = None
    """An image to start from (img2img): the base64 of a PNG, JPEG or WebP file. Without width and height,
    it renders at its own aspect ratio, at about 512² pixels."""
    strength: float = 0.6
    """How far img2img moves from `image`: low stays close to it, 1 ignores it."""
    style: str | None = None
    """The style the front end applied (`imagine/styles.py`): the prompt is already the one it expanded to."""
    scheduler: str = "default"
    safety_checker: bool = True
    """False asks for no safety check; the worker honours it only where its operator allows it."""

    @field_validator("prompt")
    @classmethod
    def _prompt_has_text(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("prompt must not be empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt must be at most {MAX_PROMPT_CHARS} characters (got {len(value)})")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_length(cls, value: str) -> str:
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"negative_prompt must be at most {MAX_PROMPT_CHARS} characters (got {len(value)})")
        return value.strip()

    @field_validator("adapter")
    @classmethod
    def _adapter_name(cls, value: str | None) -> str | None:
        if value is not None and not ADAPTER_NAME_PATTERN.match(value):
            raise ValueError(
                "adapter must be a name of letters, digits, '.', '_' or '-' (at most 64, no path), "
                f"or '{NO_ADAPTER}' (got {value!r})"
            )
        return value

    @field_validator("style")
    @classmethod
    def _style_name(cls, value: str | None) -> str | None:
        if value is not None and not ADAPTER_NAME_PATTERN.match(value):
            raise ValueError(f"style must be a name of letters, digits, '.', '_' or '-' (at most 64) (got {value!r})")
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        if value not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)} (got {value!r})")
        return value

    @property
    def blend(self) -> list[tuple[str, float]] | None:
        """The adapters asked for, with their scales: None for the worker's default adapter (at `adapter_scale`),
        empty for the base model alone."""
        if self.adapters is not None:
            return [(choice.name, choice.scale) for choice in self.adapters]
        if self.adapter == NO_ADAPTER:
            return []
        return None if self.adapter is None else [(self.adapter, self.adapter_scale)]

    @property
    def seeds(self) -> list[int]:
        """The seed of each image: consecutive from `seed`, so image i is reproducible on its own."""
        if self.seed is None:
            raise RuntimeError("seeds are known once parse_job_options has drawn the seed")
        return [self.seed + index for index in range(self.num_images_per_prompt)]


def default(option: str) -> Any:
    """An option's default, for front ends that show it (help texts, Discord's option descriptions)."""
    return JobOptions.model_fields[option].default


def _range_message(option: str, low: float, high: float, value: Any) -> str:
    kind = "an integer" if isinstance(low, int) and isinstance(high, int) else "a number"
    return f"{option} must be {kind} from {low} to {high} (got {value!r})"


def parse_job_options(data: dict[str, Any] | JobOptions, limits: Limits) -> JobOptions:
    """Validate a job's options against the contract and the limits, drawing a seed when none is given.

    Raises JobRejected with a message that names the first bad option and its allowed range.
    """
    raw = data.model_dump(exclude_unset=True) if isinstance(data, JobOptions) else data
    if not isinstance(raw, dict):
        raise JobRejected(f"job options must be an object of option names to values (got {type(raw).__name__})")
    if isinstance(raw.get("image"), bytes | bytearray):  # the Python client's callers may give the file itself
        raw = {**raw, "image": encode_image(bytes(raw["image"]))}
    ranges = limits.ranges()
    try:
        options = JobOptions.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        option = str(first["loc"][0]) if first["loc"] else None
        where = ".".join(map(str, first["loc"]))
        if first["type"] == "extra_forbidden" and len(first["loc"]) > 1:  # inside the adapters list
            known = ", ".join(AdapterChoice.model_fields)
            raise JobRejected(f"{where}: unknown field; each adapter has {known}", option) from None
        if first["type"] == "extra_forbidden":
            known = ", ".join(JobOptions.model_fields)
            raise JobRejected(f"unknown option {option!r}; the options are: {known}", option) from None
        if first["type"] == "missing":
            raise JobRejected(f"{option} is required", option) from None
        if option in ranges:
            raise JobRejected(_range_message(option, *ranges[option], first.get("input")), option) from None
        message = str(first["msg"]).removeprefix("Value error, ")
        if not message.startswith(f"{option}:") and (
            len(first["loc"]) > 1 or first["type"] in ("string_type", "bool_type", "bool_parsing", "list_type")
        ):
            message = f"{where}: {message} (got {first.get('input')!r})"
        raise JobRejected(message, option) from None

    for option, (low, high) in ranges.items():
        value = getattr(options, option)
        if value is not None and not low <= value <= high:
            raise JobRejected(_range_message(option, low, high, value), option)
    if options.adapters is not None:
        _check_adapters(options, limits)
    if limits.prompt_weights:
        for option in ("prompt", "negative_prompt"):
            try:
                fragments = weighted_fragments(getattr(options, option))
            except PromptSyntaxError as error:
                raise JobRejected(f"{option}: {error}", option) from None
            if option == "prompt" and not fragments:
                raise JobRejected("prompt: nothing is left to draw once its weights are read", option)
    if options.image is not None:
        options = _fit_to_image(options, limits)
    elif options.strength != default("strength"):
        raise JobRejected(
            "strength applies to an image to start from: give image too, or leave strength out", "strength"
        )
    for side in ("width", "height"):
        if getattr(options, side) % 8:
            raise JobRejected(f"{side} must be a multiple of 8 (got {getattr(options, side)})", side)
    if options.width * options.height > limits.max_pixels:
        raise JobRejected(
            f"width × height must be at most {limits.max_pixels} pixels "
            f"(got {options.width}×{options.height} = {options.width * options.height})",
            "width",
        )
    # The seed is drawn here, before the queue, so a redelivered job renders the same images.
    if options.seed is None:
        options = options.model_copy(update={"seed": secrets.randbelow(MAX_SEED - HARD_MAX_IMAGES)})
    if options.seed + options.num_images_per_prompt - 1 > MAX_SEED:
        raise JobRejected(
            f"seed must leave room for one seed per image: at most {MAX_SEED - options.num_images_per_prompt + 1}",
            "seed",
        )
    return options


def _fit_to_image(options: JobOptions, limits: Limits) -> JobOptions:
    """The job with the size it renders its image at, once the image decodes within the limits."""
    try:
        image = decode_image(options.image, limits.max_image_bytes, limits.max_image_pixels)
        given = options.model_fields_set
        width, height = render_size(
            image.size,
            options.width if "width" in given else None,
            options.height if "height" in given else None,
            limits.min_side,
            limits.max_side,
            limits.max_pixels,
        )
    except ImageRejected as error:
        raise JobRejected(str(error), "image") from None
    steps = int(options.num_inference_steps * options.strength)
    if steps < 1:
        raise JobRejected(
            f"strength × num_inference_steps must be at least 1, or no step runs "
            f"(got {options.strength} × {options.num_inference_steps}): raise either",
            "strength",
        )
    return options.model_copy(update={"width": width, "height": height})


def _check_adapters(options: JobOptions, limits: Limits) -> None:
    names = [choice.name for choice in options.adapters]
    if options.adapter is not None or options.adapter_scale != default("adapter_scale"):
        raise JobRejected(
            "give either adapters (several, each with its scale) or adapter and adapter_scale, not both", "adapters"
        )
    if not names:
        raise JobRejected(
            f"adapters must name at least one adapter; for the base model alone give adapter '{NO_ADAPTER}'",
            "adapters",
        )
    if len(names) > limits.max_adapters:
        raise JobRejected(f"adapters: at most {limits.max_adapters} in one job (got {len(names)})", "adapters")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise JobRejected(f"adapters: {', '.join(twice)} is listed twice; give each adapter once", "adapters")
    low, high = ADAPTER_SCALE_RANGE
    for choice in options.adapters:
        if not low <= choice.scale <= high:
            raise JobRejected(
                f"adapters: the scale of {choice.name} must be a number from {low} to {high} (got {choice.scale!r})",
                "adapters",
            )


def parse_adapter_list(text: str) -> list[dict[str, Any]]:
    """`flickr30k:0.8, style:0.5` (a name without a scale is at 1) as the `adapters` option, for front ends
    where a user types them. Raises JobRejected for a scale that is not a number; the rest is checked by
    `parse_job_options`."""
    choices: list[dict[str, Any]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, colon, scale = item.partition(":")
        choice: dict[str, Any] = {"name": name.strip()}
        if colon:
            try:
                choice["scale"] = float(scale)
            except ValueError:
                raise JobRejected(
                    f"adapters: the scale after ':' in {item!r} must be a number, as in flickr30k:0.8", "adapters"
                ) from None
        choices.append(choice)
    return choices
