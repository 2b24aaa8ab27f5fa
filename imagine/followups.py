"""Jobs made from one image of a finished job: Upscale and Vary, for every front end alike.

Each is img2img of that image with the job's own options (prompt, adapters, steps, ...): Upscale renders
it at twice its size at a low strength, with its own seed (a "hires fix": the same model adds the
detail, no upscaler to download); Vary renders it again at its size with new seeds, a little or a lot.
"""

from __future__ import annotations

import math
from typing import Any

from imagine.contract import JobRejected, Limits
from imagine.images import SIDE_MULTIPLE

UPSCALE_FACTOR = 2
UPSCALE_STRENGTH = 0.3
VARY_STRENGTHS = {"subtle": 0.35, "strong": 0.7}


def upscale_options(options: dict[str, Any], png: bytes, seed: int, limits: Limits) -> dict[str, Any]:
    """The job that upscales one image (`png`, of seed `seed`) of a job with these options: twice its size,
    or as near as MAX_SIDE and MAX_PIXELS allow. Raises JobRejected when no larger size is allowed."""
    width, height = options["width"], options["height"]
    factor = min(
        UPSCALE_FACTOR,
        limits.max_side / width,
        limits.max_side / height,
        math.sqrt(limits.max_pixels / (width * height)),
    )
    size = (_down_to_multiple(width * factor), _down_to_multiple(height * factor))
    if size[0] <= width or size[1] <= height:
        raise JobRejected(
            f"this image ({width}×{height}) is as large as this service renders "
            f"(sides up to {limits.max_side}, {limits.max_pixels} pixels in all)",
            "width",
        )
    return _from_image(options, png, UPSCALE_STRENGTH, count=1, seed=seed, width=size[0], height=size[1])


def vary_options(options: dict[str, Any], png: bytes, how: str) -> dict[str, Any]:
    """The job that varies one image of a job with these options (`how`: subtle or strong), with new seeds."""
    return _from_image(options, png, VARY_STRENGTHS[how], count=options["num_images_per_prompt"], seed=None)


def _from_image(options: dict[str, Any], png: bytes, strength: float, count: int, **changes: Any) -> dict[str, Any]:
    # img2img runs strength × steps of them: a job of few steps gets enough for one (a button has no steps to set).
    steps = max(options["num_inference_steps"], math.ceil(1 / strength))
    return {
        **options,
        "image": png,
        "strength": strength,
        "num_inference_steps": steps,
        "num_images_per_prompt": count,
        **changes,
    }


def _down_to_multiple(side: float) -> int:
    return int(side // SIDE_MULTIPLE) * SIDE_MULTIPLE
