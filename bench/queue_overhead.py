"""Queue overhead: submit-to-result time through Redis and a worker, minus the render itself.

Starts its own redis-server and one worker (`celery -A worker worker`), then:
  1. 1 job at a time: overhead = submit-to-result - the worker's own measured render time;
  2. N jobs at once: overhead = submit-to-result - own render - the renders it waited behind;
  3. the same render called directly on a plain diffusers pipeline in this process (the baseline),
     to show the worker's render is the pipeline's render.
Prints median and p95 of each, in ms.

    .venv/bin/python bench/queue_overhead.py --base-model tiny --jobs 20 --size 256 --steps 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagine.client import ImagineClient
from imagine.wire import EventType
from tests.helpers import RedisServer, WorkerProcess, service_settings


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values_s: list[float]) -> str:
    return f"median {statistics.median(values_s) * 1000:8.1f} ms   p95 {percentile(values_s, 0.95) * 1000:8.1f} ms"


def one_job(client: ImagineClient, options: dict) -> dict:
    started = time.perf_counter()
    job = client.submit(options)
    for event in client.events(job.job_id):
        if event.type in (EventType.FAILED, EventType.CANCELLED):
            raise RuntimeError(event)
    result = client.result(job.job_id)
    end_to_end = time.perf_counter() - started
    client.confirm_delivery(job.job_id)
    record = client.job(job.job_id)
    return {"e2e": end_to_end, "render": result.meta.render_s, "started_at": record.started_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-model", default="tiny", help="BASE_MODEL for the worker and the baseline.")
    parser.add_argument("--jobs", type=int, default=20, help="Jobs in each phase (and concurrency of phase 2).")
    parser.add_argument("--size", type=int, default=256, help="Width and height of each image.")
    parser.add_argument("--steps", type=int, default=10, help="num_inference_steps of each job.")
    parser.add_argument("--json", type=Path, help="Also write the figures to this file.")
    args = parser.parse_args()

    options = {
        "prompt": "a dog running on a beach",
        "width": args.size,
        "height": args.size,
        "num_inference_steps": args.steps,
        "adapter": "none",
        "seed": 1,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    cache = Path("~/.cache/imagine").expanduser()
    redis_server = RedisServer(workdir)
    redis_server.start()
    settings = service_settings(redis_server.url, f"bench{uuid.uuid4().hex[:6]}", max_queue_length=1000)
    # Default progress settings: one step event a second, previews every 2 s, as in production.
    worker = WorkerProcess(
        settings,
        "bench",
        workdir,
        BASE_MODEL=args.base_model,
        MODEL_CACHE_DIR=str(cache),
        DEFAULT_ADAPTER="",
        PROGRESS_INTERVAL_S="1.0",
        PREVIEW_INTERVAL_S="2.0",
    )
    try:
        worker.start()
        client = ImagineClient(settings)
        one_job(client, options)  # warm

        sequential = [one_job(client, options) for _ in range(args.jobs)]

        concurrent: list[dict] = []
        threads = [
            threading.Thread(target=lambda: concurrent.append(one_job(client, options))) for _ in range(args.jobs)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        worker.stop()
        redis_server.stop()

    # Baseline: the same render on a plain diffusers pipeline, in this process, after the worker stopped.
    import torch
    from diffusers import StableDiffusionPipeline

    from worker.pipeline import choose_placement, resolve_base_model

    placement = choose_placement("auto", "auto")
    pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(args.base_model, cache), dtype=placement.dtype)
    pipe = pipe.to(placement.device)
    pipe.set_progress_bar_config(disable=True)
    direct = []
    for _ in range(max(3, args.jobs // 2)):
        begin = time.perf_counter()
        pipe(
            options["prompt"],
            width=args.size,
            height=args.size,
            num_inference_steps=args.steps,
            generator=torch.Generator("cpu").manual_seed(1),
        )
        direct.append(time.perf_counter() - begin)

    seq_overhead = [job["e2e"] - job["render"] for job in sequential]
    by_start = sorted(concurrent, key=lambda job: job["started_at"])
    conc_overhead = []
    waited = 0.0
    for job in by_start:
        conc_overhead.append(job["e2e"] - job["render"] - waited)
        waited += job["render"]

    worker_render = statistics.median(job["render"] for job in sequential)
    figures = {
        "base_model": args.base_model,
        "size": args.size,
        "steps": args.steps,
        "jobs": args.jobs,
        "device": str(placement.device),
        "direct_render_median_s": statistics.median(direct),
        "worker_render_median_s": worker_render,
        "sequential_overhead_median_s": statistics.median(seq_overhead),
        "sequential_overhead_p95_s": percentile(seq_overhead, 0.95),
        "concurrent_overhead_median_s": statistics.median(conc_overhead),
        "concurrent_overhead_p95_s": percentile(conc_overhead, 0.95),
    }
    print(f"{args.base_model}, {args.size}x{args.size}, {args.steps} steps, {placement.device}, {args.jobs} jobs")
    print(f"plain diffusers render (baseline)  {summary(direct)}")
    print(
        f"render inside the worker           {summary([job['render'] for job in sequential])}"
        f"   ratio to baseline {worker_render / statistics.median(direct):.2f}"
    )
    print(f"queue overhead, 1 at a time        {summary(seq_overhead)}")
    print(f"queue overhead, {args.jobs} at once         {summary(conc_overhead)}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
