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

from imagine.contract import JobOptions, parse_job_options
from imagine.logs import job_context
from imagine.queue import RefusedMessage
from imagine.store import JobStore
from worker.adapters import AdapterRegistry, list_adapters
from worker.attempt import AttemptsInHand
from worker.jobs import JobRunner
from worker.liveness import Janitor, StatusBoard, wait_until_name_is_free
from worker.metrics import WorkerMetrics
from worker.pipeline import choose_placement, compile_pipeline, load_pipeline, serve_compiled_shapes_only
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
        registry = AdapterRegistry(
            pipe,
            settings.lora_dir,
            settings.max_adapter_bytes,
            fuse=settings.default_adapter if settings.fuse_default_adapter else None,
            scales_as_tensors=settings.compile,
        )
        renderer = Renderer(
            pipe, registry, settings.default_adapter, settings.allow_safety_checker_off, settings.limits
        )
        in_hand = AttemptsInHand()
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
        if settings.compile:
            # Before the first adapter: its LoRA tensors are then made the largest rank a reload may bring,
            # and their scales tensors, so that swapping adapters in place never recompiles.
            pipe.enable_lora_hotswap(target_rank=settings.lora_max_rank)
        reloads.reload(list_adapters(settings.lora_dir))
        warm_up = warm_up_batches(settings, list(registry.loaded)) if settings.warmup_steps else []
        if settings.compile:
            renderer.uncompiled_calls = compile_pipeline(
                pipe, settings.compile_backend, settings.compile_mode, graphs=len(warm_up)
            )
        if settings.warmup_steps:
            service.warm_up(warm_up)
            if settings.compile:
                serve_compiled_shapes_only()
        elif settings.compile:
            logger.warning("COMPILE without a warm-up (WARMUP_STEPS=0): the first job of each shape compiles")
        # A job still marked running under this worker's name died with its previous process.
        service.janitor.requeue_dead_jobs(dead_worker=worker_name)
        return service

    def warm_up(self, batches: list[list[JobOptions]]) -> None:
        """Renders a few throwaway steps before the first job, so that no user pays for what the first render
        sets up (see `warm_up_batches`)."""
        started = time.perf_counter()
        renderer = self.jobs.renderer
        shapes = []
        for jobs in batches:
            entries = renderer.entries([(job, renderer.plan(job)) for job in jobs])
            batch = renderer.render_batch(entries)
            renderer.finish_images(batch)
            images = sum(job.num_images_per_prompt for job in jobs)
            # Uncompiled here: the compiler gave up on this shape (its recompile limit, an error it logged).
            shapes.append(entries[0].plan.batch_key.shape(images) + (" (uncompiled)" if batch.uncompiled else ""))
        logger.info("warmed up in %.2f s: %s", time.perf_counter() - started, "; ".join(shapes))

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
        """After the last job's render: its delivery finishes first, then the heartbeats stop."""
        self.jobs.finisher.stop()
        self.janitor.stop()
        self.janitor.board.withdraw()


def warm_up_batches(settings: WorkerSettings, loaded: list[str]) -> list[list[JobOptions]]:
    """The throwaway batches of the warm-up: with the default adapter, as most jobs use it. A compiled
    pipeline is warmed up on every path a job may take (the base model, the default adapter fused, each
    other adapter's LoRA layers), at one image, two and a full batch (the batches between take the graph
    compiled for two: its shapes are dynamic), at each of COMPILE_SIZES; jobs of other shapes then render
    uncompiled (`serve_compiled_shapes_only`), never compiling under a user."""
    usual = settings.default_adapter if settings.default_adapter in loaded else "none"
    adapters, counts, sizes = [usual], [1], [None]
    if settings.compile:
        adapters = list(dict.fromkeys([usual, "none", *loaded]))
        counts = sorted({1, min(2, settings.batch_max_images), settings.batch_max_images})
        sizes = list(dict.fromkeys(settings.compile_sizes))
    per_job = settings.limits.max_images
    batches = []
    for adapter in adapters:
        for size in sizes:
            for images in counts:
                shape = {"width": size[0], "height": size[1]} if size else {}
                batches.append(
                    [
                        parse_job_options(
                            {
                                "prompt": "warm-up",
                                "num_inference_steps": settings.warmup_steps,
                                "num_images_per_prompt": min(per_job, images - seed),
                                "adapter": adapter,
                                "seed": seed,
                                **shape,
                            },
                            settings.limits,
                        )
                        for seed in range(0, images, per_job)
                    ]
                )
    return batches
