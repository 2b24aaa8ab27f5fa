"""The worker's numbers, kept in Redis for `imagine-admin queue` and the Prometheus exporter."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis

from imagine.logs import OncePerKey
from imagine.store import REDIS_UNREACHABLE, JobStore
from imagine.wire import AdapterLoadOutcome, DeadLetter

logger = logging.getLogger(__name__)


class WorkerMetrics:
    """A metric matters less than the job or the reload it describes: a Redis error while recording one is
    logged, and the job or the reload goes on. An unreadable record in the way (a counter that is not a
    number) is logged once: it stays in the way until someone deletes it."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._reported = OncePerKey(logger)

    def queue_wait(self, seconds: float) -> None:
        self._record(self.store.record_duration, "queue_wait", seconds)

    def render(self, seconds: float) -> None:
        self._record(self.store.record_duration, "render", seconds)

    def uncompiled_render(self) -> None:
        self._record(self.store.record_uncompiled_render)

    def adapter_load(self, outcome: AdapterLoadOutcome) -> None:
        self._record(self.store.record_adapter_load, outcome)

    def dead_letter(self, letter: DeadLetter) -> None:
        self._record(self.store.record_dead_letter, letter)

    def _record(self, record: Callable[..., None], *values: Any) -> None:
        try:
            record(*values)
        except REDIS_UNREACHABLE as error:
            logger.warning("metric %s not recorded: %s", record.__name__, error)
        except redis.RedisError as error:
            self._reported.warning(f"{record.__name__}: {error}", "metric %s not recorded: %s", record.__name__, error)
