"""BASE_MODEL: other SD 1.x folders, a hub id that cannot be fetched, and the safety checker."""

from __future__ import annotations

import os
import subprocess

import pytest

from imagine.client import ImagineClient
from tests.helpers import BIN, REPO
from worker.pipeline import ModelLoadError, choose_placement, load_pipeline


def save_pipeline_with_strict_safety_checker(folder):
    """An SD 1.x-layout folder of other dimensions than `tiny`, whose safety checker flags every image."""
    from dataclasses import replace

    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    from worker.pipeline import BUILT_IN_MODELS, build_random_pipeline

    spec = replace(
        BUILT_IN_MODELS["tiny"], seed=7, unet_channels=(16, 32), text_hidden_size=24, vae_channels=(8, 16, 16)
    )
    pipe = build_random_pipeline(spec)
    clip = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_attention_heads": 2,
            "num_hidden_layers": 1,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    checker = StableDiffusionSafetyChecker(clip)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-2.0)  # every cosine similarity is over this threshold
    pipe.register_modules(
        safety_checker=checker, feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32)
    )
    pipe.register_to_config(requires_safety_checker=True)
    pipe.save_pretrained(folder)
    return folder


@pytest.mark.integration
def test_folder_of_other_dimensions_serves_and_safety_checker_withholds(start_worker, tmp_path):
    folder = save_pipeline_with_strict_safety_checker(tmp_path / "other-sd")
    worker = start_worker(name="other", BASE_MODEL=str(folder))
    client = ImagineClient(worker.settings)
    job = client.submit(
        {
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            "num_inference_steps": 3,
            "num_images_per_prompt": 2,
            "adapter": "none",
            "seed": 1,
        }
    )
    events = list(client.events(job.job_id))
    assert events[-1].type == "done" and events[-1].withheld == 2
    result = client.result(job.job_id)
    assert result.images == [] and [image.withheld for image in result.meta.images] == [True, True]
    assert "safety checker withheld 2 of 2 images" in result.meta.warnings[0]
    assert result.meta.base_model == str(folder)

    unsafe = client.submit(
        {
            "prompt": "a cat",
            "width": 64,
            "height": 64,
            "num_inference_steps": 2,
            "adapter": "none",
            "safety_checker": False,
        }
    )
    refused = list(client.events(unsafe.job_id))[-1]
    assert refused.type == "failed" and "does not allow turning the safety checker off" in refused.message


def test_safety_checker_setting_turns_it_off(tmp_path):
    folder = save_pipeline_with_strict_safety_checker(tmp_path / "other-sd")
    placement = choose_placement("cpu", "float32")
    assert load_pipeline(str(folder), placement, tmp_path, safety_checker=True).safety_checker is not None
    pipe = load_pipeline(str(folder), placement, tmp_path, safety_checker=False)
    assert pipe.safety_checker is None
    image = pipe("a cat", num_inference_steps=2, width=64, height=64).images[0]
    assert image.size == (64, 64) and image.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_folder_that_is_not_a_pipeline_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"not a diffusers pipeline folder.*model_index.json"):
        load_pipeline(str(tmp_path), choose_placement("cpu", "auto"), tmp_path, safety_checker=True)


@pytest.mark.integration
def test_unreachable_hub_model_stops_the_worker_with_directions(redis_server, tmp_path):
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "BASE_MODEL": "CompVis/stable-diffusion-v1-4",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path),
        "QUEUE_NAME": "hubless",
        "KEY_PREFIX": "hubless",
    }
    worker = subprocess.run(
        [str(BIN / "celery"), "-A", "worker", "worker", "-n", "hubless@test"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert worker.returncode == 1
    assert "Could not load the base model 'CompVis/stable-diffusion-v1-4'" in worker.stderr
    assert "set BASE_MODEL to that folder" in worker.stderr and "BASE_MODEL=tiny" in worker.stderr


def test_tiny_model_is_saved_and_loaded_like_a_real_one(model_cache):
    folder = next(model_cache.glob("tiny-v*"))
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= {
        path.name for path in folder.iterdir()
    }
    pipe = load_pipeline("tiny", choose_placement("cpu", "auto"), model_cache, safety_checker=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8
