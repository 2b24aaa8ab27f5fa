"""Jobs through a real Redis and a real worker process on the tiny model, via the API and the `imagine` CLI."""

from __future__ import annotations

import base64
import json
import re

import pytest
from PIL import Image

from imagine.client import ImagineClient, QueueFull
from imagine.contract import JobRejected
from imagine.images import encode_image, image_digest
from imagine.queue import send_job
from tests.helpers import free_port, nearly_the_same, photo, pixels, png_size, run_cli, service_settings, wait_for

pytestmark = pytest.mark.integration

SMALL = {"width": 64, "height": 64, "num_inference_steps": 4}


def run_job(client: ImagineClient, **options) -> tuple[str, list[dict]]:
    job = client.submit({"prompt": "a dog running on a beach", **SMALL, **options})
    return job.job_id, list(client.events(job.job_id))


def test_events_arrive_in_order_and_the_result_matches(shared_service):
    settings, worker, _ = shared_service
    client = ImagineClient(settings)
    job_id, events = run_job(client, seed=11, num_images_per_prompt=2, adapter="none")
    kinds = [event.type for event in events]
    assert kinds[0] == "queued" and events[0].position >= 1
    assert kinds[1] == "started" and events[1].worker == worker.name
    assert kinds[-1] == "done"
    steps = [event.step for event in events if event.type == "step"]
    assert steps == sorted(steps) and steps[-1] == events[2].total
    assert set(kinds[2:-1]) == {"step"}
    previews = [event.preview_png for event in events if event.type == "step" and event.preview_png]
    assert previews and png_size(base64.b64decode(previews[0]))[0] > 0

    result = client.result(job_id)
    assert [png_size(png) for png in result.images] == [(64, 64), (64, 64)]
    meta = result.meta
    assert meta.seeds == [11, 12] and [image.seed for image in meta.images] == [11, 12]
    assert meta.prompt == "a dog running on a beach" and meta.num_inference_steps == 4
    assert meta.adapter is None and meta.worker == worker.name and meta.render_s > 0
    assert meta.queue_wait_s >= 0 and meta.scheduler == "PNDMScheduler"
    # Kept until its delivery is confirmed, once, then gone.
    assert client.job(job_id).state == "done" and client.result(job_id) is not None
    assert client.confirm_delivery(job_id) is True
    assert client.confirm_delivery(job_id) is False
    assert client.result(job_id) is None


def test_same_seed_gives_the_same_image_and_the_default_adapter_applies(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    first, second, base = (
        client.result(run_job(client, seed=5, adapter=adapter)[0]) for adapter in (None, None, "none")
    )
    assert first.images == second.images
    assert first.meta.adapter == "flickr30k" and len(first.meta.adapter_version) == 12
    assert pixels(first.images[0]) != pixels(base.images[0])


def test_all_three_adapter_layouts_serve_the_same_image(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    pngs = {
        adapter: client.result(run_job(client, seed=9, adapter=adapter)[0]).images[0]
        for adapter in ("flickr30k", "flickr30k-diffusers", "flickr30k-kohya", "none")
    }
    images = {adapter: pixels(png) for adapter, png in pngs.items()}
    assert images["flickr30k-diffusers"] == images["flickr30k-kohya"] != images["none"]
    # The default adapter serves fused into the base weights: the same image, but for rounding.
    assert nearly_the_same(pngs["flickr30k"], pngs["flickr30k-diffusers"]) and images["flickr30k"] != images["none"]
    zero = client.result(run_job(client, seed=9, adapter="flickr30k", adapter_scale=0.0)[0])
    assert pixels(zero.images[0]) == images["none"]


def test_schedulers_and_a_long_prompt_encoded_whole(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    job_id, events = run_job(client, seed=1, scheduler="euler_ancestral", adapter="none", prompt="dog " * 40)
    assert events[-1].type == "done"
    started = next(event for event in events if event.type == "started")
    assert started.warnings == []  # with PROMPT_WEIGHTS on, nothing is cut
    meta = client.result(job_id).meta
    assert meta.scheduler == "EulerAncestralDiscreteScheduler" and meta.warnings == []


def test_bad_options_are_refused_before_the_queue(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    before = client.store.queue_length()
    with pytest.raises(JobRejected, match="num_inference_steps must be an integer from 1 to 100"):
        client.submit({"prompt": "x", "num_inference_steps": 1000})
    assert client.store.queue_length() == before


def test_worker_refuses_a_hostile_message_and_keeps_serving(shared_service):
    """A message that skipped the client's validation (old or hostile client) fails cleanly."""
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    job = client.submit({"prompt": "ok", **SMALL, "adapter": "none"})
    list(client.events(job.job_id))
    hostile = {"prompt": "x", "width": 100000, "height": 8, "__class__": "boom"}
    client.store.create("hostile", hostile, "cli", "", max_queued=100)
    send_job(client.app, "hostile", hostile, attempt=1)
    events = list(client.events("hostile"))
    assert events[-1].type == "failed"
    assert events[-1].reason == "rejected" and "unknown option '__class__'" in events[-1].message
    _, after = run_job(client, adapter="none")
    assert after[-1].type == "done"


def test_missing_adapter_fails_the_job_with_its_name(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    _, events = run_job(client, adapter="ghost")
    assert events[-1].type == "failed" and events[-1].reason == "adapter"
    assert "'ghost' is not loaded" in events[-1].message and "flickr30k" in events[-1].message


def test_cancel_a_queued_job_and_a_running_one(shared_service):
    settings, _, _ = shared_service
    client = ImagineClient(settings)
    long_job = client.submit(
        {"prompt": "slow", "width": 512, "height": 512, "num_inference_steps": 60, "adapter": "none"}
    )
    queued = client.submit({"prompt": "waiting", **SMALL, "adapter": "none"})
    wait_for(lambda: client.job(long_job.job_id).state == "running", 30, "the long job to start")
    assert client.job(queued.job_id).state == "queued"
    assert client.cancel(queued.job_id) == "cancelled"
    assert client.cancel(long_job.job_id) == "cancelling"
    assert list(client.events(queued.job_id))[-1].type == "cancelled"
    last = list(client.events(long_job.job_id))[-1]
    assert last.type == "cancelled" and last.message == "Cancelled while rendering."
    assert client.cancel(queued.job_id) == "cancelled"  # a second click says what it is, changes nothing
    _, after = run_job(client, adapter="none")
    assert after[-1].type == "done"


def test_queue_cap_refuses_politely(shared_service):
    settings, _, _ = shared_service
    capped = settings.model_copy(update={"max_queue_length": 1})
    client = ImagineClient(capped)
    blocker = client.submit(
        {"prompt": "slow", "width": 512, "height": 512, "num_inference_steps": 40, "adapter": "none"}
    )
    wait_for(lambda: client.job(blocker.job_id).state == "running", 30, "the blocker to start")
    waiting = client.submit({"prompt": "one waits", **SMALL, "adapter": "none"})
    with pytest.raises(QueueFull, match="queue is full"):
        client.submit({"prompt": "one too many", **SMALL})
    assert waiting.position == 1
    client.cancel(blocker.job_id)
    assert list(client.events(waiting.job_id))[-1].type == "done"


def test_imagine_cli_writes_pngs_and_metadata(shared_service, tmp_path):
    settings, worker, _ = shared_service
    small = ["--width", "64", "--height", "64"]
    done = run_cli(
        settings,
        "imagine",
        "a dog running on a beach",
        "--seed",
        "7",
        "--steps",
        "4",
        "--count",
        "2",
        *small,
        "--adapter",
        "flickr30k",
        "--out",
        str(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    pngs = sorted(tmp_path.glob("*.png"))
    assert [path.name.split("-", 1)[1] for path in pngs] == ["0-seed7.png", "1-seed8.png"]
    assert all(png_size(path.read_bytes()) == (64, 64) for path in pngs)
    (meta_path,) = tmp_path.glob("*.json")
    meta = json.loads(meta_path.read_text())
    assert meta["seeds"] == [7, 8] and meta["adapter"] == "flickr30k" and meta["adapter_scale"] == 1.0
    assert meta["worker"] == worker.name and meta["guidance_scale"] == 7.5 and meta["negative_prompt"] == ""
    assert {"queue_wait_s", "render_s", "scheduler", "width", "height"} <= set(meta)
    assert [image["file"] for image in meta["images"]] == [path.name for path in pngs]
    assert "started on" in done.stderr

    client = ImagineClient(settings)
    again = client.result(run_job(client, seed=7, num_images_per_prompt=2, adapter="flickr30k")[0])
    assert again.images == [path.read_bytes() for path in pngs]  # the same seed from another front end

    refused = run_cli(settings, "imagine", "a dog", "--steps", "0")
    assert refused.returncode == 2
    assert "refused: num_inference_steps must be an integer from 1 to 100 (got 0)" in refused.stderr

    failed = run_cli(
        settings, "imagine", "a dog", "--steps", "2", *small, "--adapter", "ghost", "--out", str(tmp_path / "f")
    )
    assert failed.returncode == 1 and "job failed: adapter 'ghost' is not loaded" in failed.stderr


def test_the_cli_blends_several_adapters_and_the_result_lists_each(shared_service, tmp_path):
    settings, worker, _ = shared_service
    small = ["--steps", "3", "--width", "64", "--height", "64", "--seed", "7"]
    blended = run_cli(
        settings,
        "imagine",
        "a dog",
        *small,
        "--adapter",
        "flickr30k:0.7",
        "--adapter",
        "flickr30k-kohya:0.4",
        "--out",
        str(tmp_path),
    )
    assert blended.returncode == 0, blended.stderr
    loaded = ImagineClient(settings).queue_stats().workers[worker.name].adapters
    expected = [
        {"name": "flickr30k", "version": loaded["flickr30k"].version, "scale": 0.7},
        {"name": "flickr30k-kohya", "version": loaded["flickr30k-kohya"].version, "scale": 0.4},
    ]
    (meta_path,) = tmp_path.glob("*.json")
    assert json.loads(meta_path.read_text())["adapters"] == expected
    (png,) = tmp_path.glob("*.png")
    with Image.open(png) as image:
        assert json.loads(image.text["adapters"]) == expected
    client = ImagineClient(settings)
    alone = client.submit({"prompt": "a dog", **SMALL, "num_inference_steps": 3, "seed": 7, "adapter": "flickr30k",
                           "adapter_scale": 0.7})  # fmt: skip
    list(client.events(alone.job_id))
    assert pixels(client.result(alone.job_id).images[0]) != pixels(png.read_bytes())

    bad_scale = run_cli(settings, "imagine", "a dog", "--adapter", "flickr30k:lots")
    assert bad_scale.returncode == 2
    assert "refused: adapters: the scale after ':' in 'flickr30k:lots' must be a number" in bad_scale.stderr
    twice = run_cli(settings, "imagine", "a dog", "--adapter", "flickr30k:0.5", "--adapter", "flickr30k")
    assert twice.returncode == 2 and "refused: adapters: flickr30k is listed twice" in twice.stderr


def test_the_cli_starts_from_an_image_at_its_aspect_ratio_in_a_style(shared_service, tmp_path):
    settings, _, _ = shared_service
    start = tmp_path / "start.png"
    start.write_bytes(photo(96, 64))
    out = tmp_path / "out"
    done = run_cli(
        settings, "imagine", "a dog", "--steps", "3", "--init-image", str(start), "--strength", "0.5",
        "--width", "96", "--style", "photo", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (png,) = out.glob("*.png")
    assert png_size(png.read_bytes()) == (96, 64)  # the height follows the image's aspect ratio
    meta = json.loads(next(out.glob("*.json")).read_text())
    assert meta["init_image"] == image_digest(encode_image(start.read_bytes())) and meta["strength"] == 0.5
    assert "image" not in meta  # the file is not copied into the metadata
    assert meta["style"] == "photo" and meta["prompt"] == "a photograph of a dog, natural light, 35mm"
    assert meta["negative_prompt"].startswith("drawing, painting")  # the shipped styles.toml
    with Image.open(png) as image:
        assert image.text["strength"] == "0.5" and image.text["init_image"] == meta["init_image"]

    missing = run_cli(settings, "imagine", "a dog", "--init-image", str(tmp_path / "nowhere.png"))
    assert missing.returncode == 2 and "refused: cannot read --init-image" in missing.stderr
    unknown = run_cli(settings, "imagine", "a dog", "--style", "noir")
    assert unknown.returncode == 2 and "refused: style 'noir' is not a style of this service" in unknown.stderr


def test_imagine_admin_queue_and_adapters_read_the_live_service(shared_service):
    settings, worker, _ = shared_service
    client = ImagineClient(settings)
    run_job(client, adapter="none")
    queue = run_cli(settings, "imagine-admin", "queue")
    assert queue.returncode == 0, queue.stderr
    assert "queued:          0" in queue.stdout and "workers online:  1" in queue.stdout
    assert f"{worker.name}: idle" in queue.stdout
    assert re.search(r"^recent render:   \d+\.\d\d s \(mean of the last \d+ jobs?\)$", queue.stdout, re.MULTILINE)
    adapters = run_cli(settings, "imagine-admin", "adapters")
    assert "flickr30k (default)" in adapters.stdout
    assert "flickr30k-kohya" in adapters.stdout and "kohya" in adapters.stdout


def test_clis_say_plainly_when_redis_cannot_be_reached():
    settings = service_settings(f"redis://:hunter2@127.0.0.1:{free_port()}/0", "nowhere")
    for program, args in (("imagine", ["a dog"]), ("imagine-admin", ["queue"])):
        answer = run_cli(settings, program, *args)
        assert answer.returncode == 4, answer.stderr
        assert f"{program}: cannot reach Redis at redis://:***@127.0.0.1:" in answer.stderr
        assert "Start `redis-server`, or set REDIS_URL" in answer.stderr
        assert "hunter2" not in answer.stderr and "Traceback" not in answer.stderr
