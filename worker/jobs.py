"""A job's life in a worker, as small steps in the order they happen, the way LitServe splits a request
(decode_request, predict, encode_response):

  receive   the stored job is the truth: a message that is not one of ours is refused
  claim     one attempt of a job runs once, whatever the broker redelivers
  prepare   its options are checked again and what it renders with is settled (adapter, warnings)
  gather    queued jobs that can share its pipeline call join it (a batch), claimed the same way
  render    the pipeline runs once for the batch, each job's ProgressReporter after every step
  deliver   on the finisher's thread: the safety check, the PNGs, the metadata stored, the job ended done

Each job of a batch keeps what it has alone: its own progress and previews, its cancel (it leaves the
batch, the others go on), its time limit, its failure, its attempt and its exactly-once end. A batch that
runs out of memory is split in two and each half rendered before any job fails. Anything that goes wrong
becomes a job's failure in `failure_for`, the one place that decides a failure's reason and the words
its user reads. The Celery task (worker/tasks.py) only hands `run` the message's arguments.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from imagine.contract import JobOptions, JobRejected, parse_job_options
from imagine.images import image_digest
from imagine.logs import OncePerKey, job_context
from imagine.queue import RefusedMessage, message_options, task_id
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
from worker.attempt import Attempt, AttemptsInHand
from worker.liveness import StatusBoard
from worker.metrics import WorkerMetrics
from worker.renderer import (
    BatchEntry,
    DecodedBatch,
    Renderer,
    RenderOutput,
    RenderPlan,
    free_memory,
    is_out_of_memory,
    latent_preview,
)
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


class BatchStopped(Exception):
    """Every job of the batch left it (cancelled, superseded, out of time): the render stops."""


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

    def __init__(self, store: JobStore, attempt: Attempt, in_hand: AttemptsInHand, settings: WorkerSettings) -> None:
        self.store = store
        self.attempt = attempt
        self.in_hand = in_hand
        self.settings = settings
        self.started = time.monotonic()
        self._last_event = self._last_preview = 0.0
        self._outage = RedisOutage(f"job {attempt.job_id} progress", limit_s=None)

    def __call__(self, step: int, total: int, latents) -> None:
        """`latents`: this job's own rows of the batch."""
        now = time.monotonic()
        # A render whose last step is done is not stopped for the time limit: only decoding is left.
        if step < total and now - self.started > self.settings.job_time_limit_s:
            raise JobFailure(
                FailureReason.TIMEOUT,
                f"The job took longer than {self.settings.job_time_limit_s:g} s and was stopped; "
                "try fewer steps, a smaller size or fewer images.",
            )
        if self.in_hand.superseded(self.attempt):
            raise Superseded()
        if step < total and now - self._last_event < self.settings.progress_interval_s:
            return
        self._last_event = now
        if self._cancel_requested():
            raise CancelledByUser("Cancelled while rendering.")
        event = Step(step=step, total=total)
        if self.settings.preview_interval_s and now - self._last_preview >= self.settings.preview_interval_s:
            preview = latent_preview(latents)
            if preview is not None:
                self._last_preview = now
                event = Step(step=step, total=total, preview_png=base64.b64encode(preview).decode())
        self.report(event)

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


@dataclass
class Member:
    """One job of a batch: its attempt, what it renders, and why it left the batch, if it did."""

    attempt: Attempt
    prepared: Prepared
    reporter: ProgressReporter
    left: BaseException | None = None

    @property
    def images(self) -> int:
        return self.prepared.options.num_images_per_prompt


class BatchProgress:
    """The pipeline's step callback for a batch: each job's reporter sees its own rows of the latents. A job
    that stops leaves the batch (`on_leave` says so to its user at once); the others go on."""

    def __init__(self, members: list[Member], rows: list[slice], on_leave: Callable[[Member], None]) -> None:
        self.members = list(zip(members, rows, strict=True))
        self.on_leave = on_leave

    def __call__(self, step: int, total: int, latents) -> None:
        for member, rows in self.members:
            if member.left is not None:
                continue
            try:
                member.reporter(step, total, latents[rows])
            except (CancelledByUser, Superseded, JobFailure) as stop:
                member.left = stop
                self.on_leave(member)
        if all(member.left is not None for member, _ in self.members):
            raise BatchStopped()


class Finisher:
    """Finishes rendered batches on a thread of its own (the safety check, PNG encoding at ~30 ms per 512²
    image, storing, announcing), so that the render thread takes the next batch at once. It holds one batch
    at a time: a second waits until the first is done, so rendering never runs far ahead of delivery."""

    def __init__(self, finish: Callable[[list[Member], DecodedBatch], None]) -> None:
        self._finish = finish
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._thread = threading.Thread(target=self._loop, name="imagine-finisher", daemon=True)
        self._thread.start()

    def submit(self, members: list[Member], batch: DecodedBatch) -> None:
        self._queue.put((members, batch))

    def drain(self) -> None:
        """Wait until every batch handed over is finished."""
        self._queue.join()

    def stop(self) -> None:
        self.drain()
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._finish(*item)
            finally:
                self._queue.task_done()


class JobRunner:
    def __init__(
        self,
        settings: WorkerSettings,
        store: JobStore,
        renderer: Renderer,
        in_hand: AttemptsInHand,
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
        self.finisher = Finisher(self._finish_batch)
        self._uncompiled_shapes = OncePerKey(logger)

    def run(self, job_id: str, options: dict[str, Any], number: int) -> dict[str, Any]:
        """One message of the queue, and whatever joins its job in a batch, up to the finisher; returns a
        summary for Celery's result and Flower."""
        attempt = Attempt(job_id, number)
        with job_context(job_id):
            try:
                record = self.receive(attempt, options)
            except RefusedMessage as refusal:
                # Celery has decoded the message by now: what is kept is the task's arguments.
                arguments = {"job_id": job_id, "options": options, "attempt": number}
                self.refuse(self.settings.queue_name, json.dumps(arguments).encode(), refusal)
                return {"job_id": job_id, "state": f"refused ({refusal.kind})"}
            if attempt in self.in_hand.current:
                # A job this worker took into a batch, still being rendered or delivered: the claim would say
                # "ok" to its own worker (it does, for a claim retried through a Redis restart).
                logger.info("job %s attempt %d skipped: this worker has it in hand already", job_id, number)
                return {"job_id": job_id, "state": "skipped (in hand)"}
            claimed = until_redis_answers("claiming the job", lambda: self.claim(attempt))
            if claimed != "ok":
                logger.info("job %s attempt %d skipped: %s", job_id, number, claimed)
                return {"job_id": job_id, "state": f"skipped ({claimed})"}
            lead = self._take(attempt, record)
            if isinstance(lead, JobFailure):
                return self._failed(attempt, lead)
            members = [lead, *self.gather(lead)]
            self._render(members)
            if isinstance(lead.left, JobFailure):
                return self._failed(attempt, lead.left)
            state = "cancelled" if isinstance(lead.left, CancelledByUser) else "rendered"
            return {"job_id": job_id, "state": state, "batch": [member.attempt.job_id for member in members]}

    # The steps ---------------------------------------------------------------------------------

    def receive(self, attempt: Attempt, options: dict[str, Any]) -> JobRecord:
        """The stored job is the truth: a message for a job never recorded, or whose options are not the
        job's (an init image compared by its digest, as messages carry it), is refused (RefusedMessage),
        and the job itself is left as it is."""
        task = task_id(attempt.job_id, attempt.number)
        try:
            record = until_redis_answers("reading the job", lambda: self.store.get(attempt.job_id))
        except CorruptRecord as error:
            raise RefusedMessage(DeadLetterKind.UNKNOWN_JOB, str(error), task) from None
        if record is None:
            raise RefusedMessage(
                DeadLetterKind.UNKNOWN_JOB, f"no job {attempt.job_id} is recorded (never submitted, or expired)", task
            )
        stored, sent = message_options(record.options), message_options(options)
        if stored != sent:
            names = {*stored, *sent}
            differing = sorted(str(name)[:40] for name in names if stored.get(name) != sent.get(name))
            listed = ", ".join(differing[:10]) + (", ..." if len(differing) > 10 else "")
            raise RefusedMessage(
                DeadLetterKind.DISAGREES, f"its options differ from job {attempt.job_id}'s in {listed}", task
            )
        return record

    def claim(self, attempt: Attempt) -> str:
        """'ok' when this worker now runs the attempt (see `JobStore.claim`)."""
        return self.store.claim(attempt.job_id, attempt.number, self.worker_name)

    def _take(self, attempt: Attempt, record: JobRecord, prepared: Prepared | None = None) -> Member | JobFailure:
        """A claimed attempt into the worker's hands: from here the janitor keeps its heartbeat fresh, and
        never takes its job for a dead worker's, until its outcome is recorded."""
        self.in_hand.take(attempt)
        self.board.publish_quietly()
        try:
            prepared = self.prepare(attempt, record, prepared)
        except Exception as error:
            failure = failure_for(error, None)
            if failure.reason is FailureReason.INTERNAL:
                logger.exception("job %s could not be prepared", attempt.job_id)
            self.fail(attempt, failure)
            self._release(attempt)
            return failure
        reporter = ProgressReporter(self.store, attempt, self.in_hand, self.settings)
        reporter.report(
            Started(
                worker=self.worker_name,
                attempt=attempt.number,
                adapter=prepared.plan.adapter,
                adapters=prepared.plan.adapters,
                seeds=prepared.options.seeds,
                warnings=prepared.plan.warnings,
            )
        )
        return Member(attempt, prepared, reporter)

    def prepare(self, attempt: Attempt, record: JobRecord, prepared: Prepared | None = None) -> Prepared:
        """Check the job's options again (the message may come from an old or hostile client) and settle
        what it renders with. Raises what `failure_for` turns into the job's failure."""
        claimed = until_redis_answers("reading the job", lambda: self.store.get(attempt.job_id))
        if claimed is None:
            raise JobFailure(FailureReason.INTERNAL, "The job's record expired while it was being claimed.")
        self.metrics.queue_wait(claimed.started_at - claimed.submitted_at)
        if prepared is not None:
            return Prepared(claimed, prepared.options, prepared.plan)
        options = parse_job_options(record.options, self.settings.limits)
        return Prepared(claimed, options, self.renderer.plan(options))

    def gather(self, lead: Member) -> list[Member]:
        """Queued jobs that can share the lead's pipeline call, up to BATCH_MAX_IMAGES images, from the first
        BATCH_LOOKAHEAD places of the queue (so that no job is overtaken without bound). Their messages are
        left on the queue: the claim makes them skip when they come. With BATCH_GATHER_S, the worker waits
        that long for such jobs to arrive; by default it takes only those already queued."""
        room = self.settings.batch_max_images - lead.images
        deadline = time.monotonic() + self.settings.batch_gather_s
        members: list[Member] = []
        while room > 0:
            for job_id in self._waiting():
                if room <= 0:
                    break
                member = self._join(job_id, lead.prepared.plan, room)
                if member is not None:
                    members.append(member)
                    room -= member.images
            if room <= 0 or time.monotonic() >= deadline:
                break
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if members:
            logger.info(
                "job %s renders with %d more in one batch: %s",
                lead.attempt.job_id,
                len(members),
                ", ".join(member.attempt.job_id for member in members),
            )
        return members

    def _waiting(self) -> list[str]:
        try:
            return self.store.queued(self.settings.batch_lookahead)
        except REDIS_UNREACHABLE:
            return []  # a batch is an optimisation: without Redis, the lead renders alone

    def _join(self, job_id: str, lead_plan: RenderPlan, room: int) -> Member | None:
        """Claim a queued job into the batch if it can share the lead's call; None otherwise."""
        try:
            record = self.store.get(job_id)
            if record is None:
                return None
            # Parsing decodes a job's image: only one that could share the lead's call (the same image) is.
            image, lead_image = record.options.get("image"), lead_plan.batch_key.init_image
            if (image is None) != (lead_image is None) or (
                image is not None and (not isinstance(image, str) or image_digest(image) != lead_image)
            ):
                return None
            options = parse_job_options(record.options, self.settings.limits)
            if options.num_images_per_prompt > room:
                return None
            plan = self.renderer.plan(options)
            if plan.batch_key != lead_plan.batch_key:
                return None
            attempt = Attempt(job_id, record.attempt)
            if self.claim(attempt) != "ok":
                return None
        except (CorruptRecord, JobRejected, AdapterError, *REDIS_UNREACHABLE):
            return None  # it fails, or waits, on its own when its message comes
        with job_context(job_id):
            member = self._take(attempt, record, Prepared(record, options, plan))
        return member if isinstance(member, Member) else None

    def _render(self, members: list[Member]) -> None:
        """Render the batch and hand it to the finisher. Out of memory, a batch is split in two and each
        half rendered; a job alone out of memory fails."""
        entries = self.renderer.entries([(member.prepared.options, member.prepared.plan) for member in members])
        progress = BatchProgress(members, [entry.rows for entry in entries], self._left)
        failure, out_of_memory = None, False
        try:
            batch = self.renderer.render_batch(entries, progress)
        except BatchStopped:
            return
        except Exception as error:
            out_of_memory = is_out_of_memory(error) and len(members) > 1
            if not out_of_memory:
                failure = failure_for(error, members[0].prepared.options if len(members) == 1 else None)
                if failure.reason is FailureReason.INTERNAL:
                    logger.exception("batch of %s failed", ", ".join(member.attempt.job_id for member in members))
        else:
            for member in members:
                if member.left is None:
                    self.in_hand.rendered(member.attempt)
            if batch.uncompiled:  # before the finisher says "done": whoever sees a job done sees it counted
                self._rendered_uncompiled(entries)
            self.finisher.submit(members, batch)
            return
        # Here, past the except block, whose traceback kept the render's tensors alive.
        free_memory()
        if out_of_memory:
            half = len(members) // 2
            logger.warning("a batch of %d jobs ran out of memory; rendering it in two halves", len(members))
            for part in (members[:half], members[half:]):
                if staying := [member for member in part if member.left is None]:
                    self._render(staying)
            return
        for member in members:
            if member.left is None:
                member.left = failure
                self._left(member)

    def _rendered_uncompiled(self, entries: list[BatchEntry]) -> None:
        """Counted every time, logged once per shape: the operator's cue to warm that shape up."""
        self.metrics.uncompiled_render()
        shape = entries[0].plan.batch_key.shape(sum(entry.options.num_images_per_prompt for entry in entries))
        self._uncompiled_shapes.warning(
            shape,
            "a batch rendered uncompiled, at eager speed: no graph of the warm-up covers %s (COMPILE_SIZES "
            "lists the sizes it compiles; see COMPILE in the README); counted in imagine_uncompiled_renders_total, "
            "logged once per shape",
            shape,
        )

    def _left(self, member: Member) -> None:
        """A job left its batch: said to its user now, while the others render on."""
        attempt, why = member.attempt, member.left
        with job_context(attempt.job_id):
            if isinstance(why, Superseded):
                # Not a failure: another attempt holds the job now and reports its outcome.
                logger.warning(
                    "job %s attempt %d stopped: another attempt holds the job", attempt.job_id, attempt.number
                )
            elif isinstance(why, CancelledByUser):
                self.finish(attempt, Cancelled(message=str(why)))
            elif isinstance(why, JobFailure):
                self.fail(attempt, why)
            self._release(attempt)

    # On the finisher's thread ----------------------------------------------------------------

    def _finish_batch(self, members: list[Member], batch: DecodedBatch) -> None:
        """`members`: the batch's jobs in the order of its entries, those that left it included."""
        try:
            outputs: list[RenderOutput | JobFailure] = list(self.renderer.finish_images(batch))
        except Exception as error:
            logger.exception("finishing the batch of %s failed", ", ".join(m.attempt.job_id for m in members))
            outputs = [failure_for(error, None)] * len(members)
        for member, output in zip(members, outputs, strict=True):
            if member.left is not None:
                continue  # its outcome was said when it left
            with job_context(member.attempt.job_id):
                try:
                    if isinstance(output, JobFailure):
                        self.fail(member.attempt, output)
                    else:
                        self.deliver(member, output)
                except Exception:
                    logger.exception("job %s could not be delivered", member.attempt.job_id)
                finally:
                    self._release(member.attempt)

    def deliver(self, member: Member, output: RenderOutput) -> None:
        """Store the images and their metadata, then end the job as done, its result announced."""
        attempt, options, plan, record = (
            member.attempt,
            member.prepared.options,
            member.prepared.plan,
            member.prepared.record,
        )
        queue_wait_s = round(record.started_at - record.submitted_at, 3)
        meta = ResultMeta(
            job_id=attempt.job_id,
            **options.model_dump(exclude={"seed", "adapter", "adapters", "scheduler", "image", "strength"}),
            **({"init_image": plan.batch_key.init_image, "strength": options.strength} if options.image else {}),
            seeds=output.seeds,
            adapter=plan.adapter,
            adapter_version=plan.adapter_version,
            adapters=plan.adapters,
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
        # Said before the outcome is announced: whoever reacts to it then reads this line among the job's.
        logger.info("job %s done in %.2f s on %s", attempt.job_id, output.render_s, self.worker_name)
        if not self.finish(attempt, done):
            logger.warning(
                "job %s attempt %d finished after it was taken over; result not announced",
                attempt.job_id,
                attempt.number,
            )

    # Endings ---------------------------------------------------------------------------------

    def finish(self, attempt: Attempt, event: TerminalEvent) -> bool:
        """Record the attempt's outcome and its terminal event, in one step; False when another attempt
        holds the job now. The status first stops showing the job: whoever reacts to the outcome
        (`imagine-admin queue`, the bot's /queue) then sees the worker as it is, not a heartbeat later."""
        self.in_hand.rendered(attempt)
        self.board.publish_quietly()
        return until_redis_answers(
            f"recording the job as {event.type}", lambda: self.store.finish(attempt.job_id, attempt.number, event)
        )

    def fail(self, attempt: Attempt, failure: JobFailure) -> None:
        logger.warning("job %s failed (%s): %s", attempt.job_id, failure.reason, failure.message)
        self.finish(attempt, Failed(reason=failure.reason, message=failure.message))

    def _failed(self, attempt: Attempt, failure: JobFailure) -> dict[str, Any]:
        return {"job_id": attempt.job_id, "state": "failed", "reason": str(failure.reason), "message": failure.message}

    def _release(self, attempt: Attempt) -> None:
        self.in_hand.release(attempt)
        self.board.publish_quietly()

    def refuse(self, queue_name: str, raw: bytes, refusal: RefusedMessage) -> None:
        """A message on the queue that is not a job of ours: logged (never its content, which may hold a
        user's prompt), kept among the dead letters for an operator, and acknowledged away."""
        logger.warning(
            "refused a message on queue %s (%s, task %s, %d bytes): %s; kept in the dead letters "
            "(imagine-admin dead-letters)",
            queue_name,
            refusal.kind,
            refusal.task_id or "-",
            len(raw),
            refusal.reason,
        )
        letter = DeadLetter(
            kind=refusal.kind,
            reason=refusal.reason,
            queue=queue_name,
            task_id=refusal.task_id,
            worker=self.worker_name,
            bytes=len(raw),
            message=raw[:DEAD_LETTER_BYTES].decode(errors="replace"),
        )
        self.metrics.dead_letter(letter)
