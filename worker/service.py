"""The generation service of one worker process: a job's life around the renderer, and adapter reloads.

The Celery task is only the transport: it hands `run_job` the job id, options and attempt number.
Here the job is claimed (so a stale or duplicate delivery does nothing), validated again, rendered
with throttled progress events, stored with its metadata, and finished exactly once.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

import redis
from celery import Celery

from imagine.contract import JobRejected, parse_job_options
from imagine.logs import OncePerKey, job_context
from imagine.queue import RefusedMessage, messages_on_queue, send_job, task_id
from imagine.store import REDIS_OUTAGE_S, REDIS_UNREACHABLE, CorruptRecord, JobRecord, JobResult, JobStore
from worker.adapters import AdapterError, AdapterRegistry, list_adapters
from worker.pipeline import choose_placement, load_pipeline
from worker.renderer import JobInterrupted, Renderer, free_memory, is_out_of_memory, latent_preview
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)

PRUNE_INTERVAL_S = 60.0

T = TypeVar("T")


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
        store.now() - status["heartbeat_at"],
    )
    deadline = time.monotonic() + dead_after_s
    while time.monotonic() < deadline:
        time.sleep(0.5)
        latest = store.workers(alive_within_s=dead_after_s).get(name)
        if latest is None:
            return
        if latest["heartbeat_at"] != status["heartbeat_at"]:
            raise WorkerNameTaken(
                f"another worker named {name} is running; give each worker its own name with -n (e.g. -n gpu1@%h)"
            )


class GenerationService:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        renderer: Renderer,
        adapters: AdapterRegistry,
        worker_name: str,
        app: Celery,
        device: str,
    ) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.adapters = adapters
        self.worker_name = worker_name
        self.app = app
        self.device = device
        self.current_job: tuple[str, int] | None = None
        """(job id, attempt) claimed by the job in hand, until its run ends: the janitor heartbeats it and
        never takes it for a dead worker's."""
        self._rendering: str | None = None
        """The job this worker renders, as its status shows it: cleared before the outcome is announced."""
        self._progress_lost = False
        """Whether the last progress event failed to reach Redis (it is logged once per outage)."""
        self._superseded: tuple[str, int] | None = None
        """Set by the janitor when the current attempt no longer holds its job: the render stops."""
        self.jobs_done = 0
        self.adapter_errors: dict[str, str] = {}
        # Reload requests up to this one are reflected in what is loaded.
        self._reload_cursor = store.latest_reload_request()
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        # Both the job thread and the janitor publish this worker's status: taking the snapshot and writing
        # it under one lock means the last status written is always the newest one.
        self._status_lock = threading.Lock()
        self._reported = OncePerKey(logger)
        self._last_lost_check = 0.0

    @classmethod
    def start(cls, settings: WorkerSettings, worker_name: str, app: Celery) -> GenerationService:
        """Load the model and every adapter once, warm up, and take over jobs this worker left running."""
        store = JobStore.from_url(settings.redis_url, settings.key_prefix, settings.result_ttl_s)
        wait_until_name_is_free(store, worker_name, settings.worker_dead_after_s)
        placement = choose_placement(settings.device, settings.dtype)
        pipe = load_pipeline(settings.base_model, placement, settings.model_cache_dir, settings.safety_checker)
        adapters = AdapterRegistry(pipe, settings.lora_dir, settings.max_adapter_bytes)
        renderer = Renderer(pipe, adapters, settings.default_adapter, settings.allow_safety_checker_off)
        service = cls(settings, store, renderer, adapters, worker_name, app, str(placement.device))
        service.reload(list_adapters(settings.lora_dir))
        if settings.warmup_steps:
            service.warm_up()
        # A job still marked running under this worker's name died with its previous process.
        service.requeue_dead_jobs(dead_worker=worker_name)
        return service

    def warm_up(self) -> None:
        started = time.perf_counter()
        options = parse_job_options(
            {"prompt": "warm-up", "num_inference_steps": self.settings.warmup_steps, "adapter": "none", "seed": 0},
            self.settings.limits,
        )
        self.renderer.render(options)
        logger.info("warmed up in %.2f s", time.perf_counter() - started)

    # Adapters --------------------------------------------------------------------------------

    def reload(self, names: list[str]) -> list[dict[str, Any]]:
        """Load each named adapter's current files; each answer says ok with its version, or the error."""
        answers = []
        for name in names:
            previous = self.adapters.loaded.get(name)
            started = time.perf_counter()
            answer: dict[str, Any] = {"worker": self.worker_name, "adapter": name}
            try:
                loaded = self.adapters.load(name)
                answer.update(ok=True, version=loaded.version, layout=loaded.layout, file=loaded.file)
                self.adapter_errors.pop(name, None)
                outcome = "unchanged" if previous is not None and previous.version == loaded.version else "loaded"
            except Exception as error:  # any adapter, however broken, is refused rather than stopping the worker
                message = str(error) if isinstance(error, AdapterError) else f"{type(error).__name__}: {error}"
                logger.error("adapter %s refused: %s", name, message, exc_info=not isinstance(error, AdapterError))
                answer.update(ok=False, error=message, version=previous.version if previous else None)
                self.adapter_errors[name] = message
                outcome = "failed"
            answer["previous_version"] = previous.version if previous else None
            answer["seconds"] = round(time.perf_counter() - started, 4)
            answers.append(answer)
            self._record_metric(self.store.record_adapter_load, outcome)
        return answers

    def sync_adapters(self) -> None:
        """Apply every reload request recorded since the last sync and file this worker's answers.

        Called by the reload control command (idle worker) and before every job (a worker that was busy,
        or disconnected, catches up before it renders anything else)."""
        entries = self.store.reload_requests_after(self._reload_cursor)
        if not entries:
            return
        # Whatever happens below, these requests are handled: a broken one must not block every job after it.
        self._reload_cursor = entries[-1][0]
        requests = [(request_id, request) for request_id, request in entries if request is not None]
        if not requests:
            return
        named = {request["adapter"] for _, request in requests} - {"*"}
        everything = set(self.adapters.loaded) | set(list_adapters(self.settings.lora_dir))
        wants_all = any(request["adapter"] == "*" for _, request in requests)
        answers = {
            answer["adapter"]: answer for answer in self.reload(sorted(named | everything if wants_all else named))
        }
        # Before answering: whoever waits on the answers then reads the new versions in `imagine-admin adapters`.
        self._publish_status_quietly()
        for request_id, request in requests:
            name = request["adapter"]
            mine = (
                [answers[other] for other in sorted(everything) if other in answers]
                if name == "*"
                else [answers[name]]
            )
            self.store.answer_reload(request_id, self.worker_name, mine)

    # Jobs ------------------------------------------------------------------------------------

    def refuse_message(self, queue: str, raw: bytes, refusal: RefusedMessage) -> None:
        """A message on the queue that is not a job of ours: logged (never its content, which may hold a
        user's prompt), kept among the dead letters for an operator, and acknowledged away."""
        logger.warning(
            "refused a message on queue %s (%s, task %s, %d bytes): %s; kept in the dead letters "
            "(imagine-admin dead-letters)",
            queue,
            refusal.kind,
            refusal.task_id or "-",
            len(raw),
            refusal.reason,
        )
        details = {"queue": queue, "reason": refusal.reason, "task_id": refusal.task_id, "worker": self.worker_name}
        self._record_metric(self.store.record_dead_letter, refusal.kind, details, raw)

    def _check_against_record(self, job_id: str, options: dict[str, Any], attempt: int) -> JobRecord:
        """The stored job is the truth: a message for a job never recorded, or whose options are not the
        job's, is refused (RefusedMessage), and the job itself is left as it is."""
        task = task_id(job_id, attempt)
        try:
            record = self._until_redis_answers("reading the job", lambda: self.store.get(job_id))
        except CorruptRecord as error:
            raise RefusedMessage("unknown_job", str(error), task) from None
        if record is None:
            raise RefusedMessage("unknown_job", f"no job {job_id} is recorded (never submitted, or expired)", task)
        if record.options != options:
            names = {*record.options, *options}
            differing = sorted(str(name)[:40] for name in names if record.options.get(name) != options.get(name))
            listed = ", ".join(differing[:10]) + (", ..." if len(differing) > 10 else "")
            raise RefusedMessage("disagrees", f"its options differ from job {job_id}'s in {listed}", task)
        return record

    def run_job(self, job_id: str, options: dict[str, Any], attempt: int) -> dict[str, Any]:
        with job_context(job_id):
            try:
                self.sync_adapters()
            except Exception:  # Redis away for a moment: the job still runs, the reload is applied before the next
                logger.exception("applying adapter reloads failed")
            try:
                record = self._check_against_record(job_id, options, attempt)
            except RefusedMessage as refusal:
                # Celery has decoded the message by now: what is kept is the task's arguments.
                arguments = {"job_id": job_id, "options": options, "attempt": attempt}
                self.refuse_message(self.settings.queue_name, json.dumps(arguments).encode(), refusal)
                return {"job_id": job_id, "state": f"refused ({refusal.kind})"}
            try:
                outcome = self._until_redis_answers(
                    "claiming the job", lambda: self.store.claim(job_id, attempt, self.worker_name)
                )
                if outcome != "ok":
                    logger.info("job %s attempt %d skipped: %s", job_id, attempt, outcome)
                    return {"job_id": job_id, "state": f"skipped ({outcome})"}
                # Claimed with a fresh heartbeat: from here the janitor keeps it fresh, and never takes
                # this job for a dead worker's, until its outcome is recorded.
                self.current_job = (job_id, attempt)
                self._rendering = job_id
                self._publish_status_quietly()
                return self._run_claimed(job_id, record.options, attempt)
            finally:
                self.current_job = self._superseded = None
                self._progress_lost = False  # the next job's progress starts afresh
                if self._rendering is not None:  # stopped without an outcome (superseded, or Redis gone)
                    self._rendering = None
                    self._publish_status_quietly()

    # Redis during a job -------------------------------------------------------------------------
    # Redis may restart under a running job (a crash, a `docker compose restart redis`). Progress is a
    # courtesy and is skipped while Redis is away; the claim and the outcome are not, and wait for it.

    def _report_progress(self, job_id: str, event: dict[str, Any]) -> None:
        try:
            self.store.append_event(job_id, event)
        except REDIS_UNREACHABLE as error:
            if not self._progress_lost:  # once per outage, not once per step
                logger.warning("job %s: Redis is away, progress is not recorded; rendering on: %s", job_id, error)
            self._progress_lost = True
            return
        if self._progress_lost:
            logger.info("job %s: Redis answers again; progress recorded again", job_id)
            self._progress_lost = False

    def _cancel_requested(self, job_id: str) -> bool:
        try:
            return self.store.cancel_requested(job_id)
        except REDIS_UNREACHABLE:
            return False  # Redis is away (`_report_progress` says so): asked again at the next progress event

    def _finish(self, job_id: str, attempt: int, state: str, event: dict[str, Any], **details: str) -> bool:
        """Record the attempt's outcome and its terminal event, in one step; False when another attempt
        holds the job now.

        The worker first says it is idle: whoever reacts to the outcome (`imagine-admin queue`, the
        bot's /queue) then sees it idle, not a heartbeat later."""
        self._rendering = None
        self._publish_status_quietly()
        return self._until_redis_answers(
            f"recording the job as {state}", lambda: self.store.finish(job_id, attempt, state, event, **details)
        )

    def _until_redis_answers(self, what: str, call: Callable[[], T]) -> T:
        """Retry `call` through a Redis outage of up to REDIS_OUTAGE_S. Past that the job is given up;
        once Redis is back, a worker's janitor queues it again (its heartbeat went stale meanwhile)."""
        deadline = time.monotonic() + REDIS_OUTAGE_S
        delay = 0.5
        while True:
            try:
                return call()
            except REDIS_UNREACHABLE as error:
                if time.monotonic() + delay > deadline:
                    raise
                logger.warning("%s: Redis is not answering (%s); trying again in %.1f s", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _run_claimed(self, job_id: str, raw_options: dict[str, Any], attempt: int) -> dict[str, Any]:
        record = self._until_redis_answers("reading the job", lambda: self.store.get(job_id))
        client = record.client
        queue_wait_s = record.started_at - record.submitted_at
        self._record_metric(self.store.record_duration, "queue_wait", queue_wait_s)
        try:
            options = parse_job_options(raw_options, self.settings.limits)
            plan = self.renderer.plan(options)
        except JobRejected as error:
            return self._fail(job_id, attempt, client, "rejected", f"Refused: {error}")
        except AdapterError as error:
            return self._fail(job_id, attempt, client, "adapter", str(error))
        except Exception as error:
            logger.exception("job %s could not be planned", job_id)
            return self._fail(job_id, attempt, client, "internal", f"The worker hit an unexpected error ({error!r}).")
        self._report_progress(
            job_id,
            {
                "type": "started",
                "worker": self.worker_name,
                "attempt": attempt,
                "adapter": plan.adapter,
                "seeds": options.seeds,
                "warnings": plan.warnings,
            },
        )

        started = time.monotonic()
        last_event = last_preview = 0.0

        def on_step(step: int, total: int, latents) -> None:
            nonlocal last_event, last_preview
            now = time.monotonic()
            # A render whose last step is done is not stopped for the time limit: only decoding is left.
            if step < total and now - started > self.settings.job_time_limit_s:
                raise JobInterrupted(
                    "timeout",
                    f"The job took longer than {self.settings.job_time_limit_s:g} s and was stopped; "
                    "try fewer steps, a smaller size or fewer images.",
                )
            if self._superseded == (job_id, attempt):
                raise JobInterrupted("superseded", "This attempt lost the job to another worker.")
            if step < total and now - last_event < self.settings.progress_interval_s:
                return
            last_event = now
            if self._cancel_requested(job_id):
                raise JobInterrupted("cancelled", "Cancelled while rendering.")
            event: dict[str, Any] = {"type": "step", "step": step, "total": total}
            if self.settings.preview_interval_s and now - last_preview >= self.settings.preview_interval_s:
                preview = latent_preview(latents)
                if preview is not None:
                    last_preview = now
                    event["preview_png"] = base64.b64encode(preview).decode()
            self._report_progress(job_id, event)

        out_of_memory = False
        try:
            output = self.renderer.render(options, plan, on_step)
        except JobInterrupted as interrupted:
            if interrupted.reason == "superseded":
                # Not a failure: another attempt holds the job now and reports its outcome.
                logger.warning("job %s attempt %d stopped: %s", job_id, attempt, interrupted)
                return {"job_id": job_id, "state": "superseded"}
            if interrupted.reason == "cancelled":
                self._finish(job_id, attempt, "cancelled", {"message": str(interrupted)}, client=client)
                return {"job_id": job_id, "state": "cancelled"}
            return self._fail(job_id, attempt, client, interrupted.reason, str(interrupted))
        except Exception as error:
            if not is_out_of_memory(error):
                logger.exception("job %s failed", job_id)
                return self._fail(
                    job_id,
                    attempt,
                    client,
                    "internal",
                    f"The worker hit an unexpected error ({type(error).__name__}).",
                )
            out_of_memory = True
        if out_of_memory:
            # Outside the except block: its traceback would keep the render's tensors alive.
            free_memory()
            return self._fail(
                job_id,
                attempt,
                client,
                "out_of_memory",
                f"The worker ran out of memory rendering {options.num_images_per_prompt} image(s) of "
                f"{options.width}×{options.height}; try fewer images or a smaller size.",
            )

        meta = {
            "job_id": job_id,
            **options.model_dump(exclude={"seed", "adapter"}),
            "seeds": output.seeds,
            "adapter": plan.adapter,
            "adapter_version": plan.adapter_version,
            "scheduler": output.scheduler,
            "base_model": self.settings.base_model,
            "images": [
                {"index": index, "seed": seed, "withheld": png is None}
                for index, (seed, png) in enumerate(zip(output.seeds, output.images, strict=True))
            ],
            "worker": self.worker_name,
            "device": self.device,
            "attempt": attempt,
            "queue_wait_s": round(queue_wait_s, 3),
            "render_s": round(output.render_s, 3),
            "warnings": output.warnings,
        }
        result = JobResult(meta=meta, images=[png for png in output.images if png is not None])
        self._until_redis_answers("storing the images", lambda: self.store.stage_result(job_id, attempt, result))
        done = {
            "worker": self.worker_name,
            "images": len(output.images),
            "withheld": sum(png is None for png in output.images),
            "render_s": meta["render_s"],
            "queue_wait_s": meta["queue_wait_s"],
            "warnings": output.warnings,
        }
        # Counted before the outcome is announced, so that whoever reacts to it (`imagine-admin queue`, the
        # exporter) reads numbers that include it. A superseded attempt (rare) is counted too: it did render.
        self._record_metric(self.store.record_duration, "render", output.render_s)
        self.jobs_done += 1
        if not self._finish(job_id, attempt, "done", done, client=client):
            logger.warning("job %s attempt %d finished after it was taken over; result not announced", job_id, attempt)
            return {"job_id": job_id, "state": "superseded"}
        logger.info("job %s done in %.2f s on %s", job_id, output.render_s, self.worker_name)
        return {"job_id": job_id, "state": "done", "render_s": meta["render_s"]}

    def _record_metric(self, record: Callable[..., None], *values: Any) -> None:
        """A metric matters less than the job or the reload it describes: a Redis error while recording
        one is logged, and the job or the reload goes on. An unreadable record in the way (a counter that is
        not a number) is logged once: it stays in the way until someone deletes it."""
        try:
            record(*values)
        except REDIS_UNREACHABLE as error:
            logger.warning("metric %s not recorded: %s", record.__name__, error)
        except redis.RedisError as error:
            self._reported.warning(f"{record.__name__}: {error}", "metric %s not recorded: %s", record.__name__, error)

    def _fail(self, job_id: str, attempt: int, client: str, reason: str, message: str) -> dict[str, Any]:
        logger.warning("job %s failed (%s): %s", job_id, reason, message)
        event = {"reason": reason, "message": message}
        self._finish(job_id, attempt, "failed", event, error=message, reason=reason, client=client)
        return {"job_id": job_id, "state": "failed", "reason": reason, "message": message}

    # Liveness --------------------------------------------------------------------------------

    def requeue_dead_jobs(self, dead_worker: str = "") -> None:
        """Run again the jobs whose worker stopped sending heartbeats, or fail those out of attempts."""
        current = self.current_job
        dead_before = self.store.now() - self.settings.worker_dead_after_s
        for job_id in self.store.running_jobs():
            if current is not None and job_id == current[0]:
                continue
            with job_context(job_id):
                self._for_each_job(job_id, "requeueing", self._requeue_if_dead, job_id, dead_before, dead_worker)

    def _for_each_job(self, job_id: str, what: str, step: Callable[..., None], *args: Any) -> None:
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
                self._for_each_job(job_id, "resending", self._resend_if_lost, job_id, queued_at, on_queue)

    def _resend_if_lost(self, job_id: str, queued_at: float, on_queue: set[str]) -> None:
        record = self.store.get(job_id)
        if record is None or record.state != "queued" or task_id(job_id, record.attempt) in on_queue:
            return
        resent = self.store.resend_lost(job_id, record.attempt, queued_at, self.settings.max_job_attempts)
        if resent < 0:
            return
        if resent == 0:
            logger.error("job %s failed for good: its message went missing too often", job_id)
            return
        logger.warning("job %s attempt %d was queued with no message on the queue; sent again", job_id, record.attempt)
        note = "Its message was lost; it was sent again."
        self.store.append_event(job_id, {"type": "queued", "position": self.store.position(job_id), "message": note})
        send_job(self.app, job_id, record.options, record.attempt)

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
        self.store.append_event(
            job_id,
            {
                "type": "queued",
                "position": self.store.position(job_id),
                "message": "Its worker stopped; the job was queued again.",
            },
        )
        send_job(self.app, job_id, record.options, attempt)

    def status(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "base_model": self.settings.base_model,
            "default_adapter": self.settings.default_adapter or None,
            "adapters": {name: asdict(adapter) for name, adapter in self.adapters.loaded.items()},
            "adapter_errors": dict(self.adapter_errors),
            "current_job": self._rendering,
            "jobs_done": self.jobs_done,
        }

    def publish_status(self) -> None:
        with self._status_lock:
            self.store.publish_worker(self.worker_name, self.status())

    def _publish_status_quietly(self) -> None:
        """Between heartbeats, a status is a courtesy: a Redis error is logged and the next beat retries."""
        try:
            self.publish_status()
        except redis.RedisError as error:
            logger.warning("worker status not published: %s", error)

    def start_janitor(self) -> None:
        """Heartbeats for this worker and its current job, and requeueing of dead workers' jobs."""

        def loop() -> None:
            last_prune = time.monotonic()
            redis_away = False
            while not self._stop.wait(self.settings.worker_heartbeat_s):
                try:
                    self.publish_status()
                    if redis_away:
                        logger.info("Redis answers again; heartbeats resumed")
                        redis_away = False
                    current = self.current_job  # read once: the job thread changes it
                    if current is not None and not self.store.heartbeat(*current, self.worker_name):
                        self._superseded = current
                    self.requeue_dead_jobs()
                    self.resend_lost_jobs()
                    if time.monotonic() - last_prune > PRUNE_INTERVAL_S:
                        last_prune = time.monotonic()
                        self.store.prune()
                except REDIS_UNREACHABLE as error:  # Redis away: try again next beat
                    if not redis_away:
                        logger.warning("heartbeats stopped: Redis is not answering (%s)", error)
                    redis_away = True
                except Exception:  # anything else is a bug to see in full, but not a reason to stop beating
                    logger.exception("janitor beat failed")

        self.publish_status()
        self._janitor = threading.Thread(target=loop, name="imagine-janitor", daemon=True)
        self._janitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._janitor is not None:
            self._janitor.join(timeout=5)
        try:
            self.store.remove_worker(self.worker_name)
        except redis.RedisError as error:  # its status then ages out after WORKER_DEAD_AFTER_S
            logger.warning("could not remove this worker's status from Redis: %s", error)
