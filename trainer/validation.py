"""Fixed prompts rendered with fixed seeds, without and with an adapter, side by side in one grid.

The trainer renders a grid every `--validation-every` steps with the adapter it is training;
`python -m trainer eval` renders held-out captions the same way with a published adapter.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

GRID_CELL = 256
"""Side of one image in a grid: large enough to judge, small enough for TensorBoard and a model card."""


def render_prompts(
    pipe, prompts: list[str], seed: int, steps: int, width: int, height: int | None = None
) -> list[Image.Image]:
    """One image per prompt (square unless `height` is given), prompt i drawn with seed + i on the CPU, so
    the same prompt and seed give the same starting noise on any device and in any run."""
    images = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        result = pipe(
            prompt, num_inference_steps=steps, width=width, height=height or width, generator=generator
        ).images[0]
        images.append(result)
    return images


def comparison_grid(base: list[Image.Image], adapted: list[Image.Image]) -> Image.Image:
    """One column per prompt: the base model on the top row, the adapter below it."""
    if len(base) != len(adapted) or not base:
        raise ValueError(f"a comparison needs the same number of images on each row (got {len(base)}, {len(adapted)})")
    width, height = base[0].size
    scale = GRID_CELL / max(width, height)  # the long side: a wide validation size gives wide cells
    cell = (round(width * scale), round(height * scale))
    cells = [image.resize(cell, Image.Resampling.LANCZOS) for image in (*base, *adapted)]
    return make_image_grid(cells, rows=2, cols=len(base))


class ValidationGrids:
    """The validation prompts on the base model, rendered at the first grid, and a grid against the adapter.

    The pipeline is given at each grid (a run whose encoder cache is complete loads the VAE and the text
    encoder for validation only); its UNet, and its text encoder when trained, carry the PEFT adapters being
    trained, disabled for the base row only.
    """

    def __init__(self, prompts: list[str], seed: int, steps: int, width: int, height: int, folder: Path) -> None:
        self.prompts = prompts
        self.seed, self.steps, self.width, self.height = seed, steps, width, height
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.base_images: list[Image.Image] | None = None

    def _render(self, pipe) -> list[Image.Image]:
        with torch.no_grad():
            return render_prompts(pipe, self.prompts, self.seed, self.steps, self.width, self.height)

    def grid(self, pipe, step: int) -> tuple[Path, Image.Image]:
        if self.base_images is None:
            with adapters_disabled(pipe):
                self.base_images = self._render(pipe)
        image = comparison_grid(self.base_images, self._render(pipe))
        path = self.folder / f"step-{step:06d}.png"
        image.save(path)
        return path, image


@contextmanager
def adapters_disabled(pipe):
    """The pipeline's PEFT layers (UNet and text encoder) switched off for the duration."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [
        module
        for model in (pipe.unet, pipe.text_encoder)
        for module in model.modules()
        if isinstance(module, BaseTunerLayer)
    ]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
