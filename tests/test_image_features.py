"""What users of other Stable Diffusion bots expect, checked against diffusers' own way of doing it on the
tiny model: several adapters blended in one image, img2img from an image a user gives, prompt weights and
long prompts, and Upscale and Vary."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imagine.contract import JobRejected, Limits, parse_job_options
from imagine.images import encode_image
from tests.helpers import photo, pixels, write_adapter
from worker.adapters import AdapterError, AdapterRegistry
from worker.pipeline import choose_placement, load_pipeline, resolve_base_model
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


# img2img ------------------------------------------------------------------------------------------


def test_img2img_equals_diffusers_img2img_and_a_higher_strength_moves_further(renderer, model_cache):
    from diffusers import StableDiffusionImg2ImgPipeline

    start = photo(64, 64)
    ours = {strength: render(renderer, image=start, strength=strength, adapter="none") for strength in (0.4, 0.9)}

    theirs = StableDiffusionImg2ImgPipeline.from_pretrained(
        resolve_base_model("tiny", model_cache), safety_checker=None, requires_safety_checker=False
    )
    reference = theirs(
        "a dog",
        image=Image.open(io.BytesIO(start)),
        strength=0.4,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    assert pixels(ours[0.4].images[0]) == reference.convert("RGB").tobytes()

    def distance(png: bytes) -> float:
        return float(
            np.abs(
                np.asarray(Image.open(io.BytesIO(png)), float) - np.asarray(Image.open(io.BytesIO(start)), float)
            ).mean()
        )

    assert distance(start) == 0 < distance(ours[0.4].images[0]) < distance(ours[0.9].images[0])


def test_an_image_renders_at_its_own_aspect_ratio_unless_a_size_is_given():
    wide = parse_job_options({"prompt": "a dog", "image": photo(300, 200)}, LIMITS)
    assert (wide.width, wide.height) == (624, 416)  # 3:2 at about 512² pixels, in multiples of 8
    assert wide.image == encode_image(photo(300, 200))  # the file travels as it was given
    given = parse_job_options({"prompt": "a dog", "image": photo(300, 200), "width": 256, "height": 256}, LIMITS)
    assert (given.width, given.height) == (256, 256)
    one_side = parse_job_options({"prompt": "a dog", "image": photo(300, 200), "width": 480}, LIMITS)
    assert (one_side.width, one_side.height) == (480, 320)
    # The worker parses the stored options again, and gets the same size.
    again = parse_job_options(wide.model_dump(), LIMITS)
    assert (again.width, again.height) == (624, 416)


def test_a_given_shape_crops_the_image_to_fill_it_and_aspects_fit_the_limits():
    from imagine.images import aspect_sizes, resized

    wide = Image.new("RGB", (200, 100), "red")
    wide.paste(Image.new("RGB", (50, 100), "blue"), (0, 0))  # a blue band on the left, cropped away
    square = resized(wide, 64, 64)
    red, _, blue = square.getpixel((1, 32))
    assert square.size == (64, 64) and red > 200 and blue < 40  # the centre, not the squeezed blue band
    assert set(aspect_sizes(64, 1024, 1024 * 1024)) == {"1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16"}
    assert aspect_sizes(64, 512, 512 * 512) == {"1:1": (512, 512)}  # the others' long side is over 512


def test_jobs_batch_together_only_with_the_same_image_and_strength(renderer):
    def key(**options):
        return renderer.plan(parse_job_options({**JOB, **options}, LIMITS)).batch_key

    first, second = photo(64, 64), photo(64, 64, "JPEG")
    assert key(image=first) == key(image=first, prompt="a cat")
    assert len({key(), key(image=first), key(image=second), key(image=first, strength=0.8)}) == 4


def _animated_webp() -> bytes:
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
    return buffer.getvalue()


def _turned_jpeg() -> bytes:
    """64×32 pixels stored, whose EXIF orientation (6: turn 90° clockwise) makes a 32×64 picture."""
    image = Image.new("RGB", (64, 32), "green")
    exif = image.getexif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def _transparent_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_image_is_decoded_as_its_viewer_shows_it():
    from imagine.images import decode_image

    def decoded(data: bytes) -> Image.Image:
        return decode_image(encode_image(data), LIMITS.max_image_bytes, LIMITS.max_image_pixels)

    assert decoded(_animated_webp()).getpixel((10, 10)) == (255, 0, 0)  # the first frame
    assert decoded(_turned_jpeg()).size == (32, 64)  # turned as its EXIF says
    assert decoded(_transparent_png()).getpixel((0, 0)) == (255, 255, 255)  # transparency over white
    assert decoded(photo(64, 64, "WEBP")).mode == "RGB"
    grey16 = io.BytesIO()
    Image.fromarray(np.full((64, 64), 40 * 256, np.uint16)).save(grey16, format="PNG")
    assert decoded(grey16.getvalue()).getpixel((5, 5)) == (40, 40, 40)  # 16 bits to 8, not clipped to white


def _bomb(side: int) -> bytes:
    """A PNG of side² pixels in a few kilobytes."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"image": "not base64!"}, r"image must be the base64 of a PNG, JPEG or WebP file"),
        ({"image": b"%PDF-1.4 not an image"}, r"image is not a PNG, JPEG or WebP file"),
        ({"image": photo(64, 64, "GIF")}, r"image is not a PNG, JPEG or WebP file"),
        ({"image": photo(64, 64)[:300]}, r"image could not be decoded .*truncated"),
        ({"image": photo(64, 64, "BMP")}, r"image is not a PNG, JPEG or WebP file"),
        ({"image": photo(1200, 1000)}, r"image is 1200×1000 = 1200000 pixels; at most 1000000"),
        ({"image": b"x" * 1_100_000}, r"image is 1\.0 MiB; at most 1\.0 MiB"),
        (
            {"image": photo(1000, 10)},
            r"image is 1000×10: kept in shape, it would render at 5120×48, but each side must be from 64 to 1024",
        ),
        ({"image": photo(64, 64), "strength": 1.5}, r"strength must be a number from 0\.0 to 1\.0 \(got 1\.5\)"),
        ({"image": photo(64, 64), "strength": -0.1}, r"strength must be a number from 0\.0 to 1\.0"),
        ({"image": photo(64, 64), "strength": 0.02}, r"strength × num_inference_steps must be at least 1"),
        ({"strength": 0.3}, r"strength applies to an image to start from: give image too"),
        ({"image": 42}, r"image: Input should be a valid string"),
    ],
)
def test_a_bad_image_or_strength_is_refused_with_what_to_do(options, message):
    limits = Limits(max_image_bytes=2**20, max_image_pixels=1_000_000)
    with pytest.raises(JobRejected, match=message):
        parse_job_options({"prompt": "a dog", **options}, limits)


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    bomb = _bomb(5000)
    assert len(bomb) < 100_000
    with pytest.raises(JobRejected, match=r"image is 5000×5000 = 25000000 pixels; at most 16777216"):
        parse_job_options({"prompt": "a dog", "image": bomb}, LIMITS)
    # Beyond Pillow's own bound, Pillow refuses it from its header first.
    with pytest.raises(JobRejected, match=r"image has far more than 16777216 pixels: send a smaller image"):
        parse_job_options({"prompt": "a dog", "image": _bomb(20000)}, LIMITS)


# Upscale and Vary -----------------------------------------------------------------------------------


def test_upscale_doubles_the_size_within_the_limits_and_refuses_past_them():
    from imagine.followups import upscale_options, vary_options

    job = parse_job_options({"prompt": "a dog", "num_inference_steps": 2, "seed": 40}, LIMITS).model_dump()
    upscale = parse_job_options(upscale_options(job, photo(512, 512), 41, LIMITS), LIMITS)
    assert (upscale.width, upscale.height, upscale.seed, upscale.strength) == (1024, 1024, 41, 0.3)
    assert upscale.num_inference_steps == 4  # enough for one step at strength 0.3
    tall = {**job, "width": 440, "height": 592}
    assert upscale_options(tall, b"", 41, LIMITS)["width"] == 760  # as near twice as MAX_SIDE allows
    with pytest.raises(JobRejected, match=r"this image \(1024×1024\) is as large as this service renders"):
        upscale_options({**job, "width": 1024, "height": 1024}, b"", 41, LIMITS)

    subtle = parse_job_options(vary_options({**job, "num_images_per_prompt": 2}, photo(512, 512), "subtle"), LIMITS)
    assert (subtle.width, subtle.strength, subtle.num_images_per_prompt) == (512, 0.35, 2) and subtle.seed != 40


# Prompt weights and long prompts ------------------------------------------------------------------

LONG = "a lighthouse at dusk, " + "waves crashing on the rocks, " * 30


def test_a_weight_changes_the_image_and_a_weight_of_one_changes_nothing(renderer):
    plain = render(renderer, prompt="a dog on a beach", adapter="none")
    assert pixels(render(renderer, prompt="a (dog:1.0) on a beach", adapter="none").images[0]) == pixels(
        plain.images[0]
    )
    for weighted in ("a (dog:1.5) on a beach", "a (dog) on a beach", "a [dog] on a beach"):
        assert pixels(render(renderer, prompt=weighted, adapter="none").images[0]) != pixels(plain.images[0])


def test_a_long_prompt_is_encoded_whole_unless_weights_are_off(renderer, tiny_pipe):
    whole = render(renderer, prompt=LONG, adapter="none")
    assert whole.warnings == []
    plan = renderer.plan(parse_job_options({**JOB, "prompt": LONG}, LIMITS))
    embeds, _ = renderer.prompt_encoder.encode([LONG], [""])
    assert plan.batch_key.prompt_chunks == embeds.shape[1] // 77 > 1
    assert plan.batch_key != renderer.plan(parse_job_options(JOB, LIMITS)).batch_key  # never batched with a short one

    off = Limits(prompt_weights=False)
    plain_renderer = Renderer(tiny_pipe, renderer.adapters, "", allow_safety_checker_off=False, limits=off)
    cut = plain_renderer.render(parse_job_options({**JOB, "prompt": LONG, "adapter": "none"}, off))
    assert any("longer than the text encoder's 77 tokens" in warning for warning in cut.warnings)
    assert pixels(cut.images[0]) != pixels(whole.images[0])
    # Off, brackets are plain text: the prompt is not read for weights, and nothing is refused.
    assert parse_job_options({"prompt": "a (smiley"}, off).prompt == "a (smiley"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("a (dog on a beach", r"prompt: the '\(' at character 3 is never closed; close it with '\)', or write `\\\(`"),
        ("a dog :1.5) on a beach", r"prompt: the '\)' at character 7 closes nothing; write `\\\(` for a parenthesis"),
        ("a (dog] on a beach", r"prompt: the '\]' at character 7 closes the '\(' at character 3, which needs '\)'"),
        ("a (dog:25) on a beach", r"prompt: the weight 25 at character 7 must be from 0 to 10"),
        ("((a dog:5):3)", r"prompt: the weights around character 11 multiply to 15; at most 10"),
        ("a <lora:style:0.8> dog", r"prompt: the <lora:style:0.8> at character 3 is A1111's way to add an adapter"),
        ("()", r"prompt: nothing is left to draw once its weights are read"),
    ],
)
def test_a_prompt_whose_weights_do_not_parse_is_refused_saying_where(prompt, message):
    with pytest.raises(JobRejected, match=message):
        parse_job_options({"prompt": prompt}, LIMITS)
    if prompt != "()":  # an empty negative prompt is allowed
        with pytest.raises(JobRejected, match=message.replace("prompt:", "negative_prompt:")):
            parse_job_options({"prompt": "a dog", "negative_prompt": prompt}, LIMITS)


def test_weights_read_as_a1111_reads_them():
    from imagine.prompts import weighted_fragments

    assert weighted_fragments("a (dog:1.0), running") == [("a dog, running", 1.0)]
    assert weighted_fragments("a (red [car]:1.5) \\(x\\)") == [
        ("a ", 1.0),
        ("red ", 1.5),
        ("car", 1.5 / 1.1),
        (" (x)", 1.0),
    ]
    assert weighted_fragments("((big)) house, time: 10:30") == [("big", 1.1 * 1.1), (" house, time: 10:30", 1.0)]
    # A bracket that closes nothing is text, and so are smileys, as in A1111.
    assert weighted_fragments("a cat :) and a dog) ;(") == [("a cat :) and a dog) ;(", 1.0)]
