"""What users of other Stable Diffusion bots expect, checked against diffusers' own way of doing it on the
tiny model: several adapters blended in one image."""

from __future__ import annotations

import pytest
import torch

from imagine.contract import Limits, parse_job_options
from tests.helpers import pixels, write_adapter
from worker.adapters import AdapterError, AdapterRegistry
from worker.pipeline import choose_placement, load_pipeline
from worker.renderer import Renderer

LIMITS = Limits()
JOB = {"prompt": "a dog", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 3}


@pytest.fixture
def lora_dir(tmp_path, adapter_weights):
    folder = tmp_path / "loradir"
    write_adapter(folder / "first", "diffusers", adapter_weights["v1"])
    write_adapter(folder / "second", "diffusers", adapter_weights["v2"])
    return folder


@pytest.fixture
def renderer(tiny_pipe, lora_dir):
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    for name in ("first", "second"):
        registry.load(name)
    return Renderer(tiny_pipe, registry, "", allow_safety_checker_off=False)


def render(renderer: Renderer, **options):
    return renderer.render(parse_job_options({**JOB, **options}, LIMITS))


def test_two_adapters_blend_as_diffusers_set_adapters_does(renderer, lora_dir, model_cache):
    blended = render(renderer, adapters=[{"name": "first", "scale": 0.7}, {"name": "second", "scale": 0.4}])

    pipe = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
    pipe.load_lora_weights(lora_dir / "first", adapter_name="first")
    pipe.load_lora_weights(lora_dir / "second", adapter_name="second")
    pipe.set_adapters(["first", "second"], [0.7, 0.4])
    theirs = pipe("a dog", num_inference_steps=3, width=64, height=64, generator=torch.Generator().manual_seed(3))
    assert pixels(blended.images[0]) == theirs.images[0].convert("RGB").tobytes()

    alone = [render(renderer, adapter=name, adapter_scale=scale) for name, scale in (("first", 0.7), ("second", 0.4))]
    assert all(pixels(output.images[0]) != pixels(blended.images[0]) for output in alone)
    # The one-adapter spellings are the same job.
    assert pixels(render(renderer, adapters=[{"name": "first", "scale": 0.7}]).images[0]) == pixels(alone[0].images[0])


def test_the_plan_lists_each_adapter_with_its_version_and_scale(renderer):
    options = parse_job_options({**JOB, "adapters": [{"name": "second", "scale": 0.5}, {"name": "first"}]}, LIMITS)
    plan = renderer.plan(options)
    loaded = renderer.adapters.loaded
    assert [(use.name, use.version, use.scale) for use in plan.adapters] == [
        ("second", loaded["second"].version, 0.5),
        ("first", loaded["first"].version, 1.0),
    ]
    assert plan.batch_key.adapters == (("second", 0.5), ("first", 1.0))
    other_scales = parse_job_options(
        {**JOB, "adapters": [{"name": "second", "scale": 0.6}, {"name": "first"}]}, LIMITS
    )
    assert renderer.plan(other_scales).batch_key != plan.batch_key  # blends of other scales never share a batch


def test_an_adapter_the_worker_has_not_loaded_is_refused_by_name(renderer):
    options = parse_job_options(
        {**JOB, "adapters": [{"name": "first"}, {"name": "missing"}, {"name": "gone"}]}, LIMITS
    )
    with pytest.raises(AdapterError, match=r"adapters 'missing', 'gone' are not loaded on this worker; available: "):
        renderer.plan(options)
