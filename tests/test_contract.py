"""The job contract: defaults, the drawn seed, and a clear message for each kind of bad option."""

from __future__ import annotations

import subprocess
import sys

import pytest

from imagine.contract import JobOptions, JobRejected, Limits, parse_job_options

LIMITS = Limits(max_steps=100, max_images=4, max_side=1024, max_pixels=1024 * 1024)


def test_defaults_and_drawn_seed():
    options = parse_job_options({"prompt": "  a dog on a beach  "}, LIMITS)
    assert options.prompt == "a dog on a beach"
    assert (options.num_inference_steps, options.guidance_scale, options.width, options.height) == (30, 7.5, 512, 512)
    assert options.adapter is None and options.scheduler == "default"
    assert isinstance(options.seed, int)
    four = parse_job_options({"prompt": "x", "seed": 41, "num_images_per_prompt": 4}, LIMITS)
    assert four.seeds == [41, 42, 43, 44]


def test_revalidating_parsed_options_keeps_them():
    options = parse_job_options({"prompt": "x", "seed": 5, "adapter": "none"}, LIMITS)
    assert parse_job_options(options.model_dump(), LIMITS) == options
    blended = parse_job_options({"prompt": "x", "adapters": [{"name": "a", "scale": 0.8}, {"name": "b"}]}, LIMITS)
    assert parse_job_options(blended.model_dump(), LIMITS) == blended


def test_the_adapters_a_job_asks_for():
    def blend(**options):
        return parse_job_options({"prompt": "x", **options}, LIMITS).blend

    assert blend() is None  # the worker's default adapter
    assert blend(adapter="none") == []
    assert blend(adapter="style", adapter_scale=0.5) == [("style", 0.5)]
    assert blend(adapters=[{"name": "a", "scale": 0.8}, {"name": "b"}]) == [("a", 0.8), ("b", 1.0)]
    assert Limits(max_adapters=1) and parse_job_options(
        {"prompt": "x", "adapters": [{"name": "a"}]}, Limits(max_adapters=1)
    ).blend == [("a", 1.0)]
    with pytest.raises(JobRejected, match="at most 1 in one job"):
        parse_job_options({"prompt": "x", "adapters": [{"name": "a"}, {"name": "b"}]}, Limits(max_adapters=1))


@pytest.mark.parametrize(
    ("changes", "option", "message"),
    [
        ({"prompt": "   "}, "prompt", "prompt must not be empty"),
        ({"prompt": "x" * 2001}, "prompt", "at most 2000 characters"),
        ({"num_inference_steps": 0}, "num_inference_steps", "an integer from 1 to 100 (got 0)"),
        ({"num_inference_steps": 500}, "num_inference_steps", "an integer from 1 to 100 (got 500)"),
        ({"num_inference_steps": "many"}, "num_inference_steps", "an integer from 1 to 100 (got 'many')"),
        ({"num_inference_steps": 2.5}, "num_inference_steps", "from 1 to 100"),
        ({"guidance_scale": 31}, "guidance_scale", "a number from 0.0 to 30.0 (got 31"),
        ({"width": 100}, "width", "width must be a multiple of 8 (got 100)"),
        ({"height": 2048}, "height", "an integer from 64 to 1024 (got 2048)"),
        ({"width": 32}, "width", "from 64 to 1024"),
        ({"seed": -1}, "seed", "from 0 to 4294967295"),
        ({"seed": 2**32 - 2, "num_images_per_prompt": 4}, "seed", "one seed per image"),
        ({"num_images_per_prompt": 5}, "num_images_per_prompt", "from 1 to 4 (got 5)"),
        ({"adapter": "../../etc/passwd"}, "adapter", "no path"),
        ({"adapter": "a/b"}, "adapter", "no path"),
        ({"adapter_scale": 3}, "adapter_scale", "from 0.0 to 2.0"),
        ({"scheduler": "magic"}, "scheduler", "scheduler must be one of default, pndm, ddim"),
        ({"safety_checker": "maybe"}, "safety_checker", "safety_checker"),
        ({"steps": 20}, "steps", "unknown option 'steps'"),
        # Several adapters
        ({"adapters": []}, "adapters", "at least one adapter; for the base model alone give adapter 'none'"),
        ({"adapters": [{"name": "none"}]}, "adapters", "give adapter 'none' instead"),
        ({"adapters": [{"name": "a/b"}]}, "adapters", "no path"),
        ({"adapters": [{"name": "a"}, {"name": "b"}, {"name": "a"}]}, "adapters", "a is listed twice"),
        ({"adapters": [{"name": f"a{n}"} for n in range(5)]}, "adapters", "at most 4 in one job (got 5)"),
        ({"adapters": [{"name": "a", "scale": 2.5}]}, "adapters", "the scale of a must be a number from 0.0 to 2.0"),
        ({"adapters": [{"name": "a", "scale": "high"}]}, "adapters", "adapters.0.scale: "),
        ({"adapters": [{"name": "a", "weight": 1}]}, "adapters", "adapters.0.weight: "),
        ({"adapters": "a,b"}, "adapters", "adapters: "),
        ({"adapters": [{"name": "a"}], "adapter": "b"}, "adapters", "either adapters"),
        ({"adapters": [{"name": "a"}], "adapter_scale": 0.5}, "adapters", "either adapters"),
    ],
)
def test_bad_option_is_refused_with_its_range(changes, option, message):
    with pytest.raises(JobRejected) as refused:
        parse_job_options({"prompt": "a dog", **changes}, LIMITS)
    assert refused.value.option == option
    assert message in str(refused.value)


def test_pixel_budget_is_a_setting():
    small = Limits(max_pixels=256 * 256)
    with pytest.raises(JobRejected, match=r"at most 65536 pixels \(got 512×512 = 262144\)"):
        parse_job_options({"prompt": "x"}, small)
    assert parse_job_options({"prompt": "x", "width": 256, "height": 256}, small).width == 256


def test_missing_prompt_and_non_object():
    with pytest.raises(JobRejected, match="prompt is required"):
        parse_job_options({}, LIMITS)
    with pytest.raises(JobRejected, match="must be an object"):
        parse_job_options(["a dog"], LIMITS)


def test_seeds_need_a_drawn_seed():
    with pytest.raises(RuntimeError):
        _ = JobOptions(prompt="x").seeds


def test_contract_and_client_import_no_torch():
    code = "import sys, imagine.contract, imagine.client, imagine.cli, imagine.admin; print('torch' in sys.modules)"
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert answer.stdout.strip() == "False"
