"""The Celery application both sides share, and what a job's message on the queue looks like.

Front ends send jobs with `send_job`; workers read each raw message with `read_job_message` before
Celery sees it (worker/transport.py), so that a message that cannot be decoded, or that is not a job
of ours, is refused instead of stopping the worker.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.transport.redis import Channel as RedisChannel

from imagine.images import image_digest
from imagine.settings import ServiceSettings
from imagine.wire import DeadLetterKind

GENERATE_TASK = "imagine.generate"
RELOAD_COMMAND = "imagine_sync_adapters"
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
JOB_MESSAGE_KWARGS = frozenset({"job_id", "options", "attempt"})
IMAGE_REFERENCE = "sha256:"
"""How a message names its job's init image. Not base64 (':' is outside its alphabet), so never an image."""


def make_celery(settings: ServiceSettings, main: str = "imagine") -> Celery:
    app = Celery(main, broker=settings.redis_url)
    app.conf.update(
        # JSON only: a pickle message from the queue could run code on the worker.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        task_default_queue=settings.queue_name,
        # Job state and results live in our own Redis keys (imagine/store.py), not Celery's backend.
        task_ignore_result=True,
        # A job is acknowledged only once it finished, and a worker holds one job at a time, so a job
        # whose worker dies is not lost and no job waits behind a busy worker's prefetch.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        # One process owns the GPU and the pipeline; CUDA does not survive a fork.
        worker_pool="solo",
        worker_concurrency=1,
        # Events let Flower show each job, its arguments (the prompt), runtime and state.
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_track_started=True,
    )
    return app


def task_id(job_id: str, attempt: int) -> str:
    """The Celery task id of one attempt of a job: what Flower and Celery's log lines show."""
    return f"{job_id}.{attempt}"


def message_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options as a job's message carries them: an init image by its digest. The worker renders from
    the stored job, and only checks the message against it, so the image (up to MAX_IMAGE_BYTES, a third
    more as base64, and a third more again in kombu's envelope) is kept in Redis once, not twice,
    and Flower shows a line where it would show megabytes."""
    image = options.get("image")
    if not isinstance(image, str) or not image.isascii() or image.startswith(IMAGE_REFERENCE):
        return options  # a reference already, or not base64 at all (a hostile message): compared as it is
    return {**options, "image": IMAGE_REFERENCE + image_digest(image)}


def send_job(app: Celery, job_id: str, options: dict, attempt: int) -> None:
    """Put one attempt of a job on the queue. Keyword arguments, so Flower shows the prompt by name."""
    app.send_task(
        GENERATE_TASK,
        kwargs={"job_id": job_id, "options": message_options(options), "attempt": attempt},
        task_id=task_id(job_id, attempt),
    )


# Reading messages as kombu's Redis transport keeps them ---------------------------------------------
# A message is a JSON envelope (headers, properties, base64 body) in a Redis list named after the queue,
# or, once a worker has taken it and until it acknowledges it, in the transport's `unacked` hash.


class RefusedMessage(ValueError):
    """A raw message that is not a job of ours. The reason names what is wrong, never the body's content."""

    def __init__(self, kind: DeadLetterKind, reason: str, task_id: str | None = None) -> None:
        super().__init__(reason)
        self.kind = DeadLetterKind(kind)
        self.reason = reason
        self.task_id = task_id


@dataclass(frozen=True)
class JobMessage:
    task_id: str | None
    job_id: str
    options: dict[str, Any]
    attempt: int


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _envelope(raw: bytes) -> dict[str, Any]:
    try:
        envelope = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, f"the message is not JSON ({error})") from None
    if not isinstance(envelope, dict):
        raise RefusedMessage(
            DeadLetterKind.UNDECODABLE, f"the message is a JSON {type(envelope).__name__}, not an object"
        )
    properties, headers = envelope.get("properties"), envelope.get("headers")
    if not isinstance(properties, dict) or not isinstance(properties.get("delivery_tag"), str):
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, "the message has no properties with a delivery tag")
    if not isinstance(headers, dict):
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, "the message has no headers")
    return envelope


def read_job_message(raw: bytes) -> JobMessage:
    """Decode one raw message of the job queue, or raise RefusedMessage saying why it is not a job."""
    envelope = _envelope(raw)
    headers, properties = envelope["headers"], envelope["properties"]
    task = headers.get("id") if isinstance(headers.get("id"), str) else None
    if envelope.get("content-type") != "application/json":
        raise RefusedMessage(
            DeadLetterKind.UNDECODABLE, f"content type {_short(envelope.get('content-type'))} is not JSON", task
        )
    if headers.get("compression"):
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, "compressed messages are not accepted", task)
    body = envelope.get("body")
    if not isinstance(body, str):
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, "the message has no body", task)
    if properties.get("body_encoding") == "base64":
        try:
            body = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as error:
            raise RefusedMessage(DeadLetterKind.UNDECODABLE, f"the body is not valid base64 ({error})", task) from None
    elif properties.get("body_encoding") is not None:
        raise RefusedMessage(
            DeadLetterKind.UNDECODABLE, f"unknown body encoding {_short(properties['body_encoding'])}", task
        )
    try:
        arguments = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise RefusedMessage(DeadLetterKind.UNDECODABLE, f"the body is not JSON ({error})", task) from None

    if headers.get("task") != GENERATE_TASK:
        raise RefusedMessage(
            DeadLetterKind.NOT_A_JOB, f"task {_short(headers.get('task'))} is not {GENERATE_TASK}", task
        )
    if not (isinstance(arguments, list) and len(arguments) == 3):
        raise RefusedMessage(DeadLetterKind.NOT_A_JOB, "the body is not Celery's [args, kwargs, embed]", task)
    args, kwargs, embed = arguments
    if args != [] or not isinstance(kwargs, dict) or not isinstance(embed, dict):
        raise RefusedMessage(DeadLetterKind.NOT_A_JOB, "a job takes keyword arguments only", task)
    if set(kwargs) != JOB_MESSAGE_KWARGS:
        names = ", ".join(sorted(str(name)[:40] for name in kwargs))
        expected = ", ".join(sorted(JOB_MESSAGE_KWARGS))
        raise RefusedMessage(DeadLetterKind.NOT_A_JOB, f"a job's arguments are {expected} (got {names})", task)
    job_id, options, attempt = kwargs["job_id"], kwargs["options"], kwargs["attempt"]
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise RefusedMessage(
            DeadLetterKind.NOT_A_JOB, "job_id is not a job id (letters, digits, '_' and '-', at most 64)", task
        )
    if not isinstance(options, dict):
        raise RefusedMessage(DeadLetterKind.NOT_A_JOB, "options is not an object", task)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
        raise RefusedMessage(DeadLetterKind.NOT_A_JOB, "attempt is not a positive integer", task)
    return JobMessage(task, job_id, options, attempt)


def messages_on_queue(client: redis.Redis, queue_name: str) -> set[str]:
    """The task ids of every message of the queue that a worker may still run: waiting in the queue's
    lists (one per priority) or taken by a worker and not yet acknowledged."""
    lists = [queue_name, *(f"{queue_name}{RedisChannel.sep}{step}" for step in RedisChannel.priority_steps if step)]
    with client.pipeline(transaction=False) as pipe:
        for name in lists:
            pipe.lrange(name, 0, -1)
        pipe.hvals(RedisChannel.unacked_key)
        *waiting, unacked = pipe.execute()
    ids = set()
    for raw in (item for items in waiting for item in items):
        try:
            ids.add(_envelope(raw)["headers"].get("id"))
        except RefusedMessage:
            continue
    for entry in unacked:  # [envelope, exchange, routing key]
        try:
            ids.add(json.loads(entry)[0]["headers"].get("id"))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            continue
    return {task for task in ids if isinstance(task, str)}
