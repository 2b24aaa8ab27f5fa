"""Per-user limits that keep the service usable under load: pending jobs and a cooldown, for every front
end (the bot's users, the web page's browsers).

With at most a few jobs each, one user's twenty submissions cannot fill the queue ahead of everyone
else. The pending count is checked by the service itself, in the same atomic step that records the job
(`ImagineClient.submit`); the cooldown is the front end's, here. Both live in Redis, so a restart of
the front end does not reset them.
"""

from __future__ import annotations

import math

from imagine.contract import JobRejected
from imagine.store import FrontEndRecords


class LimitReached(JobRejected):
    """The user has to wait before submitting again."""


class UserLimits:
    def __init__(self, records: FrontEndRecords, max_pending: int, cooldown_s: float) -> None:
        self.records = records
        self.max_pending = max_pending
        """Passed to `submit`, which counts the user's jobs queued or rendering as it records a new one."""
        self.cooldown_s = cooldown_s

    def admit(self, user_id: int | str) -> None:
        """Start the user's cooldown, or raise LimitReached saying when to try again."""
        if self.cooldown_s <= 0:
            return
        if not self.records.claim("cooldown", str(user_id), self.cooldown_s):
            wait_s = self.records.claimed_for_s("cooldown", str(user_id))
            raise LimitReached(f"Slow down a little: try again in {math.ceil(wait_s)} s.")

    def forgive(self, user_id: int | str) -> None:
        """Lift the cooldown of a submission the service refused (a full queue): it did not run."""
        self.records.release("cooldown", str(user_id))
