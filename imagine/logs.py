"""A job id on every log line about a job, so that `grep <job id>` follows one job from the bot through the worker.

Code that works on one job runs inside `job_context(job_id)`; a filter on the process's log handlers adds
` job=<id>` to every record made there, whichever module or library made it. The id travels in a contextvar:
the worker runs each job in its main thread and the bot follows each job in its own asyncio task (and
`asyncio.to_thread` copies the context), so no job's lines ever carry another's id.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s: %(message)s"
"""The bot's and the workers' log format; `%(job)s` needs `JobIdFilter` on the handler."""

_current_job: ContextVar[str | None] = ContextVar("imagine_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line made inside with `job=<job_id>`."""
    token = _current_job.set(job_id)
    try:
        yield
    finally:
        _current_job.reset(token)


class JobIdFilter(logging.Filter):
    """Gives every record a `job` attribute: ` job=<id>` inside `job_context`, empty elsewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = _current_job.get()
        record.job = f" job={job_id}" if job_id else ""
        return True


def tag_job_ids(handlers: list[logging.Handler]) -> None:
    """Let these handlers format `%(job)s` (LOG_FORMAT)."""
    for handler in handlers:
        handler.addFilter(JobIdFilter())


class OncePerKey:
    """Logs a warning the first time a key comes up, then stays quiet about it: a bad record that every
    pass of a loop meets is reported once, not twice a second. Remembers at most `limit` keys."""

    def __init__(self, logger: logging.Logger, limit: int = 10_000) -> None:
        self.logger = logger
        self.limit = limit
        self._seen: set[str] = set()

    def warning(self, key: str, message: str, *args: object, exc_info: bool = False) -> None:
        if key in self._seen:
            return
        if len(self._seen) >= self.limit:
            self._seen.clear()
        self._seen.add(key)
        self.logger.warning(message, *args, exc_info=exc_info)
