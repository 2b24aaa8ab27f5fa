"""Celery tasks: thin transport over the generation service."""

from __future__ import annotations

from typing import Any

from imagine.queue import GENERATE_TASK
from worker.celery import app, service


@app.task(name=GENERATE_TASK)
def generate(job_id: str, options: dict[str, Any], attempt: int) -> dict[str, Any]:
    # Idempotent: a duplicate or stale delivery of the same job is skipped by the claim.
    return service().run_job(job_id, options, attempt)
