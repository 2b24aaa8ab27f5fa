"""The attempt of a job that a worker has in hand, shared by its two threads: the job thread renders it,
the liveness thread keeps its heartbeat fresh and tells the render to stop once another attempt holds
its job (the worker was cut off from Redis long enough for another worker to take the job over)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    job_id: str
    number: int


class AttemptInHand:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._attempt: Attempt | None = None
        self._rendering = False
        self._superseded = False

    def take(self, attempt: Attempt) -> None:
        """The worker claimed this attempt: from now on its heartbeat is kept fresh."""
        with self._lock:
            self._attempt, self._rendering, self._superseded = attempt, True, False

    def rendered(self) -> None:
        """Its outcome is about to be announced: whoever reacts to it then sees the worker idle. Its
        heartbeat is still kept until it is released."""
        with self._lock:
            self._rendering = False

    def release(self) -> None:
        with self._lock:
            self._attempt, self._rendering, self._superseded = None, False, False

    @property
    def current(self) -> Attempt | None:
        with self._lock:
            return self._attempt

    @property
    def rendering_job(self) -> str | None:
        """The job the worker renders, as its status shows it."""
        with self._lock:
            return self._attempt.job_id if self._attempt is not None and self._rendering else None

    def supersede(self, attempt: Attempt) -> None:
        """Another attempt holds the job now (the liveness thread learnt it from a refused heartbeat)."""
        with self._lock:
            if self._attempt == attempt:
                self._superseded = True

    @property
    def superseded(self) -> bool:
        with self._lock:
            return self._superseded
