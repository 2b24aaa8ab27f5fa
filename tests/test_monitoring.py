"""Monitoring as an operator meets it: Flower (`celery -A worker flower`) and the Prometheus exporter
(`imagine-admin metrics`) over a real Redis and a real worker on the tiny model, `imagine-admin queue`
telling the same numbers, and the job id on the worker's log lines."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from imagine.client import ImagineClient
from imagine.wire import ResultMeta, WorkerStatus
from tests.helpers import (
    BIN,
    ServiceProcess,
    WorkerProcess,
    free_port,
    run_cli,
    service_settings,
    wait_for,
    write_adapter,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOWER_USER, FLOWER_PASSWORD = "operator", "correct horse"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 3}
# Longer than CLIP's 77 tokens: with PROMPT_WEIGHTS off, diffusers logs a warning while the job renders.
LONG_PROMPT = "a lighthouse at dusk, " + "waves " * 80


def http_get(url: str, credentials: tuple[str, str] | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if credentials is not None:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError):
        return 0, ""


class FlowerProcess(ServiceProcess):
    """`celery -A worker flower`, with basic auth from the environment as an operator runs it."""

    label = "flower"

    def __init__(self, settings, log_dir: Path) -> None:
        super().__init__(settings, "flower", log_dir, {"FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"})
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.command = [str(BIN / "celery"), "-A", "worker", "flower", f"--port={port}", "--address=127.0.0.1"]

    def is_ready(self) -> bool:
        return http_get(f"{self.url}/healthcheck")[0] == 200  # the one page open without credentials

    def api(self, path: str, credentials: tuple[str, str] | None = (FLOWER_USER, FLOWER_PASSWORD)):
        status, body = http_get(f"{self.url}{path}", credentials)
        return status, json.loads(body) if status == 200 else body


class ExporterProcess(ServiceProcess):
    """`imagine-admin metrics`: the one Prometheus exporter of a service."""

    label = "exporter"

    def __init__(self, settings, log_dir: Path) -> None:
        super().__init__(settings, "exporter", log_dir, {})
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.command = [str(BIN / "imagine-admin"), "metrics", "--port", str(port), "--address", "127.0.0.1"]

    def is_ready(self) -> bool:
        return http_get(self.url)[0] == 200

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics, by name and labels."""
        status, body = http_get(self.url)
        assert status == 200, body
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body)
            for sample in family.samples
        }


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics[(name, frozenset(labels.items()))]


@dataclass
class MonitoredRun:
    """What happened in one small service watched by Flower and the exporter."""

    flower: FlowerProcess
    exporter: ExporterProcess
    worker: WorkerProcess
    done_job: str
    failed_job: str
    done_meta: ResultMeta
    metrics_while_queued: dict
    queue_while_queued: str
    reload_output: str
    worker_status: WorkerStatus


@pytest.fixture(scope="module")
def monitored(redis_server, model_cache, tmp_path_factory, adapter_weights):
    """Flower and the exporter, then a job queued before any worker is up, a worker that renders it, a job
    that fails (an adapter no worker has), and a reload of all adapters (one new version, one broken file)."""
    logs = tmp_path_factory.mktemp("monitoring-logs")
    lora_dir = tmp_path_factory.mktemp("monitoring-loradir")
    write_adapter(lora_dir / "flickr30k", "peft", adapter_weights["v1"])
    settings = service_settings(redis_server.url, f"m{uuid.uuid4().hex[:8]}")
    flower = FlowerProcess(settings, logs)
    exporter = ExporterProcess(settings, logs)
    worker = WorkerProcess(
        settings,
        "monitored",
        logs,
        BASE_MODEL="tiny",
        MODEL_CACHE_DIR=str(model_cache),
        LORA_DIR=str(lora_dir),
        DEFAULT_ADAPTER="flickr30k",
        PROMPT_WEIGHTS="false",
    )
    try:
        # Flower sees only the events sent after it connects: it starts first.
        flower.start()
        exporter.start()
        client = ImagineClient(settings)
        done_job = client.submit({"prompt": LONG_PROMPT, **SMALL}).job_id
        metrics_while_queued = exporter.scrape()
        queue_while_queued = run_cli(settings, "imagine-admin", "queue").stdout

        worker.start()
        wait_for(lambda: worker.name in flower.api("/api/workers?refresh=1")[1], 30, "Flower to list the worker")
        assert list(client.events(done_job))[-1].type == "done"
        failed_job = client.submit({"prompt": "a dog", **SMALL, "adapter": "ghost"}).job_id
        assert list(client.events(failed_job))[-1].type == "failed"
        client.store.redis.lpush(settings.queue_name, b"not a message")  # refused, and counted
        wait_for(client.store.dead_letters, 30, "the worker to refuse the message")

        write_adapter(lora_dir / "flickr30k", "peft", adapter_weights["v2"])
        (lora_dir / "broken.safetensors").write_bytes(b"not a safetensors file")
        reload_output = run_cli(settings, "imagine-admin", "reload-adapter").stdout

        yield MonitoredRun(
            flower=flower,
            exporter=exporter,
            worker=worker,
            done_job=done_job,
            failed_job=failed_job,
            done_meta=client.result(done_job).meta,
            metrics_while_queued=metrics_while_queued,
            queue_while_queued=queue_while_queued,
            reload_output=reload_output,
            worker_status=client.workers()[worker.name],
        )
    finally:
        for process in (worker, exporter, flower):
            process.stop()


def test_flower_lists_the_worker_and_each_job_with_its_prompt_runtime_and_state(monitored):
    flower = monitored.flower
    status, workers = flower.api("/api/workers")
    assert status == 200 and monitored.worker.name in workers

    def finished_tasks():
        tasks = flower.api("/api/tasks")[1]
        found = [tasks.get(f"{job_id}.1") or {} for job_id in (monitored.done_job, monitored.failed_job)]
        return found if all(task.get("state") in ("SUCCESS", "FAILURE") for task in found) else None

    done, failed = wait_for(finished_tasks, 30, "Flower to see both jobs finish")
    assert done["state"] == "SUCCESS" and done["name"] == "imagine.generate"
    assert done["worker"] == monitored.worker.name and done["runtime"] > 0
    assert "'prompt': 'a lighthouse at dusk," in done["kwargs"]
    assert failed["state"] == "FAILURE" and "'prompt': 'a dog'" in failed["kwargs"]
    assert "adapter: adapter 'ghost' is not loaded" in failed["exception"]


def test_flower_refuses_requests_without_the_credentials(monitored):
    flower = monitored.flower
    for path in ("/api/workers", "/api/tasks"):
        assert flower.api(path, credentials=None)[0] == 401
        assert flower.api(path, credentials=(FLOWER_USER, "wrong"))[0] == 401
        assert flower.api(path)[0] == 200


def test_metrics_count_the_queue_renders_failures_and_reloads(monitored):
    queued = monitored.metrics_while_queued
    assert sample(queued, "imagine_queue_depth") == 1 and sample(queued, "imagine_workers_online") == 0
    assert sample(queued, "imagine_render_seconds_count") == 0

    metrics = monitored.exporter.scrape()
    assert sample(metrics, "imagine_queue_depth") == 0 and sample(metrics, "imagine_jobs_running") == 0
    assert sample(metrics, "imagine_workers_online") == 1

    render_s = monitored.done_meta.render_s
    assert sample(metrics, "imagine_render_seconds_count") == 1
    assert sample(metrics, "imagine_render_seconds_sum") == pytest.approx(render_s, abs=0.01)
    assert sample(metrics, "imagine_render_seconds_bucket", le="+Inf") == 1
    assert sample(metrics, "imagine_render_seconds_bucket", le="1800.0") == 1
    # The first job waited for the worker to start; the failed one was claimed as well.
    assert sample(metrics, "imagine_queue_wait_seconds_count") == 2
    assert sample(metrics, "imagine_queue_wait_seconds_sum") >= monitored.done_meta.queue_wait_s > 1

    assert sample(metrics, "imagine_job_failures_total", reason="adapter") == 1
    for reason in ("rejected", "out_of_memory", "timeout", "worker_lost", "internal"):
        assert sample(metrics, "imagine_job_failures_total", reason=reason) == 0
    assert sample(metrics, "imagine_jobs_cancelled_total") == 0

    # flickr30k at start, then its new version on reload; the broken file refused.
    assert "REFUSED" in monitored.reload_output and " ok" in monitored.reload_output
    assert sample(metrics, "imagine_adapter_loads_total", outcome="loaded") == 2
    assert sample(metrics, "imagine_adapter_loads_total", outcome="unchanged") == 0
    assert sample(metrics, "imagine_adapter_loads_total", outcome="failed") == 1
    worker = monitored.worker.name
    version = monitored.worker_status.adapters["flickr30k"].version
    assert sample(metrics, "imagine_adapter_serving", worker=worker, adapter="flickr30k", version=version) == 1
    assert sample(metrics, "imagine_adapter_refused", worker=worker, adapter="broken") == 1
    assert ("imagine_adapter_refused", frozenset({"worker": worker, "adapter": "flickr30k"}.items())) not in metrics

    assert sample(metrics, "imagine_dead_letters_total", kind="undecodable") == 1
    for kind in ("not_a_job", "unknown_job", "disagrees"):
        assert sample(metrics, "imagine_dead_letters_total", kind=kind) == 0
    assert sample(metrics, "imagine_uncompiled_renders_total") == 0  # counted by compiled workers only


def test_imagine_admin_queue_tells_the_same_numbers_as_the_exporter(monitored):
    assert "queued:          1" in monitored.queue_while_queued
    assert "workers online:  0" in monitored.queue_while_queued

    metrics = monitored.exporter.scrape()
    queue = run_cli(monitored.worker.settings, "imagine-admin", "queue")
    assert queue.returncode == 0, queue.stderr
    lines = queue.stdout.splitlines()
    render_s = sample(metrics, "imagine_render_seconds_sum") / sample(metrics, "imagine_render_seconds_count")
    loads = {
        outcome: int(sample(metrics, "imagine_adapter_loads_total", outcome=outcome))
        for outcome in ("loaded", "unchanged", "failed")
    }
    assert f"queued:          {sample(metrics, 'imagine_queue_depth'):.0f}" in lines
    assert f"workers online:  {sample(metrics, 'imagine_workers_online'):.0f}" in lines
    assert f"recent render:   {render_s:.2f} s (mean of the last 1 job)" in lines
    assert f"jobs done:       {sample(metrics, 'imagine_render_seconds_count'):.0f}" in lines
    failures = int(sample(metrics, "imagine_job_failures_total", reason="adapter"))
    assert (
        f"failed:          {failures} in the last hour (adapter {failures}), {failures} in all (adapter {failures})"
        in lines
    )
    assert f"cancelled:       {sample(metrics, 'imagine_jobs_cancelled_total'):.0f}" in lines
    assert (
        f"adapter loads:   {loads['loaded']} loaded, {loads['unchanged']} unchanged, {loads['failed']} failed" in lines
    )
    refused = int(sample(metrics, "imagine_dead_letters_total", kind="undecodable"))
    assert f"dead letters:    {refused} (undecodable {refused}; see imagine-admin dead-letters)" in lines


def test_every_worker_line_about_a_job_carries_its_id(monitored):
    lines = monitored.worker.log_path.read_text().splitlines()
    for job_id in (monitored.done_job, monitored.failed_job):
        task = f"imagine.generate[{job_id}.1]"
        received = next(index for index, line in enumerate(lines) if f"Task {task} received" in line)
        ended = next(index for index, line in enumerate(lines) if task in line and index > received)
        # Celery's own lines name the task, `<job id>.<attempt>`; ours, and the libraries', in between carry job=<id>.
        during = lines[received + 1 : ended]
        assert during, f"no line logged while job {job_id} ran"
        assert all(f"job={job_id}" in line for line in during), "\n".join(during)
    done_lines = [line for line in lines if f"job={monitored.done_job}" in line]
    assert any("truncated" in line for line in done_lines), "diffusers' warning about the long prompt"
    assert any(f"job {monitored.done_job} done in" in line for line in done_lines)
    # The start-up lines, logged before Celery would set its logging up, are there too, formatted.
    assert any(" INFO worker.pipeline: loaded base model tiny on cpu" in line for line in lines)
