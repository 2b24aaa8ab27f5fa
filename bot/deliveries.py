"""Where each job's result goes: kept in Redis (the service client's records), so a restarted bot picks up
the jobs it was following, and several bot processes never deliver one job twice."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

from imagine.logs import OncePerKey
from imagine.store import FrontEndRecords

logger = logging.getLogger(__name__)

INTERACTION_TOKEN_LIFETIME_S = 15 * 60
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
    def __init__(self, records: FrontEndRecords, ttl_s: float, claim_s: float) -> None:
        self.records = records
        self.ttl_s = ttl_s
        self.claim_s = claim_s
        """How long the right to deliver a job lasts; the delivering bot renews it while it works."""
        self._unreadable = OncePerKey(logger)

    def save(self, delivery: Delivery) -> None:
        self.records.put("delivery", delivery.job_id, asdict(delivery), self.ttl_s)

    def get(self, job_id: str) -> Delivery | None:
        """Where the job goes; None when there is no record, or it cannot be read (logged once)."""
        record = self.records.get("delivery", job_id)
        if record is None:
            return None
        try:
            return Delivery(**record)
        except TypeError as error:
            self._unreadable.warning(job_id, "skipping the unreadable delivery record of job %s: %s", job_id, error)
            return None

    def pending(self) -> list[Delivery]:
        """Every job the bot still has to deliver, oldest records first; expired ones are dropped."""
        deliveries = [self.get(job_id) for job_id in self.records.names("delivery")]
        return sorted((d for d in deliveries if d is not None), key=lambda delivery: delivery.token_expires_at)

    def claim(self, job_id: str) -> bool:
        """Take the right to deliver a job for `claim_s`: two bot processes never deliver the same job."""
        return self.records.claim("delivering", job_id, self.claim_s)

    def renew_claim(self, job_id: str) -> None:
        self.records.renew("delivering", job_id, self.claim_s)

    def release(self, job_id: str) -> None:
        self.records.release("delivering", job_id)

    def remove(self, job_id: str) -> None:
        self.records.delete("delivery", job_id)
