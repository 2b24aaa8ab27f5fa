"""Celery tasks: thin transport over the generation service."""

from __future__ import annotations

from typing import Any

from imagine.queue import GENERATE_TASK
from worker.celery import app, service


class JobFailed(Exception):
    """Raised once a failed job is recorded, so that Flower lists its task as FAILURE, with the reason.

    Declared in the task's `throws`: Celery logs it as one line, without a traceback, and acknowledges
    the message as for any other end (the job is over; running it again would fail the same way)."""


@app.task(name=GENERATE_TASK, throws=(JobFailed,))
def generate(job_id: str, options: dict[str, Any], attempt: int) -> dict[str, Any]:
    # Idempotent: a duplicate or stale delivery of the same job is skipped by the claim.
    outcome = service().run_job(job_id, options, attempt)
    if outcome["state"] == "failed":
        raise JobFailed(f"{outcome['reason']}: {outcome['message']}")
    return outcome
