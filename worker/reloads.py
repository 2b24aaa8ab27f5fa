"""The reload protocol of one worker: apply the reload requests recorded in Redis, answer each.

`imagine-admin reload-adapter` (or `/reload-adapter`, or the trainer's `--notify`) records a request
and wakes idle workers with a control command; a busy worker catches up before its next job, and one
that was offline loads the current files when it starts. Either way every request since the last sync
is applied, and the answers are filed under each request: the version now serving, or why the new
files were refused (the previous version then keeps serving).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from imagine.store import JobStore
from imagine.wire import AdapterLoadOutcome, ReloadAnswer
from worker.adapters import AdapterError, AdapterRegistry, list_adapters
from worker.metrics import WorkerMetrics

logger = logging.getLogger(__name__)

ALL_ADAPTERS = "*"


class AdapterReloads:
    def __init__(
        self,
        registry: AdapterRegistry,
        store: JobStore,
        worker_name: str,
        lora_dir: Path,
        errors: dict[str, str],
        metrics: WorkerMetrics,
        on_change: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.store = store
        self.worker_name = worker_name
        self.lora_dir = lora_dir
        self.errors = errors
        """Shared with the worker's status: the adapters whose current files were refused, and why."""
        self.metrics = metrics
        self.on_change = on_change
        """Publishes the worker's status: called before answering, so that whoever waits on the answers
        reads the new versions in `imagine-admin adapters`."""
        # Reload requests up to this one are reflected in what is loaded.
        self._cursor = store.latest_reload_request()

    def reload(self, names: list[str]) -> list[ReloadAnswer]:
        """Load each named adapter's current files; each answer says ok with its version, or the error."""
        return [self._reload_one(name) for name in names]

    def _reload_one(self, name: str) -> ReloadAnswer:
        previous = self.registry.loaded.get(name)
        started = time.perf_counter()
        try:
            loaded = self.registry.load(name)
        except Exception as error:  # any adapter, however broken, is refused rather than stopping the worker
            message = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
            logger.error("adapter %s refused: %s", name, message, exc_info=not isinstance(error, AdapterError))
            self.errors[name] = message
            self.metrics.adapter_load(AdapterLoadOutcome.FAILED)
            return ReloadAnswer(
                worker=self.worker_name,
                adapter=name,
                ok=False,
                error=message,
                version=previous.version if previous else None,
                previous_version=previous.version if previous else None,
                seconds=round(time.perf_counter() - started, 4),
            )
        self.errors.pop(name, None)
        unchanged = previous is not None and previous.version == loaded.version
        self.metrics.adapter_load(AdapterLoadOutcome.UNCHANGED if unchanged else AdapterLoadOutcome.LOADED)
        return ReloadAnswer(
            worker=self.worker_name,
            adapter=name,
            ok=True,
            version=loaded.version,
            previous_version=previous.version if previous else None,
            layout=loaded.layout,
            file=loaded.file,
            seconds=round(time.perf_counter() - started, 4),
        )

    def sync(self) -> None:
        """Apply every reload request recorded since the last sync and file this worker's answers.

        Called by the reload control command (an idle worker) and before every job (a worker that was busy,
        or disconnected, catches up before it renders anything else)."""
        entries = self.store.reload_requests_after(self._cursor)
        if not entries:
            return
        # Whatever happens below, these requests are handled: a broken one must not block every job after it.
        self._cursor = entries[-1][0]
        requests = [(request_id, adapter) for request_id, adapter in entries if adapter is not None]
        if not requests:
            return
        everything = set(self.registry.loaded) | set(list_adapters(self.lora_dir))
        named = {adapter for _, adapter in requests} - {ALL_ADAPTERS}
        wants_all = any(adapter == ALL_ADAPTERS for _, adapter in requests)
        answers = {
            answer.adapter: answer for answer in self.reload(sorted(named | everything if wants_all else named))
        }
        self.on_change()
        for request_id, adapter in requests:
            mine = (
                [answers[name] for name in sorted(everything) if name in answers]
                if adapter == ALL_ADAPTERS
                else [answers[adapter]]
            )
            self.store.answer_reload(request_id, self.worker_name, mine)
