"""The bot's per-user limits against a real Redis: pending jobs and the cooldown."""

from __future__ import annotations

import threading
import uuid

import pytest

from imagine.client import ImagineClient, TooManyPending
from imagine.contract import JobRejected
from imagine.limits import LimitReached, UserLimits
from tests.helpers import service_settings

pytestmark = pytest.mark.integration


def test_cooldown_says_when_to_try_again(redis_server):
    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    limits = UserLimits(client.records(), max_pending=2, cooldown_s=30)
    limits.admit(42)
    with pytest.raises(LimitReached, match=r"Slow down a little: try again in (29|30) s\."):
        limits.admit(42)
    limits.admit(43)  # another user is not held back


def test_pending_jobs_count_per_user(redis_server):
    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    client.submit({"prompt": "waiting"}, owner="42", max_pending_for_owner=1)
    with pytest.raises(TooManyPending, match="You already have 1 jobs queued or rendering"):
        client.submit({"prompt": "one more"}, owner="42", max_pending_for_owner=1)
    client.submit({"prompt": "another user's"}, owner="43", max_pending_for_owner=1)


def test_a_refused_submission_does_not_hold_the_cooldown(redis_server):
    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    limits = UserLimits(client.records(), max_pending=1, cooldown_s=30)
    limits.admit(42)
    limits.forgive(42)  # what the bot does when the service refused the job (a full queue)
    limits.admit(42)


def test_unreadable_delivery_records_are_skipped(redis_server):
    from bot.deliveries import Delivery, DeliveryStore

    client = ImagineClient(service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}"))
    deliveries = DeliveryStore(client.records(), ttl_s=60, claim_s=30)
    good = Delivery("a" * 32, user_id=1, channel_id=2, application_id=3, interaction_token="t", token_expires_at=0)
    deliveries.save(good)
    deliveries.save(Delivery("b" * 32, 1, 2, 3, "t", 0))
    client.store.redis.set(client.store.key("cli", "delivery", "b" * 32), b"{not json")  # a restarted bot gets past it
    assert deliveries.pending() == [good]


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
    # The two that passed are the user's share: a third is refused, another user's is not.
    with pytest.raises(TooManyPending):
        clients[0].submit({"prompt": "one more"}, owner="42", max_pending_for_owner=2)
    clients[0].submit({"prompt": "another user's"}, owner="43", max_pending_for_owner=2)


def test_a_burst_of_submissions_from_many_users_never_passes_the_limits(redis_server):
    """250 submissions from 50 users at once, against a queue cap of 60 and two pending jobs each."""
    settings = service_settings(redis_server.url, f"l{uuid.uuid4().hex[:8]}", max_queue_length=60)
    clients = [ImagineClient(settings, client_name="discord") for _ in range(10)]
    users, each = 50, 5
    start = threading.Barrier(len(clients))
    outcomes: list[tuple[str, str]] = []

    def submit(client: ImagineClient, share: list[str]) -> None:
        start.wait()
        for owner in share:
            try:
                client.submit({"prompt": "a burst"}, owner=owner, max_pending_for_owner=2)
                outcomes.append((owner, "queued"))
            except JobRejected as refusal:
                outcomes.append((owner, str(refusal)))

    owners = [str(user) for user in range(users) for _ in range(each)]
    shares = [owners[index :: len(clients)] for index in range(len(clients))]
    threads = [threading.Thread(target=submit, args=pair) for pair in zip(clients, shares, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(outcomes) == users * each
    queued = [owner for owner, outcome in outcomes if outcome == "queued"]
    assert len(queued) == clients[0].store.queue_length() == 60
    assert max(queued.count(owner) for owner in set(queued)) == 2
    refusals = {outcome.split(" (")[0].split(";")[0] for _, outcome in outcomes if outcome != "queued"}
    assert refusals <= {"The queue is full", "You already have 2 jobs queued or rendering"}, refusals
