"""Per-user limits that keep the service usable under load: pending jobs and a cooldown.

With at most `MAX_PENDING_PER_USER` jobs each, one user's twenty submissions cannot fill the queue
ahead of everyone else. Both limits live in Redis, so a bot restart does not reset them.
"""

from __future__ import annotations

import math

from imagine.client import ImagineClient, TooManyPending
from imagine.contract import JobRejected


class LimitReached(JobRejected):
    """The user has to wait before submitting again."""


class UserLimits:
    def __init__(self, client: ImagineClient, max_pending: int, cooldown_s: float) -> None:
        self.client = client
        self.max_pending = max_pending
        self.cooldown_s = cooldown_s

    def admit(self, user_id: int) -> None:
        """Count a new submission of `user_id`, or raise TooManyPending or LimitReached saying when to try
        again. The pending count is checked again, atomically, when the job is created."""
        pending = self.client.pending_for_owner(str(user_id))
        if len(pending) >= self.max_pending:
            raise TooManyPending(len(pending), self.max_pending)
        if self.cooldown_s <= 0:
            return
        key = self.client.store.key("bot", "cooldown", str(user_id))
        if not self.client.store.redis.set(key, 1, nx=True, px=int(self.cooldown_s * 1000)):
            wait_ms = max(self.client.store.redis.pttl(key), 0)
            raise LimitReached(f"Slow down a little: try again in {math.ceil(wait_ms / 1000)} s.")
