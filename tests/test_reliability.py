"""Workers killed mid-job: the job runs again and is delivered once, or fails once it has killed too many."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import uuid
from pathlib import Path

import pytest

from imagine.client import ImagineClient
from imagine.queue import send_job
from tests.helpers import BIN, RedisServer, service_env, service_settings, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LONG = {
    "prompt": "a long render",
    "width": 384,
    "height": 384,
    "num_inference_steps": 40,
    "adapter": "none",
    "seed": 4,
}


def wait_until_rendering(client: ImagineClient, job_id: str, worker_name: str, attempt: int) -> None:
    def rendering() -> bool:
        record = client.job(job_id)
        if record.state != "running" or record.worker != worker_name or record.attempt != attempt:
            return False
        return any(event.type == "step" for _, event in client.store.read_events(job_id))

    wait_for(rendering, 60, f"attempt {attempt} of the job to render on {worker_name}")


def test_job_killed_with_its_worker_completes_on_the_restarted_worker_once(redis_server, start_worker):
    worker = start_worker(name="victim")
    client = ImagineClient(worker.settings)
    job = client.submit(LONG)
    wait_until_rendering(client, job.job_id, worker.name, attempt=1)
    worker.kill()

    worker.start()  # the same worker comes back; it knows its old job died with it
    events = list(client.events(job.job_id))
    assert [event.type for event in events].count("done") == 1
    assert [event.worker for event in events if event.type == "started"] == [worker.name, worker.name]
    assert any(getattr(event, "message", None) == "Its worker stopped; the job was queued again." for event in events)
    result = client.result(job.job_id)
    assert result.meta.attempt == 2 and len(result.images) == 1

    # The broker's late copy of the first delivery is recognised as stale: nothing runs twice.
    send_job(client.app, job.job_id, client.job(job.job_id).options, attempt=1)
    probe = client.submit({**LONG, "num_inference_steps": 2, "width": 64, "height": 64})
    list(client.events(probe.job_id))
    assert [event.type for _, event in client.store.read_events(job.job_id)].count("done") == 1
    assert client.result(job.job_id).images == result.images


def test_another_worker_takes_over_when_one_dies(redis_server, start_worker):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    first = start_worker(settings, name="first")
    client = ImagineClient(settings)
    job = client.submit(LONG)
    wait_until_rendering(client, job.job_id, first.name, attempt=1)
    first.kill()
    second = start_worker(settings, name="second")  # sees the job's heartbeat go stale
    events = list(client.events(job.job_id))
    assert events[-1].type == "done" and events[-1].worker == second.name
    assert [event.type for event in events].count("done") == 1


def test_job_that_keeps_killing_workers_ends_as_failed(redis_server, start_worker):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}", max_job_attempts=2)
    worker = start_worker(settings, name="fragile")
    client = ImagineClient(settings)
    job = client.submit(LONG)
    for attempt in (1, 2):
        wait_until_rendering(client, job.job_id, worker.name, attempt=attempt)
        worker.kill()
        worker.start()
    events = list(client.events(job.job_id))
    assert events[-1].type == "failed" and events[-1].reason == "worker_lost"
    assert "stopped its worker 2 times" in events[-1].message
    assert client.job(job.job_id).state == "failed"
    assert client.queue_stats().counters.failures["worker_lost"] == 1
    # The worker is healthy and serves the next job.
    after = client.submit({**LONG, "num_inference_steps": 2, "width": 64, "height": 64})
    assert list(client.events(after.job_id))[-1].type == "done"


def test_out_of_memory_fails_the_job_and_the_worker_keeps_serving(redis_server, start_worker):
    huge = 32768
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}", max_side=huge, max_pixels=huge * huge)
    worker = start_worker(
        settings, name="small", memory_limit=8 * 2**30, MAX_SIDE=str(huge), MAX_PIXELS=str(huge * huge)
    )
    client = ImagineClient(settings)
    job = client.submit(
        {"prompt": "too big", "width": huge, "height": huge, "num_inference_steps": 1, "adapter": "none"}
    )
    failed = list(client.events(job.job_id))[-1]
    assert failed.type == "failed" and failed.reason == "out_of_memory"
    assert failed.message == (
        f"The worker ran out of memory rendering 1 image(s) of {huge}×{huge}; try fewer images or a smaller size."
    )
    assert client.queue_stats().counters.failures["out_of_memory"] == 1
    after = client.submit({**LONG, "num_inference_steps": 2, "width": 64, "height": 64})
    assert list(client.events(after.job_id))[-1].type == "done"
    assert worker.process.poll() is None


def test_job_over_the_time_limit_is_stopped(redis_server, start_worker):
    # Far more work than a second holds on any machine; and a one-step job, whose only step is its last,
    # is never stopped for the limit: neither outcome depends on the machine's speed.
    steps = 5000
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}", max_steps=steps)
    start_worker(settings, name="timed", JOB_TIME_LIMIT_S="1", MAX_STEPS=str(steps))
    client = ImagineClient(settings)
    job = client.submit({**LONG, "num_inference_steps": steps})
    failed = list(client.events(job.job_id))[-1]
    assert failed.type == "failed" and failed.reason == "timeout"
    assert "took longer than 1 s" in failed.message
    assert client.queue_stats().failures_last_hour == {"timeout": 1}
    # Euler takes exactly the steps asked (PNDM one more).
    quick = client.submit({**LONG, "num_inference_steps": 1, "scheduler": "euler", "width": 64, "height": 64})
    assert list(client.events(quick.job_id))[-1].type == "done"


@contextlib.contextmanager
def a_redis_crash_under_a_cli_job(tmp_path, start_worker, persistent: bool, password: str | None = None):
    """A long job from the `imagine` CLI; the redis-server is SIGKILLed while it renders, and started again
    once the render ended. Yields the client, the worker, the CLI's process and the job's id."""
    server = RedisServer(tmp_path, persistent=persistent, password=password)
    server.start()
    settings = service_settings(server.url, f"t{uuid.uuid4().hex[:8]}")
    worker = start_worker(settings, name="survivor")
    client = ImagineClient(settings)
    options = ["--width", "384", "--height", "384", "--steps", "40", "--adapter", "none", "--seed", "4"]
    user = subprocess.Popen(
        [str(BIN / "imagine"), "a long render", *options, "--out", str(tmp_path / "out")],
        env=service_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = wait_for(lambda: client.store.running_jobs(), 60, "the job to start")[0]
        wait_until_rendering(client, job_id, worker.name, attempt=1)
        server.crash()
        # The render goes on without Redis, then its images wait in the worker for Redis to come back.
        wait_for(lambda: "storing the images: Redis is not answering" in worker.log(), 120, "the render to end")
        server.start()
        yield client, worker, user, job_id
        probe = client.submit({**LONG, "num_inference_steps": 2, "width": 64, "height": 64})
        assert [event.type for event in client.events(probe.job_id)][-1] == "done"
    finally:
        user.kill()
        worker.stop()
        server.stop()


def test_redis_crash_mid_job_loses_neither_the_render_nor_the_worker(tmp_path, start_worker):
    with a_redis_crash_under_a_cli_job(tmp_path, start_worker, persistent=True) as (client, _, user, job_id):
        # The user's `imagine` rode the outage out and got the first render, not a second one.
        stdout, stderr = user.communicate(timeout=120)
        assert user.returncode == 0, stderr
        assert json.loads((tmp_path / "out" / f"{job_id}.json").read_text())["attempt"] == 1
        assert len(stdout.split()) == 1 and Path(stdout.strip()).stat().st_size > 0
        events = [event for _, event in client.store.read_events(job_id)]
        assert [event.type for event in events].count("done") == 1


def test_a_stream_of_jobs_through_workers_killed_again_and_again_delivers_each_once(redis_server, start_worker):
    """SIGKILL whichever of two workers is rendering, again and again; every job still ends done, once.
    IMAGINE_STREAM_JOBS and IMAGINE_STREAM_KILLS make it a longer run (docs/reliability.md)."""
    jobs, kills = int(os.environ.get("IMAGINE_STREAM_JOBS", 6)), int(os.environ.get("IMAGINE_STREAM_KILLS", 2))
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}", max_job_attempts=kills + 2)
    workers = [start_worker(settings, name=name) for name in ("left", "right")]
    client = ImagineClient(settings)
    chance = random.Random(9)
    submitted = [
        client.submit({**LONG, "seed": seed, "width": 256, "height": 256, "num_inference_steps": 20})
        for seed in range(jobs)
    ]

    def rendering() -> list:
        """(worker, job) for each job a worker is rendering."""
        return [
            (worker, job_id)
            for job_id in client.store.running_jobs()
            for worker in workers
            if client.job(job_id).worker == worker.name and client.store.read_events(job_id)[-1][1].type == "step"
        ]

    killed = 0
    while killed < kills:

        def all_ended() -> bool:
            return client.store.queue_length() == 0 and not client.store.running_jobs()

        busy = wait_for(lambda: rendering() or all_ended(), 120, "a worker to be rendering")
        if busy is True:  # a fast machine rendered everything already
            break
        victim, _ = chance.choice(busy)
        victim.kill()
        killed += 1
        victim.start()  # the other renders on meanwhile
    for job in submitted:
        events = list(client.events(job.job_id))
        assert [event.type for event in events].count("done") == 1 and events[-1].type == "done"
        assert client.result(job.job_id).meta.attempt == client.job(job.job_id).attempt
    assert killed >= 1 and client.store.queue_length() == 0 and client.store.running_jobs() == []


def test_redis_crash_without_persistence_loses_the_job_plainly_and_no_password_reaches_a_log(tmp_path, start_worker):
    password = "a-password-for-redis-only"
    with a_redis_crash_under_a_cli_job(tmp_path, start_worker, persistent=False, password=password) as running:
        _, worker, user, job_id = running  # Redis came back empty: it kept nothing
        _, stderr = user.communicate(timeout=120)
        assert user.returncode == 1
        assert f"imagine: job {job_id} is unknown or has expired" in stderr and "submit it again" in stderr
    assert password not in worker.log_path.read_text() and password not in stderr
