"""The Prometheus exporter: the service's numbers, read from Redis at each scrape.

Workers are separate processes, often on several machines, and come and go; the numbers they make
(render and queue-wait histograms, failures by reason, adapter loads) are therefore kept in Redis by
the job store, next to the queue itself. One exporter reads them all through `ImagineClient.queue_stats`,
the function `/queue` and `imagine-admin queue` call too, so the three always agree, and a scrape
counts every worker once whichever are online. Flower's own `/metrics` adds the Celery task runtimes
and per-worker counts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from imagine.client import ImagineClient
from imagine.store import DurationStats


def _histogram(name: str, documentation: str, stats: DurationStats) -> HistogramMetricFamily:
    buckets = [(floatToGoString(bound), count) for bound, count in stats.buckets]
    return HistogramMetricFamily(name, documentation, buckets=[*buckets, ("+Inf", stats.count)], sum_value=stats.sum_s)


def _by_label(name: str, documentation: str, label: str, counts: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([value], count)
    return family


class ServiceCollector(Collector):
    """Reads the service's numbers from Redis at every scrape; a Redis that cannot be read fails the scrape."""

    def __init__(self, client: ImagineClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        stats = self.client.queue_stats()
        yield GaugeMetricFamily("imagine_queue_depth", "Jobs waiting in the queue.", value=stats.queued)
        yield GaugeMetricFamily("imagine_jobs_running", "Jobs a worker is rendering now.", value=len(stats.running))
        yield GaugeMetricFamily(
            "imagine_workers_online", "Workers whose heartbeat is recent.", value=len(stats.workers)
        )
        yield _histogram(
            "imagine_queue_wait_seconds",
            "Time from a job's submission until a worker started it (again for a job requeued after its worker died).",
            stats.queue_wait,
        )
        yield _histogram("imagine_render_seconds", "Render time of each job done.", stats.render)
        yield _by_label("imagine_job_failures", "Jobs failed, by reason.", "reason", stats.counters.failures)
        yield CounterMetricFamily(
            "imagine_jobs_cancelled", "Jobs cancelled, queued or running.", value=stats.counters.cancelled
        )
        yield _by_label(
            "imagine_adapter_loads",
            "Adapter loads by the workers, at start and on reload requests: loaded (a new version), "
            "unchanged (the same files), failed (refused; the previous version keeps serving).",
            "outcome",
            stats.counters.adapter_loads,
        )
        yield _by_label(
            "imagine_dead_letters",
            "Queue messages the workers refused as not a job of ours (imagine-admin dead-letters), by kind.",
            "kind",
            stats.counters.dead_letters,
        )
        yield CounterMetricFamily(
            "imagine_uncompiled_renders",
            "Batches a compiled worker (COMPILE) rendered uncompiled, at eager speed: shapes its warm-up did "
            "not compile (another size or prompt length, a blend, one image without guidance; see the worker's log).",
            value=stats.counters.uncompiled_renders,
        )
        serving = GaugeMetricFamily(
            "imagine_adapter_serving",
            "1 for each adapter version a worker serves.",
            labels=["worker", "adapter", "version"],
        )
        refused = GaugeMetricFamily(
            "imagine_adapter_refused",
            "1 where a worker refused an adapter's current files (a version still serving keeps serving).",
            labels=["worker", "adapter"],
        )
        for worker, status in sorted(stats.workers.items()):
            for name, adapter in sorted(status.adapters.items()):
                serving.add_metric([worker, name, adapter.version], 1)
            for name in sorted(status.adapter_errors):
                refused.add_metric([worker, name], 1)
        yield serving
        yield refused


def serve_metrics(client: ImagineClient, port: int, address: str = "0.0.0.0") -> None:
    """Serve /metrics until the process is stopped."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(client))
    _, thread = start_http_server(port, addr=address, registry=registry)
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how one stops it by hand
        thread.join()
