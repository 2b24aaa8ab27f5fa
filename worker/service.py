"""One worker process, put together: the model loaded once, its adapters, and the three parts that keep it
serving, each in its module:

  worker/jobs.py      a job's life, from the message to its outcome (the job thread)
  worker/reloads.py   the reload protocol: apply reload requests, answer them
  worker/liveness.py  status, heartbeats, and recovery of jobs other workers left (the janitor thread)

They share the attempt in hand (worker/attempt.py) and the status board. The Celery task and the control
command (worker/tasks.py, worker/celery.py) call in here.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from imagine.contract import parse_job_options
from imagine.logs import job_context
from imagine.queue import RefusedMessage
from imagine.store import JobStore
from worker.adapters import AdapterRegistry, list_adapters
from worker.attempt import AttemptInHand
from worker.jobs import JobRunner
from worker.liveness import Janitor, StatusBoard, wait_until_name_is_free
from worker.metrics import WorkerMetrics
from worker.pipeline import choose_placement, load_pipeline
from worker.reloads import AdapterReloads
from worker.renderer import Renderer
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class WorkerService:
    def __init__(self, settings: WorkerSettings, jobs: JobRunner, reloads: AdapterReloads, janitor: Janitor) -> None:
        self.settings = settings
        self.jobs = jobs
        self.reloads = reloads
        self.janitor = janitor

    @classmethod
    def start(cls, settings: WorkerSettings, worker_name: str, app: Celery) -> WorkerService:
        """Load the model and every adapter once, warm up, and take over jobs this worker left running."""
        store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.result_ttl_s)
        wait_until_name_is_free(store, worker_name, settings.worker_dead_after_s)
        placement = choose_placement(settings.device, settings.dtype)
        pipe = load_pipeline(settings.base_model, placement, settings.model_cache_dir, settings.safety_checker)
        registry = AdapterRegistry(pipe, settings.lora_dir, settings.max_adapter_bytes)
        renderer = Renderer(pipe, registry, settings.default_adapter, settings.allow_safety_checker_off)
        in_hand = AttemptInHand()
        board = StatusBoard(store, worker_name, settings, str(placement.device), registry, in_hand)
        metrics = WorkerMetrics(store)
        reloads = AdapterReloads(
            registry, store, worker_name, settings.lora_dir, board.adapter_errors, metrics, board.publish_quietly
        )
        service = cls(
            settings,
            JobRunner(settings, store, renderer, in_hand, board, metrics),
            reloads,
            Janitor(settings, store, app, board, in_hand),
        )
        reloads.reload(list_adapters(settings.lora_dir))
        if settings.warmup_steps:
            service.warm_up()
        # A job still marked running under this worker's name died with its previous process.
        service.janitor.requeue_dead_jobs(dead_worker=worker_name)
        return service

    def warm_up(self) -> None:
        started = time.perf_counter()
        options = parse_job_options(
            {"prompt": "warm-up", "num_inference_steps": self.settings.warmup_steps, "adapter": "none", "seed": 0},
            self.settings.limits,
        )
        self.jobs.renderer.render(options)
        logger.info("warmed up in %.2f s", time.perf_counter() - started)

    def run_job(self, job_id: str, options: dict[str, Any], attempt: int) -> dict[str, Any]:
        """Apply the reloads requested meanwhile, then run the job: it never renders with stale adapters."""
        with job_context(job_id):
            try:
                self.reloads.sync()
            except Exception:  # Redis away for a moment: the job still runs, the reload is applied before the next
                logger.exception("applying adapter reloads failed")
            return self.jobs.run(job_id, options, attempt)

    def sync_adapters(self) -> None:
        self.reloads.sync()

    def refuse_message(self, queue: str, raw: bytes, refusal: RefusedMessage) -> None:
        self.jobs.refuse(queue, raw, refusal)

    def start_janitor(self) -> None:
        self.janitor.start()

    def stop(self) -> None:
        self.janitor.stop()
        self.janitor.board.withdraw()
