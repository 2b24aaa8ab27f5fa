"""A worker's liveness: its name, its status and heartbeat, and the recovery of what other workers left.

`StatusBoard` is what the worker tells the others (published on every heartbeat, and whenever it
changes). `Janitor` is the worker's second thread: every WORKER_HEARTBEAT_S it publishes the status,
keeps the heartbeat of the attempt in hand fresh (and marks it superseded when another attempt holds its
job), queues again the jobs of workers that fell silent, sends again the jobs whose message went missing,
and prunes what expired. It never stops for one bad job or one Redis outage.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery import Celery

from imagine.logs import OncePerKey, job_context
from imagine.queue import messages_on_queue, send_job, task_id
from imagine.store import REDIS_UNREACHABLE, JobStore, RedisOutage
from imagine.wire import JobState, Queued, WorkerStatus
from worker.adapters import AdapterRegistry
from worker.attempt import AttemptsInHand
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 60.0


class WorkerNameTaken(RuntimeError):
    """Another live worker uses this worker's name."""


def wait_until_name_is_free(store: JobStore, name: str, dead_after_s: float) -> None:
    """Refuse to start beside a live worker of the same name (each would take the other's running job
    for a dead one's). A status left by this worker's own previous, crashed process goes quiet within
    `dead_after_s`, so a restart waits at most that long."""
    status = store.workers(alive_within_s=dead_after_s).get(name)
    if status is None:
        return
    logger.warning(
        "a worker named %s was online %.0f s ago; waiting to see whether it still is",
        name,
        store.now() - status.heartbeat_at,
    )
    deadline = time.monotonic() + dead_after_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        latest = store.workers(alive_within_s=dead_after_s).get(name)
        if latest is None:
            return
        if latest.heartbeat_at != status.heartbeat_at:
            raise WorkerNameTaken(
                f"another worker named {name} is running; give each worker its own name with -n (e.g. -n gpu1@%h)"
            )


class StatusBoard:
    """What this worker tells the others: its device and model, its adapters and refusals, its job."""

    def __init__(
        self,
        store: JobStore,
        worker_name: str,
        settings: WorkerSettings,
        device: str,
        adapters: AdapterRegistry,
        attempt: AttemptsInHand,
    ) -> None:
        self.store = store
        self.worker_name = worker_name
        self.settings = settings
        self.device = device
        self.adapters = adapters
        self.attempt = attempt
        self.jobs_done = 0
        self.adapter_errors: dict[str, str] = {}
        """Adapters whose current files this worker refused, and why (a previous version may still serve)."""
        # Both threads publish: taking the snapshot and writing it under one lock means the last status
        # written is always the newest one.
        self._lock = threading.Lock()

    def status(self) -> WorkerStatus:
        rendering = self.attempt.rendering_jobs
        return WorkerStatus(
            device=self.device,
            base_model=self.settings.base_model,
            default_adapter=self.settings.default_adapter or None,
            adapters=self.adapters.loaded,
            adapter_errors=dict(self.adapter_errors),
            current_job=next(iter(rendering), None),
            current_jobs=rendering,
            jobs_done=self.jobs_done,
        )

    def publish(self) -> None:
        with self._lock:
            self.store.publish_worker(self.worker_name, self.status())

    def publish_quietly(self) -> None:
        """Between heartbeats, a status is a courtesy: a Redis error is logged and the next beat retries."""
        try:
            self.publish()
        except redis.RedisError as error:
            logger.warning("worker status not published: %s", error)

    def withdraw(self) -> None:
        """Take this worker's status away as it stops; else it ages out after WORKER_DEAD_AFTER_S."""
        try:
            self.store.remove_worker(self.worker_name)
        except redis.RedisError as error:
            logger.warning("could not remove this worker's status from Redis: %s", error)


class Janitor:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        app: Celery,
        board: StatusBoard,
        attempt: AttemptsInHand,
    ) -> None:
        self.settings = settings
        self.store = store
        self.app = app
        self.board = board
        self.attempt = attempt
        self._reported = OncePerKey(logger)
        self._last_lost_check = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.board.publish()
        self._thread = threading.Thread(target=self._loop, name="imagine-janitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        last_prune = time.monotonic()
        outage = RedisOutage("heartbeats", limit_s=None)
        while not self._stop.wait(self.settings.worker_heartbeat_s):
            try:
                self.beat()
                outage.answered()
                if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                    last_prune = time.monotonic()
                    self.store.prune()
            except REDIS_UNREACHABLE as error:  # Redis away: try again next beat
                outage.failed(error)
            except Exception:  # anything else is a bug to see in full, but not a reason to stop beating
                logger.exception("janitor beat failed")

    def beat(self) -> None:
        self.board.publish()
        for attempt in self.attempt.current:
            if not self.store.heartbeat(attempt.job_id, attempt.number, self.board.worker_name):
                self.attempt.supersede(attempt)
        self.requeue_dead_jobs()
        self.resend_lost_jobs()

    # Jobs other workers left -----------------------------------------------------------------

    def requeue_dead_jobs(self, dead_worker: str = "") -> None:
        """Run again the jobs whose worker stopped sending heartbeats (or is `dead_worker`, this worker's
        previous process), or fail those out of attempts."""
        in_hand = {attempt.job_id for attempt in self.attempt.current}
        dead_before = self.store.now() - self.settings.worker_dead_after_s
        for job_id in self.store.running_jobs():
            if job_id in in_hand:
                continue
            with job_context(job_id):
                self._each_job(job_id, "requeueing", self._requeue_if_dead, job_id, dead_before, dead_worker)

    def _requeue_if_dead(self, job_id: str, dead_before: float, dead_worker: str) -> None:
        attempt = self.store.requeue_if_dead(job_id, dead_before, self.settings.max_job_attempts, dead_worker)
        if attempt == -2:
            logger.info("job %s lost its worker while being cancelled: cancelled", job_id)
        if attempt < 0:
            return
        record = self.store.get(job_id)
        if record is None:
            return
        if attempt == 0:
            logger.error("job %s failed for good: %s", job_id, record.error)
            return
        logger.warning("job %s lost its worker; queued again as attempt %d", job_id, attempt)
        note = "Its worker stopped; the job was queued again."
        self.store.append_event(job_id, Queued(position=self.store.position(job_id), message=note))
        send_job(self.app, job_id, record.options, attempt)

    def resend_lost_jobs(self) -> None:
        """Send again the jobs queued for LOST_MESSAGE_AFTER_S whose message is on no queue: their front end
        died between recording the job and sending its message, or the queue was purged. The claim keeps a
        job that turns out to have had its message after all from running twice."""
        lost_after = self.settings.lost_message_after_s
        if time.monotonic() - self._last_lost_check < lost_after / 3:
            return
        self._last_lost_check = time.monotonic()
        waiting = self.store.queued_before(self.store.now() - lost_after)
        if not waiting:
            return
        on_queue = messages_on_queue(self.store.redis, self.settings.queue_name)
        for job_id, queued_at in waiting:
            with job_context(job_id):
                self._each_job(job_id, "resending", self._resend_if_lost, job_id, queued_at, on_queue)

    def _resend_if_lost(self, job_id: str, queued_at: float, on_queue: set[str]) -> None:
        record = self.store.get(job_id)
        if record is None or record.state != JobState.QUEUED or task_id(job_id, record.attempt) in on_queue:
            return
        resent = self.store.resend_lost(job_id, record.attempt, queued_at, self.settings.max_job_attempts)
        if resent < 0:
            return
        if resent == 0:
            logger.error("job %s failed for good: its message went missing too often", job_id)
            return
        logger.warning("job %s attempt %d was queued with no message on the queue; sent again", job_id, record.attempt)
        note = "Its message was lost; it was sent again."
        self.store.append_event(job_id, Queued(position=self.store.position(job_id), message=note))
        send_job(self.app, job_id, record.options, record.attempt)

    def _each_job(self, job_id: str, what: str, step: Callable[..., None], *args: Any) -> None:
        """One job's share of a pass over many: a job whose record is unreadable (or whatever else goes wrong
        with it) is logged once and skipped, and the pass goes on to the others."""
        try:
            step(*args)
        except REDIS_UNREACHABLE:
            raise  # not this job's fault: the janitor waits for Redis
        except Exception as error:
            self._reported.warning(
                f"{what} {job_id}", "%s job %s failed; skipping it: %s", what, job_id, error, exc_info=True
            )
