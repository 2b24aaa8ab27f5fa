"""The worker's Celery application: `celery -A worker worker` loads the model once, then serves jobs.

The model loads in `worker_init`, in the one process that runs the jobs (the solo pool): never in a
parent that forks, since CUDA does not survive a fork, and not in `worker_process_init`, whose 4 s
limit is far too short to load Stable Diffusion.
"""

from __future__ import annotations

import logging

from celery.signals import after_setup_logger, worker_init, worker_ready, worker_shutdown
from celery.worker.control import control_command

from imagine.logs import LOG_FORMAT, tag_job_ids
from imagine.queue import RELOAD_COMMAND, make_celery
from worker.settings import WorkerSettings
from worker.transport import screened_redis_transport

logger = logging.getLogger(__name__)

settings = WorkerSettings()
app = make_celery(settings, main="worker")
app.conf.include = ["worker.tasks"]
app.conf.worker_log_format = LOG_FORMAT
# Messages reach Celery only once read as jobs: one that is not (undecodable, another task) is refused
# and kept among the dead letters, instead of stopping the worker.
app.conf.broker_transport = screened_redis_transport(
    settings.queue_name, lambda queue, raw, refusal: service().refuse_message(queue, raw, refusal)
)

_service = None


def service():
    """The process's generation service, loaded at worker start."""
    if _service is None:
        raise RuntimeError("the generation service is not loaded: jobs run only in a started worker")
    return _service


@worker_init.connect
def _load_service(sender, **_) -> None:
    global _service
    pool = sender.pool_cls if isinstance(sender.pool_cls, str) else sender.pool_cls.__module__
    if not pool.endswith("solo"):
        logger.critical(
            "this worker must run with --pool solo (got %s): one process holds the model and the GPU", pool
        )
        raise SystemExit(1)
    # Celery sets its logging up only after worker_init: without this, the start-up lines (the model, its
    # device, the adapters loaded) would be lost. Setting it up again later is a no-op.
    sender.setup_logging()
    from worker.liveness import WorkerNameTaken
    from worker.pipeline import ModelLoadError
    from worker.service import WorkerService

    try:
        _service = WorkerService.start(settings, sender.hostname, app)
    except Exception as error:
        # Celery logs and swallows exceptions from signal handlers, and a worker without its model would
        # take jobs only to drop them: it must stop.
        expected = isinstance(error, (ModelLoadError, WorkerNameTaken))
        logger.critical("worker %s cannot start: %s", sender.hostname, error, exc_info=not expected)
        raise SystemExit(1) from error


@after_setup_logger.connect
def _log_job_ids(logger: logging.Logger, **_) -> None:
    tag_job_ids(logger.handlers)
    # diffusers and transformers write through handlers of their own, which would print their warnings
    # (a truncated prompt, an adapter's unused keys) without the job id; through Celery's they carry it.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.disable_default_handler()
        library.enable_propagation()


@worker_ready.connect
def _start_janitor(**_) -> None:
    service().start_janitor()


@worker_shutdown.connect
def _stop_service(**_) -> None:
    if _service is not None:
        _service.stop()


@control_command(name=RELOAD_COMMAND)
def _sync_adapters(state) -> dict:
    # Runs in the worker's main thread, between jobs: the solo pool delays it behind a running job.
    service().sync_adapters()
    return {"ok": True}
