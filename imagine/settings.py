"""Settings every process shares: where the queue is and the limits of a job.

Each process builds one settings object at start (the worker and the bot extend this class) and
passes it down; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from imagine.contract import HARD_MAX_IMAGES, Limits


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the queue, job state and results.")
    queue_name: str = Field("imagine", description="The Celery queue jobs go to; every worker of a service reads it.")
    key_prefix: str = Field("imagine", description="Prefix of every Redis key this service writes.")

    max_steps: int = Field(100, ge=1, description="Largest `num_inference_steps` a job may ask for.")
    max_images: int = Field(HARD_MAX_IMAGES, ge=1, le=HARD_MAX_IMAGES, description="Most images in one job.")
    max_side: int = Field(1024, ge=64, description="Largest width or height, in pixels.")
    max_pixels: int = Field(1024 * 1024, ge=64 * 64, description="Largest width × height of one image.")
    max_adapters: int = Field(4, ge=1, description="Most adapters one job may blend.")
    max_image_bytes: int = Field(
        10 * 2**20, ge=1024, description="Largest image file a job may start from (img2img), in bytes."
    )
    max_image_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Largest image a job may start from, in pixels (before resizing)."
    )
    prompt_weights: bool = Field(
        True,
        description="Read prompts with A1111's weights, (word:1.3), and encode them beyond 77 tokens; "
        "false: plain text, cut at 77 tokens.",
    )
    max_queue_length: int = Field(100, ge=1, description="Jobs waiting at once; more are refused as 'queue full'.")

    job_time_limit_s: float = Field(600, gt=0, description="A job still rendering after this long is failed.")
    max_job_attempts: int = Field(
        3, ge=1, description="Runs a job gets when its worker dies under it before it is failed for good."
    )
    result_ttl_s: int = Field(
        24 * 3600, ge=60, description="How long jobs, events and results stay in Redis when nobody confirms delivery."
    )
    worker_heartbeat_s: float = Field(2.0, gt=0, description="How often a worker says it is alive.")
    worker_dead_after_s: float = Field(
        15.0, gt=0, description="A running job whose worker has been silent this long is run again elsewhere."
    )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_steps=self.max_steps,
            max_images=self.max_images,
            max_side=self.max_side,
            max_pixels=self.max_pixels,
            max_adapters=self.max_adapters,
            max_image_bytes=self.max_image_bytes,
            max_image_pixels=self.max_image_pixels,
            prompt_weights=self.prompt_weights,
        )

    @property
    def visibility_timeout_s(self) -> int:
        # Must outlast the longest job, or the broker hands a running job to a second worker
        # (celery #5935). Redelivery after a worker died is ours to do (the janitor in worker/liveness.py).
        return int(max(3600, 2 * self.job_time_limit_s))


class FrontEndSettings(ServiceSettings):
    """What every front end (the CLIs, the bot, the web page) reads besides the service's settings."""

    styles_file: Path = Field(
        Path("styles.toml"),
        description="The styles front ends offer (a TOML file; read again when it changes; none when it is absent).",
    )
