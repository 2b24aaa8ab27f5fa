"""Where each job's result goes: kept in Redis, so a restarted bot picks up the jobs it was following."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass

from imagine.logs import OncePerKey
from imagine.store import JobStore

logger = logging.getLogger(__name__)

INTERACTION_TOKEN_LIFETIME_S = 15 * 60
DELIVERY_CLAIM_S = 30
"""How long the right to deliver a job lasts; the delivering bot renews it while it works."""
TOKEN_MARGIN_S = 30
"""Past this much before its expiry, a token is not trusted for a final edit that may need uploads."""


@dataclass
class Delivery:
    job_id: str
    user_id: int
    channel_id: int
    application_id: int
    interaction_token: str
    token_expires_at: float
    message_id: int | None = None
    """The bot's message showing the job: edited with progress, then with the images."""

    @property
    def editable(self) -> bool:
        """Whether the job's message can still be edited through the interaction token."""
        return self.message_id is not None and time.time() < self.token_expires_at - TOKEN_MARGIN_S


class DeliveryStore:
    def __init__(self, store: JobStore) -> None:
        self.redis = store.redis
        self.ttl_s = store.ttl_s
        self._index = store.key("bot", "deliveries")
        self._prefix = store.key("bot", "delivery")
        self._unreadable = OncePerKey(logger)

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:{job_id}"

    def save(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self._key(delivery.job_id), json.dumps(asdict(delivery)), ex=self.ttl_s)
            pipe.sadd(self._index, delivery.job_id)
            pipe.execute()

    def get(self, job_id: str) -> Delivery | None:
        """Where the job goes; None when there is no record, or it cannot be read (logged once)."""
        key = self._key(job_id)
        raw = self.redis.get(key)
        if not raw:
            return None
        try:
            return Delivery(**json.loads(raw))
        except (ValueError, TypeError, UnicodeDecodeError) as error:
            self._unreadable.warning(key, "skipping an unreadable delivery record at %s: %s", key, error)
            return None

    def pending(self) -> list[Delivery]:
        """Every job the bot still has to deliver, oldest records first; expired ones are dropped."""
        deliveries = []
        for member in self.redis.smembers(self._index):
            delivery = self.get(member.decode())
            if delivery is None:
                self.redis.srem(self._index, member)
            else:
                deliveries.append(delivery)
        return sorted(deliveries, key=lambda delivery: delivery.token_expires_at)

    def _claim_key(self, job_id: str) -> str:
        return f"{self._prefix}:{job_id}:delivering"

    def claim(self, job_id: str) -> bool:
        """Take the right to deliver a job for DELIVERY_CLAIM_S: two bot processes never deliver the same job."""
        return bool(self.redis.set(self._claim_key(job_id), 1, nx=True, ex=DELIVERY_CLAIM_S))

    def renew_claim(self, job_id: str) -> None:
        self.redis.expire(self._claim_key(job_id), DELIVERY_CLAIM_S)

    def release(self, job_id: str) -> None:
        self.redis.delete(self._claim_key(job_id))

    def remove(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(job_id))
            pipe.srem(self._index, job_id)
            pipe.execute()
