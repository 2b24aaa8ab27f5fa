"""What a broken or hostile client can put in Redis, against a real worker: raw messages on the queue
(written with kombu and redis-py, as such a client would), unreadable records, and jobs whose message
went missing. Nothing may stop the service, and no job may be stranded or run twice."""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis
from kombu.transport.redis import Channel as RedisChannel

from imagine.client import ImagineClient
from imagine.contract import parse_job_options
from imagine.images import encode_image, image_digest
from imagine.queue import GENERATE_TASK, make_celery, send_job, task_id
from tests.helpers import photo, run_cli, service_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"prompt": "a dog", "width": 64, "height": 64, "num_inference_steps": 2, "adapter": "none"}
BUSY = {"prompt": "keeps the worker busy", "width": 384, "height": 384, "num_inference_steps": 60, "adapter": "none"}
SECRET = "hunter2-in-a-prompt"


def kinds(events: list[dict]) -> list[str]:
    return [event.type for event in events]


def raw_job_message(settings, job_id: str, options: dict, attempt: int = 1) -> dict:
    """The envelope kombu writes for a job, captured from a queue no worker reads."""
    scratch = settings.model_copy(update={"queue_name": f"scratch-{uuid.uuid4().hex[:8]}"})
    send_job(make_celery(scratch), job_id, options, attempt)
    raw = redis.Redis.from_url(settings.redis_url).rpop(scratch.queue_name)
    return json.loads(raw)


def with_body(envelope: dict, body: bytes) -> bytes:
    return json.dumps({**envelope, "body": base64.b64encode(body).decode()}).encode()


def test_messages_that_are_not_jobs_are_refused_and_kept_and_the_worker_serves_on(start_worker):
    worker = start_worker(name="screen")
    settings = worker.settings
    client = ImagineClient(settings)
    r = client.store.redis
    envelope = raw_job_message(settings, "a" * 32, {**SMALL, "prompt": SECRET})
    body = json.loads(base64.b64decode(envelope["body"]))
    hostile = {
        "not JSON": (b"{not json " + SECRET.encode(), "undecodable"),
        "a JSON list": (b'["' + SECRET.encode() + b'"]', "undecodable"),
        "no delivery tag": (json.dumps({**envelope, "properties": {}}).encode(), "undecodable"),
        "body not base64": (json.dumps({**envelope, "body": "!!" + SECRET}).encode(), "undecodable"),
        "body not JSON": (with_body(envelope, b"\xff" + SECRET.encode()), "undecodable"),
        "pickle": (json.dumps({**envelope, "content-type": "application/x-python-serialize"}).encode(), "undecodable"),
        "body not [args, kwargs, embed]": (with_body(envelope, json.dumps({"p": SECRET}).encode()), "not_a_job"),
        "another task": (
            json.dumps({**envelope, "headers": {**envelope["headers"], "task": "celery.backend_cleanup"}}).encode(),
            "not_a_job",
        ),
        "positional arguments": (with_body(envelope, json.dumps([[1], body[1], body[2]]).encode()), "not_a_job"),
        "attempt as text": (
            with_body(envelope, json.dumps([[], {**body[1], "attempt": "1"}, body[2]]).encode()),
            "not_a_job",
        ),
        "a job never recorded": (json.dumps(envelope).encode(), "unknown_job"),
    }
    for raw, _ in hostile.values():
        r.lpush(settings.queue_name, raw)
    after = client.submit(SMALL)
    assert kinds(client.events(after.job_id))[-1] == "done"
    assert worker.process.poll() is None

    expected = {kind: 0 for kind in ("undecodable", "not_a_job", "unknown_job", "disagrees")}
    for _, kind in hostile.values():
        expected[kind] += 1
    assert client.queue_stats().counters.dead_letters == expected
    letters = client.store.dead_letters()
    assert len(letters) == len(hostile) and {letter.worker for letter in letters} == {worker.name}
    assert r.llen(settings.queue_name) == 0  # acknowledged away: a restart meets none of them again

    def unacknowledged() -> list:
        return [entry for entry in r.hvals(RedisChannel.unacked_key) if settings.queue_name.encode() in entry]

    # The last job's message is acknowledged once its task returns, a moment after its outcome.
    wait_for(lambda: not unacknowledged(), 30, "the last message to be acknowledged")

    # One warning each, naming what is wrong and never what the message holds.
    log = worker.log_path.read_text()
    refusals = [line for line in log.splitlines() if "refused a message on queue" in line]
    assert len(refusals) == len(hostile), refusals
    assert SECRET not in log and envelope["body"] not in log and "Traceback" not in log
    assert any("the body is not valid base64" in line for line in refusals)
    assert any("task 'celery.backend_cleanup' is not imagine.generate" in line for line in refusals)

    queue = run_cli(settings, "imagine-admin", "queue")
    assert f"dead letters:    {len(hostile)} (" in queue.stdout and SECRET not in queue.stdout
    listing = run_cli(settings, "imagine-admin", "dead-letters")
    assert listing.returncode == 0 and len(listing.stdout.splitlines()) == len(hostile)
    assert SECRET not in listing.stdout
    assert SECRET in run_cli(settings, "imagine-admin", "dead-letters", "--messages").stdout  # for the operator

    worker.stop()
    worker.start()  # nothing left on the queue to stop it again
    again = client.submit(SMALL)
    assert kinds(client.events(again.job_id))[-1] == "done"


def test_a_message_that_disagrees_with_its_stored_job_renders_nothing(start_worker):
    worker = start_worker(name="truth")
    settings = worker.settings
    client = ImagineClient(settings)
    busy = client.submit(BUSY)
    wait_for(lambda: client.job(busy.job_id).state == "running", 30, "the worker to be busy")
    job = client.submit({**SMALL, "prompt": "the prompt the user typed", "seed": 3})
    start = encode_image(photo(64, 64))
    from_image = client.submit({**SMALL, "image": start, "strength": 0.5})
    # The image is kept once, in the job's record: its message names it by its digest.
    waiting = [json.loads(raw) for raw in client.store.redis.lrange(settings.queue_name, 0, -1)]
    (message,) = [envelope for envelope in waiting if envelope["headers"]["id"] == task_id(from_image.job_id, 1)]
    sent = json.loads(base64.b64decode(message["body"]))[1]["options"]
    assert sent["image"] == f"sha256:{image_digest(start)}" and len(json.dumps(message)) < 4096
    # Another job's id and attempt, with options of its own: another prompt, another image.
    forged = {**client.job(job.job_id).options, "prompt": "a forged prompt"}
    send_job(client.app, job.job_id, forged, attempt=1)
    send_job(client.app, from_image.job_id, {**sent, "image": encode_image(photo(64, 48))}, attempt=1)
    send_job(client.app, from_image.job_id, {**sent, "image": "é"}, attempt=1)  # not even base64
    # A message as front ends sent them before images went by digest (queued before an upgrade) still runs.
    old_style = client.new_job_id()
    stored = parse_job_options({**SMALL, "image": start, "strength": 0.5, "seed": 5}, settings.limits).model_dump()
    assert client.store.create(old_style, stored, "cli", "", settings.max_queue_length)[0] == "ok"
    client.app.send_task(GENERATE_TASK, kwargs={"job_id": old_style, "options": stored, "attempt": 1},
                         task_id=task_id(old_style, 1))  # fmt: skip
    client.cancel(busy.job_id)

    events = list(client.events(job.job_id))
    assert kinds(events).count("started") == 1 and kinds(events)[-1] == "done"
    assert client.result(job.job_id).meta.prompt == "the prompt the user typed"
    assert kinds(client.events(from_image.job_id))[-1] == "done"
    assert client.result(from_image.job_id).meta.init_image == image_digest(start)
    assert kinds(client.events(old_style))[-1] == "done"
    letters = wait_for(lambda: len(client.store.dead_letters()) == 3 and client.store.dead_letters(), 30, "refusals")
    reasons = sorted(letter.reason for letter in letters)
    assert {letter.kind for letter in letters} == {"disagrees"} and all("differ from job" in r for r in reasons)
    assert sorted(reason.rsplit(" in ", 1)[1] for reason in reasons) == ["image", "image", "prompt"], reasons
    assert "a forged prompt" not in worker.log_path.read_text()


def test_jobs_whose_message_went_missing_are_sent_again_and_run_once(redis_server, start_worker):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    # One job per render: a worker that batches may take a job whose message is lost into the batch of one
    # whose message came, before its own is sent again (it runs once either way, without the note).
    worker = start_worker(settings, name="reconciler", LOST_MESSAGE_AFTER_S="1", BATCH_MAX_IMAGES="1")
    client = ImagineClient(settings)
    store = client.store

    # A front end killed between recording its job and sending the message.
    unsent = client.new_job_id()
    options = parse_job_options({**SMALL, "seed": 1}, settings.limits).model_dump()
    assert store.create(unsent, options, "cli", "", settings.max_queue_length)[0] == "ok"
    # A janitor killed between queueing a dead worker's job again and sending its message.
    requeued = client.new_job_id()
    store.create(requeued, options, "cli", "", settings.max_queue_length)
    assert store.claim(requeued, 1, "dead@elsewhere") == "ok"
    assert store.requeue_if_dead(requeued, store.now() + 1, max_attempts=3) == 2
    for job_id, attempt in ((unsent, 1), (requeued, 2)):
        events = list(client.events(job_id))
        assert kinds(events).count("started") == 1 and kinds(events)[-1] == "done"
        assert client.result(job_id).meta.attempt == attempt
    assert any(getattr(event, "message", None) == "Its message was lost; it was sent again." for event in events)

    # Jobs waiting with their message on the queue are left alone...
    busy = client.submit(BUSY)
    wait_for(lambda: client.job(busy.job_id).state == "running", 30, "the worker to be busy")
    waiting = [client.submit({**SMALL, "seed": seed}) for seed in (2, 3)]
    wait_for(lambda: store.queued_before(store.now() - 2), 10, "the jobs to wait longer than LOST_MESSAGE_AFTER_S")
    resent = worker.log_path.read_text().count("sent again")
    assert resent == 2
    # ...until `celery purge` empties the queue under them.
    client.app.control.purge()
    client.cancel(busy.job_id)
    for job in waiting:
        events = list(client.events(job.job_id))
        assert kinds(events).count("started") == 1 and kinds(events)[-1] == "done"
    assert worker.log_path.read_text().count("sent again") == resent + 2
    assert len(store.dead_letters()) == 0


def test_unreadable_records_are_skipped_and_everything_else_goes_on(redis_server, start_worker, worker_log_dir):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    client = ImagineClient(settings)
    store = client.store
    r = store.redis
    r.hset(store.key("workers"), mapping={"garbage@x": b"{not json", "partial@x": json.dumps({"heartbeat_at": 1})})
    r.sadd(store.key("running"), "garbled")
    r.hset(store.key("job", "garbled"), mapping={"state": "running", "attempt": "x", "heartbeat_at": "soon"})
    r.hset(store.key("counters"), "failed:adapter", "lots")
    r.hset(store.key("duration", "render"), "count", "many")
    r.lpush(store.key("recent", "render"), "fast")
    # A job whose worker died while holding it, and a job with a garbage event in its stream.
    orphan = client.submit({**SMALL, "seed": 5})
    assert store.claim(orphan.job_id, 1, "dead@elsewhere") == "ok"
    followed = client.submit({**SMALL, "seed": 6})
    r.xadd(store.key("job", followed.job_id, "events"), {"event": b"{not json"})

    worker = start_worker(settings, name="survivor")  # the garbage status does not keep it from starting
    assert kinds(client.events(followed.job_id))[-1] == "done"
    orphan_events = list(client.events(orphan.job_id))
    assert kinds(orphan_events)[-1] == "done" and orphan_events[-1].worker == worker.name

    bad_requests = [
        r.xadd(store.key("reloads"), {"request": b"{not json"}).decode(),
        r.xadd(store.key("reloads"), {"request": json.dumps({"adapter": 5})}).decode(),
    ]
    for _ in range(2):  # the garbage requests, read first, do not make it "busy"
        outcome = client.reload_adapters(None, timeout_s=20)
        assert outcome.waiting_for == [] and worker.name in outcome.answers
    for command in ("queue", "adapters"):
        answer = run_cli(settings, "imagine-admin", command)
        assert answer.returncode == 0 and "Traceback" not in answer.stderr, answer.stderr
    assert "workers online:  1" in run_cli(settings, "imagine-admin", "queue").stdout

    log = worker.log_path.read_text()
    unreadable = [f"{store.key('workers')} {name}" for name in ("garbage@x", "partial@x")]
    unreadable += [f"{store.key('reloads')} {entry}" for entry in bad_requests]
    for key in unreadable:
        assert log.count(f"skipping an unreadable record at {key}:") == 1, key
    assert log.count("requeueing job garbled failed") == 1  # once, though the janitor passes twice a second
