"""Fixed prompts rendered with fixed seeds, without and with an adapter, side by side in one grid.

The trainer renders a grid every `--validation-every` steps with the adapter it is training;
`python -m trainer eval` renders held-out captions the same way with a published adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

GRID_CELL = 256
"""Side of one image in a grid: large enough to judge, small enough for TensorBoard and a model card."""


def render_prompts(pipe, prompts: list[str], seed: int, steps: int, resolution: int) -> list[Image.Image]:
    """One image per prompt, prompt i drawn with seed + i on the CPU, so the same prompt and seed give
    the same starting noise on any device and in any run."""
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        result = pipe(
            prompt, num_inference_steps=steps, width=resolution, height=resolution, generator=generator
        ).images[0]
        images.append(result)
    return images


def comparison_grid(base: list[Image.Image], adapted: list[Image.Image]) -> Image.Image:
    """One column per prompt: the base model on the top row, the adapter below it."""
    if len(base) != len(adapted) or not base:
        raise ValueError(f"a comparison needs the same number of images on each row (got {len(base)}, {len(adapted)})")
    cells = [image.resize((GRID_CELL, GRID_CELL), Image.Resampling.LANCZOS) for image in (*base, *adapted)]
    return make_image_grid(cells, rows=2, cols=len(base))


class ValidationGrids:
    """The validation prompts on the base model, rendered once, and a grid against the adapter on demand.

    `pipe.unet` carries the PEFT adapter being trained: it is disabled for the base row only.
    """

    def __init__(self, pipe, prompts: list[str], seed: int, steps: int, resolution: int, folder: Path) -> None:
        self.pipe = pipe
        self.prompts = prompts
        self.seed, self.steps, self.resolution = seed, steps, resolution
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        pipe.unet.disable_adapters()
        try:
            self.base_images = self._render()
        finally:
            pipe.unet.enable_adapters()

    def _render(self) -> list[Image.Image]:
        with torch.no_grad():
            return render_prompts(self.pipe, self.prompts, self.seed, self.steps, self.resolution)

    def grid(self, step: int) -> tuple[Path, Image.Image]:
        image = comparison_grid(self.base_images, self._render())
        path = self.folder / f"step-{step:06d}.png"
        image.save(path)
        return path, image
