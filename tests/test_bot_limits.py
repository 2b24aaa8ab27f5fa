"""The bot's per-user limits against a real Redis: pending jobs and the cooldown."""

from __future__ import annotations

import threading
import uuid

import pytest

from bot.limits import LimitReached, UserLimits
from imagine.client import ImagineClient, TooManyPending
from tests.helpers import service_settings

pytestmark = pytest.mark.integration


def test_cooldown_says_when_to_try_again(redis_server):
    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    limits = UserLimits(client, max_pending=2, cooldown_s=30)
    limits.admit(42)
    with pytest.raises(LimitReached, match=r"Slow down a little: try again in (29|30) s\."):
        limits.admit(42)
    limits.admit(43)  # another user is not held back


def test_pending_jobs_count_per_user(redis_server):
    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    limits = UserLimits(client, max_pending=1, cooldown_s=0)
    client.submit({"prompt": "waiting"}, owner="42")
    with pytest.raises(TooManyPending, match="You already have 1 jobs queued or rendering"):
        limits.admit(42)
    limits.admit(43)


def test_racing_submissions_cannot_pass_the_per_user_limit_together(redis_server):
    settings = service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}")
    clients = [ImagineClient(settings, client_name="discord") for _ in range(8)]
    start = threading.Barrier(len(clients))
    outcomes: list[str] = []

    def submit(client: ImagineClient) -> None:
        start.wait()
        try:
            client.submit({"prompt": "all at once"}, owner="42", max_pending_for_owner=2)
            outcomes.append("queued")
        except TooManyPending as refusal:
            outcomes.append(str(refusal))

    threads = [threading.Thread(target=submit, args=(client,)) for client in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes).count("queued") == 2 and len(outcomes) == 8
    assert all(outcome.startswith("You already have 2 jobs") for outcome in outcomes if outcome != "queued")
    assert len(clients[0].pending_for_owner("42")) == 2
