"""The one way into the service, for every front end: the `imagine` CLI, the Discord bot, scripts.

It validates options with the shared contract before anything reaches the queue, records the job,
sends it to the workers, follows its events and fetches its result. It imports no torch.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kombu.utils.url import maybe_sanitize_url

from imagine.contract import JobOptions, JobRejected, parse_job_options
from imagine.queue import RELOAD_COMMAND, make_celery, send_job
from imagine.settings import ServiceSettings
from imagine.store import (
    REDIS_OUTAGE_S,
    DurationStats,
    FrontEndRecords,
    JobFollower,
    JobRecord,
    JobResult,
    JobStore,
    ServiceCounters,
)
from imagine.wire import DeadLetter, JobEvent, ReloadAnswer, WorkerStatus

EXIT_UNREACHABLE = 4
"""Exit status of `imagine` and `imagine-admin` when they cannot reach Redis."""


def unreachable_message(settings: ServiceSettings, error: Exception) -> str:
    """What to tell a person whose command found no Redis to talk to."""
    return (
        f"cannot reach Redis at {maybe_sanitize_url(settings.redis_url, mask='***')} ({error}). "
        "Is it running? Start `redis-server`, or set REDIS_URL to the service's Redis."
    )


class QueueFull(JobRejected):
    """The service holds as many waiting jobs as it accepts."""


class TooManyPending(JobRejected):
    """The submitter already has as many jobs queued or rendering as one person may."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"You already have {count} jobs queued or rendering (the limit is {limit}); "
            "submit again when one of them has finished."
        )


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    options: JobOptions
    position: int


@dataclass(frozen=True)
class QueueStats:
    """Every number the service keeps about its queue and its jobs, read from Redis: what `/queue`,
    `imagine-admin queue` and the Prometheus exporter show, from whichever machine."""

    queued: int
    running: list[str]
    workers: dict[str, WorkerStatus]
    render: DurationStats
    queue_wait: DurationStats
    """From a job's submission until a worker started it (again, for a job requeued after its worker died)."""
    counters: ServiceCounters
    failures_last_hour: dict[str, int]
    dead_letters: list[DeadLetter]
    """The latest queue messages workers refused, newest first."""

    @property
    def recent_render_s(self) -> float | None:
        """Mean render time of the last jobs, None before any finished."""
        return self.render.recent_mean

    def estimated_wait_s(self, position: int) -> float | None:
        if self.recent_render_s is None:
            return None
        return self.recent_render_s * position / max(1, len(self.workers))


class ImagineClient:
    def __init__(self, settings: ServiceSettings, client_name: str = "cli") -> None:
        self.settings = settings
        self.client_name = client_name
        self.store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.result_ttl_s)
        self.app = make_celery(settings)

    @staticmethod
    def new_job_id() -> str:
        return uuid.uuid4().hex

    def submit(
        self,
        options: dict[str, Any] | JobOptions,
        owner: str = "",
        job_id: str | None = None,
        max_pending_for_owner: int | None = None,
    ) -> SubmittedJob:
        """Validate and enqueue a job. Raises JobRejected (bad option), QueueFull, or TooManyPending when
        `owner` already has `max_pending_for_owner` jobs queued or running.

        A front end that must remember the job before it exists (the bot) passes its own `job_id`."""
        checked = parse_job_options(options, self.settings.limits)
        job_id = job_id or self.new_job_id()
        payload = checked.model_dump()
        outcome, position = self.store.create(
            job_id, payload, self.client_name, owner, self.settings.max_queue_length, max_pending_for_owner
        )
        if outcome == "queue_full":
            raise self._queue_full()
        if outcome == "owner_limit":
            raise TooManyPending(position, max_pending_for_owner)
        try:
            send_job(self.app, job_id, payload, attempt=1)
        except Exception:
            self.store.cancel(job_id)  # no message on the queue: do not leave it holding a place
            raise
        return SubmittedJob(job_id=job_id, options=checked, position=position)

    def _queue_full(self) -> QueueFull:
        return QueueFull(
            f"The queue is full ({self.settings.max_queue_length} jobs waiting); try again in a few minutes."
        )

    def events(self, job_id: str) -> Iterator[JobEvent]:
        """The job's events in order (queued, started, step..., then done, failed or cancelled)."""
        return self.store.follow(job_id)

    def follower(self, job_id: str, outage_s: float | None = REDIS_OUTAGE_S) -> JobFollower:
        """A job's events to poll at a front end's own pace (the bot's event loop), through Redis restarts."""
        return JobFollower(self.store, job_id, outage_s)

    def job(self, job_id: str) -> JobRecord | None:
        return self.store.get(job_id)

    def result(self, job_id: str) -> JobResult | None:
        return self.store.load_result(job_id)

    def cancel(self, job_id: str) -> str:
        return self.store.cancel(job_id)

    def confirm_delivery(self, job_id: str) -> bool:
        return self.store.confirm_delivery(job_id)

    def records(self) -> FrontEndRecords:
        """This front end's own records in the service's Redis (what it must remember across restarts)."""
        return self.store.records(self.client_name)

    def workers(self) -> dict[str, WorkerStatus]:
        return self.store.workers(alive_within_s=self.settings.worker_dead_after_s)

    def queue_stats(self) -> QueueStats:
        return QueueStats(
            queued=self.store.queue_length(),
            running=self.store.running_jobs(),
            workers=self.workers(),
            render=self.store.durations("render"),
            queue_wait=self.store.durations("queue_wait"),
            counters=self.store.counters(),
            failures_last_hour=self.store.recent_failures(),
            dead_letters=self.store.dead_letters(count=3),
        )

    def reload_adapters(self, adapter: str | None = None, timeout_s: float = 30.0) -> ReloadOutcome:
        """Ask every worker to reload one adapter (None: all) from its LORA_DIR and collect the answers.

        An idle worker answers at once. A worker busy with a job answers when the job is done: it never
        swaps weights under a running job, and always applies pending reloads before its next job. A
        worker that was offline loads the current files when it starts.
        """
        workers = set(self.workers())
        request_id = self.store.request_reload(adapter)
        # Wakes idle workers; busy ones see the request before their next job.
        self.app.control.broadcast(RELOAD_COMMAND, reply=False)
        deadline = time.monotonic() + timeout_s
        answers = self.store.reload_answers(request_id)
        while not workers.issubset(answers) and time.monotonic() < deadline:
            time.sleep(0.2)
            answers = self.store.reload_answers(request_id)
        return ReloadOutcome(request_id=request_id, answers=answers, waiting_for=sorted(workers - set(answers)))


@dataclass(frozen=True)
class ReloadOutcome:
    request_id: str
    answers: dict[str, list[ReloadAnswer]]
    """Worker name -> one answer per adapter."""
    waiting_for: list[str]
    """Workers online that had not answered by the timeout (busy with a job: they reload before the next)."""
