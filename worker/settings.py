"""Settings of a worker process: the shared ones plus the model, the adapters and the device."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode

from imagine.contract import JobRejected, default, parse_job_options
from imagine.settings import ServiceSettings

DEFAULT_MAX_ADAPTER_BYTES = 512 * 2**20
"""An SD 1.x LoRA of rank 128 is about 150 MB: a file far larger is refused before it is read."""


class WorkerSettings(ServiceSettings):
    base_model: str = Field(
        "CompVis/stable-diffusion-v1-4",
        description="Hub id, local diffusers folder, or `tiny` (built-in random-weight model for offline demos).",
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/imagine").expanduser(), description="Where the built-in `tiny` model is saved on first use."
    )
    lora_dir: Path = Field(Path("./loradir"), description="One folder (or .safetensors file) per LoRA adapter.")
    max_adapter_bytes: int = Field(
        DEFAULT_MAX_ADAPTER_BYTES,
        ge=1,
        description="Larger adapter files are refused before they are read (a rank-128 SD 1.x LoRA is ~150 MB).",
    )
    default_adapter: str = Field(
        "flickr30k", description="Adapter for jobs that name none; empty for the base model alone."
    )
    device: str = Field("auto", description="`auto` (CUDA if present, else CPU), `cuda`, `cuda:1`, `cpu`, `mps`.")
    dtype: str = Field(
        "auto", pattern="^(auto|float16|bfloat16|float32)$", description="`auto`: float16 on CUDA, float32 elsewhere."
    )
    safety_checker: bool = Field(True, description="Run the model folder's safety checker (SD v1-4 ships one).")
    allow_safety_checker_off: bool = Field(
        False, description="Honour jobs that ask for no safety check (the bot asks only in NSFW channels)."
    )
    warmup_steps: int = Field(2, ge=0, description="Steps of a throwaway render at start-up; 0 skips the warm-up.")
    progress_interval_s: float = Field(1.0, ge=0, description="Least time between two step events of a job.")
    preview_interval_s: float = Field(
        2.0, ge=0, description="Least time between two preview images in step events; 0 sends none."
    )
    batch_max_images: int = Field(
        8, ge=1, description="Most images one pipeline call renders, from several jobs that can share it."
    )
    batch_lookahead: int = Field(
        16,
        ge=1,
        description="How far into the queue a worker looks for jobs to join a batch (none is overtaken more).",
    )
    batch_gather_s: float = Field(
        0.0, ge=0, description="How long a worker waits for jobs to join a batch; 0 takes only those already queued."
    )
    fuse_default_adapter: bool = Field(
        True, description="Merge the default adapter into the base weights while the renders use it alone."
    )
    compile: bool = Field(False, description="torch.compile the UNet and the VAE decoder (worth it on a GPU).")
    compile_backend: str = Field("inductor", description="torch.compile's backend.")
    compile_mode: str | None = Field(None, description="torch.compile's mode (e.g. max-autotune); none: its default.")
    lora_max_rank: int = Field(
        64, ge=1, description="With COMPILE: the largest LoRA rank a reload swaps in without recompiling."
    )
    compile_sizes: Annotated[list[tuple[int, int]], NoDecode] = Field(
        default_factory=lambda: [(default("width"), default("height"))],
        description="With COMPILE: the sizes the warm-up compiles (comma-separated WxH, e.g. "
        "512x512,680x384,384x680); jobs of other sizes run uncompiled.",
    )
    lost_message_after_s: float = Field(
        30.0,
        gt=0,
        description="A job queued this long whose message is on no queue (its sender died, a purge) is sent again.",
    )

    @field_validator("compile_sizes", mode="before")
    @classmethod
    def _sizes(cls, value):
        if not isinstance(value, str):
            return value
        sizes = []
        for part in filter(None, value.replace(" ", "").lower().split(",")):
            size = re.fullmatch(r"(\d+)x(\d+)", part, re.ASCII)
            if size is None:
                raise ValueError(f"{part!r} is not a size: write WIDTHxHEIGHT, e.g. 680x384")
            sizes.append((int(size[1]), int(size[2])))
        return sizes

    @model_validator(mode="after")
    def _sizes_a_job_may_have(self):
        for width, height in self.compile_sizes:
            try:
                parse_job_options({"prompt": "warm-up", "width": width, "height": height}, self.limits)
            except JobRejected as refusal:
                raise ValueError(f"COMPILE_SIZES: {width}x{height} is not a size jobs may have: {refusal}") from None
        return self
