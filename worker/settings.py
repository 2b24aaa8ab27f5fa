"""Settings of a worker process: the shared ones plus the model, the adapters and the device."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from imagine.settings import ServiceSettings


class WorkerSettings(ServiceSettings):
    base_model: str = Field(
        "CompVis/stable-diffusion-v1-4",
        description="Hub id, local diffusers folder, or `tiny` (built-in random-weight model for offline demos).",
    )
    model_cache_dir: Path = Field(
        Path("~/.cache/imagine").expanduser(), description="Where the built-in `tiny` model is saved on first use."
    )
    lora_dir: Path = Field(Path("./loradir"), description="One folder (or .safetensors file) per LoRA adapter.")
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
