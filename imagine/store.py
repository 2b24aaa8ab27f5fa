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
  dead_letters       list   the latest queue messages workers refused (not a job of ours), newest first

Every reader takes a record it cannot parse (a bug, an old version, a hostile client writing to Redis)
for absent: it is skipped and logged once with its key, and everything else goes on.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imagine.logs import OncePerKey

logger = logging.getLogger(__name__)

TERMINAL_EVENTS = ("done", "failed", "cancelled")
REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
"""What a call raises while Redis is away (restarting, or not there at all)."""
CreateOutcome = tuple[Literal["ok", "queue_full", "owner_limit"], int]
FAILURE_REASONS = ("rejected", "adapter", "out_of_memory", "timeout", "worker_lost", "message_lost", "internal")
"""Why a job failed: refused options, a missing or refused adapter, out of memory, over JOB_TIME_LIMIT_S,
its worker died under it MAX_JOB_ATTEMPTS times, its queue message went missing MAX_JOB_ATTEMPTS times,
anything else. A fixed set, so a metric's label stays small."""
ADAPTER_LOAD_OUTCOMES = ("loaded", "unchanged", "failed")
DEAD_LETTER_KINDS = ("undecodable", "not_a_job", "unknown_job", "disagrees")
"""Why a worker refused a queue message (imagine.queue.RefusedMessage)."""
WORKER_STATUS_FIELDS = frozenset({"heartbeat_at", "device", "base_model", "adapters", "jobs_done"})
"""What a worker's status must hold for the readers of `workers`."""
DURATIONS = ("render", "queue_wait")
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
"""Upper bounds of the duration histograms: from the tiny model on a CPU to SD at 1024 px behind a long queue."""
RECENT_DURATIONS_KEPT = 50
RECENT_FAILURES_S = 3600
MAX_EVENTS = 2000
"""Events kept per job (about: Redis trims streams in whole nodes)."""
DEAD_LETTERS_KEPT = 100
DEAD_LETTER_BYTES = 64 * 1024
"""How much of a refused message a dead letter keeps."""
REDIS_OUTAGE_S = 300.0
"""How long a worker holding a finished render, or a front end following a job, waits for Redis to come back."""

# A job's events, written by the scripts that change its state in the same atomic step. The event's
# "ts" is spliced in as the caller wrote it: cjson would round it to 14 digits, sometimes to an integer.
_EVENTS = f"""
local function event_json(job_id, now, fields)
  return '{{"job_id":' .. cjson.encode(job_id) .. ',"ts":' .. now .. ',' .. string.sub(cjson.encode(fields), 2)
end
local function add_event(events, event, ttl)
  redis.call('XADD', events, 'MAXLEN', '~', {MAX_EVENTS}, '*', 'event', event)
  redis.call('EXPIRE', events, ttl)
end
"""

# Ends a job: its final state, its place among the client's finished jobs, its count, and its terminal
# event (what every follower waits for). The scripts that end a job start with this function, so all of
# it happens in the one atomic step that ends the job: once, however many attempts, redeliveries and
# cancels race for it, and never a final state without its event (nor an event twice).
# keys: job, finished, counters, recent_failures, events.
_END_JOB = f"""
local function end_job(keys, state, reason, now, job_id, event, ttl)
  redis.call('HSET', keys[1], 'state', state, 'finished_at', now)
  redis.call('EXPIRE', keys[1], ttl)  -- from the end: a late front end still finds the job and its outcome
  redis.call('ZADD', keys[2], now, job_id)
  if state == 'failed' then
    redis.call('HINCRBY', keys[3], 'failed:' .. reason, 1)
    redis.call('ZADD', keys[4], now, reason .. ':' .. job_id)
    redis.call('ZREMRANGEBYSCORE', keys[4], '-inf', tonumber(now) - {RECENT_FAILURES_S})
  elseif state == 'cancelled' then
    redis.call('HINCRBY', keys[3], 'cancelled', 1)
  end
  add_event(keys[5], event, ttl)
end
"""

# Queue a new job unless the queue, or its owner's share of it, is full, with its first event.
# KEYS: job, pending, running, events. ARGV: job id, options, client, owner, now, max queued,
# max for the owner ('' for none), ttl, prefix of job keys (owners are read from the jobs queued or running:
# keys the script names itself, which a single Redis allows and Redis Cluster would not).
_CREATE = """
local queued = redis.call('ZCARD', KEYS[2])
if queued >= tonumber(ARGV[6]) then return {'queue_full', queued} end
if ARGV[7] ~= '' then
  local owned = 0
  for _, ids in ipairs({redis.call('ZRANGE', KEYS[2], 0, -1), redis.call('SMEMBERS', KEYS[3])}) do
    for _, id in ipairs(ids) do
      if redis.call('HGET', ARGV[9] .. id, 'owner') == ARGV[4] then owned = owned + 1 end
    end
  end
  if owned >= tonumber(ARGV[7]) then return {'owner_limit', owned} end
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'options', ARGV[2], 'client', ARGV[3], 'owner', ARGV[4],
           'attempt', 1, 'submitted_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], ARGV[8])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
local position = redis.call('ZRANK', KEYS[2], ARGV[1]) + 1
add_event(KEYS[4], event_json(ARGV[1], ARGV[5], {type = 'queued', position = position}), ARGV[8])
return {'ok', position}
"""

# Claim a queued job for one attempt. A message whose attempt is not the job's current one is a
# leftover of a redelivery (the broker restores unacked messages late) and is dropped.
_CLAIM = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 'stale' end
if state == 'running' and redis.call('HGET', KEYS[1], 'worker') == ARGV[2] then
  -- This worker's own claim, sent again after Redis restarted before answering it; the heartbeat is
  -- refreshed, or other workers would take the job for a dead worker's after a long outage.
  redis.call('HSET', KEYS[1], 'heartbeat_at', ARGV[3])
  return 'ok'
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
# KEYS: job, running, finished, staged result, result, counters, recent_failures, events.
# ARGV: attempt, state, now, error, reason, job id, terminal event (JSON), ttl.
_FINISH = """
if redis.call('HGET', KEYS[1], 'finished_attempt') == ARGV[1] and redis.call('HGET', KEYS[1], 'state') == ARGV[2] then
  return 1  -- this attempt's own finish, sent again after Redis restarted before answering it
end
if redis.call('HGET', KEYS[1], 'state') ~= 'running' or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then
  redis.call('DEL', KEYS[4])
  return 0
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('RENAME', KEYS[4], KEYS[5])
  redis.call('EXPIRE', KEYS[5], ARGV[8])
end
redis.call('HSET', KEYS[1], 'error', ARGV[4], 'reason', ARGV[5], 'finished_attempt', ARGV[1])
redis.call('SREM', KEYS[2], ARGV[6])
end_job({KEYS[1], KEYS[3], KEYS[6], KEYS[7], KEYS[8]}, ARGV[2], ARGV[5], ARGV[3], ARGV[6], ARGV[7], ARGV[8])
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

# KEYS: job, pending, finished, counters, recent_failures, events. ARGV: now, job id, terminal event, ttl.
_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('ZREM', KEYS[2], ARGV[2])
  end_job({KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, 'cancelled', '', ARGV[1], ARGV[2], ARGV[3], ARGV[4])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'cancelling'
end
return state
"""

# Put back a job whose worker stopped sending heartbeats, or fail it once it has used its attempts.
# KEYS: job, running, finished, pending, counters, recent_failures, events.
# ARGV: dead before, max attempts, job id, now, dead worker, ttl.
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
local ending = {KEYS[1], KEYS[3], KEYS[5], KEYS[6], KEYS[7]}
redis.call('SREM', KEYS[2], ARGV[3])
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  local message = 'Cancelled (its worker stopped).'
  local event = event_json(ARGV[3], ARGV[4], {type = 'cancelled', message = message})
  end_job(ending, 'cancelled', '', ARGV[4], ARGV[3], event, ARGV[6])
  return -2
end
if attempt >= tonumber(ARGV[2]) then
  local message = 'This job stopped its worker ' .. attempt ..
                  ' times (killed or crashed mid-render), so it was not run again. Try a smaller size or fewer images.'
  redis.call('HSET', KEYS[1], 'reason', 'worker_lost', 'error', message)
  local event = event_json(ARGV[3], ARGV[4], {type = 'failed', reason = 'worker_lost', message = message})
  end_job(ending, 'failed', 'worker_lost', ARGV[4], ARGV[3], event, ARGV[6])
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', attempt + 1)
-- At the back of the queue, where the broker puts its new message.
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
return attempt + 1
"""


# Send again a queued job whose message is on no queue (its front end died between recording the job and
# sending its message, or the queue was purged): move it to the back of the queue, where the new message
# goes, unless another worker's janitor did so first; fail it once it was sent again `max resends` times.
# KEYS: job, pending, finished, counters, recent_failures, events.
# ARGV: job id, attempt, its place in the queue when it was seen, now, max resends, ttl, message.
_RESEND = """
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' or redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[2] then
  return -1
end
local place = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]))
if place == nil or place ~= tonumber(ARGV[3]) then return -1 end
local resent = redis.call('HINCRBY', KEYS[1], 'resent', 1)
if resent > tonumber(ARGV[5]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HSET', KEYS[1], 'reason', 'message_lost', 'error', ARGV[7])
  local event = event_json(ARGV[1], ARGV[4], {type = 'failed', reason = 'message_lost', message = ARGV[7]})
  end_job({KEYS[1], KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, 'failed', 'message_lost', ARGV[4], ARGV[1], event, ARGV[6])
  return 0
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return resent
"""


class CorruptRecord(LookupError):
    """A job's record is in Redis but cannot be read: for its readers, the job is gone."""


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
    dead_letters: dict[str, int]
    """Queue messages the workers refused, by kind (DEAD_LETTER_KINDS)."""


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
        self._create = redis_client.register_script(_EVENTS + _CREATE)
        self._claim = redis_client.register_script(_CLAIM)
        self._finish = redis_client.register_script(_EVENTS + _END_JOB + _FINISH)
        self._cancel = redis_client.register_script(_EVENTS + _END_JOB + _CANCEL)
        self._requeue = redis_client.register_script(_EVENTS + _END_JOB + _REQUEUE)
        self._heartbeat = redis_client.register_script(_HEARTBEAT)
        self._resend = redis_client.register_script(_EVENTS + _END_JOB + _RESEND)
        self._unreadable = OncePerKey(logger)

    def _skip_unreadable(self, key: str, error: BaseException) -> None:
        self._unreadable.warning(key, "skipping an unreadable record at %s: %s", key, error or type(error).__name__)

    @classmethod
    def from_url(cls, url: str, prefix: str, ttl_s: int) -> JobStore:
        """A store on the Redis at `url`. A command is not retried here, where a retry after a lost answer
        could do a write twice: what must survive an outage retries at its own level, knowing what it
        writes (the worker's claim and outcome, `follow`)."""
        # A timeout, so that a half-open connection fails a call instead of hanging a worker or the bot;
        # a short connect timeout, so that with Redis's host gone the bot still answers within Discord's 3 s.
        client = redis.Redis.from_url(
            url, health_check_interval=30, socket_timeout=30, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        return cls(client, prefix, ttl_s)

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
    ) -> CreateOutcome:
        """Record a queued job: ("ok", its position, 1 = next). Or why it was not recorded, with the
        count that said no: ("queue_full", jobs queued) when the queue holds `max_queued` jobs,
        ("owner_limit", the owner's jobs) when `owner` has `max_for_owner` jobs queued or running.

        The checks and the write are one atomic step: submissions racing each other cannot pass a
        limit together."""
        keys = [self.key("job", job_id), self.key("pending"), self.key("running"), self.key("job", job_id, "events")]
        limit = "" if max_for_owner is None else max_for_owner
        job_prefix = self.key("job", "")
        args = [job_id, json.dumps(options), client, owner, self.now(), max_queued, limit, self.ttl_s, job_prefix]
        outcome, number = self._create(keys=keys, args=args)
        return outcome.decode(), int(number)

    def position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self.key("pending"), job_id)
        return None if rank is None else rank + 1

    def queue_length(self) -> int:
        return self.redis.zcard(self.key("pending"))

    def pending_for_owner(self, owner: str) -> list[str]:
        """Jobs of `owner` queued or running."""
        ids = [member.decode() for member in self.redis.zrange(self.key("pending"), 0, -1)]
        running = [member.decode() for member in self.redis.smembers(self.key("running"))]
        return [
            job_id for job_id in ids + running if self.redis.hget(self.key("job", job_id), "owner") == owner.encode()
        ]

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
        """The job's record, None when there is none; raises CorruptRecord when it cannot be read."""
        key = self.key("job", job_id)
        raw = self.redis.hgetall(key)
        if not raw:
            return None
        try:
            record = JobRecord(
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
            if not isinstance(record.options, dict):
                raise TypeError(f"options are a JSON {type(record.options).__name__}, not an object")
        except (KeyError, ValueError, TypeError, UnicodeDecodeError) as error:
            self._skip_unreadable(key, error)
            raise CorruptRecord(f"job {job_id}'s record cannot be read ({type(error).__name__}: {error})") from None
        return record

    def _client_of(self, job_id: str) -> str:
        """The front end that submitted a job ('' when unknown): its finished jobs are indexed under it."""
        return (self.redis.hget(self.key("job", job_id), "client") or b"").decode(errors="replace")

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
        self,
        job_id: str,
        attempt: int,
        state: str,
        event: dict[str, Any] | None = None,
        error: str = "",
        reason: str = "",
        client: str = "",
    ) -> bool:
        """End the job as `state` ('done', 'failed', 'cancelled') with its terminal event, of type `state`
        and the details in `event`, if `attempt` still holds it. Sent again after its answer was lost
        (a Redis restart), it answers True again and changes nothing."""
        now = self.now()
        keys = [
            self.key("job", job_id),
            self.key("running"),
            self.key("finished", client),
            self._staged_result_key(job_id, attempt),
            self.key("job", job_id, "result"),
            *self._end_counter_keys(),
            self.key("job", job_id, "events"),
        ]
        terminal = self._event_json(job_id, now, {"type": state, **(event or {})})
        args = [attempt, state, now, error, reason, job_id, terminal, self.ttl_s]
        return bool(self._finish(keys=keys, args=args))

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job ('cancelled'), ask a running one to stop ('cancelling'), or say its state."""
        keys = [
            self.key("job", job_id),
            self.key("pending"),
            self.key("finished", self._client_of(job_id)),
            *self._end_counter_keys(),
            self.key("job", job_id, "events"),
        ]
        now = self.now()
        terminal = self._event_json(job_id, now, {"type": "cancelled", "message": "Cancelled while queued."})
        return self._cancel(keys=keys, args=[now, job_id, terminal, self.ttl_s]).decode()

    def requeue_if_dead(self, job_id: str, dead_before: float, max_attempts: int, dead_worker: str = "") -> int:
        """Requeue a running job whose heartbeat is older than `dead_before` (or whose worker is
        `dead_worker`). Returns the new attempt, 0 when it has failed for good, -1 when it was alive,
        -2 when it was being cancelled (it is now)."""
        keys = [
            self.key("job", job_id),
            self.key("running"),
            self.key("finished", self._client_of(job_id)),
            self.key("pending"),
            *self._end_counter_keys(),
            self.key("job", job_id, "events"),
        ]
        args = [dead_before, max_attempts, job_id, self.now(), dead_worker, self.ttl_s]
        return int(self._requeue(keys=keys, args=args))

    # Events -----------------------------------------------------------------------------------

    @staticmethod
    def _event_json(job_id: str, now: float, event: dict[str, Any]) -> str:
        return json.dumps({"job_id": job_id, "ts": now, **event})

    def append_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Add a progress event (queued, started, step). Terminal events come with the end of the job."""
        payload = self._event_json(job_id, self.now(), event)
        with self.redis.pipeline() as pipe:
            pipe.xadd(self.key("job", job_id, "events"), {"event": payload}, maxlen=MAX_EVENTS, approximate=True)
            self._touch(pipe, job_id)
            pipe.execute()

    def _event_entries(
        self, job_id: str, after: str, block_ms: int | None = None
    ) -> list[tuple[str, dict[str, Any] | None]]:
        """Entries of the job's stream after `after`, each with its event or None when it cannot be read."""
        key = self.key("job", job_id, "events")
        answer = self.redis.xread({key: after}, block=block_ms, count=100)
        entries = []
        for entry_id, fields in answer[0][1] if answer else []:
            try:
                event = json.loads(fields[b"event"])
                if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                    raise ValueError("not an object with a type")
            except (KeyError, ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {entry_id.decode()}", error)
                event = None
            entries.append((entry_id.decode(), event))
        return entries

    def read_events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, dict]]:
        """Events after the stream id `after`, waiting up to `block_ms` for the first one."""
        return [(entry_id, event) for entry_id, event in self._event_entries(job_id, after, block_ms) if event]

    def poll_events(self, job_id: str, cursor: EventCursor, block_ms: int | None = None) -> list[dict[str, Any]]:
        """The job's next events after `cursor` (which it advances), waiting up to `block_ms` for one.
        While the job waits in the queue, a fresh `queued` event reports each change of its position.
        Raises LookupError once the job is unknown or expired."""
        events = []
        for entry_id, event in self._event_entries(job_id, cursor.last_id, block_ms=block_ms):
            cursor.last_id = entry_id  # past an unreadable entry too, or every poll would read it again
            if event is None:
                continue
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

    def follow(self, job_id: str, poll_s: float = 1.0, outage_s: float = REDIS_OUTAGE_S) -> Iterator[dict[str, Any]]:
        """Yield the job's events in order until a terminal one (see `poll_events`).

        Rides out a Redis restart of up to `outage_s`: the cursor keeps its place in the job's event
        stream, which a persistent Redis brings back, so no event is missed or repeated."""
        cursor = EventCursor()
        unreachable_since: float | None = None
        while True:
            try:
                events = self.poll_events(job_id, cursor, block_ms=int(poll_s * 1000))
            except REDIS_UNREACHABLE:
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
        """The job's result; None when there is none, or it cannot be read (logged once)."""
        key = self.key("job", job_id, "result")
        raw = self.redis.hgetall(key)
        if not raw:
            return None
        try:
            images = [raw[f"png:{index}".encode()] for index in range(len(raw) - 1)]
            meta = json.loads(raw[b"meta"])
            if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
                raise ValueError("its metadata is not an object with images")
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            self._skip_unreadable(key, error)
            return None
        return JobResult(meta=meta, images=images)

    def undelivered(self, client: str) -> list[str]:
        return [member.decode() for member in self.redis.zrange(self.key("finished", client), 0, -1)]

    def confirm_delivery(self, job_id: str) -> bool:
        """Forget a finished job's result once its front end has delivered it. True for the first caller
        only, so two front ends (or a restarted one) never deliver the same job twice."""
        if not self.redis.exists(self.key("job", job_id)):
            return False
        removed = self.redis.zrem(self.key("finished", self._client_of(job_id)), job_id)
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

    def _numbers(self, key: str, fields: dict[bytes, bytes], kind: type[int] | type[float] = int) -> dict[str, Any]:
        """A hash of counts or sums, without the fields that are not numbers (each logged once)."""
        numbers = {}
        for name, value in fields.items():
            try:
                numbers[name.decode()] = kind(value)
            except (ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {name.decode(errors='replace')}", error)
        return numbers

    def durations(self, name: str) -> DurationStats:
        histogram_key, recent_key = self.key("duration", name), self.key("recent", name)
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(histogram_key)
            pipe.lrange(recent_key, 0, -1)
            histogram, recent = pipe.execute()
        histogram = self._numbers(histogram_key, histogram, float)
        recent_s = self._numbers(recent_key, {str(i).encode(): value for i, value in enumerate(recent)}, float)
        return DurationStats(
            count=int(histogram.get("count", 0)),
            sum_s=histogram.get("sum", 0.0),
            buckets=[(bound, int(histogram.get(f"le:{bound}", 0))) for bound in DURATION_BUCKETS_S],
            recent=list(recent_s.values()),
        )

    def record_adapter_load(self, outcome: str) -> None:
        if outcome not in ADAPTER_LOAD_OUTCOMES:
            raise ValueError(f"unknown adapter load outcome {outcome!r}; expected one of {ADAPTER_LOAD_OUTCOMES}")
        self.redis.hincrby(self.key("counters"), f"adapter_loads:{outcome}", 1)

    def counters(self) -> ServiceCounters:
        raw = self._numbers(self.key("counters"), self.redis.hgetall(self.key("counters")))

        def by_label(kind: str, labels: tuple[str, ...]) -> dict[str, int]:
            counts = dict.fromkeys(labels, 0)
            # A label outside the known set (a newer worker's) is kept rather than hidden.
            counts.update({name.split(":", 1)[1]: value for name, value in raw.items() if name.startswith(f"{kind}:")})
            return counts

        return ServiceCounters(
            failures=by_label("failed", FAILURE_REASONS),
            cancelled=raw.get("cancelled", 0),
            adapter_loads=by_label("adapter_loads", ADAPTER_LOAD_OUTCOMES),
            dead_letters=by_label("dead_letters", DEAD_LETTER_KINDS),
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
        key = self.key("workers")
        online = {}
        for name, raw in self.redis.hgetall(key).items():
            try:
                status = json.loads(raw)
                missing = WORKER_STATUS_FIELDS - set(status) if isinstance(status, dict) else WORKER_STATUS_FIELDS
                if missing:
                    raise ValueError(f"no {', '.join(sorted(missing))}")
                if not isinstance(status["heartbeat_at"], (int, float)) or not isinstance(status["adapters"], dict):
                    raise ValueError("heartbeat_at is not a number or adapters not an object")
                worker = name.decode()
            except (ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {name.decode(errors='replace')}", error)
                continue
            if now - status["heartbeat_at"] <= alive_within_s:
                online[worker] = status
        return online

    def request_reload(self, adapter: str | None) -> str:
        """Record a reload of one adapter (None: all); returns the request id the answers are filed under."""
        entry = {"adapter": adapter or "*", "requested_at": self.now()}
        return self.redis.xadd(self.key("reloads"), {"request": json.dumps(entry)}, maxlen=1000).decode()

    def reload_requests_after(self, request_id: str) -> list[tuple[str, dict[str, Any] | None]]:
        """Reload requests after `request_id`, each with the request, or None when it cannot be read."""
        key = self.key("reloads")
        requests = []
        for entry_id, fields in self.redis.xrange(key, min=f"({request_id}" if request_id != "0" else "-"):
            try:
                request = json.loads(fields[b"request"])
                if not isinstance(request, dict) or not isinstance(request.get("adapter"), str):
                    raise ValueError("not an object naming an adapter")
            except (KeyError, ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {entry_id.decode()}", error)
                request = None
            requests.append((entry_id.decode(), request))
        return requests

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
        key = self.key("reload", request_id)
        answers = {}
        for worker, raw in self.redis.hgetall(key).items():
            try:
                parsed = json.loads(raw)
                if not isinstance(parsed, list) or not all(isinstance(answer, dict) for answer in parsed):
                    raise ValueError("not a list of answers")
                answers[worker.decode()] = parsed
            except (ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {worker.decode(errors='replace')}", error)
        return answers

    # Lost and refused messages ----------------------------------------------------------------

    def queued_before(self, before: float) -> list[tuple[str, float]]:
        """Jobs queued (or queued again) before the time `before`, with that time: their place in the queue."""
        return [
            (member.decode(), score)
            for member, score in self.redis.zrangebyscore(self.key("pending"), "-inf", before, withscores=True)
        ]

    def resend_lost(self, job_id: str, attempt: int, queued_at: float, max_resends: int) -> int:
        """Move a queued job whose message is lost to the back of the queue before its message is sent again.
        Returns how many times it was sent again; 0 when it failed instead (sent again `max_resends` times);
        -1 when it moved meanwhile (claimed, cancelled, or already sent again by another worker)."""
        keys = [
            self.key("job", job_id),
            self.key("pending"),
            self.key("finished", self._client_of(job_id)),
            *self._end_counter_keys(),
            self.key("job", job_id, "events"),
        ]
        message = (
            f"This job's message on the queue went missing {max_resends + 1} times (was the queue purged?), "
            "so it was not sent again; submit it again."
        )
        args = [job_id, attempt, queued_at, self.now(), max_resends, self.ttl_s, message]
        return int(self._resend(keys=keys, args=args))

    def record_dead_letter(self, kind: str, details: dict[str, Any], raw: bytes) -> None:
        """Keep a refused queue message (the latest DEAD_LETTERS_KEPT) and count it by kind."""
        letter = {
            "at": self.now(),
            "kind": kind,
            **details,
            "bytes": len(raw),
            "message": raw[:DEAD_LETTER_BYTES].decode(errors="replace"),
        }
        with self.redis.pipeline() as pipe:
            pipe.lpush(self.key("dead_letters"), json.dumps(letter))
            pipe.ltrim(self.key("dead_letters"), 0, DEAD_LETTERS_KEPT - 1)
            pipe.hincrby(self.key("counters"), f"dead_letters:{kind}", 1)
            pipe.execute()

    def dead_letters(self, count: int = DEAD_LETTERS_KEPT) -> list[dict[str, Any]]:
        """The latest refused messages, newest first."""
        key = self.key("dead_letters")
        letters = []
        for index, raw in enumerate(self.redis.lrange(key, 0, count - 1)):
            try:
                letter = json.loads(raw)
                if not isinstance(letter, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as error:
                self._skip_unreadable(f"{key} {index}", error)
                continue
            letters.append(letter)
        return letters
