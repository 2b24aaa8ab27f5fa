"""The worker's broker transport: kombu's Redis transport, with every message of the job queue screened
before kombu and Celery decode it.

Celery stops the whole worker ("Unrecoverable error") on a message it cannot decode: a list item that
is not JSON, a body that is not base64, a body that is not `[args, kwargs, embed]`. kombu's Redis
transport had already taken such a message off the queue (BRPOP), and a restart meets the next one
the same way. Here each message is read with `read_job_message` as Redis answers the BRPOP: one that
is not a job of ours is handed to `on_refused` (which logs it and keeps it among the dead letters)
and answered to kombu as "no message", so it is gone from the queue and the worker serves on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kombu.transport import redis as kombu_redis

from imagine.queue import RefusedMessage, read_job_message

logger = logging.getLogger(__name__)

OnRefused = Callable[[str, bytes, RefusedMessage], None]
"""Called with the queue's name, the raw message and why it was refused."""


def screened_redis_transport(job_queue: str, on_refused: OnRefused) -> type[kombu_redis.Transport]:
    """A Redis transport class whose consumers never receive a message of `job_queue` that is not a job."""

    class ScreenedChannel(kombu_redis.Channel):
        def _create_client(self, asynchronous: bool = False):
            client = super()._create_client(asynchronous)
            # The BRPOP reply is where a consumer first holds a message: screening it there keeps a bad one
            # from reaching any code of kombu's or Celery's that would raise on it.
            parse_reply = client.response_callbacks.get("BRPOP", lambda reply, **_: reply)

            def screen(reply, **options):
                popped = parse_reply(reply, **options)
                return self._screened(popped)

            client.set_response_callback("BRPOP", screen)
            return client

        def _screened(self, popped):
            if not popped:
                return popped
            key, raw = popped
            queue = (key.decode() if isinstance(key, bytes) else key).rsplit(self.sep, 1)[0]
            if queue != job_queue:
                return popped
            try:
                read_job_message(raw)
            except RefusedMessage as refusal:
                try:
                    on_refused(queue, raw, refusal)
                except Exception:  # keeping the dead letter is a courtesy; the worker must not stop for it
                    logger.exception("a refused message of queue %s could not be kept", queue)
                return None  # kombu reads "no message": the refused one is already off the queue
            return popped

    class ScreenedTransport(kombu_redis.Transport):
        Channel = ScreenedChannel

    return ScreenedTransport
