"""Job state, progress events and results in Redis, shared by front ends and workers.

Results travel through Redis rather than a shared disk, so a front end on another machine than the
worker gets them. Every state change is a small Lua script, so that a job redelivered after a worker
died, a stale broker message and a cancel racing a start all resolve to one outcome.

Keys (under the configured prefix):
  job:{id}           hash   options, state, attempt, worker, timestamps, error
  job:{id}:events    stream one JSON event per entry, in order
  job:{id}:result    hash   `meta` (JSON) and `png:{i}` (bytes)
  pending            zset   queued job ids by submission time: queue positions and the cap
  running            set    job ids a worker has claimed: the janitor looks here for dead workers
  finished:{client}  zset   finished jobs nobody has confirmed delivery of, per front end
  workers            hash   worker name -> its latest status (JSON)
  reloads            stream adapter reload requests; reload:{request id} holds each worker's answer
  counters           hash   jobs failed (per reason) and cancelled, adapter loads (per outcome), for ever
  recent_failures    zset   `reason:job id` of the last hour's failures, by time
  duration:{name}    hash   a histogram of `render` and `queue_wait` seconds: count, sum, one count per bound
  recent:{name}      list   the latest of those durations, for medians and estimates
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

TERMINAL_EVENTS = ("done", "failed", "cancelled")
CreateRefusal = Literal["queue_full", "owner_limit"]
FAILURE_REASONS = ("rejected", "adapter", "out_of_memory", "timeout", "worker_lost", "internal")
"""Why a job failed: refused options, a missing or refused adapter, out of memory, over JOB_TIME_LIMIT_S,
its worker died under it MAX_JOB_ATTEMPTS times, anything else. A fixed set, so a metric's label stays small."""
ADAPTER_LOAD_OUTCOMES = ("loaded", "unchanged", "failed")
DURATIONS = ("render", "queue_wait")
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
"""Upper bounds of the duration histograms: from the tiny model on a CPU to SD at 1024 px behind a long queue."""
RECENT_DURATIONS_KEPT = 50
RECENT_FAILURES_S = 3600

# Counts a job's end; the scripts that end a job start with it, so that each job is counted in the same
# atomic step that ends it: once, however many attempts, redeliveries and cancels race for it.
_COUNT_END = f"""
local function count_end(counters, recent_failures, state, reason, now, job_id)
  if state == 'failed' then
    redis.call('HINCRBY', counters, 'failed:' .. reason, 1)
    redis.call('ZADD', recent_failures, now, reason .. ':' .. job_id)
    redis.call('ZREMRANGEBYSCORE', recent_failures, '-inf', tonumber(now) - {RECENT_FAILURES_S})
  elseif state == 'cancelled' then
    redis.call('HINCRBY', counters, 'cancelled', 1)
  end
end
"""

# Claim a queued job for one attempt. A message whose attempt is not the job's current one is a
# leftover of a redelivery (the broker restores unacked messages late) and is dropped.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
if state == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  return 'ok'  -- this worker's own claim, sent again after Redis restarted before answering it
end
if state ~= 'queued' then return state end
redis.call('HSET', KEYS[1], 'state', 'running', 'worker', ARGV[2], 'started_at', ARGV[3], 'heartbeat_at', ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[4])
redis.call('SADD', KEYS[3], ARGV[4])
return 'ok'
"""

# Finish the attempt that holds the job; anything else (a superseded attempt) changes nothing. The
# result this attempt staged becomes the job's result only here, so a superseded attempt that ran on
# (a worker cut off from Redis for a while) can never replace the result of the attempt that won.
_FINISH = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[2] and redis.call('HGET', KEYS[1], 'attempt') == ARGV[1] then
  return 1  -- this attempt's own finish, sent again after Redis restarted before answering it
end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then
  redis.call('DEL', KEYS[4])
  return 0
end
if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('RENAME', KEYS[4], KEYS[5]) end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3], 'error', ARGV[4], 'reason', ARGV[5])
redis.call('SREM', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
count_end(KEYS[6], KEYS[7], ARGV[2], ARGV[5], ARGV[3], ARGV[6])
return 1
"""

# Refresh the heartbeat of the attempt that holds the job; 0 tells a worker it no longer does.
_HEARTBEAT = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'worker') ~= ARGV[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[3])
return 1
"""

_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZADD', KEYS[3], ARGV[1], ARGV[2])
  count_end(KEYS[4], KEYS[5], 'cancelled', '', ARGV[1], ARGV[2])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return state
"""

# Put back a job whose worker stopped sending heartbeats, or fail it once it has used its attempts.
_REQUEUE = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  redis.call('SREM', KEYS[2], ARGV[3])  -- its record expired: nothing left to run
  return -1
end
if state ~= 'running' then return -1 end
local heartbeat = tonumber(redis.call('HGET', KEYS[1], 'heartbeat_at'))
if heartbeat and heartbeat > tonumber(ARGV[1]) and redis.call('HGET', KEYS[1], 'worker') ~= ARGV[5] then
  return -1
end
local attempt = tonumber(redis.call('HGET', KEYS[1], 'attempt'))
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[4])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  count_end(KEYS[5], KEYS[6], 'cancelled', '', ARGV[4], ARGV[3])
  return -2
end
if attempt >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[4], 'reason', 'worker_lost',
             'error', 'This job stopped its worker ' .. attempt ..
             ' times (killed or crashed mid-render), so it was not run again. Try a smaller size or fewer images.')
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  count_end(KEYS[5], KEYS[6], 'failed', 'worker_lost', ARGV[4], ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', attempt + 1)
-- At the back of the queue, where the broker puts its new message.
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
return attempt + 1
"""


@dataclass
class JobRecord:
    job_id: str
    state: str
    options: dict[str, Any]
    client: str
    owner: str
    attempt: int
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class DurationStats:
    """A duration histogram over the service's life, and its latest samples."""

    count: int
    sum_s: float
    buckets: list[tuple[float, int]]
    """(upper bound, how many durations were at most that), for each of DURATION_BUCKETS_S."""
    recent: list[float]
    """The latest RECENT_DURATIONS_KEPT durations, newest first."""

    @property
    def recent_mean(self) -> float | None:
        return statistics.fmean(self.recent) if self.recent else None

    @property
    def recent_median(self) -> float | None:
        return statistics.median(self.recent) if self.recent else None


@dataclass(frozen=True)
class ServiceCounters:
    """Counts over the service's life (as long as Redis keeps its data)."""

    failures: dict[str, int]
    """Failed jobs by reason: every one of FAILURE_REASONS, zeros included."""
    cancelled: int
    adapter_loads: dict[str, int]
    """Adapter loads by the workers, at start and on reload requests, by outcome (ADAPTER_LOAD_OUTCOMES)."""


@dataclass
class EventCursor:
    """Where a follower is in a job's event stream."""

    last_id: str = "0"
    last_position: int | None = None


@dataclass
class JobResult:
    """What a finished job produced: its metadata and the PNG bytes of each image that passed."""

    meta: dict[str, Any]
    images: list[bytes] = field(default_factory=list)

    def delivered_images(self) -> list[tuple[dict[str, Any], bytes]]:
        """Each image's metadata with its PNG, for the images the safety checker did not withhold."""
        kept = [image for image in self.meta["images"] if not image["withheld"]]
        return list(zip(kept, self.images, strict=True))

    def file_name(self, image: dict[str, Any]) -> str:
        return f"{self.meta['job_id']}-{image['index']}-seed{image['seed']}.png"


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _number(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


class JobStore:
    def __init__(self, redis_client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.ttl_s = ttl_s
        self._claim = redis_client.register_script(_CLAIM)
        self._finish = redis_client.register_script(_COUNT_END + _FINISH)
        self._cancel = redis_client.register_script(_COUNT_END + _CANCEL)
        self._requeue = redis_client.register_script(_COUNT_END + _REQUEUE)
        self._heartbeat = redis_client.register_script(_HEARTBEAT)

    @classmethod
    def from_url(cls, url: str, prefix: str, ttl_s: int, quick_retries: int | None = None) -> JobStore:
        """A store on the Redis at `url`. Each command is retried through a short outage (redis-py's
        default: 10 tries over a few seconds); `quick_retries` gives up sooner, after that many tries
        within about half a second, for a front end that owes someone an answer (Discord's 3 s)."""
        options: dict[str, Any] = {}
        if quick_retries is not None:
            options["retry"] = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), quick_retries)
        # A timeout, so that a half-open connection fails a call instead of hanging a worker or the bot.
        return cls(redis.Redis.from_url(url, health_check_interval=30, socket_timeout=30, **options), prefix, ttl_s)

    def now(self) -> float:
        """Redis's clock: workers, bots and CLIs on several machines compare times, so they share one clock."""
        seconds, microseconds = self.redis.time()
        return seconds + microseconds / 1e6

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _job_keys(self, job_id: str) -> list[str]:
        return [self.key("job", job_id), self.key("job", job_id, "events"), self.key("job", job_id, "result")]

    def _end_counter_keys(self) -> list[str]:
        return [self.key("counters"), self.key("recent_failures")]

    def _touch(self, pipe: redis.client.Pipeline, job_id: str) -> None:
        for key in self._job_keys(job_id):
            pipe.expire(key, self.ttl_s)

    # Submission and queue -------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        options: dict[str, Any],
        client: str,
        owner: str,
        max_queued: int,
        max_for_owner: int | None = None,
    ) -> int | CreateRefusal:
        """Record a queued job and return its position (1 = next), or why it was not recorded: the queue
        holds `max_queued` jobs, or `owner` already has `max_for_owner` jobs queued or running.

        Both checks and the write are one transaction: submissions racing each other cannot pass a
        limit together."""
        pending, running = self.key("pending"), self.key("running")
        now = self.now()
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(pending, running)
                    if pipe.zcard(pending) >= max_queued:
                        pipe.unwatch()
                        return "queue_full"
                    if max_for_owner is not None and len(self._owned(pipe, owner)) >= max_for_owner:
                        pipe.unwatch()
                        return "owner_limit"
                    pipe.multi()
                    pipe.hset(
                        self.key("job", job_id),
                        mapping={
                            "state": "queued",
                            "options": json.dumps(options),
                            "client": client,
                            "owner": owner,
                            "attempt": 1,
                            "submitted_at": now,
                        },
                    )
                    pipe.zadd(pending, {job_id: now})
                    self._touch(pipe, job_id)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self.position(job_id)

    def position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self.key("pending"), job_id)
        return None if rank is None else rank + 1

    def queue_length(self) -> int:
        return self.redis.zcard(self.key("pending"))

    def pending_for_owner(self, owner: str) -> list[str]:
        """Jobs of `owner` queued or running."""
        return self._owned(self.redis, owner)

    def _owned(self, reader: redis.Redis | redis.client.Pipeline, owner: str) -> list[str]:
        ids = [member.decode() for member in reader.zrange(self.key("pending"), 0, -1)]
        running = [member.decode() for member in reader.smembers(self.key("running"))]
        return [job_id for job_id in ids + running if reader.hget(self.key("job", job_id), "owner") == owner.encode()]

    def prune(self) -> int:
        """Forget queue and delivery entries of jobs whose records expired (RESULT_TTL_S), so that a
        lost message can never hold a place under the queue cap for ever. Returns how many went."""
        removed = 0
        for index_key in [self.key("pending"), *self.redis.scan_iter(match=self.key("finished", "*"))]:
            for member in self.redis.zrange(index_key, 0, -1):
                if not self.redis.exists(self.key("job", member.decode())):
                    removed += self.redis.zrem(index_key, member)
        return removed

    def running_jobs(self) -> list[str]:
        return sorted(member.decode() for member in self.redis.smembers(self.key("running")))

    # Job life ---------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self.key("job", job_id))
        if not raw:
            return None
        return JobRecord(
            job_id=job_id,
            state=raw[b"state"].decode(),
            options=json.loads(raw[b"options"]),
            client=raw.get(b"client", b"").decode(),
            owner=raw.get(b"owner", b"").decode(),
            attempt=int(raw[b"attempt"]),
            submitted_at=float(raw[b"submitted_at"]),
            started_at=_number(raw.get(b"started_at")),
            finished_at=_number(raw.get(b"finished_at")),
            worker=_text(raw.get(b"worker")),
            error=_text(raw.get(b"error")) or None,
            reason=_text(raw.get(b"reason")) or None,
        )

    def claim(self, job_id: str, attempt: int, worker: str) -> str:
        """'ok' when this worker now runs the job; otherwise why not ('stale', 'cancelled', 'done', ...)."""
        keys = [self.key("job", job_id), self.key("pending"), self.key("running")]
        return self._claim(keys=keys, args=[attempt, worker, self.now(), job_id]).decode()

    def heartbeat(self, job_id: str, attempt: int, worker: str) -> bool:
        """Say the attempt is alive; False when it no longer holds the job (requeued, cancelled, expired)."""
        return bool(self._heartbeat(keys=[self.key("job", job_id)], args=[attempt, worker, self.now()]))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.key("job", job_id), "cancel_requested") == b"1"

    def finish(
        self, job_id: str, attempt: int, state: str, error: str = "", reason: str = "", client: str = ""
    ) -> bool:
        keys = [
            self.key("job", job_id),
            self.key("running"),
            self.key("finished", client),
            self._staged_result_key(job_id, attempt),
            self.key("job", job_id, "result"),
            *self._end_counter_keys(),
        ]
        args = [attempt, state, self.now(), error, reason, job_id]
        return bool(self._finish(keys=keys, args=args))

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job ('cancelled'), ask a running one to stop ('cancelling'), or say its state."""
        record = self.get(job_id)
        client = record.client if record else ""
        keys = [self.key("job", job_id), self.key("pending"), self.key("finished", client), *self._end_counter_keys()]
        outcome = self._cancel(keys=keys, args=[self.now(), job_id]).decode()
        if outcome == "cancelled":
            self.append_event(job_id, {"type": "cancelled", "message": "Cancelled while queued."})
        return outcome

    def requeue_if_dead(self, job_id: str, dead_before: float, max_attempts: int, dead_worker: str = "") -> int:
        """Requeue a running job whose heartbeat is older than `dead_before` (or whose worker is
        `dead_worker`). Returns the new attempt, 0 when it has failed for good, -1 when it was alive,
        -2 when it was being cancelled (it is now)."""
        record = self.get(job_id)
        client = record.client if record else ""
        keys = [
            self.key("job", job_id),
            self.key("running"),
            self.key("finished", client),
            self.key("pending"),
            *self._end_counter_keys(),
        ]
        return int(self._requeue(keys=keys, args=[dead_before, max_attempts, job_id, self.now(), dead_worker]))

    # Events -----------------------------------------------------------------------------------

    def append_event(self, job_id: str, event: dict[str, Any]) -> None:
        event = {"job_id": job_id, "ts": self.now(), **event}
        with self.redis.pipeline() as pipe:
            pipe.xadd(self.key("job", job_id, "events"), {"event": json.dumps(event)}, maxlen=2000, approximate=True)
            self._touch(pipe, job_id)
            pipe.execute()

    def read_events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, dict]]:
        """Events after the stream id `after`, waiting up to `block_ms` for the first one."""
        answer = self.redis.xread({self.key("job", job_id, "events"): after}, block=block_ms, count=100)
        if not answer:
            return []
        return [(entry_id.decode(), json.loads(fields[b"event"])) for entry_id, fields in answer[0][1]]

    def poll_events(self, job_id: str, cursor: EventCursor, block_ms: int | None = None) -> list[dict[str, Any]]:
        """The job's next events after `cursor` (which it advances), waiting up to `block_ms` for one.
        While the job waits in the queue, a fresh `queued` event reports each change of its position.
        Raises LookupError once the job is unknown or expired."""
        events = []
        for entry_id, event in self.read_events(job_id, cursor.last_id, block_ms=block_ms):
            cursor.last_id = entry_id
            if event["type"] == "queued":
                cursor.last_position = event.get("position")
            events.append(event)
        if events:
            return events
        position = self.position(job_id)
        if position is not None and cursor.last_position is not None and position != cursor.last_position:
            cursor.last_position = position
            return [{"type": "queued", "job_id": job_id, "ts": self.now(), "position": position}]
        if not self.redis.exists(self.key("job", job_id)):
            raise LookupError(f"job {job_id} is unknown or has expired")
        return []

    def follow(self, job_id: str, poll_s: float = 1.0, outage_s: float = 120.0) -> Iterator[dict[str, Any]]:
        """Yield the job's events in order until a terminal one (see `poll_events`).

        Rides out a Redis restart of up to `outage_s`: the cursor keeps its place in the job's event
        stream, which a persistent Redis brings back, so no event is missed or repeated."""
        cursor = EventCursor()
        unreachable_since: float | None = None
        while True:
            try:
                events = self.poll_events(job_id, cursor, block_ms=int(poll_s * 1000))
            except (redis.ConnectionError, redis.TimeoutError):
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > outage_s:
                    raise
                time.sleep(poll_s)
                continue
            unreachable_since = None
            for event in events:
                yield event
                if event["type"] in TERMINAL_EVENTS:
                    return

    # Results ----------------------------------------------------------------------------------

    def _staged_result_key(self, job_id: str, attempt: int) -> str:
        return self.key("job", job_id, f"result.{attempt}")

    def stage_result(self, job_id: str, attempt: int, result: JobResult) -> None:
        """Store one attempt's result; `finish(..., "done")` makes it the job's result."""
        key = self._staged_result_key(job_id, attempt)
        with self.redis.pipeline() as pipe:
            pipe.delete(key)
            mapping: dict[str, Any] = {"meta": json.dumps(result.meta)}
            mapping.update({f"png:{index}": png for index, png in enumerate(result.images)})
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, self.ttl_s)
            self._touch(pipe, job_id)
            pipe.execute()

    def load_result(self, job_id: str) -> JobResult | None:
        raw = self.redis.hgetall(self.key("job", job_id, "result"))
        if not raw:
            return None
        images = [raw[f"png:{index}".encode()] for index in range(len(raw) - 1)]
        return JobResult(meta=json.loads(raw[b"meta"]), images=images)

    def undelivered(self, client: str) -> list[str]:
        return [member.decode() for member in self.redis.zrange(self.key("finished", client), 0, -1)]

    def confirm_delivery(self, job_id: str) -> bool:
        """Forget a finished job's result once its front end has delivered it. True for the first caller
        only, so two front ends (or a restarted one) never deliver the same job twice."""
        record = self.get(job_id)
        if record is None:
            return False
        removed = self.redis.zrem(self.key("finished", record.client), job_id)
        if removed:
            self.redis.delete(self.key("job", job_id, "result"))
        return bool(removed)

    # Workers and statistics -------------------------------------------------------------------

    def record_duration(self, name: str, seconds: float) -> None:
        """One `render` or `queue_wait` duration: into its histogram (for Prometheus) and its recent samples."""
        if name not in DURATIONS:
            raise ValueError(f"unknown duration {name!r}; expected one of {DURATIONS}")
        histogram = self.key("duration", name)
        # One transaction, so that a scrape never sees the count without the bounds it counts in.
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(histogram, "count", 1)
            pipe.hincrbyfloat(histogram, "sum", seconds)
            for bound in DURATION_BUCKETS_S:
                if seconds <= bound:
                    pipe.hincrby(histogram, f"le:{bound}", 1)
            pipe.lpush(self.key("recent", name), seconds)
            pipe.ltrim(self.key("recent", name), 0, RECENT_DURATIONS_KEPT - 1)
            pipe.execute()

    def durations(self, name: str) -> DurationStats:
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(self.key("duration", name))
            pipe.lrange(self.key("recent", name), 0, -1)
            histogram, recent = pipe.execute()
        return DurationStats(
            count=int(histogram.get(b"count", 0)),
            sum_s=float(histogram.get(b"sum", 0.0)),
            buckets=[(bound, int(histogram.get(f"le:{bound}".encode(), 0))) for bound in DURATION_BUCKETS_S],
            recent=[float(value) for value in recent],
        )

    def record_adapter_load(self, outcome: str) -> None:
        if outcome not in ADAPTER_LOAD_OUTCOMES:
            raise ValueError(f"unknown adapter load outcome {outcome!r}; expected one of {ADAPTER_LOAD_OUTCOMES}")
        self.redis.hincrby(self.key("counters"), f"adapter_loads:{outcome}", 1)

    def counters(self) -> ServiceCounters:
        raw = {name.decode(): int(value) for name, value in self.redis.hgetall(self.key("counters")).items()}

        def by_label(kind: str, labels: tuple[str, ...]) -> dict[str, int]:
            counts = dict.fromkeys(labels, 0)
            # A label outside the known set (a newer worker's) is kept rather than hidden.
            counts.update({name.split(":", 1)[1]: value for name, value in raw.items() if name.startswith(f"{kind}:")})
            return counts

        return ServiceCounters(
            failures=by_label("failed", FAILURE_REASONS),
            cancelled=raw.get("cancelled", 0),
            adapter_loads=by_label("adapter_loads", ADAPTER_LOAD_OUTCOMES),
        )

    def recent_failures(self) -> dict[str, int]:
        """Failures of the last hour (RECENT_FAILURES_S), by reason."""
        members = self.redis.zrangebyscore(self.key("recent_failures"), self.now() - RECENT_FAILURES_S, "+inf")
        return dict(Counter(member.decode().split(":", 1)[0] for member in members))

    def publish_worker(self, name: str, status: dict[str, Any]) -> None:
        self.redis.hset(self.key("workers"), name, json.dumps({**status, "heartbeat_at": self.now()}))

    def remove_worker(self, name: str) -> None:
        self.redis.hdel(self.key("workers"), name)

    def workers(self, alive_within_s: float) -> dict[str, dict[str, Any]]:
        """Workers whose last heartbeat is recent enough to count them as online."""
        now = self.now()
        statuses = {name.decode(): json.loads(raw) for name, raw in self.redis.hgetall(self.key("workers")).items()}
        return {name: status for name, status in statuses.items() if now - status["heartbeat_at"] <= alive_within_s}

    def request_reload(self, adapter: str | None) -> str:
        """Record a reload of one adapter (None: all); returns the request id the answers are filed under."""
        entry = {"adapter": adapter or "*", "requested_at": self.now()}
        return self.redis.xadd(self.key("reloads"), {"request": json.dumps(entry)}, maxlen=1000).decode()

    def reload_requests_after(self, request_id: str) -> list[tuple[str, dict[str, Any]]]:
        entries = self.redis.xrange(self.key("reloads"), min=f"({request_id}" if request_id != "0" else "-")
        return [(entry_id.decode(), json.loads(fields[b"request"])) for entry_id, fields in entries]

    def latest_reload_request(self) -> str:
        entries = self.redis.xrevrange(self.key("reloads"), count=1)
        return entries[0][0].decode() if entries else "0"

    def answer_reload(self, request_id: str, worker: str, answers: list[dict[str, Any]]) -> None:
        key = self.key("reload", request_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, worker, json.dumps(answers))
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def reload_answers(self, request_id: str) -> dict[str, list[dict[str, Any]]]:
        raw = self.redis.hgetall(self.key("reload", request_id))
        return {worker.decode(): json.loads(answers) for worker, answers in raw.items()}
