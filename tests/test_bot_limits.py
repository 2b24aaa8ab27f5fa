"""The bot's per-user limits against a real Redis: pending jobs and the cooldown."""

from __future__ import annotations

import uuid

import pytest

from bot.limits import LimitReached, UserLimits
from imagine.client import ImagineClient
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
    with pytest.raises(LimitReached, match="You already have 1 jobs queued or rendering"):
        limits.admit(42)
    limits.admit(43)
