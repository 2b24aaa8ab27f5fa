"""Serving fast without serving wrong: batches, the fused default adapter, adapters swapped in place, and a
compiled pipeline, each checked against the plain way of rendering the same job, on the tiny model."""

from __future__ import annotations

import uuid

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch._dynamo.utils import counters

from imagine.client import ImagineClient
from imagine.contract import Limits, parse_job_options
from tests.helpers import (
    TARGET_MODULES,
    make_lora_state,
    nearly_the_same,
    pixels,
    rewrite_adapter,
    run_cli,
    service_settings,
    wait_for,
    write_adapter,
)
from worker.adapters import AdapterRegistry
from worker.pipeline import choose_placement, compile_pipeline, load_pipeline, serve_compiled_shapes_only
from worker.renderer import Renderer
from worker.service import warm_up_batches
from worker.settings import WorkerSettings

LIMITS = Limits()
# A worker under this address-space limit renders 4 images of SIDE² (peak 1.9 GiB) and not 8 (2.5 GiB): the
# VAE decoder's activations at full resolution. Measured: /proc/PID/status VmPeak of a worker without a limit.
SIDE, MEMORY_LIMIT = 768, int(2.2 * 2**30)


def job(**options):
    return parse_job_options(
        {"prompt": "a dog", "num_inference_steps": 3, "width": 64, "height": 64, "seed": 3, **options}, LIMITS
    )


@pytest.fixture
def lora_dir(tmp_path, adapter_weights):
    folder = tmp_path / "loradir"
    write_adapter(folder / "flickr30k", "peft", adapter_weights["v1"])
    write_adapter(folder / "twin", "diffusers", adapter_weights["v1"])  # the same weights, another layout
    write_adapter(folder / "other", "diffusers", adapter_weights["v2"])
    return folder


def rendered(renderer: Renderer, jobs) -> list[list[bytes]]:
    """Each job's PNGs from one batch."""
    entries = renderer.entries([(options, renderer.plan(options)) for options in jobs])
    return [output.images for output in renderer.finish_images(renderer.render_batch(entries))]


def rendered_uncompiled(renderer: Renderer, jobs) -> bool:
    """Whether a compiled renderer ran some of the batch's model calls uncompiled."""
    return renderer.render_batch(renderer.entries([(options, renderer.plan(options)) for options in jobs])).uncompiled


def test_a_job_alone_is_diffusers_own_render(tiny_pipe, lora_dir):
    """The renderer's path (CPU timesteps, decoded tensors, our PNGs) changes no pixel of the pipeline's own."""
    stock_scheduler = tiny_pipe.scheduler
    renderer = Renderer(tiny_pipe, AdapterRegistry(tiny_pipe, lora_dir), "", allow_safety_checker_off=False)
    ours = [pixels(png) for png in renderer.render(job(num_images_per_prompt=2, seed=11)).images]
    generators = [torch.Generator().manual_seed(seed) for seed in (11, 12)]
    tiny_pipe.scheduler = stock_scheduler
    theirs = tiny_pipe(
        "a dog", num_inference_steps=3, width=64, height=64, num_images_per_prompt=2, generator=generators
    ).images
    assert ours == [image.convert("RGB").tobytes() for image in theirs]


def test_a_batch_renders_each_job_as_it_would_alone(tiny_pipe, lora_dir):
    renderer = Renderer(tiny_pipe, AdapterRegistry(tiny_pipe, lora_dir), "", allow_safety_checker_off=False)
    jobs = [
        job(prompt="a dog", seed=1, num_images_per_prompt=2),
        job(prompt="a cat on a sofa", seed=7, negative_prompt="blurry"),
        job(prompt="a red house", seed=3),
    ]
    batched = rendered(renderer, jobs)
    alone = [renderer.render(options).images for options in jobs]
    assert [len(images) for images in batched] == [2, 1, 1]
    for together, apart in zip(batched, alone, strict=True):
        assert all(nearly_the_same(a, b) for a, b in zip(together, apart, strict=True))
    # ...and each is its own: another prompt, another seed, another image.
    assert len({pixels(png) for images in batched for png in images}) == 4


def test_the_default_adapter_fused_renders_as_unfused_and_the_base_weights_come_back_exactly(
    tiny_pipe, lora_dir, model_cache
):
    # An adapter of a trained one's strength: the test adapters' are made large, to tell images apart.
    fresh_unet = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False).unet
    trained_like = make_lora_state(fresh_unet, seed=4, alpha=8.0, std=0.1)
    write_adapter(lora_dir / "flickr30k", "peft", trained_like)
    write_adapter(lora_dir / "twin", "diffusers", trained_like)
    registry = AdapterRegistry(tiny_pipe, lora_dir, fuse="flickr30k")
    for name in ("flickr30k", "twin", "other"):
        registry.load(name)
    unet = tiny_pipe.unet
    base = {key: value.clone() for key, value in unet.state_dict().items() if "lora_" not in key}
    torch.manual_seed(0)
    sample, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)

    def output(adapters) -> torch.Tensor:
        registry.activate(adapters)
        with torch.no_grad():
            return unet(sample, 10, states).sample

    for scale in (1.0, 0.6):
        unfused = output((("twin", scale),))  # the same weights, as LoRA layers
        fused = output((("flickr30k", scale),))
        assert any(layer.merged for layer in registry.layers())
        assert torch.allclose(fused, unfused, atol=1e-5, rtol=0)
    for _ in range(20):  # switching back and forth never drifts the base weights
        output((("flickr30k", 1.0),))
        output((("other", 0.5),))
    output(())
    assert not any(layer.merged for layer in registry.layers())
    current = {key: value for key, value in unet.state_dict().items() if "lora_" not in key}
    assert all(torch.equal(current[key], value) for key, value in base.items())


def test_a_new_version_that_fits_is_swapped_in_place_and_renders_like_a_fresh_load(
    tiny_pipe, lora_dir, model_cache, adapter_weights
):
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    renderer = Renderer(tiny_pipe, registry, "", allow_safety_checker_off=False)
    first = registry.load("twin")
    write_adapter(lora_dir / "twin", "diffusers", adapter_weights["v2"])
    second = registry.load("twin")
    assert second.internal_name == first.internal_name and second.version != first.version  # no module injected
    swapped = renderer.render(job(adapter="twin")).images[0]

    fresh_pipe = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
    fresh_registry = AdapterRegistry(fresh_pipe, lora_dir)
    fresh_registry.load("twin")
    fresh = Renderer(fresh_pipe, fresh_registry, "", allow_safety_checker_off=False).render(job(adapter="twin"))
    assert pixels(swapped) == pixels(fresh.images[0])


def test_versions_in_every_layout_swapped_in_turn_render_like_fresh_loads(
    tiny_pipe, lora_dir, model_cache, adapter_weights
):
    """A kohya file carries its alphas apart; the PEFT and diffusers files fold them in: whichever comes after
    which, the layers' scaling follows the file."""
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    renderer = Renderer(tiny_pipe, registry, "", allow_safety_checker_off=False)
    fresh_pipe = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
    for step, (layout, version) in enumerate([("peft", "v1"), ("kohya", "v2"), ("diffusers", "v1"), ("peft", "v2")]):
        path = rewrite_adapter(lora_dir / "swapped", layout, adapter_weights[version])
        if layout == "kohya":  # the same weights, its alphas twice the rank: the scaling is the file's
            state = load_file(path)
            save_file(
                {
                    key: tensor * (2 if key.endswith(".alpha") else 0.5 if "lora_up" in key else 1)
                    for key, tensor in state.items()
                },
                path,
            )
        loaded = registry.load("swapped")
        assert loaded.internal_name == "adapter00000001" and loaded.layout == layout  # swapped in place every time
        fresh_registry = AdapterRegistry(fresh_pipe, lora_dir)
        fresh_registry.load("swapped")
        fresh = Renderer(fresh_pipe, fresh_registry, "", allow_safety_checker_off=False)
        assert nearly_the_same(
            renderer.render(job(adapter="swapped")).images[0], fresh.render(job(adapter="swapped")).images[0], 0
        ), f"step {step}: {layout} {version}"
        fresh_pipe.delete_adapters(fresh_registry.loaded["swapped"].internal_name)


def test_a_dora_version_is_copied_into_place_and_a_swap_diffusers_fails_never_loses_the_adapter(
    tiny_pipe, lora_dir, model_cache, caplog
):
    def unet():
        return load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False).unet

    def like_a_fresh_load(name: str) -> bool:
        fresh_pipe = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
        fresh_registry = AdapterRegistry(fresh_pipe, lora_dir)
        fresh_registry.load(name)
        fresh = Renderer(fresh_pipe, fresh_registry, "", allow_safety_checker_off=False).render(job(adapter=name))
        return pixels(renderer.render(job(adapter=name)).images[0]) == pixels(fresh.images[0])

    registry = AdapterRegistry(tiny_pipe, lora_dir)
    renderer = Renderer(tiny_pipe, registry, "", allow_safety_checker_off=False)
    write_adapter(lora_dir / "dora", "peft", make_lora_state(unet(), seed=1, alpha=8.0, use_dora=True))
    first, *_ = [registry.load(name) for name in ("dora", "other", "flickr30k")]
    renderer.render(job(adapter="dora"))
    rewrite_adapter(lora_dir / "dora", "peft", make_lora_state(unet(), seed=2, alpha=8.0, use_dora=True))
    assert registry.load("dora").internal_name == first.internal_name  # magnitudes and matrices copied in place
    assert like_a_fresh_load("dora")

    # As many modules as the loaded version, not the same ones. In a kohya file that shows only as diffusers'
    # hotswap fails, and it drops the adapter it was swapping into on its way out (its layers too, where it was
    # the active one); in a diffusers file it shows before. Either way the new version loads beside and serves,
    # and nothing is left of the old one, active or not.
    for layout, active, targets in (
        ("kohya", "flickr30k", ["to_k", "to_v", "to_out.0", "conv1"]),
        ("diffusers", "other", TARGET_MODULES),
    ):
        caplog.clear()
        renderer.render(job(adapter=active))
        before = registry.loaded["other"]
        state = make_lora_state(unet(), seed=len(targets), alpha=8.0, targets=targets)
        rewrite_adapter(lora_dir / "other", layout, state)
        after = registry.load("other")
        assert after.internal_name != before.internal_name and after.version != before.version
        assert not [layer for layer in registry.layers() if before.internal_name in layer.lora_A]
        assert ("diffusers dropped its previous version" in caplog.text) == (layout == "kohya")
        assert like_a_fresh_load("other")


def test_a_swap_into_one_adapter_leaves_the_others_as_they_were(tiny_pipe, lora_dir, adapter_weights):
    """peft's hotswap finds the tensors of the adapter it swaps into by its name as a substring: the eleventh
    adapter loaded must not be taken for the first's."""
    registry = AdapterRegistry(tiny_pipe, lora_dir)
    renderer = Renderer(tiny_pipe, registry, "", allow_safety_checker_off=False)
    for number in range(11):
        write_adapter(lora_dir / f"n{number}", "diffusers", adapter_weights["v1" if number % 2 else "v2"])
        registry.load(f"n{number}")
    before = [pixels(renderer.render(job(adapter=f"n{number}")).images[0]) for number in (9, 10)]
    rewrite_adapter(lora_dir / "n0", "kohya", adapter_weights["v1"])  # alphas apart: diffusers' hotswap swaps it
    assert registry.load("n0").internal_name == "adapter00000001"
    assert [pixels(renderer.render(job(adapter=f"n{number}")).images[0]) for number in (9, 10)] == before


def test_after_the_warm_up_no_job_compiles_and_reloads_and_switches_never_recompile(
    tiny_pipe, lora_dir, adapter_weights
):
    registry = AdapterRegistry(tiny_pipe, lora_dir, fuse="flickr30k", scales_as_tensors=True)
    renderer = Renderer(tiny_pipe, registry, "flickr30k", allow_safety_checker_off=False)
    tiny_pipe.enable_lora_hotswap(target_rank=8)  # before the first adapter, as the worker does with COMPILE
    for name in ("flickr30k", "other"):
        registry.load(name)
    paths = [job(), job(adapter="other"), job(adapter="none")]  # fused, LoRA layers, the base model
    unwarmed = [job(width=96), job(width=72), job(prompt="a dog, " + "on a beach, " * 30)]
    other_schedulers = [job(scheduler=name) for name in ("euler", "euler_ancestral", "ddim", "dpmpp_2m")]
    eager = [renderer.render(options).images[0] for options in [*paths, *other_schedulers]]
    eager_unwarmed = [renderer.render(options).images for options in unwarmed]

    # A backend that runs the graphs dynamo captures as they are: what is checked is the capture and its guards.
    renderer.uncompiled_calls = compile_pipeline(tiny_pipe, "eager", None)
    settings = WorkerSettings(compile=True, default_adapter="flickr30k", batch_max_images=4, warmup_steps=1,
                              compile_sizes="64x64")  # fmt: skip
    assert not any(rendered_uncompiled(renderer, jobs) for jobs in warm_up_batches(settings, list(registry.loaded)))
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            # Each covered by the warm-up, whatever the scheduler: the Euler schedulers' timesteps are floats,
            # the default's integers, and the compiled UNet gets floats from every one.
            warm = [renderer.render(options).images[0] for options in [*paths, *other_schedulers]]
            for adapter in ("flickr30k", "other", "none"):  # 1, 2 and 4 images warmed up: 3 takes 2's graph
                renderer.render(job(adapter=adapter, num_images_per_prompt=3))
            with pytest.raises(RuntimeError, match="Detected recompile"):
                renderer.render(unwarmed[1])
        assert all(nearly_the_same(a, b) for a, b in zip(warm, eager, strict=True))

        # As the worker serves after its warm-up: a shape the warm-up did not compile renders uncompiled,
        # and says so (one image without guidance, a UNet batch of one, too).
        serve_compiled_shapes_only()
        graphs = counters["stats"]["unique_graphs"]
        assert [renderer.render(options).images for options in unwarmed] == eager_unwarmed
        assert counters["stats"]["unique_graphs"] == graphs
        assert all(rendered_uncompiled(renderer, [options]) for options in [*unwarmed, job(guidance_scale=1.0)])
        assert not any(rendered_uncompiled(renderer, [options]) for options in paths)

        write_adapter(lora_dir / "other", "diffusers", adapter_weights["v1"])  # a new version of the same shapes
        with torch.compiler.set_stance("fail_on_recompile"):
            registry.load("other")
            for options in [*paths, job(adapter="other", adapter_scale=0.5), job(adapter_scale=0.7), *paths]:
                renderer.render(options)
        # The reloaded adapter now holds the fused one's weights: both paths render the same image.
        assert nearly_the_same(renderer.render(job(adapter="other")).images[0], renderer.render(job()).images[0])
    finally:
        torch.compiler.set_stance("default")  # the stance is the process's; the next tests compile as usual


@pytest.mark.integration
def test_a_compiled_worker_serves_and_counts_what_it_renders_uncompiled(start_worker):
    # The eager backend: what a worker does around the compiler is checked, not the compiler's speed.
    worker = start_worker(name="compiled", COMPILE="true", COMPILE_BACKEND="eager", COMPILE_SIZES="64x64",
                          BATCH_MAX_IMAGES="1")  # fmt: skip
    client = ImagineClient(worker.settings)
    small = {"prompt": "a dog", "num_inference_steps": 2, "width": 64, "height": 64, "adapter": "none"}
    jobs = [
        {**small},  # the shape the warm-up compiled
        {**small, "width": 72},
        {**small, "scheduler": "euler"},  # another scheduler, the same graph
        {**small, "guidance_scale": 1.0},
        {**small, "width": 72, "seed": 5},  # the same shape again: counted, not logged again
    ]
    for options in jobs:
        submitted = client.submit(options)
        assert list(client.events(submitted.job_id))[-1].type == "done"
    assert client.queue_stats().counters.uncompiled_renders == 3
    log = worker.log_path.read_text()
    assert "warmed up in" in log and "64x64 ×1, adapters none" in log
    uncompiled = [line for line in log.splitlines() if "rendered uncompiled, at eager speed" in line]
    assert len(uncompiled) == 2, uncompiled
    assert "covers 72x64 ×1, adapters none (" in uncompiled[0]
    assert "covers 64x64 ×1, adapters none, no guidance (" in uncompiled[1]
    queue = run_cli(worker.settings, "imagine-admin", "queue")
    assert "uncompiled:      3 batches at eager speed on compiled workers" in queue.stdout, queue.stderr


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ("680by384", "'680by384' is not a size: write WIDTHxHEIGHT, e.g. 680x384"),
        ("5²x64", "'5²x64' is not a size"),
        ("680x384,681x384", "COMPILE_SIZES: 681x384 is not a size jobs may have: width must be a multiple of 8"),
        ("2048x512", "COMPILE_SIZES: 2048x512 is not a size jobs may have: width must be an integer from 64 to"),
    ],
)
def test_compile_sizes_are_sizes_a_job_may_have(sizes, message):
    with pytest.raises(ValidationError, match=message):
        WorkerSettings(compile_sizes=sizes)
    assert WorkerSettings(compile_sizes="680x384, 384X680").compile_sizes == [(680, 384), (384, 680)]


def alone_pngs(model_cache, lora_dir, options: dict) -> list[bytes]:
    """What the job renders alone, in this process, on the tiny model, as the worker does (the default adapter
    fused): the reference for a batched render."""
    pipe = load_pipeline("tiny", choose_placement("cpu", "float32"), model_cache, safety_checker=False)
    registry = AdapterRegistry(pipe, lora_dir, fuse="flickr30k")
    for name in ("flickr30k", "other"):
        registry.load(name)
    output = Renderer(pipe, registry, "", allow_safety_checker_off=False).render(parse_job_options(options, LIMITS))
    return output.images


def keep_busy(client: ImagineClient):
    """A long job the worker renders while the test queues the jobs to batch; cancel it to let them run."""
    busy = client.submit({"prompt": "busy", "width": 384, "height": 384, "num_inference_steps": 60, "adapter": "none"})
    wait_for(lambda: client.job(busy.job_id).state == "running", 30, "the worker to be busy")
    return busy


@pytest.mark.integration
@pytest.mark.slow
def test_queued_jobs_render_in_batches_each_keeping_its_own_life(redis_server, start_worker, model_cache, lora_dir):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    worker = start_worker(
        settings, name="batcher", lora_dir=lora_dir, BATCH_MAX_IMAGES="6", PREVIEW_INTERVAL_S="0.001"
    )
    client = ImagineClient(settings)
    busy = keep_busy(client)
    # Few steps: a batched render drifts from the same render alone with every step (see nearly_the_same).
    small = {"num_inference_steps": 3, "width": 64, "height": 64}
    mix = [
        {"prompt": "a dog", "seed": 1, "num_images_per_prompt": 2, "adapter": "flickr30k", **small},
        {"prompt": "a cat", "seed": 5, "negative_prompt": "blurry", "adapter": "flickr30k", **small},
        {"prompt": "a dog", "seed": 1, "adapter": "other", **small},  # another adapter: another batch
        {"prompt": "a boat", "seed": 9, "adapter": "flickr30k", **small, "width": 128},  # another size
        {"prompt": "a tree", "seed": 2, "num_images_per_prompt": 3, "adapter": "flickr30k", **small},
        {"prompt": "a bird", "seed": 4, "adapter": "flickr30k", **small},  # no room left: 2 + 1 + 3 = 6
    ]
    jobs = [client.submit(options) for options in mix]
    client.cancel(busy.job_id)

    for submitted, options in zip(jobs, mix, strict=True):
        events = list(client.events(submitted.job_id))
        kinds = [event.type for event in events]
        assert kinds.count("started") == 1 and kinds[-1] == "done", kinds
        assert any(event.type == "step" and event.preview_png for event in events)  # its own preview
        result = client.result(submitted.job_id)
        assert result.meta.prompt == options["prompt"] and result.meta.seeds[0] == options["seed"]
        alone = alone_pngs(model_cache, lora_dir, options)
        # Every value within one level of 255. Rendered in another process (its own thread count: other kernel
        # splits) with the tests' adapter fused (far stronger than a trained one), up to a sixth of the values
        # move by that level (measured: 1.4 to 15 %); another prompt or seed moves most values by many levels.
        assert all(nearly_the_same(a, b, max_share=0.25) for a, b in zip(result.images, alone, strict=True))
    log = worker.log_path.read_text()
    batched = [line for line in log.splitlines() if "in one batch" in line]
    assert len(batched) == 1 and all(job.job_id in batched[0] for job in (jobs[0], jobs[1], jobs[4]))


@pytest.mark.integration
@pytest.mark.slow
def test_a_job_cancelled_in_a_batch_leaves_it_and_the_others_go_on(redis_server, start_worker):
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    start_worker(settings, name="canceller", BATCH_MAX_IMAGES="3")
    client = ImagineClient(settings)
    busy = keep_busy(client)
    long = {"num_inference_steps": 60, "width": 256, "height": 256, "adapter": "none"}
    jobs = [client.submit({"prompt": f"job {n}", "seed": n, **long}) for n in range(3)]
    client.cancel(busy.job_id)
    leaving = jobs[1].job_id
    wait_for(
        lambda: any(event.type == "step" for _, event in client.store.read_events(leaving)), 60, "the batch to render"
    )
    assert {client.job(job.job_id).state for job in jobs} == {"running"}  # together
    assert client.cancel(leaving) == "cancelling"
    last = list(client.events(leaving))[-1]
    assert last.type == "cancelled" and last.message == "Cancelled while rendering."
    assert all(client.job(job.job_id).state == "running" for job in (jobs[0], jobs[2]))  # they render on
    assert [list(client.events(job.job_id))[-1].type for job in (jobs[0], jobs[2])] == ["done", "done"]


@pytest.mark.integration
@pytest.mark.slow
def test_a_batch_out_of_memory_is_split_and_every_job_delivered(redis_server, start_worker):
    # What fits is a matter of bytes (see MEMORY_LIMIT), not of the machine's speed.
    settings = service_settings(redis_server.url, f"t{uuid.uuid4().hex[:8]}")
    worker = start_worker(
        settings, name="tight", memory_limit=MEMORY_LIMIT, BATCH_MAX_IMAGES="8", MALLOC_ARENA_MAX="2"
    )
    client = ImagineClient(settings)
    busy = keep_busy(client)
    big = {"width": SIDE, "height": SIDE, "num_inference_steps": 1, "num_images_per_prompt": 4, "adapter": "none"}
    jobs = [client.submit({"prompt": f"big {n}", "seed": n, **big}) for n in range(2)]
    client.cancel(busy.job_id)
    for job in jobs:
        assert list(client.events(job.job_id))[-1].type == "done"
        assert len(client.result(job.job_id).images) == 4
    log = worker.log_path.read_text()
    assert "renders with 1 more in one batch" in log
    assert "a batch of 2 jobs ran out of memory; rendering it in two halves" in log
    assert client.queue_stats().counters.failures.get("out_of_memory", 0) == 0
