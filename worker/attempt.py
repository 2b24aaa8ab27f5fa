"""The attempts of jobs that a worker has in hand, shared by its threads: the job thread renders them (a
batch holds several), the finisher stores and announces them, and the liveness thread keeps their
heartbeats fresh and tells an attempt to stop once another attempt holds its job (the worker was cut off
from Redis long enough for another worker to take the job over)."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    job_id: str
    number: int


@dataclass
class _Held:
    rendering: bool = True
    superseded: bool = False


class AttemptsInHand:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[Attempt, _Held] = {}

    def take(self, attempt: Attempt) -> None:
        """The worker claimed this attempt: from now on its heartbeat is kept fresh."""
        with self._lock:
            self._held[attempt] = _Held()

    def rendered(self, attempt: Attempt) -> None:
        """Its render is over: the status no longer shows it (it is being stored, or its outcome announced).
        Its heartbeat is still kept until it is released."""
        with self._lock:
            if attempt in self._held:
                self._held[attempt].rendering = False

    def release(self, attempt: Attempt) -> None:
        with self._lock:
            self._held.pop(attempt, None)

    @property
    def current(self) -> list[Attempt]:
        with self._lock:
            return list(self._held)

    @property
    def rendering_jobs(self) -> list[str]:
        """The jobs the worker renders, as its status shows them."""
        with self._lock:
            return [attempt.job_id for attempt, held in self._held.items() if held.rendering]

    def supersede(self, attempt: Attempt) -> None:
        """Another attempt holds the job now (the liveness thread learnt it from a refused heartbeat)."""
        with self._lock:
            if attempt in self._held:
                self._held[attempt].superseded = True

    def superseded(self, attempt: Attempt) -> bool:
        with self._lock:
            held = self._held.get(attempt)
            return held is not None and held.superseded
