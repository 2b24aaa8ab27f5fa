"""The job store's atomic transitions against a real Redis, without a worker."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from imagine.store import JobStore
from imagine.wire import Cancelled, Done, Failed, FailureReason

DONE = Done(worker="w1", images=1, withheld=0, render_s=0.5, queue_wait_s=0.1)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(redis_server) -> JobStore:
    return JobStore.from_url(redis_server.url, f"store{uuid.uuid4().hex[:8]}", ttl_s=60)


def test_claim_runs_one_attempt_once(store):
    store.create("j", {"prompt": "x"}, "cli", "alice", max_queued=10)
    assert store.claim("j", 2, "w1") == "stale"  # a message for an attempt the job is not at
    assert store.claim("j", 1, "w1") == "ok"
    assert store.claim("j", 1, "w2") == "running"  # a duplicate delivery of the same attempt
    assert store.claim("j", 1, "w1") == "ok"  # w1's claim sent again: Redis restarted before answering
    assert store.finish("j", 1, DONE)
    assert not store.finish("j", 1, Failed(reason=FailureReason.INTERNAL, message="late"))
    assert store.finish("j", 1, DONE)  # sent again, for the same reason
    events = [event for _, event in store.read_events("j")]
    assert [(event.type, getattr(event, "images", None)) for event in events] == [("queued", None), ("done", 1)]
    assert store.get("j").state == "done"
    assert store.confirm_delivery("j") and not store.confirm_delivery("j")  # awaited its delivery, once


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
    assert store.create("a", {"prompt": "x"}, "cli", "alice", max_queued=2) == ("ok", 1)
    assert store.create("b", {"prompt": "x"}, "cli", "bob", max_queued=2) == ("ok", 2)
    assert store.create("c", {"prompt": "x"}, "cli", "alice", max_queued=2) == ("queue_full", 2)
    assert store.create("c", {"prompt": "x"}, "cli", "alice", max_queued=3, max_for_owner=1) == ("owner_limit", 1)
    assert store.claim("a", 1, "w1") == "ok"  # running jobs count too
    assert store.create("c", {"prompt": "x"}, "cli", "alice", max_queued=3, max_for_owner=2) == ("ok", 2)
    assert store.create("d", {"prompt": "x"}, "cli", "alice", max_queued=3, max_for_owner=2) == ("owner_limit", 2)
    assert store.create("e", {"prompt": "x"}, "cli", "bob", max_queued=4, max_for_owner=2) == ("ok", 3)  # bob's own


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


def test_each_job_end_is_counted_once_with_its_reason(store):
    for job_id in ("done", "refused", "queued", "lost", "cancelling"):
        store.create(job_id, {"prompt": "x"}, "cli", "", max_queued=10)
    for job_id in ("done", "refused", "lost", "cancelling"):
        assert store.claim(job_id, 1, "w1") == "ok"
    refused = Failed(reason=FailureReason.ADAPTER, message="no such adapter")
    assert store.finish("done", 1, DONE)
    assert store.finish("refused", 1, refused)
    # Sent again after Redis restarted before answering: the same attempt's own outcome, counted once.
    assert store.finish("refused", 1, refused)
    assert not store.finish("refused", 1, DONE)  # another outcome for an ended job
    assert store.cancel("queued") == "cancelled" and store.cancel("queued") == "cancelled"
    assert store.requeue_if_dead("lost", time.time() + 1, max_attempts=1) == 0
    assert store.cancel("cancelling") == "cancelling"
    assert store.requeue_if_dead("cancelling", time.time() + 1, max_attempts=3) == -2

    counters = store.counters()
    assert counters.failures == {
        "rejected": 0,
        "adapter": 1,
        "out_of_memory": 0,
        "timeout": 0,
        "worker_lost": 1,
        "message_lost": 0,
        "internal": 0,
    }
    assert counters.cancelled == 2
    assert store.recent_failures() == {"adapter": 1, "worker_lost": 1}


def test_durations_make_a_cumulative_histogram_and_keep_the_latest(store):
    for seconds in (0.05, 0.3, 7.0):
        store.record_duration("render", seconds)
    render = store.durations("render")
    assert render.count == 3 and render.sum_s == pytest.approx(7.35)
    buckets = dict(render.buckets)
    assert (buckets[0.1], buckets[0.5], buckets[5], buckets[10], buckets[1800]) == (1, 2, 2, 3, 3)
    assert render.recent == [7.0, 0.3, 0.05] and render.recent_median == 0.3
    assert store.durations("queue_wait").count == 0 and store.durations("queue_wait").recent_median is None


def test_an_attempt_that_lost_its_job_is_not_told_it_finished_it(store):
    store.create("j", {"prompt": "x"}, "cli", "", max_queued=10)
    assert store.claim("j", 1, "w1") == "ok"
    assert store.requeue_if_dead("j", time.time() + 1, max_attempts=1) == 0  # w1 fell silent: failed for good
    assert not store.finish("j", 1, Failed(reason=FailureReason.TIMEOUT, message="too slow"))
    assert store.get("j").reason == "worker_lost"
    events = [event for _, event in store.read_events("j")]
    assert [(event.type, getattr(event, "reason", None)) for event in events] == [
        ("queued", None),
        ("failed", "worker_lost"),
    ]
    assert "stopped its worker 1 times" in events[1].message


def test_a_job_ends_with_exactly_one_terminal_event(store):
    store.create("queued", {"prompt": "x"}, "cli", "", max_queued=10)
    assert store.cancel("queued") == "cancelled" and store.cancel("queued") == "cancelled"
    queued = [event for _, event in store.read_events("queued")]
    assert [(event.type, getattr(event, "position", None)) for event in queued] == [("queued", 1), ("cancelled", None)]
    store.create("running", {"prompt": "x"}, "cli", "", max_queued=10)
    assert store.claim("running", 1, "w1") == "ok" and store.cancel("running") == "cancelling"
    store.redis.expire(store.key("job", "running"), 5)  # a job that waited and rendered for nearly RESULT_TTL_S
    assert store.requeue_if_dead("running", time.time() + 1, max_attempts=3) == -2  # its worker died meanwhile
    assert not store.finish(
        "running", 1, Cancelled(message="Cancelled while rendering.")
    )  # the worker, back, too late
    events = [event for _, event in store.read_events("running")]
    assert [event.type for event in events] == ["queued", "cancelled"] and events[1].job_id == "running"
    # Written by Lua: "ts" stays Redis's clock to the microsecond, a float like every event's.
    raw = [entry[b"event"] for _, entry in store.redis.xrange(store.key("job", "running", "events"))]
    assert all(isinstance(json.loads(event)["ts"], float) for event in raw)
    assert store.redis.ttl(store.key("job", "running")) > 50  # the end of a job renews its time in Redis
