"""The Celery application both sides share: front ends send jobs with it, workers consume with it."""

from __future__ import annotations

from celery import Celery

from imagine.settings import ServiceSettings

GENERATE_TASK = "imagine.generate"
RELOAD_COMMAND = "imagine_sync_adapters"


def make_celery(settings: ServiceSettings, main: str = "imagine") -> Celery:
    app = Celery(main, broker=settings.redis_url)
    app.conf.update(
        # JSON only: a pickle message from the queue could run code on the worker.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        # Job state and results live in our own Redis keys (imagine/store.py), not Celery's backend.
        task_ignore_result=True,
        # A job is acknowledged only once it finished, and a worker holds one job at a time, so a job
        # whose worker dies is not lost and no job waits behind a busy worker's prefetch.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # One process owns the GPU and the pipeline; CUDA does not survive a fork.
        worker_pool="solo",
        worker_concurrency=1,
        # Events let Flower show each job, its arguments (the prompt), runtime and state.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
    )
    return app


def send_job(app: Celery, job_id: str, options: dict, attempt: int) -> None:
    """Put one attempt of a job on the queue. Keyword arguments, so Flower shows the prompt by name."""
    app.send_task(
        GENERATE_TASK,
        kwargs={"job_id": job_id, "options": options, "attempt": attempt},
        task_id=f"{job_id}.{attempt}",
    )
