"""Hot reload of adapters on running workers, through `imagine-admin` and the Python API."""

from __future__ import annotations

import shutil
import subprocess
import threading
import uuid

import pytest

from imagine.client import ImagineClient
from tests.helpers import nearly_the_same, pixels, run_cli, service_settings, wait_for, write_adapter

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMALL = {"prompt": "a dog", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 21}


def png(client: ImagineClient, **options) -> bytes:
    job = client.submit({**SMALL, **options})
    events = list(client.events(job.job_id))
    assert events[-1].type == "done", events[-1]
    return client.result(job.job_id).images[0]


def image(client: ImagineClient, **options) -> bytes:
    return pixels(png(client, **options))


def publish(lora_dir, name: str, weights, layout: str = "diffusers") -> None:
    """Replace an adapter atomically, as the trainer publishes one: write beside it, then rename."""
    staging = lora_dir / f".{name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    write_adapter(staging, layout, weights)
    backup = lora_dir / f".{name}.old"
    if (lora_dir / name).exists():
        (lora_dir / name).rename(backup)
    staging.rename(lora_dir / name)
    shutil.rmtree(backup, ignore_errors=True)


def admin(settings, *args: str) -> subprocess.CompletedProcess:
    return run_cli(settings, "imagine-admin", *args)


def test_reload_serves_new_weights_and_refuses_a_corrupted_file(start_worker, tmp_path, adapter_weights):
    lora_dir = tmp_path / "loradir"
    publish(lora_dir, "flickr30k", adapter_weights["v1"])
    worker = start_worker(name="reloader", lora_dir=lora_dir, DEFAULT_ADAPTER="flickr30k")
    client = ImagineClient(worker.settings)
    first = image(client)
    old_version = client.workers()[worker.name].adapters["flickr30k"].version

    publish(lora_dir, "flickr30k", adapter_weights["v2"])
    assert image(client) == first  # nothing changes before the reload
    reloaded = admin(worker.settings, "reload-adapter", "flickr30k")
    assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
    assert worker.name in reloaded.stdout and " ok" in reloaded.stdout
    new_version = next(line.split()[2] for line in reloaded.stdout.splitlines() if line.startswith(worker.name))
    assert new_version != old_version
    second = image(client)
    assert second != first

    listing = admin(worker.settings, "adapters")
    assert f"flickr30k (default)  {new_version}" in listing.stdout

    weights = lora_dir / "flickr30k" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated mid-copy
    refused = admin(worker.settings, "reload-adapter", "flickr30k")
    assert refused.returncode == 1
    assert "REFUSED" in refused.stdout and "truncated or corrupted" in refused.stdout
    assert image(client) == second  # the previous version keeps serving
    # ...and the listing says so beside it.
    (line,) = [line for line in admin(worker.settings, "adapters").stdout.splitlines() if "flickr30k" in line]
    assert f"flickr30k (default)  {new_version}" in line
    assert "serving; its new files were REFUSED" in line and "truncated or corrupted" in line

    (lora_dir / "flickr30k" / "pytorch_lora_weights.safetensors").unlink()
    (lora_dir / "flickr30k" / "pytorch_lora_weights.bin").write_bytes(b"\x80\x04pickle")
    pickled = admin(worker.settings, "reload-adapter")
    assert pickled.returncode == 1 and "pickle" in pickled.stdout
    assert image(client) == second


def test_jobs_during_a_reload_all_complete_and_a_busy_worker_answers_after_its_job(
    start_worker, tmp_path, adapter_weights
):
    lora_dir = tmp_path / "loradir"
    publish(lora_dir, "flickr30k", adapter_weights["v1"], layout="peft")
    worker = start_worker(name="busy", lora_dir=lora_dir, DEFAULT_ADAPTER="flickr30k")
    client = ImagineClient(worker.settings)
    before = image(client)

    long_job = client.submit({**SMALL, "width": 384, "height": 384, "num_inference_steps": 30})
    wait_for(lambda: client.job(long_job.job_id).state == "running", 30, "the long job to start")
    jobs = [client.submit(SMALL) for _ in range(4)]
    publish(lora_dir, "flickr30k", adapter_weights["v2"], layout="peft")
    typo = client.reload_adapters("flickr3k", timeout_s=0.1)  # a bad request among good ones blocks nothing
    outcome = client.reload_adapters("flickr30k", timeout_s=0.5)
    everything = client.reload_adapters(None, timeout_s=0.1)
    assert outcome.waiting_for == [worker.name]  # busy: it will not swap weights under a running job

    finals = [list(client.events(job.job_id))[-1] for job in [long_job, *jobs]]
    assert [event.type for event in finals] == ["done"] * 5
    answers = wait_for(lambda: client.store.reload_answers(outcome.request_id), 30, "the busy worker's answer")
    (answer,) = answers[worker.name]
    assert answer.ok and answer.previous_version != answer.version
    ((refused,),) = client.store.reload_answers(typo.request_id).values()
    assert not refused.ok and "'flickr3k' not found" in refused.error
    ((all_answer,),) = client.store.reload_answers(everything.request_id).values()
    assert all_answer.adapter == "flickr30k" and all_answer.ok
    # The reload was applied before the next job, so every job after the long one used the new weights. They
    # rendered together, in one batch: the same image as alone, but for rounding.
    alone = png(client)
    assert all(nearly_the_same(client.result(job.job_id).images[0], alone) for job in jobs)
    assert pixels(alone) != before
    assert client.result(long_job.job_id).meta.adapter_version == answer.previous_version
    assert {client.result(job.job_id).meta.adapter_version for job in jobs} == {answer.version}


def test_worker_offline_during_a_reload_serves_the_new_version_when_back(
    start_worker, redis_server, tmp_path, adapter_weights
):
    lora_dir = tmp_path / "loradir"
    publish(lora_dir, "flickr30k", adapter_weights["v1"])
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    online = start_worker(settings, name="online", lora_dir=lora_dir, DEFAULT_ADAPTER="flickr30k")
    offline = start_worker(settings, name="offline", lora_dir=lora_dir, DEFAULT_ADAPTER="flickr30k")
    client = ImagineClient(settings)
    offline.stop()

    publish(lora_dir, "flickr30k", adapter_weights["v2"])
    outcome = client.reload_adapters("flickr30k", timeout_s=20)
    assert set(outcome.answers) == {online.name} and outcome.answers[online.name][0].ok
    new_version = outcome.answers[online.name][0].version

    online.stop()
    offline.start()
    assert client.workers()[offline.name].adapters["flickr30k"].version == new_version

    results = []
    threads = [threading.Thread(target=lambda: results.append(png(client))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 2 and nearly_the_same(*results)  # alone or batched together: one version served
