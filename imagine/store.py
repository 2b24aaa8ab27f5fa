"""Job state, progress events and results in Redis, shared by front ends and workers.

Results travel through Redis rather than a shared disk, so a front end on another machine than the
worker gets them. Every state change is a small Lua script, so that a job redelivered after a worker
died, a stale broker message and a cancel racing a start all resolve to one outcome. What the keys
hold is typed in `imagine/wire.py`.

Keys (under the configured prefix):
  job:{id}           hash   options, state, attempt, worker, timestamps, error
  job:{id}:events    stream one JSON event per entry, in order
  job:{id}:result    hash   `meta` (JSON) and `png:{i}` (bytes)
  pending            zset   queued job ids by submission time: queue positions and the cap
  running            set    job ids a worker has claimed: the janitor looks here for dead workers
  finished:{client}  zset   finished jobs nobody has confirmed delivery of, per front end
  workers            hash   worker name -> its latest status (JSON)
  reloads            stream adapter reload requests; reload:{request id} holds each worker's answer
  counters           hash   jobs failed (per reason) and cancelled, adapter loads (per outcome), dead letters
                            (per kind), batches rendered uncompiled by compiled workers, for ever
  recent_failures    zset   `reason:job id` of the last hour's failures, by time
  duration:{name}    hash   a histogram of `render` and `queue_wait` seconds: count, sum, one count per bound
  recent:{name}      list   the latest of those durations, for medians and estimates
  dead_letters       list   the latest queue messages workers refused (not a job of ours), newest first
  {front end}:...    what a front end keeps for itself (`FrontEndRecords`): the bot's deliveries, cooldowns

Every reader takes a record it cannot parse (a bug, an old version, a hostile client writing to Redis)
for absent: it is skipped and logged once with its key, and everything else goes on.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import pydantic
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from imagine.logs import OncePerKey
from imagine.wire import (
    JOB_EVENT,
    TERMINAL_EVENTS,
    AdapterLoadOutcome,
    Cancelled,
    DeadLetter,
    DeadLetterKind,
    Failed,
    FailureReason,
    ImageInfo,
    JobEvent,
    JobState,
    Queued,
    ReloadAnswer,
    ResultMeta,
    TerminalEvent,
    WorkerStatus,
)

logger = logging.getLogger(__name__)

REDIS_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
"""What a call raises while Redis is away (restarting, or not there at all)."""
CreateOutcome = tuple[Literal["ok", "queue_full", "owner_limit"], int]
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
T = TypeVar("T")
UNREADABLE = (KeyError, ValueError, TypeError, UnicodeDecodeError, pydantic.ValidationError)
"""What reading a record that is not what it should be raises."""


class _Script:
    """A Lua script whose KEYS and ARGV have names. The script starts by binding each name, and a call
    passes each by name, so the two cannot disagree on an order, and a missing or unknown one raises."""

    def __init__(self, client: redis.Redis, keys: str, args: str, body: str, *helpers: str) -> None:
        self.keys, self.args = tuple(keys.split()), tuple(args.split())
        bindings = [f"local {name} = KEYS[{i}]" for i, name in enumerate(self.keys, 1)]
        bindings += [f"local {name} = ARGV[{i}]" for i, name in enumerate(self.args, 1)]
        self._script = client.register_script("\n".join([*helpers, *bindings, body]))

    def __call__(self, **values: Any) -> Any:
        if set(values) != {*self.keys, *self.args}:
            raise TypeError(f"this script takes {self.keys + self.args}, got {tuple(values)}")
        return self._script(keys=[values[name] for name in self.keys], args=[values[name] for name in self.args])


# A job's events, written by the scripts that change its state in the same atomic step. The event's
# "ts" is spliced in as the caller wrote it: cjson would round it to 14 digits, sometimes to an integer.
_EVENTS = f"""
local function event_json(job_id, now, fields)
  return '{{"job_id":' .. cjson.encode(job_id) .. ',"ts":' .. now .. ',' .. string.sub(cjson.encode(fields), 2)
end
local function add_event(events_key, event, ttl)
  redis.call('XADD', events_key, 'MAXLEN', '~', {MAX_EVENTS}, '*', 'event', event)
  redis.call('EXPIRE', events_key, ttl)
end
"""

# Ends a job: its final state, its place among the client's finished jobs, its count, and its terminal
# event (what every follower waits for). The scripts that end a job call this, so all of it happens in
# the one atomic step that ends the job: once, however many attempts, redeliveries and cancels race for
# it, and never a final state without its event (nor an event twice).
_END_JOB = f"""
local function end_job(job_key, finished_key, counters_key, recent_failures_key, events_key,
                       state, reason, now, job_id, event, ttl)
  redis.call('HSET', job_key, 'state', state, 'finished_at', now)
  redis.call('EXPIRE', job_key, ttl)  -- from the end: a late front end still finds the job and its outcome
  redis.call('ZADD', finished_key, now, job_id)
  if state == 'failed' then
    redis.call('HINCRBY', counters_key, 'failed:' .. reason, 1)
    redis.call('ZADD', recent_failures_key, now, reason .. ':' .. job_id)
    redis.call('ZREMRANGEBYSCORE', recent_failures_key, '-inf', tonumber(now) - {RECENT_FAILURES_S})
  elseif state == 'cancelled' then
    redis.call('HINCRBY', counters_key, 'cancelled', 1)
  end
  add_event(events_key, event, ttl)
end
"""
_ENDING_KEYS = "finished_key counters_key recent_failures_key events_key"

# Queue a new job unless the queue, or its owner's share of it, is full, with its first event (a Queued).
# The owner's jobs are found through the jobs queued or running, whose keys the script names itself
# (`job_prefix`): a single Redis allows it, Redis Cluster would not.
_CREATE = """
local queued = redis.call('ZCARD', pending_key)
if queued >= tonumber(max_queued) then return {'queue_full', queued} end
if max_for_owner ~= '' then
  local owned = 0
  for _, ids in ipairs({redis.call('ZRANGE', pending_key, 0, -1), redis.call('SMEMBERS', running_key)}) do
    for _, id in ipairs(ids) do
      if redis.call('HGET', job_prefix .. id, 'owner') == owner then owned = owned + 1 end
    end
  end
  if owned >= tonumber(max_for_owner) then return {'owner_limit', owned} end
end
redis.call('HSET', job_key, 'state', 'queued', 'options', options, 'client', client, 'owner', owner,
           'attempt', 1, 'submitted_at', now)
redis.call('EXPIRE', job_key, ttl)
redis.call('ZADD', pending_key, now, job_id)
local position = redis.call('ZRANK', pending_key, job_id) + 1
add_event(events_key, event_json(job_id, now, {type = 'queued', position = position}), ttl)
return {'ok', position}
"""

# Claim a queued job for one attempt. A message whose attempt is not the job's current one is a
# leftover of a redelivery (the broker restores unacked messages late) and is dropped.
_CLAIM = """
local state = redis.call('HGET', job_key, 'state')
if not state then return 'missing' end
if redis.call('HGET', job_key, 'attempt') ~= attempt then return 'stale' end
if state == 'running' and redis.call('HGET', job_key, 'worker') == worker then
  -- This worker's own claim, sent again after Redis restarted before answering it; the heartbeat is
  -- refreshed, or other workers would take the job for a dead worker's after a long outage.
  redis.call('HSET', job_key, 'heartbeat_at', now)
  return 'ok'
end
if state ~= 'queued' then return state end
redis.call('HSET', job_key, 'state', 'running', 'worker', worker, 'started_at', now, 'heartbeat_at', now)
redis.call('ZREM', pending_key, job_id)
redis.call('SADD', running_key, job_id)
return 'ok'
"""

# Finish the attempt that holds the job; anything else (a superseded attempt) changes nothing. The
# result this attempt staged becomes the job's result only here, so a superseded attempt that ran on
# (a worker cut off from Redis for a while) can never replace the result of the attempt that won.
_FINISH = """
if redis.call('HGET', job_key, 'finished_attempt') == attempt and redis.call('HGET', job_key, 'state') == state then
  return 1  -- this attempt's own finish, sent again after Redis restarted before answering it
end
if redis.call('HGET', job_key, 'state') ~= 'running' or redis.call('HGET', job_key, 'attempt') ~= attempt then
  redis.call('DEL', staged_key)
  return 0
end
if redis.call('EXISTS', staged_key) == 1 then
  redis.call('RENAME', staged_key, result_key)
  redis.call('EXPIRE', result_key, ttl)
end
redis.call('HSET', job_key, 'error', error, 'reason', reason, 'finished_attempt', attempt)
redis.call('SREM', running_key, job_id)
end_job(job_key, finished_key, counters_key, recent_failures_key, events_key, state, reason, now, job_id, event, ttl)
return 1
"""

# Refresh the heartbeat of the attempt that holds the job; 0 tells a worker it no longer does.
_HEARTBEAT = """
if redis.call('HGET', job_key, 'state') ~= 'running' or redis.call('HGET', job_key, 'attempt') ~= attempt
   or redis.call('HGET', job_key, 'worker') ~= worker then
  return 0
end
redis.call('HSET', job_key, 'heartbeat_at', now)
return 1
"""

_CANCEL = """
local state = redis.call('HGET', job_key, 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('ZREM', pending_key, job_id)
  end_job(job_key, finished_key, counters_key, recent_failures_key, events_key, 'cancelled', '', now, job_id,
          event, ttl)
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', job_key, 'cancel_requested', '1')
  return 'cancelling'
end
return state
"""

# Put back a job whose worker stopped sending heartbeats (or is `dead_worker`), or fail it once it has
# used its attempts; a job its user was cancelling ends cancelled.
_REQUEUE = """
local state = redis.call('HGET', job_key, 'state')
if not state then
  redis.call('SREM', running_key, job_id)  -- its record expired: nothing left to run
  return -1
end
if state ~= 'running' then return -1 end
local heartbeat = tonumber(redis.call('HGET', job_key, 'heartbeat_at'))
if heartbeat and heartbeat > tonumber(dead_before) and redis.call('HGET', job_key, 'worker') ~= dead_worker then
  return -1
end
local attempt = tonumber(redis.call('HGET', job_key, 'attempt'))
redis.call('SREM', running_key, job_id)
if redis.call('HGET', job_key, 'cancel_requested') == '1' then
  local message = 'Cancelled (its worker stopped).'
  local event = event_json(job_id, now, {type = 'cancelled', message = message})
  end_job(job_key, finished_key, counters_key, recent_failures_key, events_key, 'cancelled', '', now, job_id,
          event, ttl)
  return -2
end
if attempt >= tonumber(max_attempts) then
  local message = 'This job stopped its worker ' .. attempt ..
                  ' times (killed or crashed mid-render), so it was not run again. Try a smaller size or fewer images.'
  redis.call('HSET', job_key, 'reason', 'worker_lost', 'error', message)
  local event = event_json(job_id, now, {type = 'failed', reason = 'worker_lost', message = message})
  end_job(job_key, finished_key, counters_key, recent_failures_key, events_key, 'failed', 'worker_lost', now,
          job_id, event, ttl)
  return 0
end
redis.call('HSET', job_key, 'state', 'queued', 'attempt', attempt + 1)
-- At the back of the queue, where the broker puts its new message.
redis.call('ZADD', pending_key, now, job_id)
return attempt + 1
"""

# Send again a queued job whose message is on no queue (its front end died between recording the job and
# sending its message, or the queue was purged): move it to the back of the queue, where the new message
# goes, unless another worker's janitor did so first; fail it once it was sent again `max_resends` times.
_RESEND = """
if redis.call('HGET', job_key, 'state') ~= 'queued' or redis.call('HGET', job_key, 'attempt') ~= attempt then
  return -1
end
local place = tonumber(redis.call('ZSCORE', pending_key, job_id))
if place == nil or place ~= tonumber(queued_at) then return -1 end
local resent = redis.call('HINCRBY', job_key, 'resent', 1)
if resent > tonumber(max_resends) then
  redis.call('ZREM', pending_key, job_id)
  redis.call('HSET', job_key, 'reason', 'message_lost', 'error', message)
  local event = event_json(job_id, now, {type = 'failed', reason = 'message_lost', message = message})
  end_job(job_key, finished_key, counters_key, recent_failures_key, events_key, 'failed', 'message_lost', now,
          job_id, event, ttl)
  return 0
end
redis.call('ZADD', pending_key, now, job_id)
return resent
"""


class CorruptRecord(LookupError):
    """A job's record is in Redis but cannot be read: for its readers, the job is gone."""


@dataclass
class JobRecord:
    job_id: str
    state: JobState
    options: dict[str, Any]
    client: str
    owner: str
    attempt: int
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: str | None = None
    reason: FailureReason | None = None


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
    """Failed jobs by reason: every FailureReason, zeros included."""
    cancelled: int
    adapter_loads: dict[str, int]
    """Adapter loads by the workers, at start and on reload requests, by AdapterLoadOutcome."""
    dead_letters: dict[str, int]
    """Queue messages the workers refused, by DeadLetterKind."""
    uncompiled_renders: int = 0
    """Batches compiled workers rendered uncompiled, at eager speed: shapes their warm-up did not compile."""


@dataclass
class EventCursor:
    """Where a follower is in a job's event stream."""

    last_id: str = "0"
    last_position: int | None = None


@dataclass
class JobResult:
    """What a finished job produced: its metadata and the PNG bytes of each image that passed."""

    meta: ResultMeta
    images: list[bytes] = field(default_factory=list)

    def delivered_images(self) -> list[tuple[ImageInfo, bytes]]:
        """Each image's metadata with its PNG, for the images the safety checker did not withhold."""
        kept = [image for image in self.meta.images if not image.withheld]
        return list(zip(kept, self.images, strict=True))

    def file_name(self, image: ImageInfo) -> str:
        return f"{self.meta.job_id}-{image.index}-seed{image.seed}.png"


class RedisOutage:
    """Redis away, as a loop that rides a restart out sees it: the outage is logged once when it begins
    and once when it ends (not at every try), and past `limit_s` (None: never) the error is raised."""

    def __init__(self, what: str, limit_s: float | None = REDIS_OUTAGE_S) -> None:
        self.what = what
        self.limit_s = limit_s
        self._since: float | None = None

    @property
    def away(self) -> bool:
        return self._since is not None

    def failed(self, error: Exception) -> None:
        """Redis did not answer (call in the `except REDIS_UNREACHABLE`): re-raises past the limit."""
        if self._since is None:
            self._since = time.monotonic()
            logger.warning("%s: Redis is not answering (%s); going on without it meanwhile", self.what, error)
        elif self.limit_s is not None and time.monotonic() - self._since > self.limit_s:
            raise error

    def answered(self) -> None:
        if self._since is not None:
            logger.info("%s: Redis answers again", self.what)
            self._since = None


class JobFollower:
    """One job's events, followed through a Redis restart: the cursor keeps its place in the job's event
    stream, which a persistent Redis brings back, so no event is missed or repeated. `JobStore.follow`
    iterates one; the bot polls one from its event loop."""

    def __init__(self, store: JobStore, job_id: str, outage_s: float | None = REDIS_OUTAGE_S) -> None:
        self.store = store
        self.job_id = job_id
        self.cursor = EventCursor()
        self.outage = RedisOutage(f"job {job_id}", outage_s)
        """Redis away for the follower (its end is said once); past `outage_s` the error is raised."""

    def poll(self, block_ms: int | None = None) -> list[JobEvent]:
        """The next events (see `JobStore.poll_events`); none while Redis is away."""
        try:
            events = self.store.poll_events(self.job_id, self.cursor, block_ms=block_ms)
        except REDIS_UNREACHABLE as error:
            self.outage.failed(error)
            return []
        self.outage.answered()
        return events


def until_redis_answers(what: str, call: Callable[[], T], limit_s: float = REDIS_OUTAGE_S) -> T:
    """`call`, tried again through a Redis outage of up to `limit_s`, for a write that must not be lost (a
    worker's claim, its finished render). The call must be safe to repeat: its first try may have been done
    by Redis, its answer lost."""
    deadline = time.monotonic() + limit_s
    delay = 0.5
    while True:
        try:
            return call()
        except REDIS_UNREACHABLE as error:
            if time.monotonic() + delay > deadline:
                raise
            logger.warning("%s: Redis is not answering (%s); trying again in %.1f s", what, error, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _number(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


class JobStore:
    def __init__(self, redis_client: redis.Redis, prefix: str, ttl_s: int) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.ttl_s = ttl_s
        ending = (_EVENTS, _END_JOB)
        self._create = _Script(
            redis_client,
            "job_key pending_key running_key events_key",
            "job_id options client owner now max_queued max_for_owner ttl job_prefix",
            _CREATE,
            _EVENTS,
        )
        self._claim = _Script(redis_client, "job_key pending_key running_key", "attempt worker now job_id", _CLAIM)
        self._finish = _Script(
            redis_client,
            f"job_key running_key staged_key result_key {_ENDING_KEYS}",
            "attempt state now error reason job_id event ttl",
            _FINISH,
            *ending,
        )
        self._heartbeat = _Script(redis_client, "job_key", "attempt worker now", _HEARTBEAT)
        self._cancel = _Script(
            redis_client, f"job_key pending_key {_ENDING_KEYS}", "now job_id event ttl", _CANCEL, *ending
        )
        self._requeue = _Script(
            redis_client,
            f"job_key running_key pending_key {_ENDING_KEYS}",
            "dead_before max_attempts job_id now dead_worker ttl",
            _REQUEUE,
            *ending,
        )
        self._resend = _Script(
            redis_client,
            f"job_key pending_key {_ENDING_KEYS}",
            "job_id attempt queued_at now max_resends ttl message",
            _RESEND,
            *ending,
        )
        self._unreadable = OncePerKey(logger)

    def _skip_unreadable(self, key: str, error: BaseException) -> None:
        self._unreadable.warning(key, "skipping an unreadable record at %s: %s", key, _describe(error))

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

    def _ending_keys(self, job_id: str) -> dict[str, str]:
        """The keys the end of a job writes (see `end_job`)."""
        return {
            "finished_key": self.key("finished", self._client_of(job_id)),
            "counters_key": self.key("counters"),
            "recent_failures_key": self.key("recent_failures"),
            "events_key": self.key("job", job_id, "events"),
        }

    def _touch(self, pipe: redis.client.Pipeline, job_id: str) -> None:
        for key in self._job_keys(job_id):
            pipe.expire(key, self.ttl_s)

    def records(self, front_end: str) -> FrontEndRecords:
        """What a front end keeps for itself in the service's Redis (the bot's deliveries and cooldowns)."""
        return FrontEndRecords(self, front_end)

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
        limit together. It is the only place either limit is counted."""
        outcome, number = self._create(
            job_key=self.key("job", job_id),
            pending_key=self.key("pending"),
            running_key=self.key("running"),
            events_key=self.key("job", job_id, "events"),
            job_id=job_id,
            options=json.dumps(options),
            client=client,
            owner=owner,
            now=self.now(),
            max_queued=max_queued,
            max_for_owner="" if max_for_owner is None else max_for_owner,
            ttl=self.ttl_s,
            job_prefix=self.key("job", ""),
        )
        return outcome.decode(), int(number)

    def position(self, job_id: str) -> int | None:
        rank = self.redis.zrank(self.key("pending"), job_id)
        return None if rank is None else rank + 1

    def queue_length(self) -> int:
        return self.redis.zcard(self.key("pending"))

    def queued(self, count: int) -> list[str]:
        """The first `count` jobs of the queue, next first."""
        return [member.decode() for member in self.redis.zrange(self.key("pending"), 0, count - 1)]

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
            options = json.loads(raw[b"options"])
            if not isinstance(options, dict):
                raise TypeError(f"options are a JSON {type(options).__name__}, not an object")
            reason = _text(raw.get(b"reason"))
            return JobRecord(
                job_id=job_id,
                state=JobState(raw[b"state"].decode()),
                options=options,
                client=raw.get(b"client", b"").decode(),
                owner=raw.get(b"owner", b"").decode(),
                attempt=int(raw[b"attempt"]),
                submitted_at=float(raw[b"submitted_at"]),
                started_at=_number(raw.get(b"started_at")),
                finished_at=_number(raw.get(b"finished_at")),
                worker=_text(raw.get(b"worker")),
                error=_text(raw.get(b"error")) or None,
                reason=FailureReason(reason) if reason else None,
            )
        except UNREADABLE as error:
            self._skip_unreadable(key, error)
            raise CorruptRecord(f"job {job_id}'s record cannot be read ({_describe(error)})") from None

    def _client_of(self, job_id: str) -> str:
        """The front end that submitted a job ('' when unknown): its finished jobs are indexed under it."""
        return (self.redis.hget(self.key("job", job_id), "client") or b"").decode(errors="replace")

    def claim(self, job_id: str, attempt: int, worker: str) -> str:
        """'ok' when this worker now runs the job; otherwise why not ('stale', 'missing', or its state)."""
        return self._claim(
            job_key=self.key("job", job_id),
            pending_key=self.key("pending"),
            running_key=self.key("running"),
            attempt=attempt,
            worker=worker,
            now=self.now(),
            job_id=job_id,
        ).decode()

    def heartbeat(self, job_id: str, attempt: int, worker: str) -> bool:
        """Say the attempt is alive; False when it no longer holds the job (requeued, cancelled, expired)."""
        return bool(self._heartbeat(job_key=self.key("job", job_id), attempt=attempt, worker=worker, now=self.now()))

    def cancel_requested(self, job_id: str) -> bool:
        return self.redis.hget(self.key("job", job_id), "cancel_requested") == b"1"

    def finish(self, job_id: str, attempt: int, event: TerminalEvent) -> bool:
        """End the job with its terminal event (done, failed or cancelled: the job's final state) if `attempt`
        still holds it. Sent again after its answer was lost (a Redis restart), it answers True again and
        changes nothing."""
        now = self.now()
        failure = event if isinstance(event, Failed) else None
        return bool(
            self._finish(
                job_key=self.key("job", job_id),
                running_key=self.key("running"),
                staged_key=self._staged_result_key(job_id, attempt),
                result_key=self.key("job", job_id, "result"),
                **self._ending_keys(job_id),
                attempt=attempt,
                state=str(event.type),
                now=now,
                error=failure.message if failure else "",
                reason=str(failure.reason) if failure else "",
                job_id=job_id,
                event=self._stamped(job_id, now, event),
                ttl=self.ttl_s,
            )
        )

    def cancel(self, job_id: str) -> str:
        """Cancel a queued job ('cancelled'), ask a running one to stop ('cancelling'), or say its state."""
        now = self.now()
        return self._cancel(
            job_key=self.key("job", job_id),
            pending_key=self.key("pending"),
            **self._ending_keys(job_id),
            now=now,
            job_id=job_id,
            event=self._stamped(job_id, now, Cancelled(message="Cancelled while queued.")),
            ttl=self.ttl_s,
        ).decode()

    def requeue_if_dead(self, job_id: str, dead_before: float, max_attempts: int, dead_worker: str = "") -> int:
        """Requeue a running job whose heartbeat is older than `dead_before` (or whose worker is
        `dead_worker`). Returns the new attempt, 0 when it has failed for good, -1 when it was alive,
        -2 when it was being cancelled (it is now)."""
        return int(
            self._requeue(
                job_key=self.key("job", job_id),
                running_key=self.key("running"),
                pending_key=self.key("pending"),
                **self._ending_keys(job_id),
                dead_before=dead_before,
                max_attempts=max_attempts,
                job_id=job_id,
                now=self.now(),
                dead_worker=dead_worker,
                ttl=self.ttl_s,
            )
        )

    # Events -----------------------------------------------------------------------------------

    @staticmethod
    def _stamped(job_id: str, now: float, event: JobEvent) -> str:
        return event.model_copy(update={"job_id": job_id, "ts": now}).to_json()

    def append_event(self, job_id: str, event: JobEvent) -> None:
        """Add a progress event (queued, started, step). Terminal events come with the end of the job."""
        if event.type in TERMINAL_EVENTS:
            raise ValueError(f"a {event.type} event ends the job: write it with finish()")
        with self.redis.pipeline() as pipe:
            pipe.xadd(
                self.key("job", job_id, "events"),
                {"event": self._stamped(job_id, self.now(), event)},
                maxlen=MAX_EVENTS,
                approximate=True,
            )
            self._touch(pipe, job_id)
            pipe.execute()

    def _event_entries(
        self, job_id: str, after: str, block_ms: int | None = None
    ) -> list[tuple[str, JobEvent | None]]:
        """Entries of the job's stream after `after`, each with its event or None when it cannot be read."""
        key = self.key("job", job_id, "events")
        answer = self.redis.xread({key: after}, block=block_ms, count=100)
        entries = []
        for entry_id, fields in answer[0][1] if answer else []:
            try:
                event = JOB_EVENT.validate_json(fields[b"event"])
            except UNREADABLE as error:
                self._skip_unreadable(f"{key} {entry_id.decode()}", error)
                event = None
            entries.append((entry_id.decode(), event))
        return entries

    def read_events(self, job_id: str, after: str = "0", block_ms: int | None = None) -> list[tuple[str, JobEvent]]:
        """Events after the stream id `after`, waiting up to `block_ms` for the first one."""
        return [(entry_id, event) for entry_id, event in self._event_entries(job_id, after, block_ms) if event]

    def poll_events(self, job_id: str, cursor: EventCursor, block_ms: int | None = None) -> list[JobEvent]:
        """The job's next events after `cursor` (which it advances), waiting up to `block_ms` for one.
        While the job waits in the queue, a fresh `queued` event reports each change of its position.
        Raises LookupError once the job is unknown or expired."""
        events = []
        for entry_id, event in self._event_entries(job_id, cursor.last_id, block_ms=block_ms):
            cursor.last_id = entry_id  # past an unreadable entry too, or every poll would read it again
            if event is None:
                continue
            if isinstance(event, Queued):
                cursor.last_position = event.position
            events.append(event)
        if events:
            return events
        position = self.position(job_id)
        if position is not None and cursor.last_position is not None and position != cursor.last_position:
            cursor.last_position = position
            return [Queued(job_id=job_id, ts=self.now(), position=position)]
        if not self.redis.exists(self.key("job", job_id)):
            raise LookupError(f"job {job_id} is unknown or has expired")
        return []

    def follow(self, job_id: str, poll_s: float = 1.0, outage_s: float = REDIS_OUTAGE_S) -> Iterator[JobEvent]:
        """Yield the job's events in order until a terminal one, through a Redis restart of up to `outage_s`
        (see `JobFollower`)."""
        follower = JobFollower(self, job_id, outage_s)
        while True:
            events = follower.poll(block_ms=int(poll_s * 1000))
            if follower.outage.away:
                time.sleep(poll_s)
            for event in events:
                yield event
                if event.type in TERMINAL_EVENTS:
                    return

    # Results ----------------------------------------------------------------------------------

    def _staged_result_key(self, job_id: str, attempt: int) -> str:
        return self.key("job", job_id, f"result.{attempt}")

    def stage_result(self, job_id: str, attempt: int, result: JobResult) -> None:
        """Store one attempt's result; `finish` with its Done event makes it the job's result."""
        key = self._staged_result_key(job_id, attempt)
        with self.redis.pipeline() as pipe:
            pipe.delete(key)
            mapping: dict[str, Any] = {"meta": result.meta.to_json()}
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
            return JobResult(meta=ResultMeta.model_validate_json(raw[b"meta"]), images=images)
        except UNREADABLE as error:
            self._skip_unreadable(key, error)
            return None

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
            except UNREADABLE as error:
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

    def record_uncompiled_render(self) -> None:
        self.redis.hincrby(self.key("counters"), "uncompiled_renders", 1)

    def record_adapter_load(self, outcome: AdapterLoadOutcome) -> None:
        self.redis.hincrby(self.key("counters"), f"adapter_loads:{AdapterLoadOutcome(outcome)}", 1)

    def counters(self) -> ServiceCounters:
        raw = self._numbers(self.key("counters"), self.redis.hgetall(self.key("counters")))

        def by_label(kind: str, labels: type[FailureReason | AdapterLoadOutcome | DeadLetterKind]) -> dict[str, int]:
            counts = dict.fromkeys(map(str, labels), 0)
            # A label outside the known set (a newer worker's) is kept rather than hidden.
            counts.update({name.split(":", 1)[1]: value for name, value in raw.items() if name.startswith(f"{kind}:")})
            return counts

        return ServiceCounters(
            failures=by_label("failed", FailureReason),
            cancelled=raw.get("cancelled", 0),
            adapter_loads=by_label("adapter_loads", AdapterLoadOutcome),
            dead_letters=by_label("dead_letters", DeadLetterKind),
            uncompiled_renders=raw.get("uncompiled_renders", 0),
        )

    def recent_failures(self) -> dict[str, int]:
        """Failures of the last hour (RECENT_FAILURES_S), by reason."""
        members = self.redis.zrangebyscore(self.key("recent_failures"), self.now() - RECENT_FAILURES_S, "+inf")
        return dict(Counter(member.decode().split(":", 1)[0] for member in members))

    def publish_worker(self, name: str, status: WorkerStatus) -> None:
        stamped = status.model_copy(update={"heartbeat_at": self.now()})
        self.redis.hset(self.key("workers"), name, stamped.to_json())

    def remove_worker(self, name: str) -> None:
        self.redis.hdel(self.key("workers"), name)

    def workers(self, alive_within_s: float) -> dict[str, WorkerStatus]:
        """Workers whose last heartbeat is recent enough to count them as online."""
        now = self.now()
        key = self.key("workers")
        online = {}
        for name, raw in self.redis.hgetall(key).items():
            try:
                worker, status = name.decode(), WorkerStatus.model_validate_json(raw)
            except UNREADABLE as error:
                self._skip_unreadable(f"{key} {name.decode(errors='replace')}", error)
                continue
            if now - status.heartbeat_at <= alive_within_s:
                online[worker] = status
        return online

    def request_reload(self, adapter: str | None) -> str:
        """Record a reload of one adapter (None: all); returns the request id the answers are filed under."""
        entry = {"adapter": adapter or "*", "requested_at": self.now()}
        return self.redis.xadd(self.key("reloads"), {"request": json.dumps(entry)}, maxlen=1000).decode()

    def reload_requests_after(self, request_id: str) -> list[tuple[str, str | None]]:
        """Reload requests after `request_id`: each with the adapter it names ('*' for all), or None when
        it cannot be read."""
        key = self.key("reloads")
        requests = []
        for entry_id, fields in self.redis.xrange(key, min=f"({request_id}" if request_id != "0" else "-"):
            try:
                adapter = json.loads(fields[b"request"])["adapter"]
                if not isinstance(adapter, str):
                    raise TypeError("the adapter is not a name")
            except UNREADABLE as error:
                self._skip_unreadable(f"{key} {entry_id.decode()}", error)
                adapter = None
            requests.append((entry_id.decode(), adapter))
        return requests

    def latest_reload_request(self) -> str:
        entries = self.redis.xrevrange(self.key("reloads"), count=1)
        return entries[0][0].decode() if entries else "0"

    def answer_reload(self, request_id: str, worker: str, answers: list[ReloadAnswer]) -> None:
        key = self.key("reload", request_id)
        with self.redis.pipeline() as pipe:
            pipe.hset(key, worker, json.dumps([json.loads(answer.to_json()) for answer in answers]))
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    def reload_answers(self, request_id: str) -> dict[str, list[ReloadAnswer]]:
        key = self.key("reload", request_id)
        answers = {}
        for worker, raw in self.redis.hgetall(key).items():
            try:
                answers[worker.decode()] = [ReloadAnswer.model_validate(answer) for answer in json.loads(raw)]
            except UNREADABLE as error:
                self._skip_unreadable(f"{key} {worker.decode(errors='replace')}", error)
        return answers

    # Lost and refused messages ----------------------------------------------------------------

    def queued_before(self, before: float) -> list[tuple[str, float]]:
        """Jobs queued (or queued again) before the time `before`, with that time: their place in the queue."""
        waiting = self.redis.zrangebyscore(self.key("pending"), "-inf", before, withscores=True)
        return [(member.decode(), score) for member, score in waiting]

    def resend_lost(self, job_id: str, attempt: int, queued_at: float, max_resends: int) -> int:
        """Move a queued job whose message is lost to the back of the queue before its message is sent again.
        Returns how many times it was sent again; 0 when it failed instead (sent again `max_resends` times);
        -1 when it moved meanwhile (claimed, cancelled, or already sent again by another worker)."""
        message = (
            f"This job's message on the queue went missing {max_resends + 1} times (was the queue purged?), "
            "so it was not sent again; submit it again."
        )
        return int(
            self._resend(
                job_key=self.key("job", job_id),
                pending_key=self.key("pending"),
                **self._ending_keys(job_id),
                job_id=job_id,
                attempt=attempt,
                queued_at=queued_at,
                now=self.now(),
                max_resends=max_resends,
                ttl=self.ttl_s,
                message=message,
            )
        )

    def record_dead_letter(self, letter: DeadLetter) -> None:
        """Keep a refused queue message (the latest DEAD_LETTERS_KEPT) and count it by kind."""
        stamped = letter.model_copy(update={"at": self.now()})
        with self.redis.pipeline() as pipe:
            pipe.lpush(self.key("dead_letters"), stamped.to_json())
            pipe.ltrim(self.key("dead_letters"), 0, DEAD_LETTERS_KEPT - 1)
            pipe.hincrby(self.key("counters"), f"dead_letters:{letter.kind}", 1)
            pipe.execute()

    def dead_letters(self, count: int = DEAD_LETTERS_KEPT) -> list[DeadLetter]:
        """The latest refused messages, newest first."""
        key = self.key("dead_letters")
        letters = []
        for index, raw in enumerate(self.redis.lrange(key, 0, count - 1)):
            try:
                letters.append(DeadLetter.model_validate_json(raw))
            except UNREADABLE as error:
                self._skip_unreadable(f"{key} {index}", error)
        return letters


class FrontEndRecords:
    """A front end's own records in the service's Redis, under `<prefix>:<front end>:`: small JSON values
    with a lifetime, and short claims. Kept beside the jobs, so that they survive a restart of the front
    end and every process of it (several bots) shares them."""

    def __init__(self, store: JobStore, front_end: str) -> None:
        self._store = store
        self._redis = store.redis
        self._front_end = front_end

    def _key(self, kind: str, name: str) -> str:
        return self._store.key(self._front_end, kind, name)

    def put(self, kind: str, name: str, value: Any, ttl_s: float | None) -> None:
        """Keep `value` (JSON) as `name` among the records of `kind`, for `ttl_s` (None: until deleted)."""
        with self._redis.pipeline() as pipe:
            pipe.set(self._key(kind, name), json.dumps(value), px=None if ttl_s is None else int(ttl_s * 1000))
            pipe.sadd(self._store.key(self._front_end, kind), name)
            pipe.execute()

    def get(self, kind: str, name: str) -> Any | None:
        """The record, None when there is none or it cannot be read (logged once)."""
        key = self._key(kind, name)
        raw = self._redis.get(key)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except UNREADABLE as error:
            self._store._skip_unreadable(key, error)
            return None

    def names(self, kind: str) -> list[str]:
        """Every record of `kind` still kept (those that expired are forgotten on the way)."""
        index = self._store.key(self._front_end, kind)
        names = []
        for member in self._redis.smembers(index):
            name = member.decode()
            if self._redis.exists(self._key(kind, name)):
                names.append(name)
            else:
                self._redis.srem(index, member)
        return sorted(names)

    def delete(self, kind: str, name: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key(kind, name))
            pipe.srem(self._store.key(self._front_end, kind), name)
            pipe.execute()

    def claim(self, kind: str, name: str, ttl_s: float) -> bool:
        """Take `name` for `ttl_s` unless it is taken: True for one caller only."""
        return bool(self._redis.set(self._key(kind, name), 1, nx=True, px=int(ttl_s * 1000)))

    def renew(self, kind: str, name: str, ttl_s: float) -> None:
        self._redis.pexpire(self._key(kind, name), int(ttl_s * 1000))

    def release(self, kind: str, name: str) -> None:
        self._redis.delete(self._key(kind, name))

    def claimed_for_s(self, kind: str, name: str) -> float:
        """How long `name` stays taken (0 when it is free)."""
        return max(self._redis.pttl(self._key(kind, name)), 0) / 1000


def _describe(error: BaseException) -> str:
    if isinstance(error, pydantic.ValidationError):
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        return f"{where + ': ' if where else ''}{first['msg']}"
    return str(error) or type(error).__name__
