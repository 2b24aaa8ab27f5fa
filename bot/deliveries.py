"""Where each job's result goes: kept in Redis, so a restarted bot picks up the jobs it was following."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from imagine.store import JobStore

INTERACTION_TOKEN_LIFETIME_S = 15 * 60
DELIVERY_CLAIM_S = 300
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

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}:{job_id}"

    def save(self, delivery: Delivery) -> None:
        with self.redis.pipeline() as pipe:
            pipe.set(self._key(delivery.job_id), json.dumps(asdict(delivery)), ex=self.ttl_s)
            pipe.sadd(self._index, delivery.job_id)
            pipe.execute()

    def get(self, job_id: str) -> Delivery | None:
        raw = self.redis.get(self._key(job_id))
        return Delivery(**json.loads(raw)) if raw else None

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

    def claim(self, job_id: str) -> bool:
        """Take the right to deliver a job for a few minutes: two bot processes never deliver the same job."""
        return bool(self.redis.set(f"{self._prefix}:{job_id}:delivering", 1, nx=True, ex=DELIVERY_CLAIM_S))

    def release(self, job_id: str) -> None:
        self.redis.delete(f"{self._prefix}:{job_id}:delivering")

    def remove(self, job_id: str) -> None:
        with self.redis.pipeline() as pipe:
            pipe.delete(self._key(job_id))
            pipe.srem(self._index, job_id)
            pipe.execute()
