"""The job store's atomic transitions against a real Redis, without a worker."""

from __future__ import annotations

import time
import uuid

import pytest

from imagine.store import JobStore

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_server) -> JobStore:
    return JobStore.from_url(redis_server.url, f"store{uuid.uuid4().hex[:8]}", ttl_s=60)


def test_claim_runs_one_attempt_once(store):
    store.create("j", {"prompt": "x"}, "cli", "alice", max_queued=10)
    assert store.claim("j", 2, "w1") == "stale"  # a message for an attempt the job is not at
    assert store.claim("j", 1, "w1") == "ok"
    assert store.claim("j", 1, "w2") == "running"  # a duplicate delivery of the same attempt
    assert store.finish("j", 1, "done", client="cli")
    assert not store.finish("j", 1, "failed", client="cli")
    assert store.get("j").state == "done" and store.undelivered("cli") == ["j"]


def test_requeue_goes_to_the_back_like_the_broker_and_gives_up_after_the_attempts(store):
    store.create("first", {"prompt": "x"}, "cli", "", max_queued=10)
    store.create("second", {"prompt": "y"}, "cli", "", max_queued=10)
    assert store.claim("first", 1, "w1") == "ok"
    assert store.requeue_if_dead("first", time.time() - 60, max_attempts=2) == -1  # heartbeat is fresh
    assert store.requeue_if_dead("first", time.time() + 1, max_attempts=2) == 2
    assert store.position("second") == 1 and store.position("first") == 2
    assert store.claim("first", 2, "w2") == "ok"
    assert store.requeue_if_dead("first", time.time() + 1, max_attempts=2) == 0
    record = store.get("first")
    assert record.state == "failed" and record.reason == "worker_lost" and "2 times" in record.error


def test_queue_cap_and_owner_listing(store):
    assert store.create("a", {"prompt": "x"}, "cli", "alice", max_queued=2) == 1
    assert store.create("b", {"prompt": "x"}, "cli", "bob", max_queued=2) == 2
    assert store.create("c", {"prompt": "x"}, "cli", "alice", max_queued=2) is None
    assert store.pending_for_owner("alice") == ["a"]


def test_expired_jobs_do_not_hold_queue_places_for_ever(store):
    store.create("lost", {"prompt": "x"}, "cli", "", max_queued=10)
    store.create("kept", {"prompt": "x"}, "cli", "", max_queued=10)
    store.redis.delete(store.key("job", "lost"))  # as its TTL would
    assert store.prune() == 1
    assert store.queue_length() == 1 and store.position("kept") == 1


def test_a_job_being_cancelled_when_its_worker_died_ends_cancelled(store):
    store.create("j", {"prompt": "x"}, "cli", "", max_queued=10)
    assert store.claim("j", 1, "w1") == "ok"
    assert store.cancel("j") == "cancelling"
    assert store.requeue_if_dead("j", time.time() + 1, max_attempts=3) == -2
    assert store.get("j").state == "cancelled" and store.queue_length() == 0


def test_heartbeat_tells_a_superseded_attempt(store):
    store.create("j", {"prompt": "x"}, "cli", "", max_queued=10)
    assert store.claim("j", 1, "w1") == "ok"
    assert store.heartbeat("j", 1, "w1")
    assert store.requeue_if_dead("j", time.time() + 1, max_attempts=3) == 2
    assert not store.heartbeat("j", 1, "w1")  # the janitor of w1 now stops its render
    assert not store.heartbeat("gone", 1, "w1") and not store.redis.exists(store.key("job", "gone"))
