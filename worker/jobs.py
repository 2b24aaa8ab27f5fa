"""A job's life in a worker, as small steps in the order they happen, the way LitServe splits a request
(decode_request, predict, encode_response):

  receive   the stored job is the truth: a message that is not one of ours is refused
  claim     one attempt of a job runs once, whatever the broker redelivers
  prepare   its options are checked again and what it renders with is settled (adapter, warnings)
  render    the pipeline runs, a ProgressReporter after every step (progress, cancel, time limit)
  deliver   the images and their metadata are stored, and the job ends done, in one step

Anything that goes wrong becomes the job's failure in `failure_for`, the one place that decides a job's
failure reason and the words its user reads. The Celery task (worker/tasks.py) only hands `run` the
message's arguments.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from imagine.contract import JobOptions, JobRejected, parse_job_options
from imagine.logs import job_context
from imagine.queue import RefusedMessage, task_id
from imagine.store import (
    DEAD_LETTER_BYTES,
    REDIS_UNREACHABLE,
    CorruptRecord,
    JobRecord,
    JobResult,
    JobStore,
    RedisOutage,
    until_redis_answers,
)
from imagine.wire import (
    Cancelled,
    DeadLetter,
    DeadLetterKind,
    Done,
    Failed,
    FailureReason,
    ImageInfo,
    JobEvent,
    ResultMeta,
    Started,
    Step,
    TerminalEvent,
)
from worker.adapters import AdapterError
from worker.attempt import Attempt, AttemptInHand
from worker.liveness import StatusBoard
from worker.metrics import WorkerMetrics
from worker.renderer import Renderer, RenderOutput, RenderPlan, free_memory, is_out_of_memory, latent_preview
from worker.settings import WorkerSettings

logger = logging.getLogger(__name__)


class JobFailure(Exception):
    """The job fails: why (its reason, for metrics) and what to tell its user."""

    def __init__(self, reason: FailureReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Superseded(Exception):
    """Another attempt holds the job now: this one stops, and that one reports the outcome."""


class CancelledByUser(Exception):
    """The job's user cancelled it while it rendered."""


def failure_for(error: BaseException, options: JobOptions | None) -> JobFailure:
    """What a job's failure is, from what went wrong while it was prepared or rendered."""
    if isinstance(error, JobFailure):
        return error
    if isinstance(error, JobRejected):
        return JobFailure(FailureReason.REJECTED, f"Refused: {error}")
    if isinstance(error, AdapterError):
        return JobFailure(FailureReason.ADAPTER, str(error))
    if is_out_of_memory(error):
        what = f"{options.num_images_per_prompt} image(s) of {options.width}×{options.height}" if options else "it"
        return JobFailure(
            FailureReason.OUT_OF_MEMORY,
            f"The worker ran out of memory rendering {what}; try fewer images or a smaller size.",
        )
    return JobFailure(FailureReason.INTERNAL, f"The worker hit an unexpected error ({type(error).__name__}).")


@dataclass(frozen=True)
class Prepared:
    """A claimed job, checked and ready to render."""

    record: JobRecord
    options: JobOptions
    plan: RenderPlan


class ProgressReporter:
    """Called after every denoising step of one attempt: stops the render when its time is up, when another
    attempt holds the job, or when its user cancelled it; reports its progress, throttled, with a preview.

    Progress is a courtesy: while Redis is away it is skipped (and said once), and the render goes on."""

    def __init__(self, store: JobStore, attempt: Attempt, in_hand: AttemptInHand, settings: WorkerSettings) -> None:
        self.store = store
        self.attempt = attempt
        self.in_hand = in_hand
        self.settings = settings
        self.started = time.monotonic()
        self._last_event = self._last_preview = 0.0
        self._outage = RedisOutage(f"job {attempt.job_id} progress", limit_s=None)

    def __call__(self, step: int, total: int, latents) -> None:
        now = time.monotonic()
        # A render whose last step is done is not stopped for the time limit: only decoding is left.
        if step < total and now - self.started > self.settings.job_time_limit_s:
            raise JobFailure(
                FailureReason.TIMEOUT,
                f"The job took longer than {self.settings.job_time_limit_s:g} s and was stopped; "
                "try fewer steps, a smaller size or fewer images.",
            )
        if self.in_hand.superseded:
            raise Superseded()
        if step < total and now - self._last_event < self.settings.progress_interval_s:
            return
        self._last_event = now
        if self._cancel_requested():
            raise CancelledByUser("Cancelled while rendering.")
        preview_png = None
        if self.settings.preview_interval_s and now - self._last_preview >= self.settings.preview_interval_s:
            preview = latent_preview(latents)
            if preview is not None:
                self._last_preview = now
                preview_png = base64.b64encode(preview).decode()
        self.report(
            Step(step=step, total=total, preview_png=preview_png) if preview_png else Step(step=step, total=total)
        )

    def report(self, event: JobEvent) -> None:
        try:
            self.store.append_event(self.attempt.job_id, event)
        except REDIS_UNREACHABLE as error:
            self._outage.failed(error)
            return
        self._outage.answered()

    def _cancel_requested(self) -> bool:
        try:
            return self.store.cancel_requested(self.attempt.job_id)
        except REDIS_UNREACHABLE:
            return False  # asked again at the next progress event, once Redis is back


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        renderer: Renderer,
        in_hand: AttemptInHand,
        board: StatusBoard,
        metrics: WorkerMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.renderer = renderer
        self.in_hand = in_hand
        self.board = board
        self.metrics = metrics
        self.worker_name = board.worker_name

    def run(self, job_id: str, options: dict[str, Any], number: int) -> dict[str, Any]:
        """One message of the queue, to its outcome; returns a summary for Celery's result and Flower."""
        attempt = Attempt(job_id, number)
        with job_context(job_id):
            try:
                record = self.receive(attempt, options)
            except RefusedMessage as refusal:
                # Celery has decoded the message by now: what is kept is the task's arguments.
                arguments = {"job_id": job_id, "options": options, "attempt": number}
                self.refuse(self.settings.queue_name, json.dumps(arguments).encode(), refusal)
                return {"job_id": job_id, "state": f"refused ({refusal.kind})"}
            claimed = until_redis_answers(
                "claiming the job", lambda: self.store.claim(job_id, number, self.worker_name)
            )
            if claimed != "ok":
                logger.info("job %s attempt %d skipped: %s", job_id, number, claimed)
                return {"job_id": job_id, "state": f"skipped ({claimed})"}
            # Claimed with a fresh heartbeat: from here the janitor keeps it fresh, and never takes this
            # job for a dead worker's, until its outcome is recorded.
            self.in_hand.take(attempt)
            self.board.publish_quietly()
            try:
                return self._run_claimed(attempt, record)
            finally:
                stopped_without_outcome = self.in_hand.rendering_job is not None  # superseded, or Redis gone
                self.in_hand.release()
                if stopped_without_outcome:
                    self.board.publish_quietly()

    def _run_claimed(self, attempt: Attempt, record: JobRecord) -> dict[str, Any]:
        prepared = None
        try:
            prepared = self.prepare(attempt, record)
            output = self.render(attempt, prepared)
        except Superseded:
            # Not a failure: another attempt holds the job now and reports its outcome.
            logger.warning("job %s attempt %d stopped: another attempt holds the job", attempt.job_id, attempt.number)
            return {"job_id": attempt.job_id, "state": "superseded"}
        except CancelledByUser as cancelled:
            self.finish(attempt, Cancelled(message=str(cancelled)))
            return {"job_id": attempt.job_id, "state": "cancelled"}
        except Exception as error:
            failure = failure_for(error, prepared.options if prepared else None)
            if failure.reason is FailureReason.INTERNAL:
                logger.exception("job %s failed", attempt.job_id)
        else:
            return self.deliver(attempt, prepared, output)
        if failure.reason is FailureReason.OUT_OF_MEMORY:
            free_memory()  # here, past the except block, whose traceback kept the render's tensors alive
        return self.fail(attempt, failure)

    # The steps ---------------------------------------------------------------------------------

    def receive(self, attempt: Attempt, options: dict[str, Any]) -> JobRecord:
        """The stored job is the truth: a message for a job never recorded, or whose options are not the
        job's, is refused (RefusedMessage), and the job itself is left as it is."""
        task = task_id(attempt.job_id, attempt.number)
        try:
            record = until_redis_answers("reading the job", lambda: self.store.get(attempt.job_id))
        except CorruptRecord as error:
            raise RefusedMessage(DeadLetterKind.UNKNOWN_JOB, str(error), task) from None
        if record is None:
            raise RefusedMessage(
                DeadLetterKind.UNKNOWN_JOB, f"no job {attempt.job_id} is recorded (never submitted, or expired)", task
            )
        if record.options != options:
            names = {*record.options, *options}
            differing = sorted(str(name)[:40] for name in names if record.options.get(name) != options.get(name))
            listed = ", ".join(differing[:10]) + (", ..." if len(differing) > 10 else "")
            raise RefusedMessage(
                DeadLetterKind.DISAGREES, f"its options differ from job {attempt.job_id}'s in {listed}", task
            )
        return record

    def prepare(self, attempt: Attempt, record: JobRecord) -> Prepared:
        """Check the job's options again (the message may come from an old or hostile client) and settle
        what it renders with. Raises what `failure_for` turns into the job's failure."""
        claimed = until_redis_answers("reading the job", lambda: self.store.get(attempt.job_id))
        if claimed is None:
            raise JobFailure(FailureReason.INTERNAL, "The job's record expired while it was being claimed.")
        self.metrics.queue_wait(claimed.started_at - claimed.submitted_at)
        options = parse_job_options(record.options, self.settings.limits)
        return Prepared(claimed, options, self.renderer.plan(options))

    def render(self, attempt: Attempt, prepared: Prepared) -> RenderOutput:
        reporter = ProgressReporter(self.store, attempt, self.in_hand, self.settings)
        reporter.report(
            Started(
                worker=self.worker_name,
                attempt=attempt.number,
                adapter=prepared.plan.adapter,
                seeds=prepared.options.seeds,
                warnings=prepared.plan.warnings,
            )
        )
        return self.renderer.render(prepared.options, prepared.plan, reporter)

    def deliver(self, attempt: Attempt, prepared: Prepared, output: RenderOutput) -> dict[str, Any]:
        """Store the images and their metadata, then end the job as done, its result announced."""
        options, plan, record = prepared.options, prepared.plan, prepared.record
        queue_wait_s = round(record.started_at - record.submitted_at, 3)
        meta = ResultMeta(
            job_id=attempt.job_id,
            **options.model_dump(exclude={"seed", "adapter", "scheduler"}),
            seeds=output.seeds,
            adapter=plan.adapter,
            adapter_version=plan.adapter_version,
            scheduler=output.scheduler,
            base_model=self.settings.base_model,
            images=[
                ImageInfo(index=index, seed=seed, withheld=png is None)
                for index, (seed, png) in enumerate(zip(output.seeds, output.images, strict=True))
            ],
            worker=self.worker_name,
            device=self.board.device,
            attempt=attempt.number,
            queue_wait_s=queue_wait_s,
            render_s=round(output.render_s, 3),
            warnings=output.warnings,
        )
        result = JobResult(meta=meta, images=[png for png in output.images if png is not None])
        until_redis_answers(
            "storing the images", lambda: self.store.stage_result(attempt.job_id, attempt.number, result)
        )
        # Counted before the outcome is announced, so that whoever reacts to it (`imagine-admin queue`, the
        # exporter) reads numbers that include it. A superseded attempt (rare) is counted too: it did render.
        self.metrics.render(output.render_s)
        self.board.jobs_done += 1
        done = Done(
            worker=self.worker_name,
            images=len(output.images),
            withheld=sum(png is None for png in output.images),
            render_s=meta.render_s,
            queue_wait_s=queue_wait_s,
            warnings=output.warnings,
        )
        if not self.finish(attempt, done):
            logger.warning(
                "job %s attempt %d finished after it was taken over; result not announced",
                attempt.job_id,
                attempt.number,
            )
            return {"job_id": attempt.job_id, "state": "superseded"}
        logger.info("job %s done in %.2f s on %s", attempt.job_id, output.render_s, self.worker_name)
        return {"job_id": attempt.job_id, "state": "done", "render_s": meta.render_s}

    # Endings ---------------------------------------------------------------------------------

    def finish(self, attempt: Attempt, event: TerminalEvent) -> bool:
        """Record the attempt's outcome and its terminal event, in one step; False when another attempt
        holds the job now. The worker first says it is idle: whoever reacts to the outcome
        (`imagine-admin queue`, the bot's /queue) then sees it idle, not a heartbeat later."""
        self.in_hand.rendered()
        self.board.publish_quietly()
        return until_redis_answers(
            f"recording the job as {event.type}", lambda: self.store.finish(attempt.job_id, attempt.number, event)
        )

    def fail(self, attempt: Attempt, failure: JobFailure) -> dict[str, Any]:
        logger.warning("job %s failed (%s): %s", attempt.job_id, failure.reason, failure.message)
        self.finish(attempt, Failed(reason=failure.reason, message=failure.message))
        return {"job_id": attempt.job_id, "state": "failed", "reason": str(failure.reason), "message": failure.message}

    def refuse(self, queue: str, raw: bytes, refusal: RefusedMessage) -> None:
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
        letter = DeadLetter(
            kind=refusal.kind,
            reason=refusal.reason,
            queue=queue,
            task_id=refusal.task_id,
            worker=self.worker_name,
            bytes=len(raw),
            message=raw[:DEAD_LETTER_BYTES].decode(errors="replace"),
        )
        self.metrics.dead_letter(letter)
