from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.helpers import RedisServer, WorkerProcess, make_lora_state, service_settings, write_adapter


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """MODEL_CACHE_DIR holding the built-in tiny model, built once through the code path users take."""
    from worker.pipeline import ensure_built_in_model

    cache = tmp_path_factory.mktemp("model-cache")
    ensure_built_in_model("tiny", cache)
    return cache


@pytest.fixture(scope="session")
def tiny_clip(model_cache) -> Path:
    """A CLIP model with random weights and small dimensions, saved like a hub download: what
    `python -m trainer eval --clip-model` loads. Its tokenizer is the tiny model's byte-level one."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from worker.pipeline import ensure_built_in_model

    tokenizer = CLIPTokenizer.from_pretrained(ensure_built_in_model("tiny", model_cache) / "tokenizer")
    torch.manual_seed(0)
    shared = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
    config = CLIPConfig(
        text_config=shared | {"vocab_size": len(tokenizer), "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config=shared | {"image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    model = CLIPModel(config)
    with torch.no_grad():
        # Random embeddings are nearly orthogonal, half their cosines negative, and the CLIP score floors
        # those at 0: a direction shared by both projections keeps every score positive and different.
        model.vision_model.post_layernorm.bias.fill_(1.0)
        model.text_model.final_layer_norm.bias.fill_(1.0)
        model.visual_projection.weight.add_(0.1)
        model.text_projection.weight.add_(0.1)
    folder = model_cache / "tiny-clip"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_pipe(model_cache):
    """A fresh tiny pipeline loaded the way the worker loads it."""
    from worker.pipeline import choose_placement, load_pipeline

    return load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=True)


@pytest.fixture(scope="session")
def adapter_weights(model_cache):
    """Two different seeded LoRAs on the tiny UNet (rank 4, alpha 8), as PeftModels ready to be written."""
    from worker.pipeline import choose_placement, load_pipeline

    def fresh_unet():
        return load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False).unet

    return {
        "v1": make_lora_state(fresh_unet(), seed=1, alpha=8.0),
        "v2": make_lora_state(fresh_unet(), seed=2, alpha=8.0),
    }


@pytest.fixture(scope="session")
def worker_log_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture
def start_worker(redis_server, model_cache, worker_log_dir):
    """Start workers of one isolated service (own queue and keys); all are stopped after the test."""
    started: list[WorkerProcess] = []

    def start(settings=None, name="worker", lora_dir=None, wait=True, memory_limit=None, **env) -> WorkerProcess:
        settings = settings or service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
        env = {"BASE_MODEL": "tiny", "MODEL_CACHE_DIR": str(model_cache), "DEFAULT_ADAPTER": "", **env}
        if lora_dir is not None:
            env["LORA_DIR"] = str(lora_dir)
        worker = WorkerProcess(settings, name, worker_log_dir, memory_limit=memory_limit, **env)
        started.append(worker)
        return worker.start(wait=wait)

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def shared_service(redis_server, model_cache, tmp_path_factory, adapter_weights):
    """One worker for the tests that only submit jobs: a LORA_DIR with `flickr30k` in all three layouts."""
    from tests.helpers import WorkerProcess as Process

    lora_dir = tmp_path_factory.mktemp("loradir")
    write_adapter(lora_dir / "flickr30k", "peft", adapter_weights["v1"])
    write_adapter(lora_dir / "flickr30k-diffusers", "diffusers", adapter_weights["v1"])
    write_adapter(lora_dir / "flickr30k-kohya", "kohya", adapter_weights["v1"])
    settings = service_settings(redis_server.url, f"s{uuid.uuid4().hex[:8]}")
    worker = Process(
        settings,
        "shared",
        tmp_path_factory.mktemp("shared-logs"),
        BASE_MODEL="tiny",
        MODEL_CACHE_DIR=str(model_cache),
        LORA_DIR=str(lora_dir),
        DEFAULT_ADAPTER="flickr30k",
        PREVIEW_INTERVAL_S="0.000001",
    ).start()
    yield settings, worker, lora_dir
    worker.stop()
